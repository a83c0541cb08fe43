"""
Reload without restart: real TLS clients on 127.0.0.1 before and after the
certificate files are replaced and the gateway reloads (in process through
L{GatewayService.reload}, and ``twistd mailgw`` through SIGHUP).
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailgw.auth.passwd import addUser
from mailgw.tls import makeSelfSigned
from tests.integration.support import (
    PASSWORD,
    USER,
    GatewayTestCase,
    freePort,
    shortDirectory,
    spawnTwistd,
    waitForPort,
)


def anyCertificate() -> ssl.SSLContext:
    """A client context that accepts any certificate, to look at the one served."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served(port: int, starttls: bool) -> bytes:
    """The DER certificate a new session on ``port`` is served."""
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.starttls(context=anyCertificate())
            return smtp.sock.getpeercert(binary_form=True)
    with smtplib.SMTP_SSL("127.0.0.1", port, context=anyCertificate(), timeout=30) as smtp:
        return smtp.sock.getpeercert(binary_form=True)


def fileDER(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


def replaceCertificate(directory: Path, cert: str, key: str, hostname: str = "localhost") -> None:
    """Write a new certificate and key, then move them over the old ones (as certbot does)."""
    newCert, newKey = directory / "new-cert.pem", directory / "new-key.pem"
    for path in (newCert, newKey):
        if path.exists():
            path.unlink()
    makeSelfSigned(str(newCert), str(newKey), hostname)
    os.replace(newKey, key)
    os.replace(newCert, cert)


def openSession(port: int) -> smtplib.SMTP_SSL:
    """An implicit-TLS session, logged in, left open."""
    smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=anyCertificate(), timeout=30)
    smtp.login(USER, PASSWORD)
    return smtp


def finishSession(smtp: smtplib.SMTP_SSL, recipient: str) -> bytes:
    """Send one message on an open session; its certificate."""
    certificate = smtp.sock.getpeercert(binary_form=True)
    smtp.sendmail(USER, [recipient], b"Subject: in flight\r\n\r\nhi\r\n")
    smtp.quit()
    return certificate


class ReloadTests(GatewayTestCase):
    def setUp(self) -> Any:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return super().setUp()

    def logged(self, text: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    @inlineCallbacks
    def test_newCertificateForNewSessions(self) -> Any:
        """
        After the files are replaced and reload() runs, new sessions on both
        listeners get the new certificate; a session opened before keeps
        its own and still delivers its message.
        """
        cert, key = self.files["cert"], self.files["key"]
        old = fileDER(cert)
        before = yield deferToThread(served, self.submissionsPort, False)
        self.assertEqual(before, old)
        session = yield deferToThread(openSession, self.submissionsPort)
        self.addCleanup(session.close)

        replaceCertificate(self.base, cert, key)
        new = fileDER(cert)
        self.assertNotEqual(new, old)
        # Replacing the files alone changes nothing: the context is loaded.
        still = yield deferToThread(served, self.submissionsPort, False)
        self.assertEqual(still, old)

        self.assertTrue(self.service.reload())
        for port, starttls in ((self.submissionsPort, False), (self.submissionPort, True)):
            after = yield deferToThread(served, port, starttls)
            self.assertEqual(after, new)
        kept = yield deferToThread(finishSession, session, "inflight@example.org")
        self.assertEqual(kept, old)
        recipients = [str(r.address) for m in self.spooled() for r in m.recipients]
        self.assertEqual(recipients, ["inflight@example.org"])

    @inlineCallbacks
    def test_badCertificateRefused(self) -> Any:
        """A broken new certificate is refused with one log line; the old one stays."""
        cert = self.files["cert"]
        old = fileDER(cert)
        Path(cert).write_text("not a certificate\n")
        self.assertFalse(self.service.reload())
        refused = self.logged("Reload refused")
        self.assertEqual(len(refused), 1)
        self.assertIn("tls.certificate", refused[0])
        after = yield deferToThread(served, self.submissionsPort, False)
        self.assertEqual(after, old)

    @inlineCallbacks
    def test_expiredCertificateRefused(self) -> Any:
        import datetime

        cert, key = self.files["cert"], self.files["key"]
        old = fileDER(cert)
        os.unlink(cert)
        os.unlink(key)
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        makeSelfSigned(cert, key, "localhost", days=10, now=past)
        self.assertFalse(self.service.reload())
        self.assertIn("expired", self.logged("Reload refused")[0])
        after = yield deferToThread(served, self.submissionsPort, False)
        self.assertEqual(after, old)

    def test_newUsers(self) -> Any:
        """A new auth backend list applies to the next login."""
        other = self.base / "passwd2"
        addUser(str(other), "bob@example.com", "hunter2 hunter2")
        from mailgw.config import configFromDict

        data = {
            "server": {
                "hostname": "localhost",
                "submission": list(self.config.server.submission),
                "submissions": list(self.config.server.submissions),
            },
            "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
            "auth": {"backends": [f"passwd:{other}"]},
            "spool": {"directory": self.files["spool"]},
        }
        self.assertTrue(self.service.reload(configFromDict(data, source="test2")))

        def login(user: str, password: str) -> int:
            with smtplib.SMTP_SSL(
                "127.0.0.1", self.submissionsPort, context=anyCertificate(), timeout=30
            ) as smtp:
                try:
                    return int(smtp.login(user, password)[0])
                except smtplib.SMTPAuthenticationError as e:
                    return int(e.smtp_code)

        d = deferToThread(login, "bob@example.com", "hunter2 hunter2")
        d.addCallback(self.assertEqual, 235)
        d.addCallback(lambda _: deferToThread(login, USER, PASSWORD))
        d.addCallback(self.assertEqual, 535)
        return d


class HangupTests(TestCase):
    """``twistd mailgw`` reloads on SIGHUP instead of dying."""

    timeout = 120

    @inlineCallbacks
    def test_sighup(self) -> Any:
        base = shortDirectory(self)
        cert, key, passwd = str(base / "cert.pem"), str(base / "key.pem"), str(base / "passwd")
        makeSelfSigned(cert, key, "localhost")
        addUser(passwd, USER, PASSWORD)
        port = freePort()
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submissions = ["tcp:port={port}:interface=127.0.0.1"]
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
backends = ["passwd:{passwd}"]
[spool]
directory = "{base}/spool"
"""
        )
        log = base / "twistd.log"
        process = spawnTwistd(self, config, log)
        yield deferToThread(waitForPort, port, process, str(log))
        old = fileDER(cert)
        session = yield deferToThread(openSession, port)
        self.addCleanup(session.close)

        replaceCertificate(base, cert, key)
        new = fileDER(cert)
        process.send_signal(signal.SIGHUP)

        def waitForReload() -> bytes:
            # Wait for the log line, bounded; then look at what is served.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and process.poll() is None:
                if b"Reloaded the configuration" in log.read_bytes():
                    break
                time.sleep(0.1)
            self.assertIsNone(process.poll(), f"SIGHUP ended twistd:\n{log.read_text()}")
            return served(port, False)

        after = yield deferToThread(waitForReload)
        self.assertEqual(after, new, log.read_text())
        kept = yield deferToThread(finishSession, session, "inflight@example.org")
        self.assertEqual(kept, old)

        # A broken config is refused, and the gateway keeps serving.
        config.write_text(
            config.read_text().replace("[server]", '[server]\nmax_recipients = "ten"')
        )
        process.send_signal(signal.SIGHUP)

        def waitForRefusal() -> bytes:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and process.poll() is None:
                if b"Reload refused" in log.read_bytes():
                    break
                time.sleep(0.1)
            self.assertIsNone(process.poll(), log.read_text())
            return served(port, False)

        again = yield deferToThread(waitForRefusal)
        self.assertEqual(again, new)
        self.assertIn("Reload refused", log.read_text())
