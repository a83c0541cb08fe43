"""
DKIM signing end to end: smtplib submits to a real gateway on 127.0.0.1,
the queue commits, the relay signs as it reads the message and delivers to
an in-process upstream (tests/upstream.py); what the upstream received is
verified by dkimpy against an in-process DNS answer, and by OpenDKIM's test
mode (its TestPublicKeys file stands in for DNS) when OpenDKIM is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from mailgw.config import configFromDict
from mailgw.dkim.config import DomainSigning
from mailgw.dkim.keys import LoadedKey, loadKey
from tests.dkimhelp import recordsOf, signatureCount, verifyAll, writeKey
from tests.integration import test_relay_e2e
from tests.integration.support import USER, shortDirectory

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: signed  on the way\r\n"
    b"Date: Sun, 29 Nov 2026 23:00:00 +0000\r\n"
    b"Message-ID: <e2e@example.org>\r\n"
    b"\r\n"
    b".a leading dot\r\n"
    b"..two\r\n"
    b"trailing space \t\r\n"
    b"\r\n" + (b"0123456789" * 100 + b"\r\n") * 100 + b"\r\n"
)


def splitSignatures(data: bytes) -> tuple[bytes, bytes]:
    """(the DKIM-Signature fields on top, the rest), field by field."""
    match = re.match(rb"(?:DKIM-Signature:[^\r]*\r\n(?:[ \t][^\r]*\r\n)*)*", data)
    assert match is not None
    return data[: match.end()], data[match.end() :]


class SigningTests(test_relay_e2e.RelayTestCase):
    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super().adjustConfig(data)
        self.keyDirectory = self.mktemp()
        rsa = writeKey(self.keyDirectory, "rsa.key")
        ed = writeKey(self.keyDirectory, "ed.key", "ed25519-sha256")
        data["dkim"] = {
            "domains": [
                {"domain": "example.org", "selector": "r2026", "key_file": rsa},
                {
                    "domain": "example.org",
                    "selector": "e2026",
                    "key_file": ed,
                    "algorithm": "ed25519-sha256",
                },
            ]
        }
        return data

    def keys(self) -> list[LoadedKey]:
        return [
            loadKey(DomainSigning(d.domain, d.selector, d.keyFile, d.algorithm))
            for d in self.config.dkim.domains
        ]

    @inlineCallbacks
    def test_relayedMessageVerifies(self) -> Any:
        """
        The upstream gets two signatures (RSA and Ed25519) that dkimpy
        verifies, then the message as submitted, byte for byte after the
        gateway's trace header.
        """
        yield self.submit(["bob@example.net"], MESSAGE)
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(verifyAll(received.data, recordsOf(self.keys())), [True, True])
        signatures, rest = splitSignatures(received.data)
        self.assertEqual(signatureCount(signatures), 2)
        self.assertIn(b"s=e2026", signatures.split(b"DKIM-Signature:")[1])  # newest on top
        self.assertEqual(test_relay_e2e.stripTrace(rest), MESSAGE)
        # A change on the way breaks both.
        tampered = received.data.replace(b"..two", b"..tw0")
        self.assertEqual(verifyAll(tampered, recordsOf(self.keys())), [False, False])
        yield self.openDKIMVerifies(received.data, ["r2026", "e2026"])

    @inlineCallbacks
    def test_otherDomainUnsigned(self) -> Any:
        """From: a domain without a key: relayed as it came, unsigned."""
        message = MESSAGE.replace(b"alice@example.org", b"alice@example.com")
        yield self.submit(["bob@example.net"], message)
        [received] = yield self.upstream.waitForTransactions(1)
        self.assertEqual(signatureCount(received.data), 0)
        self.assertEqual(test_relay_e2e.stripTrace(received.data), message)
        self.assertEqual(received.mailFrom, USER)

    @inlineCallbacks
    def test_reloadSwapsKeys(self) -> Any:
        """A reload reads the keys again: the next message has the new selector."""
        data = self.adjustConfig(
            {
                "server": {"hostname": "localhost", "submission": ["tcp:0:interface=127.0.0.1"]},
                "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
                "auth": {"backends": [f"passwd:{self.files['passwd']}"]},
                "spool": {"directory": self.files["spool"]},
            }
        )
        data["dkim"]["domains"] = [{**data["dkim"]["domains"][0], "selector": "new"}]
        self.assertTrue(self.service.reload(configFromDict(data, source="new")))
        yield self.submit(["bob@example.net"], MESSAGE)
        [received] = yield self.upstream.waitForTransactions(1)
        new = loadKey(DomainSigning("example.org", "new", data["dkim"]["domains"][0]["key_file"]))
        self.assertEqual(verifyAll(received.data, recordsOf([new])), [True])
        # A key that cannot be read refuses the reload; the running keys stay.
        os.chmod(data["dkim"]["domains"][0]["key_file"], 0o644)
        self.assertFalse(self.service.reload(configFromDict(data, source="bad")))
        self.flushLoggedErrors()
        self.assertEqual(self.service.signer.keys[0].signing.selector, "new")

    def openDKIMVerifies(self, message: bytes, selectors: list[str]) -> Any:
        """OpenDKIM (libopendkim, a second verifier) in test mode: dkim=pass for each."""
        opendkim = shutil.which("opendkim") or (
            "/usr/sbin/opendkim" if os.access("/usr/sbin/opendkim", os.X_OK) else None
        )
        if opendkim is None:
            raise SkipTest("opendkim is not installed (Debian package opendkim)")
        directory = Path(self.mktemp())
        directory.mkdir()
        keys = directory / "keys"
        keys.write_text("".join(f"{k.recordName} {k.record}\n" for k in self.keys()))
        conf = directory / "opendkim.conf"
        conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
        (directory / "message").write_bytes(message)

        def run() -> str:
            result = subprocess.run(
                [opendkim, "-x", str(conf), "-t", str(directory / "message"), "-vv"],
                capture_output=True,
                timeout=60,
            )
            return (result.stdout + result.stderr).decode("utf-8", "replace")

        def check(output: str) -> None:
            for selector in selectors:
                self.assertRegex(output, rf"dkim=pass [^;]*header\.s={selector}", output)

        return deferToThread(run).addCallback(check)

    def test_badKeyStopsTheStart(self) -> None:
        """A key of the wrong type stops the start: file, key and problem named."""
        from mailgw.config import ConfigError
        from mailgw.service import GatewayService

        data = self.adjustConfig(
            {
                "server": {"hostname": "localhost", "submission": ["tcp:0:interface=127.0.0.1"]},
                "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
                "auth": {"backends": [f"passwd:{self.files['passwd']}"]},
                "spool": {"directory": str(shortDirectory(self) / "other")},
            }
        )
        data["dkim"]["domains"][1]["algorithm"] = "rsa-sha256"
        error = self.assertRaises(
            ConfigError, GatewayService, configFromDict(data, source="start.toml"), reactor
        )
        self.assertEqual((error.source, error.key), ("start.toml", "dkim.domains[1].key_file"))
        self.assertIn("is an Ed25519 key, but algorithm is rsa-sha256", error.problem)
