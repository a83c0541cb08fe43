"""
Postfix relaying through the gateway, on its own defaults for the SASL
mechanism: a burst of 100 messages must all be accepted, none deferred, on
the STARTTLS listener and on the implicit-TLS one, with a users file of
hashes only and with one holding CRAM-MD5 secrets.
"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest

from tests.integration.postfixclient import PostfixRelayClient, unavailable
from tests.integration.support import PASSWORD, USER, GatewayTestCase, freePort

BURST = 100


class _PostfixMixin:
    files: dict[str, str]
    submissionPort: int
    submissionsPort: int

    def setUp(self) -> Any:
        reason = unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.events: list[str] = []
        observe = lambda event: self.events.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[attr-defined]
        return super().setUp()  # type: ignore[misc]

    @inlineCallbacks
    def burst(self, implicitTLS: bool) -> Any:
        port = self.submissionsPort if implicitTLS else self.submissionPort
        postfix = PostfixRelayClient(
            port, self.files["cert"], USER, PASSWORD, freePort(), implicitTLS
        )
        self.addCleanup(postfix.stop)  # type: ignore[attr-defined]
        postfix.start()

        def inject() -> None:
            ready = postfix.waitFor(lambda: _listening(postfix.inPort), 30)
            assert ready, postfix.log()
            with smtplib.SMTP("127.0.0.1", postfix.inPort, timeout=30) as smtp:
                for number in range(BURST):
                    body = f"From: {USER}\r\nSubject: burst {number}\r\n\r\nhi\r\n"
                    smtp.sendmail(USER, ["bob@example.org"], body.encode())

        yield deferToThread(inject)
        done = yield deferToThread(
            postfix.waitFor,
            lambda: len(self.spooled()) >= BURST,
            120,  # type: ignore[attr-defined]
        )
        log = postfix.log()
        self.assertTrue(done, f"{len(self.spooled())} of {BURST} arrived:\n{log[-3000:]}")  # type: ignore
        self.assertEqual(len(self.spooled()), BURST)  # type: ignore[attr-defined]
        self.assertNotIn("status=deferred", log)  # type: ignore[attr-defined]
        self.assertEqual(log.count("status=sent"), BURST)  # type: ignore[attr-defined]
        failures = [e for e in self.events if "auth failed" in e or "Too many" in e]
        self.assertEqual(failures, [])  # type: ignore[attr-defined]

    def test_starttls(self) -> Any:
        return self.burst(False)

    def test_implicitTLS(self) -> Any:
        return self.burst(True)


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class HashOnlyPostfixTests(_PostfixMixin, GatewayTestCase):
    timeout = 240
    cramSecrets = False


class CramPostfixTests(_PostfixMixin, GatewayTestCase):
    timeout = 240
    cramSecrets = True
