"""
Tests for mailgw.certcheck and the certificate checks at start-up.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.certcheck import checkCertificate, validFor
from mailgw.config import ConfigError, configFromDict
from mailgw.service import GatewayService
from mailgw.tls import loadCertificates, makeSelfSigned

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)


class CheckCertificateTests(SynchronousTestCase):
    def certificate(self, hostname: str, days: int, start: datetime.datetime) -> tuple[str, object]:
        base = Path(self.mktemp())
        base.mkdir()
        cert, key = str(base / "c.pem"), str(base / "k.pem")
        makeSelfSigned(cert, key, hostname, days=days, now=start)
        self.key = key
        return cert, loadCertificates(cert)[0]

    def test_fine(self) -> None:
        path, cert = self.certificate("mail.example.com", 90, NOW)
        report = checkCertificate(path, cert, "mail.example.com", now=NOW)
        self.assertEqual((report.errors, report.warnings), ((), ()))

    def test_expired(self) -> None:
        path, cert = self.certificate("mail.example.com", 10, NOW - datetime.timedelta(days=11))
        report = checkCertificate(path, cert, "mail.example.com", now=NOW)
        self.assertEqual(len(report.errors), 1)
        self.assertIn(f"{path}: the certificate expired on 2026-05-31", report.errors[0])

    def test_expiringSoon(self) -> None:
        path, cert = self.certificate("mail.example.com", 10, NOW)
        report = checkCertificate(path, cert, "mail.example.com", now=NOW)
        self.assertEqual(report.errors, ())
        self.assertEqual(len(report.warnings), 1)
        self.assertIn("expires on 2026-06-11", report.warnings[0])
        # 15 days ahead: no warning.
        path, cert = self.certificate("mail.example.com", 15, NOW)
        self.assertEqual(checkCertificate(path, cert, "mail.example.com", now=NOW).warnings, ())

    def test_wrongName(self) -> None:
        path, cert = self.certificate("other.example.com", 90, NOW)
        report = checkCertificate(path, cert, "mail.example.com", now=NOW)
        self.assertEqual(report.errors, ())
        self.assertIn("not valid for mail.example.com", report.warnings[0])
        self.assertIn("other.example.com", report.warnings[0])

    def test_names(self) -> None:
        _, cert = self.certificate("mail.example.com", 90, NOW)
        self.assertTrue(validFor(cert, "mail.example.com"))
        self.assertTrue(validFor(cert, "mail.example.com."))
        self.assertTrue(validFor(cert, "127.0.0.1"))  # makeSelfSigned adds it
        self.assertFalse(validFor(cert, "192.0.2.1"))
        self.assertFalse(validFor(cert, "example.com"))

    def test_startRefusesExpired(self) -> None:
        path, _ = self.certificate(
            "localhost", 10, datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=11)
        )
        config = configFromDict(
            {
                "server": {"hostname": "localhost", "submission": ["tcp:0"]},
                "tls": {"certificate": path, "key": self.key},
                "auth": {"backends": ["memory:a:b"]},
            },
            source="test.toml",
        )
        from mailgw.testing import MemorySpool  # an in-memory spool: nothing on disk

        e = self.assertRaises(
            ConfigError, GatewayService, config, MemoryReactorClock(), spool=MemorySpool()
        )
        self.assertEqual(e.key, "tls.certificate")
        self.assertIn("expired", str(e))
