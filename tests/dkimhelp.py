"""
What the DKIM tests share (a test tool, not a test module): keys written
to a temporary directory, and verification by dkimpy against an
in-process DNS answer built from the keys' TXT records (never real DNS).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import dkim

from mailgw.dkim.config import DomainSigning
from mailgw.dkim.keys import LoadedKey, generateKey, loadKey

_KEYS: dict[tuple[str, int], bytes] = {}


def writeKey(directory: str, name: str, algorithm: str = "rsa-sha256", bits: int = 2048) -> str:
    """A new key file (mode 0600) in C{directory}; RSA keys are made once per run."""
    if (algorithm, bits) not in _KEYS or algorithm != "rsa-sha256":
        _KEYS[(algorithm, bits)] = generateKey(algorithm, bits)[0]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(_KEYS[(algorithm, bits)])
    os.chmod(path, 0o600)
    return path


def makeKey(
    directory: str,
    domain: str = "example.org",
    selector: str = "sel",
    algorithm: str = "rsa-sha256",
    **settings: object,
) -> LoadedKey:
    path = writeKey(directory, f"{domain}.{selector}.key", algorithm)
    return loadKey(DomainSigning(domain, selector, path, algorithm, **settings))  # type: ignore[arg-type]


def dnsFor(records: dict[str, str]):  # type: ignore[no-untyped-def]
    """A dkimpy C{dnsfunc} answering TXT queries from C{records} (name: value)."""
    answers = {name.rstrip(".").lower(): value.encode("ascii") for name, value in records.items()}

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        if isinstance(name, bytes):
            name = name.decode("ascii")
        return answers.get(name.rstrip(".").lower())

    return dnsfunc


def recordsOf(keys: Iterable[LoadedKey]) -> dict[str, str]:
    return {key.recordName: key.record for key in keys}


def signatureCount(message: bytes) -> int:
    return len(re.findall(rb"(?im)^DKIM-Signature:", message.split(b"\r\n\r\n", 1)[0]))


def verifyAll(message: bytes, records: dict[str, str]) -> list[bool]:
    """Whether each DKIM-Signature of C{message} verifies (dkimpy), top first."""
    results = []
    for index in range(signatureCount(message)):
        try:
            results.append(bool(dkim.DKIM(message).verify(index, dnsfunc=dnsFor(records))))
        except dkim.DKIMException:
            results.append(False)
    return results


def zoneValue(zoneText: str) -> tuple[str, str]:
    """(name, TXT value) of the zone file lines ``mailgw dkim`` prints: strings joined."""
    match = re.search(r"^(\S+)\s+IN\s+TXT\s+\((.*?)\)", zoneText, re.MULTILINE | re.DOTALL)
    assert match is not None, zoneText
    strings = re.findall(r'"([^"]*)"', match.group(2))
    for s in strings:
        assert len(s.encode("ascii")) <= 255, s
    return match.group(1), "".join(strings)
