"""
The lines an operator greps: one per session at its disconnect (Postfix
style), one per accepted message, one per plaintext connection to the
implicit-TLS port. The tests read the log lines the running code writes,
and check their fields serialise in the JSON format.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import LimitsConfig
from mailgw.logs import JSONLinesObserver
from mailgw.server.plaintext import PlaintextSniffingFactory
from tests.helpers import PASSWORD, USER, Harness


class LogCapture:
    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, start: str) -> list[str]:
        return [t for t in map(formatEvent, self.events) if t.startswith(start)]

    def event(self, start: str) -> dict[str, Any]:
        [event] = [e for e in self.events if formatEvent(e).startswith(start)]
        return event


def send(harness: Harness, message: bytes) -> bytes:
    for line in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>"):
        assert harness.command(line).startswith(b"250")
    harness.command(b"RCPT TO:<carol@example.net>")
    assert harness.command(b"DATA").startswith(b"354")
    return harness.command(message + b"\r\n.")


class DisconnectLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCapture(self)

    def test_fullSession(self) -> None:
        harness = Harness()
        harness.command(b"EHLO client.test")
        harness.command(b"STARTTLS")
        harness.command(b"EHLO client.test")
        bad = base64.b64encode(b"\0" + USER + b"\0wrong")
        self.assertTrue(harness.command(b"AUTH PLAIN " + bad).startswith(b"535"))
        good = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
        self.assertTrue(harness.command(b"AUTH PLAIN " + good).startswith(b"235"))
        self.assertTrue(send(harness, b"Subject: x\r\n\r\nhi").startswith(b"250"))
        harness.command(b"NOOP")
        harness.command(b"FROB")
        harness.command(b"QUIT")
        harness.transport.peerClosesTLS()
        [line] = self.log.lines("disconnect from")
        self.assertEqual(
            line,
            "disconnect from client=192.0.2.7 listener=submission "
            "tls=TLSv1.3/TLS_AES_256_GCM_SHA384 user=alice@example.com mech=PLAIN "
            "ehlo=2 starttls=1 auth=1/2 mail=1 rcpt=2 data=1 noop=1 quit=1 unknown=1 "
            "commands=12 outcome=quit",
        )
        event = self.log.event("disconnect from")
        self.assertEqual(event["commands"]["rcpt"], 2)
        self.assertEqual(
            (event["user"], event["mech"], event["outcome"]), (USER.decode(), "PLAIN", "quit")
        )
        out = io.StringIO()
        JSONLinesObserver(out)(event)
        record = json.loads(out.getvalue())
        self.assertEqual(record["tls"], "TLSv1.3/TLS_AES_256_GCM_SHA384")
        self.assertEqual(record["commands"]["ehlo"], 2)
        self.assertEqual(record["commandCount"], 12)

    def test_clientHangsUp(self) -> None:
        harness = Harness()
        harness.command(b"EHLO client.test")
        harness.hangUp()
        [line] = self.log.lines("disconnect from")
        self.assertEqual(
            line,
            "disconnect from client=192.0.2.7 listener=submission tls=none ehlo=1 "
            "commands=1 outcome=lost",
        )

    def test_timeout(self) -> None:
        harness = Harness()
        harness.clock.advance(10_000)
        [line] = self.log.lines("disconnect from")
        self.assertTrue(line.endswith("commands=0 outcome=timeout"), line)

    def test_refusedByTheConnectionLimit(self) -> None:
        harness = Harness(limits=LimitsConfig(maxConnections=1))
        harness.connect()
        [line] = self.log.lines("disconnect from")
        self.assertTrue(line.endswith("outcome=limit"), line)

    def test_implicitTLSNeverHandshaken(self) -> None:
        """On the submissions port, a connection gone before its handshake ended."""
        harness = Harness(implicitTLS=True)
        harness.transport.getHandle = lambda: None  # type: ignore[method-assign]
        harness.hangUp()
        [line] = self.log.lines("disconnect from")
        self.assertIn("listener=submissions tls=none", line)
        self.assertTrue(line.endswith("outcome=tls_failed"), line)


class QueuedLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCapture(self)
        self.harness = Harness()
        self.harness.login()

    def test_everyRecipientAndTheMessageID(self) -> None:
        message = b"Message-ID: <abc\x7f@client.test>\r\nSubject: x\r\n\r\nhi"
        reply = send(self.harness, message)
        queueId = reply.split()[-1].decode()
        [line] = self.log.lines("queued ")
        size = len(message) + 2
        self.assertEqual(
            line,
            f"queued {queueId} from=<alice@example.com> "
            "to=<bob@example.org>,<carol@example.net> rcpts=2 "
            f"size={size} msgid=<abc?@client.test> user='alice@example.com' client=192.0.2.7",
        )
        event = self.log.event("queued ")
        self.assertEqual(event["recipients"], ["bob@example.org", "carol@example.net"])
        out = io.StringIO()
        JSONLinesObserver(out)(event)
        self.assertEqual(json.loads(out.getvalue())["messageId"], "<abc?@client.test>")

    def test_addedMessageID(self) -> None:
        """Without one from the client, the line names the Message-ID we added."""
        reply = send(self.harness, b"Subject: x\r\n\r\nhi")
        queueId = reply.split()[-1].decode()
        [line] = self.log.lines("queued ")
        self.assertIn(f" msgid=<{queueId}@mx.test> ", line)


class PlaintextTests(SynchronousTestCase):
    def connect(self) -> tuple[Protocol, list[bytes]]:
        received: list[bytes] = []

        class Inner(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        factory = PlaintextSniffingFactory(Factory.forProtocol(Inner))
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(StringTransport(peerAddress=_Peer()))
        return protocol, received

    def test_loggedOncePerConnection(self) -> None:
        log = LogCapture(self)
        protocol, received = self.connect()
        protocol.dataReceived(b"EHLO laptop\x00\r\n")
        protocol.dataReceived(b"MAIL FROM:<a@b>\r\n")
        self.assertEqual(
            log.lines("plaintext"),
            [
                "plaintext on implicit-TLS port client=192.0.2.9 listener=submissions "
                "first='EHLO laptop?'"
            ],
        )
        self.assertEqual(b"".join(received), b"EHLO laptop\x00\r\nMAIL FROM:<a@b>\r\n")
        self.connect()[0].dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(len(log.lines("plaintext")), 2)

    def test_authPayloadNotLogged(self) -> None:
        """Of an AUTH line sent to the wrong port only the verb and mechanism are logged."""
        log = LogCapture(self)
        self.connect()[0].dataReceived(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        self.connect()[0].dataReceived(b"auth login\r\n")
        self.assertEqual(
            [line.rpartition(" first=")[2] for line in log.lines("plaintext")],
            ["'AUTH PLAIN ...'", "'auth login'"],
        )
        self.assertNotIn("AGFsaWNl", " ".join(log.lines("plaintext")))

    def test_tlsNotLogged(self) -> None:
        log = LogCapture(self)
        protocol, received = self.connect()
        protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01")
        self.assertEqual(log.lines("plaintext"), [])
        self.assertEqual(received, [b"\x16\x03\x01\x02\x00\x01"])


class _Peer:
    host = "192.0.2.9"
    port = 1234
