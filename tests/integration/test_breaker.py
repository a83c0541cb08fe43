"""
The account breaker over real sockets: smtplib clients on 127.0.0.0/8
(different /24s stand for different client networks) against the embedded
gateway. The third new network trips it: that login and the later ones get
``454 4.7.0``; a session that logged in before keeps sending, and its mail
is held (the FakeRelay behind the gateway sees nothing of it); the trip and
the held mail survive a restart on the same spool; ``mailgw account show``,
``mailgw queue release --account`` and ``mailgw account reset`` do the rest.
"""

from __future__ import annotations

import json
import smtplib
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.config import configFromDict
from mailgw.queue.spool import SpoolReader
from mailgw.service import GatewayService
from mailgw.testing import FakeRelay
from tests.integration.support import (
    PASSWORD,
    USER,
    clientContext,
    makeFixtures,
    run,
    shortDirectory,
)

BODY = b"From: alice@example.com\r\nSubject: hello\r\n\r\nhello\r\n"


class BreakerSocketTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.files = makeFixtures(Path(self.mktemp()), shortDirectory(self) / "spool")
        self.config = configFromDict(
            {
                "server": {"hostname": "localhost", "submission": ["tcp:0:interface=127.0.0.1"]},
                "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
                "auth": {"backends": [f"passwd:{self.files['passwd']}"]},
                "spool": {"directory": self.files["spool"]},
                "limits": {"exempt": ["127.0.0.0/8"]},
                "breaker": {"new_account_networks": 2, "save_interval": 0.1},
            },
            source="test",
        )
        self.relay = FakeRelay()

    @inlineCallbacks
    def start(self) -> Any:
        self.service = GatewayService(self.config, reactor, relay=self.relay)
        self.service.startService()
        [port] = yield self.service.whenListening()
        self.port = port.getHost().port

    def connect(self, source: str) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30, source_address=(source, 0))
        smtp.ehlo("client.example")
        smtp.starttls(context=clientContext(self.files["cert"]))
        return smtp

    def login(self, source: str, keep: bool = True) -> tuple[int, smtplib.SMTP | None]:
        """Log in from ``source``: (235, the session if ``keep``) or (the refusal's code, None)."""
        smtp = self.connect(source)
        try:
            smtp.login(USER, PASSWORD)
        except smtplib.SMTPAuthenticationError as e:
            smtp.close()
            return e.smtp_code, None
        if not keep:
            smtp.close()
            return 235, None
        return 235, smtp

    def send(self, smtp: smtplib.SMTP, to: str) -> bytes:
        smtp.mail(USER)
        smtp.rcpt(to)
        code, reply = smtp.data(BODY)
        assert code == 250, (code, reply)
        return reply

    def mailgw(self, *args: str) -> Any:
        return run(sys.executable, "-m", "mailgw", *args, "--spool", self.files["spool"])

    @inlineCallbacks
    def test_tripRefuseHoldRestartReleaseReset(self) -> Any:
        yield self.start()

        def before() -> tuple[Any, ...]:
            code, first = self.login("127.0.0.1")  # network 1
            assert first is not None
            sent = self.send(first, "bob@example.org")
            first.quit()
            code2, kept = self.login("127.1.0.1")  # network 2: still fine
            code3, _ = self.login("127.2.0.1", keep=False)  # network 3: > 2, trips
            assert kept is not None
            held = self.send(kept, "carol@example.net")  # logged in before: 250, held
            kept.quit()
            code4, _ = self.login("127.0.0.1", keep=False)  # a known network: refused too
            return code, sent, code2, code3, held, code4

        code, sent, code2, code3, held, code4 = yield deferToThread(before)
        self.assertEqual((code, code2, code3, code4), (235, 235, 454, 454))
        sentId, heldId = sent.split()[-1].decode(), held.split()[-1].decode()
        self.assertEqual({q for q, _ in self.relay.attempts}, {sentId})
        [message] = SpoolReader(self.files["spool"]).pending()
        self.assertEqual((message.queueId, message.held), (heldId, True))

        # A restart on the same spool: still tripped, still held.
        yield self.service.stopService()
        self.relay = FakeRelay()
        yield self.start()
        self.addCleanup(self.service.stopService)
        code, _ = yield deferToThread(self.login, "127.0.0.1", False)
        self.assertEqual(code, 454)
        yield deferLater(reactor, 0.5, lambda: None)  # the queue's start-up pass
        self.assertEqual(self.relay.attempts, [])

        shown = yield self.mailgw("account", "show", USER, "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        state = json.loads(shown.stdout)
        self.assertEqual((state["tripped"], state["trip"]["rule"]), (True, "networks"))
        self.assertEqual(state["trip"]["client"], "127.2.0.1")
        self.assertEqual(state["held"], 1)
        text = yield self.mailgw("account", "show", USER)
        self.assertIn("networks: 3 new client networks in the last hour > 2", text.stdout)

        released = yield self.mailgw("queue", "release", "--account", USER)
        self.assertEqual(released.returncode, 0, released.stderr)
        self.assertEqual(released.stdout, f"released 1 message of {USER}\n")
        self.assertEqual([q for q, _ in self.relay.attempts], [heldId])

        reset = yield self.mailgw("account", "reset", USER)
        self.assertEqual((reset.returncode, reset.stdout), (0, f"{USER}: re-armed\n"))

        def after() -> tuple[int, bytes]:
            code, smtp = self.login("127.0.0.1")
            assert smtp is not None
            reply = self.send(smtp, "dave@example.net")
            smtp.quit()
            return code, reply

        code, reply = yield deferToThread(after)
        self.assertEqual(code, 235)
        self.assertIn(reply.split()[-1].decode(), {q for q, _ in self.relay.attempts})

    @inlineCallbacks
    def test_tripAlertsTheWebhookReceiver(self) -> Any:
        """
        With ``[webhooks]`` set and ``[breaker] webhook = true``, the trip
        reaches a real receiver as a signed ``account.tripped`` event.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.web.server import Site

        from mailgw.webhooks import verify
        from tests.test_webhooks import Receiver

        receiver = Receiver()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(receiver))
        self.addCleanup(port.stopListening)
        secret = Path(self.mktemp())
        secret.write_text("a-long-webhook-secret\n")
        secret.chmod(0o600)
        data = {
            "server": {"hostname": "localhost", "submission": ["tcp:0:interface=127.0.0.1"]},
            "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
            "auth": {"backends": [f"passwd:{self.files['passwd']}"]},
            "spool": {"directory": self.files["spool"]},
            "limits": {"exempt": ["127.0.0.0/8"]},
            "breaker": {"new_account_networks": 2, "save_interval": 0.1, "webhook": True},
            "webhooks": {
                "urls": [f"http://127.0.0.1:{port.getHost().port}/hook"],
                "secret_file": str(secret),
            },
        }
        self.config = configFromDict(data, source="test")
        yield self.start()
        self.addCleanup(self.service.stopService)
        codes = yield deferToThread(
            lambda: [self.login(a, keep=False)[0] for a in ("127.0.0.1", "127.1.0.1", "127.2.0.1")]
        )
        self.assertEqual(codes, [235, 235, 454])
        yield receiver.whenReceived(1)
        body, headers = receiver.received[0]
        self.assertEqual(headers[b"x-mailgw-event"], b"account.tripped")
        self.assertTrue(
            verify(b"a-long-webhook-secret", body, headers[b"x-mailgw-signature"].decode())
        )
        event = json.loads(body)
        self.assertEqual(event["event"], "account.tripped")
        self.assertEqual((event["data"]["account"], event["data"]["rule"]), (USER, "networks"))
        self.assertEqual(event["data"]["client"], "127.2.0.1")
