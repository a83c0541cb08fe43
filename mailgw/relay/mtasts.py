"""
MTA-STS (RFC 8461): a recipient domain's policy, found through its
``_mta-sts`` TXT record, fetched over HTTPS (L{mailgw.relay.mtastsfetch}),
parsed strictly, and cached for its ``max_age`` in memory and on disk (the
spool's ``mta-sts/`` directory), so that a restart keeps the policies a
downgrade attack would otherwise strip.

L{MTASTSPolicies.policyFor} never fails: a domain without a usable policy
gets None, and the relay delivers as the route says.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailgw.relay.filecache import RunBlocking, runInline

__all__ = ["MTASTSPolicies", "Policy", "PolicyError", "mxMatches", "parsePolicy", "parseRecord"]

log = Logger()

#: RFC 8461 3.3: a policy body is at most 64 KiB.
MAX_POLICY_SIZE = 64 * 1024
#: RFC 8461 3.2: max_age is at most 31557600 seconds (a year).
MAX_AGE = 31557600

_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_MX = re.compile(r"(\*\.)?([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}\Z")
_FIELD = re.compile(r"([A-Za-z0-9_.-]{1,32}):[ \t]*([\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)[ \t]*\Z")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?\Z")


class PolicyError(ValueError):
    """A policy or TXT record that does not follow RFC 8461."""


@attrs.frozen
class Policy:
    """One parsed policy (RFC 8461 3.2)."""

    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]
    maxAge: int

    def allows(self, host: str) -> bool:
        """May mail go to MX host ``host`` (RFC 8461 4.1)?"""
        return any(mxMatches(pattern, host) for pattern in self.mx)


def mxMatches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: equal names, or ``*.rest`` for one more leftmost label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first and dot) and rest == pattern[2:]
    return host == pattern


def parseRecord(texts: list[str]) -> str | None:
    """
    The policy id of the ``_mta-sts`` TXT records ``texts`` (RFC 8461 3.1),
    or None: no record starts with ``v=STSv1``, several do, or the one that
    does is malformed.
    """
    candidates = [t for t in texts if t.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields[-1] == "":
        fields.pop()
    if not fields or fields[0] != "v=STSv1":
        return None
    ids = [f[3:] for f in fields[1:] if f.startswith("id=")]
    if len(ids) != 1 or not _ID.match(ids[0]):
        return None
    return ids[0]


def parsePolicy(body: bytes) -> Policy:
    """
    The policy in ``body`` (RFC 8461 3.2), strictly: version, mode and
    max_age once each, at least one valid ``mx`` unless mode is none;
    unknown fields are ignored, as the RFC asks.

    @raise PolicyError: with what is wrong.
    """
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError("policy larger than 64 KiB")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("policy is not ASCII") from None
    single: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        match = _FIELD.match(line)
        if match is None:
            raise PolicyError(f"malformed line {line[:80]!r}")
        name, value = match.group(1), match.group(2)
        if name == "mx":
            if not _MX.match(value.lower()):
                raise PolicyError(f"bad mx pattern {value[:80]!r}")
            mx.append(value.lower())
        elif name in ("version", "mode", "max_age"):
            if name in single:
                raise PolicyError(f"{name} given twice")
            single[name] = value
    if single.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = single.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    age = single.get("max_age", "")
    if not (age.isdigit() and len(age) <= 10 and int(age) <= MAX_AGE):
        raise PolicyError(f"bad max_age {age[:20]!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return Policy(mode, tuple(mx), int(age))


@attrs.frozen
class _Cached:
    policy: Policy
    id: str
    expires: float
    body: bytes = attrs.field(repr=False)


#: Fetches ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``: a Deferred of
#: the body, failing when the fetch does (L{mailgw.relay.mtastsfetch}).
Fetch = Callable[[str], "Deferred[bytes]"]


@attrs.define
class MTASTSPolicies:
    """
    The policies of recipient domains: looked up, fetched and cached.

    @ivar clock: C{seconds()} dates the cache (max_age).
    @ivar resolver: an L{IResolver} for the TXT records.
    @ivar fetch: see L{Fetch}.
    @ivar directory: where policies are kept across restarts (None: memory only).
    @ivar runBlocking: reads and writes the files off the reactor thread.
    @ivar report: told C{(domain, resultType)} of each fetch or parse
        failure (TLS-RPT counting), or None.
    """

    clock: Any
    resolver: Any
    fetch: Fetch
    directory: str | None = None
    runBlocking: RunBlocking = runInline
    report: Callable[[str, str], None] | None = None
    _memory: dict[str, _Cached] = attrs.field(factory=dict, init=False)
    _diskRead: set[str] = attrs.field(factory=set, init=False)
    _inFlight: dict[str, Deferred[Policy | None]] = attrs.field(factory=dict, init=False)

    def policyFor(self, domain: str) -> Deferred[Policy | None]:
        """
        The policy of ``domain`` (an A-label, lowercased) in force now, or
        None. Lookups for one domain at once share one fetch. Never fails.
        """
        if not _DOMAIN.match(domain) or ".." in domain:
            return succeed(None)
        shared = self._inFlight.get(domain)
        if shared is None:
            shared = Deferred.fromCoroutine(self._policyFor(domain))
            self._inFlight[domain] = shared
            shared.addBoth(self._done, domain)
        result: Deferred[Policy | None] = Deferred()

        def share(policy: Policy | None) -> Policy | None:
            result.callback(policy)
            return policy

        shared.addCallback(share)
        return result

    def _done(self, result: Any, domain: str) -> Any:
        self._inFlight.pop(domain, None)
        return result

    async def _policyFor(self, domain: str) -> Policy | None:
        try:
            cached = await self._cached(domain)
            policyId = await self._lookupId(domain)
            now = self.clock.seconds()
            fresh = cached if cached is not None and cached.expires > now else None
            if fresh is not None and policyId in (None, fresh.id):
                return fresh.policy
            if policyId is None:
                return None
            return await self._refresh(domain, policyId, fresh)
        except Exception:
            log.failure("MTA-STS lookup for {domain} failed", domain=domain)
            return None

    async def _lookupId(self, domain: str) -> str | None:
        try:
            answers, _, _ = await self.resolver.lookupText(f"_mta-sts.{domain}".encode("ascii"))
        except Exception:
            return None  # no record, or DNS failed: the cache alone speaks (RFC 8461 5.1)
        texts = [
            b"".join(rr.payload.data).decode("ascii", "replace")
            for rr in answers
            if hasattr(rr.payload, "data") and isinstance(rr.payload.data, list)
        ]
        return parseRecord(texts)

    async def _refresh(self, domain: str, policyId: str, fresh: _Cached | None) -> Policy | None:
        try:
            body = await self.fetch(domain)
        except Exception as e:
            log.info("MTA-STS policy of {domain} not fetched: {why}", domain=domain, why=str(e))
            self._report(domain, "sts-policy-fetch-error")
            return fresh.policy if fresh is not None else None
        try:
            policy = parsePolicy(body)
        except PolicyError as e:
            log.info("MTA-STS policy of {domain} is invalid: {why}", domain=domain, why=str(e))
            self._report(domain, "sts-policy-invalid")
            return fresh.policy if fresh is not None else None
        entry = _Cached(policy, policyId, self.clock.seconds() + policy.maxAge, body)
        self._memory[domain] = entry
        if self.directory is not None:
            try:
                await self.runBlocking(_write, self.directory, domain, entry)
            except OSError as e:
                log.warn("cannot keep the MTA-STS policy of {d}: {e}", d=domain, e=str(e))
        return policy

    def _report(self, domain: str, resultType: str) -> None:
        if self.report is not None:
            self.report(domain, resultType)

    async def _cached(self, domain: str) -> _Cached | None:
        cached = self._memory.get(domain)
        if cached is not None or self.directory is None or domain in self._diskRead:
            return cached
        self._diskRead.add(domain)  # the disk is read once per domain and run
        try:
            cached = await self.runBlocking(_read, self.directory, domain)
        except (OSError, ValueError, KeyError, TypeError, PolicyError):
            cached = None
        if cached is not None and domain not in self._memory:
            self._memory[domain] = cached
        return self._memory.get(domain)


def _read(directory: str, domain: str) -> _Cached | None:
    try:
        with open(os.path.join(directory, domain), "rb") as f:
            data = json.loads(f.read(4 * MAX_POLICY_SIZE))
    except FileNotFoundError:
        return None
    body = data["policy"].encode("ascii")
    return _Cached(parsePolicy(body), str(data["id"]), float(data["expires"]), body)


def _write(directory: str, domain: str, entry: _Cached) -> None:
    """Atomically: a temporary file, fsync'd, renamed over the old one."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    final = os.path.join(directory, domain)
    temporary = final + ".tmp"
    data = {"id": entry.id, "expires": entry.expires, "policy": entry.body.decode("ascii")}
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(data).encode("ascii"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
