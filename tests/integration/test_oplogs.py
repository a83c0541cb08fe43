"""
The operator's log lines as a gateway on real sockets writes them: the
session's disconnect line after a real smtplib submission, and plaintext
sent to the implicit-TLS port.
"""

from __future__ import annotations

import smtplib
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from tests.integration.support import PASSWORD, USER, GatewayTestCase, clientContext


class OperatorLogTests(GatewayTestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.lines: list[str] = []
        observe = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        yield super().setUp()

    def matching(self, start: str) -> list[str]:
        return [line for line in self.lines if line.startswith(start)]

    @inlineCallbacks
    def waitFor(self, start: str) -> Any:
        for _ in range(200):
            if self.matching(start):
                return self.matching(start)
            d: Deferred[None] = Deferred()
            reactor.callLater(0.05, d.callback, None)
            yield d
        self.fail(f"no {start!r} line in {self.lines}")

    @inlineCallbacks
    def test_submission(self) -> Any:
        def submit() -> None:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=30) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.ehlo()
                smtp.esmtp_features["auth"] = "PLAIN"
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.org"], b"Subject: s\r\n\r\nx\r\n")

        yield deferToThread(submit)
        [line] = yield self.waitFor("disconnect from")
        self.assertRegex(
            line,
            r"^disconnect from client=127\.0\.0\.1 listener=submission tls=TLSv1\.[23]/\S+ "
            r"user=alice@example\.com mech=PLAIN ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 "
            r"data=1 quit=1 commands=8 outcome=quit$",
        )
        [queued] = self.matching("queued ")
        self.assertIn(" to=<bob@example.org> rcpts=1 ", queued)

    @inlineCallbacks
    def test_plaintextOnImplicitTLS(self) -> Any:
        def plaintext() -> None:
            with socket.create_connection(("127.0.0.1", self.submissionsPort), 30) as s:
                s.sendall(b"EHLO laptop\r\n")
                s.settimeout(30)
                while s.recv(4096):
                    pass

        yield deferToThread(plaintext)
        lines = yield self.waitFor("plaintext on implicit-TLS port")
        self.assertEqual(
            lines,
            [
                "plaintext on implicit-TLS port client=127.0.0.1 listener=submissions "
                "first='EHLO laptop'"
            ],
        )
        [line] = yield self.waitFor("disconnect from")
        self.assertIn("listener=submissions tls=none", line)
        self.assertTrue(line.endswith("outcome=tls_failed"), line)
