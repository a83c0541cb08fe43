"""
Tests for L{mailgw.relay.client}, L{mailgw.relay.clientprotocol} and
L{mailgw.relay.clienttransaction}: scripted dialogs in memory (exact bytes,
pipelining groups, timeouts on a Clock, hostile replies), then real
sessions over loopback with L{tests.upstream}.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from twisted.internet import error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.config import TLSMode
from mailgw.envelope import (
    BodyType,
    DeliveryResult,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
    splitAddress,
)
from mailgw.relay import clientprotocol
from mailgw.relay.client import RelaySettings, RelayTimeouts, deliverBatch
from mailgw.relay.clientprotocol import ProtocolError, ReplyParser
from mailgw.relay.clienttransaction import Capabilities
from mailgw.relay.filecache import threadPoolRunner
from tests.upstream import makeTLSFiles, startUpstream

CREATOR = optionsForClientTLS("upstream.test")  # never used for a handshake in memory
PASSWORD = "s3cret pass"


def makeMessage(
    queueId: str = "Q1",
    sender: str | None = "alice@example.com",
    recipients: Iterable[str] = ("bob@example.net",),
    body: BodyType = BodyType.SEVENBIT,
    smtputf8: bool = False,
    size: int = 100,
    delivered: Iterable[str] = (),
) -> QueuedMessage:
    recipients, delivered = tuple(recipients), set(delivered)
    states = tuple(
        RecipientState(
            splitAddress(r),
            RecipientStatus.DELIVERED if r in delivered else RecipientStatus.PENDING,
        )
        for r in recipients
    )
    envelope = Envelope(
        None if sender is None else splitAddress(sender),
        tuple(splitAddress(r) for r in recipients),
        body,
        smtputf8,
    )
    return QueuedMessage(queueId, envelope, Session("192.0.2.9"), 0.0, size, states)


def opener(bodies: dict[str, bytes]) -> Any:
    return lambda queueId: io.BytesIO(bodies[queueId])


def settingsFor(mode: TLSMode = TLSMode.NONE, **kw: Any) -> RelaySettings:
    kw.setdefault("tlsCreator", None if mode is TLSMode.NONE else CREATOR)
    return RelaySettings("upstream.test", "gw.example.com", mode, **kw)


class Transport(StringTransport):
    """
    Records each write, STARTTLS and TCP_NODELAY; closing is immediate.
    With a C{bufferLimit}, a streaming producer is paused, as a real
    transport does, once more than that many bytes are buffered.
    """

    protocol: Any

    def __init__(self) -> None:
        super().__init__(
            IPv4Address("TCP", "127.0.0.1", 50000), IPv4Address("TCP", "192.0.2.1", 25)
        )
        self.bufferLimit: int | None = None
        self.writes: list[bytes] = []
        self.tlsCreators: list[object] = []
        self.noDelay: bool | None = None
        self.aborted = False
        self.lost = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)
        full = self.bufferLimit is not None and len(self.value()) > self.bufferLimit
        if full and self.producer is not None and self.streaming:
            self.producer.pauseProducing()

    def startTLS(self, creator: object) -> None:
        self.tlsCreators.append(creator)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def loseConnection(self) -> None:
        super().loseConnection()
        self.closeNow(Failure(error.ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def closeNow(self, reason: Failure) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(reason)


class Blocking:
    """A C{runBlocking} whose calls wait until the test runs them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def names(self) -> list[str]:
        return [f.__name__ for f, _, _ in self.calls]

    def runNext(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self) -> None:
        self.connecting: Deferred[Any] = Deferred()
        self.factory: Any = None

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factory = factory
        return self.connecting


class Dialog:
    """One client session in memory, driven reply by reply."""

    def __init__(
        self,
        case: SynchronousTestCase,
        settings: RelaySettings,
        messages: list[QueuedMessage],
        bodies: dict[str, bytes] | None = None,
        connect: bool = True,
        **kw: Any,
    ) -> None:
        self.case = case
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        if bodies is None:
            bodies = {m.queueId: b"Subject: hi\r\n\r\nbody\r\n" for m in messages}
        openBody = kw.pop("openBody", None) or opener(bodies)
        self.deferred = deliverBatch(
            self.clock, self.endpoint, settings, [(m, openBody) for m in messages], **kw
        )
        self.results: list[list[list[DeliveryResult]]] = []
        self.deferred.addCallback(self.results.append)
        if connect:
            self.connect()

    def connect(self) -> None:
        factory = self.endpoint.factory
        wrapped = getattr(factory, "wrappedFactory", None)  # IMPLICIT: TLS wrapper
        self.protocol = (wrapped or factory).buildProtocol(None)
        self.transport = Transport()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        if wrapped is None:
            self.endpoint.connecting.callback(self.protocol)
        else:
            self.endpoint.connecting.callback(SimpleNamespace(wrappedProtocol=self.protocol))

    def server(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def client(self) -> bytes:
        """What the client sent since the last call."""
        data = self.transport.value()
        self.transport.clear()
        self.transport.writes.clear()
        return data

    def expect(self, data: bytes) -> None:
        self.case.assertEqual(self.client(), data)

    def pumpBody(self) -> None:
        """Let a paused body go to its end."""
        self.transport.bufferLimit = None
        if self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.case.assertIsNone(self.transport.producer, "body never ended")

    def hello(self, capabilities: Iterable[str] = ("PIPELINING", "8BITMIME")) -> None:
        """Greeting and EHLO with these capabilities."""
        self.server(b"220 upstream.test ESMTP\r\n")
        self.expect(b"EHLO gw.example.com\r\n")
        lines = ["upstream.test", *capabilities]
        reply = "".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        )
        self.server(reply.encode("ascii"))

    def quit(self) -> list[list[DeliveryResult]]:
        self.expect(b"QUIT\r\n")
        self.server(b"221 2.0.0 Bye\r\n")
        return self.done()

    def done(self) -> list[list[DeliveryResult]]:
        self.case.assertEqual(len(self.results), 1, "deliverBatch has not fired")
        self.case.assertTrue(self.transport.lost, "connection left open")
        return self.results[0]


def summary(results: list[DeliveryResult]) -> list[tuple[str, str, int]]:
    """(recipient, success/permanent/transient, code) per result."""

    def kind(r: DeliveryResult) -> str:
        return "success" if r.success else "permanent" if r.permanent else "transient"

    return [(str(r.recipient), kind(r), r.code) for r in results]


class DialogTests(SynchronousTestCase):
    """Exact bytes of whole sessions."""

    def test_pipelinedTransaction(self) -> None:
        """
        With PIPELINING, MAIL, every RCPT and DATA go out in one write; the
        body is dot-stuffed; the session ends with QUIT.
        """
        message = makeMessage(recipients=["bob@example.net", "carol@example.org"])
        body = b"Subject: x\r\n\r\n.hidden\r\nlast"
        d = Dialog(self, settingsFor(), [message], {"Q1": body})
        self.assertTrue(d.transport.noDelay)
        d.hello(["PIPELINING", "SIZE 1000", "8BITMIME"])
        self.assertEqual(
            d.transport.writes,
            [
                b"MAIL FROM:<alice@example.com> SIZE=100\r\n"
                b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n"
            ],
        )
        d.client()
        d.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        d.pumpBody()
        d.expect(b"Subject: x\r\n\r\n..hidden\r\nlast\r\n.\r\n")
        d.server(b"250 2.0.0 Ok: queued as X\r\n")
        [results] = d.quit()
        self.assertEqual(
            summary(results),
            [("bob@example.net", "success", 250), ("carol@example.org", "success", 250)],
        )
        self.assertEqual(results[0].enhanced, "2.0.0")
        self.assertEqual(results[0].text, "Ok: queued as X")
        self.assertEqual(results[0].remote, "upstream.test")

    def test_withoutPipelining(self) -> None:
        """
        Without PIPELINING each command waits for the previous reply; a
        rejected recipient gets a permanent result, the other succeeds.
        """
        message = makeMessage(recipients=["bob@example.net", "bad@example.net"])
        d = Dialog(self, settingsFor(), [message])
        d.hello(["8BITMIME"])
        d.expect(b"MAIL FROM:<alice@example.com>\r\n")
        d.server(b"250 2.1.0 Ok\r\n")
        d.expect(b"RCPT TO:<bob@example.net>\r\n")
        d.server(b"250 2.1.5 Ok\r\n")
        d.expect(b"RCPT TO:<bad@example.net>\r\n")
        d.server(b"550 5.1.1 No such user\r\n")
        d.expect(b"DATA\r\n")
        d.server(b"354 go\r\n")
        d.pumpBody()
        self.assertTrue(d.client().endswith(b"body\r\n.\r\n"))
        d.server(b"250 2.0.0 Ok\r\n")
        [results] = d.quit()
        self.assertEqual(
            summary(results),
            [("bob@example.net", "success", 250), ("bad@example.net", "permanent", 550)],
        )
        self.assertEqual((results[1].enhanced, results[1].text), ("5.1.1", "No such user"))

    def test_parameters(self) -> None:
        """
        BODY=8BITMIME and SMTPUTF8 are sent when the envelope needs them;
        SIZE only when offered.
        """
        message = makeMessage(sender="jösé@example.com", body=BodyType.EIGHTBITMIME, smtputf8=True)
        d = Dialog(self, settingsFor(), [message])
        d.hello(["PIPELINING", "8BITMIME", "SMTPUTF8"])
        self.assertEqual(
            d.client().split(b"\r\n")[0],
            "MAIL FROM:<jösé@example.com> BODY=8BITMIME SMTPUTF8".encode(),
        )

    def test_nullSender(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage(sender=None)])
        d.hello(["PIPELINING"])
        self.assertTrue(d.client().startswith(b"MAIL FROM:<>\r\n"))

    def test_onlyPendingRecipients(self) -> None:
        """
        Recipients already delivered get neither a RCPT nor a result.
        """
        message = makeMessage(recipients=["a@x.test", "b@x.test"], delivered=["a@x.test"])
        d = Dialog(self, settingsFor(), [message])
        d.hello([])
        d.expect(b"MAIL FROM:<alice@example.com>\r\n")
        d.server(b"250 ok\r\n")
        d.expect(b"RCPT TO:<b@x.test>\r\n")
        d.server(b"451 4.3.0 try later\r\n")
        d.expect(b"RSET\r\n")
        d.server(b"250 ok\r\n")
        [results] = d.quit()
        self.assertEqual(summary(results), [("b@x.test", "transient", 451)])

    def test_nothingPendingNoConnection(self) -> None:
        message = makeMessage(delivered=["bob@example.net"])
        d = Dialog(self, settingsFor(), [message], connect=False)
        self.assertEqual(d.results, [[[]]])
        self.assertIsNone(d.endpoint.factory)

    def test_twoMessagesRsetOnlyAfterFailure(self) -> None:
        """
        A transaction that failed at DATA is reset before the next message;
        one that succeeded is not.
        """
        one = makeMessage("Q1", recipients=["a@x.test"])
        two = makeMessage("Q2", recipients=["b@x.test"])
        three = makeMessage("Q3", recipients=["c@x.test"])
        d = Dialog(self, settingsFor(), [one, two, three])
        d.hello(["PIPELINING"])
        d.client()
        d.server(b"250 ok\r\n250 ok\r\n554 5.6.0 no thanks\r\n")
        d.expect(b"RSET\r\n")
        d.server(b"250 ok\r\n")
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.pumpBody()
        d.client()
        d.server(b"250 ok\r\n")
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.pumpBody()
        d.client()
        d.server(b"452 4.3.1 full\r\n")
        results = d.quit()
        self.assertEqual(
            [summary(r) for r in results],
            [
                [("a@x.test", "permanent", 554)],
                [("b@x.test", "success", 250)],
                [("c@x.test", "transient", 452)],
            ],
        )

    def test_mailRefusedPipelined(self) -> None:
        """
        5xx to MAIL is permanent for every recipient; the RCPT and DATA
        replies of the group are still read; no RSET is needed.
        """
        message = makeMessage(recipients=["a@x.test", "b@x.test"])
        d = Dialog(self, settingsFor(), [message])
        d.hello(["PIPELINING"])
        d.client()
        d.server(b"550 5.7.1 sender refused\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n")
        [results] = d.quit()
        self.assertEqual(
            summary(results), [("a@x.test", "permanent", 550), ("b@x.test", "permanent", 550)]
        )

    def test_dataAcceptedWithoutRecipients(self) -> None:
        """
        RFC 2920 3.1: when DATA gets 354 although no RCPT succeeded, the
        client ends the data at once with "." and sends no message.
        """
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.hello(["PIPELINING"])
        d.client()
        d.server(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        d.expect(b".\r\n")
        d.server(b"554 5.5.1 No valid recipients\r\n")
        [results] = d.quit()
        self.assertEqual(summary(results), [("bob@example.net", "permanent", 550)])

    def test_authRequiredIsTransient(self) -> None:
        """530 at MAIL is our configuration's fault: transient."""
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.hello([])
        d.client()
        d.server(b"530 5.7.0 Authentication required\r\n")
        [results] = d.quit()
        self.assertEqual(summary(results), [("bob@example.net", "transient", 0)])
        self.assertIn("check the relay configuration", results[0].text)

    def test_421EndsSession(self) -> None:
        """
        421 to a RCPT ends the session: everything unfinished is transient,
        with the 421 reply.
        """
        one = makeMessage("Q1", recipients=["a@x.test", "b@x.test"])
        d = Dialog(self, settingsFor(), [one, makeMessage("Q2")])
        d.hello(["PIPELINING"])
        d.client()
        d.server(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n")
        results = d.done()
        self.assertEqual(
            [summary(r) for r in results],
            [
                [("a@x.test", "permanent", 550), ("b@x.test", "transient", 421)],
                [("bob@example.net", "transient", 421)],
            ],
        )
        self.assertEqual(results[1][0].enhanced, "4.3.2")
        self.assertNotIn(b"QUIT", d.client())

    def test_openFailureIsTransientForThatMessage(self) -> None:
        """
        A message that cannot be opened is transient; the next one goes.
        """
        d = Dialog(
            self,
            settingsFor(),
            [makeMessage("gone"), makeMessage("Q2")],
            {"Q2": b"x\r\n"},
        )
        d.hello(["PIPELINING"])
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.pumpBody()
        d.expect(b"x\r\n.\r\n")
        d.server(b"250 ok\r\n")
        results = d.quit()
        self.assertEqual(results[0][0].transient, True)
        self.assertIn("cannot open the message", results[0][0].text)
        self.assertTrue(results[1][0].success)

    def test_spoolErrorAtOpenIsTransientForThatMessage(self) -> None:
        """
        An opener failing with the spool's own error (not an OSError, e.g.
        SpoolError for too many open files): transient for that message,
        logged; the next one goes.
        """

        class SpoolTrouble(Exception):
            pass

        def openBody(queueId: str) -> io.BytesIO:
            if queueId == "Q1":
                raise SpoolTrouble("cannot open Q1: too many open files")
            return io.BytesIO(b"x\r\n")

        d = Dialog(self, settingsFor(), [makeMessage("Q1"), makeMessage("Q2")], openBody=openBody)
        d.hello(["PIPELINING"])
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.expect(b"x\r\n.\r\n")
        d.server(b"250 ok\r\n")
        [[first], [second]] = d.quit()
        self.assertTrue(first.transient)
        self.assertIn("cannot open the message in the spool: cannot open Q1", first.text)
        self.assertTrue(second.success)
        self.assertEqual(len(self.flushLoggedErrors(SpoolTrouble)), 1)

    def test_bodyStreamedInChunks(self) -> None:
        """
        The file is opened (with its first chunk read in the same trip),
        read 64 KiB at a time and closed through runBlocking (off the
        reactor thread); one read at a time, none while the transport is
        paused, so a message is never in memory whole.
        """
        body = b"x" * (3 * clientprotocol.BODY_CHUNK + 5)
        blocking = Blocking()
        d = Dialog(self, settingsFor(), [makeMessage()], {"Q1": body}, runBlocking=blocking)
        d.hello(["PIPELINING"])
        self.assertEqual(d.client(), b"")  # MAIL waits for the file to open
        self.assertEqual(blocking.names(), ["_openBody"])
        blocking.runNext()
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        producer: Any = d.transport.producer
        self.assertTrue(d.transport.streaming)
        verifyObject(IPushProducer, producer)
        # The first chunk came with the opening: written at once.
        self.assertEqual(len(d.client()), clientprotocol.BODY_CHUNK)
        self.assertEqual(blocking.names(), ["read"])  # the next chunk, one at a time
        producer.pauseProducing()
        blocking.runNext()
        self.assertEqual(len(d.client()), clientprotocol.BODY_CHUNK)
        self.assertEqual(blocking.calls, [])  # paused: nothing read
        producer.resumeProducing()
        while blocking.names() == ["read"]:
            blocking.runNext()
        self.assertEqual(len(d.client()), clientprotocol.BODY_CHUNK + 5 + 5)
        self.assertIsNone(d.transport.producer)
        d.server(b"250 ok\r\n")
        self.assertEqual(blocking.names(), ["close"])
        blocking.runNext()
        [[result]] = d.quit()
        self.assertTrue(result.success)

    def test_smallBodyOneTrip(self) -> None:
        """
        A message shorter than a chunk costs one trip to a thread: opened,
        read and closed there at once; nothing is left to close.
        """
        blocking = Blocking()
        d = Dialog(self, settingsFor(), [makeMessage()], {"Q1": b"small\r\n"}, runBlocking=blocking)
        d.hello(["PIPELINING"])
        self.assertEqual(blocking.names(), ["_openBody"])
        blocking.runNext()
        d.client()
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(d.client(), b"small\r\n.\r\n")
        self.assertEqual(blocking.calls, [])
        d.server(b"250 ok\r\n")
        self.assertEqual(blocking.calls, [])  # no close: closed in the first trip
        [[result]] = d.quit()
        self.assertTrue(result.success)

    def test_onFinishedPerMessage(self) -> None:
        """
        onFinished reports each message as soon as its final dot is
        answered, while the session goes on; once each, in order.
        """
        reports: list[tuple[int, list[str], Any]] = []

        def onFinished(index: int, results: list[DeliveryResult], attempt: Any) -> None:
            reports.append((index, [kind(r) for r in results], attempt))

        d = Dialog(
            self,
            settingsFor(),
            [makeMessage("Q1"), makeMessage("Q2", recipients=["a@x.test", "b@x.test"])],
            onFinished=onFinished,
        )
        d.hello(["PIPELINING"])
        d.client()
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.client()
        self.assertEqual(reports, [])
        d.server(b"250 ok\r\n")
        self.assertEqual([r[:2] for r in reports], [(0, ["success"])])
        self.assertEqual(reports[0][2].peer, ("192.0.2.1", 25))
        self.assertIsNone(reports[0][2].tlsVersion)
        d.client()
        d.server(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        d.client()
        d.server(b"250 ok\r\n")
        self.assertEqual(
            [r[:2] for r in reports], [(0, ["success"]), (1, ["success", "permanent"])]
        )
        d.quit()
        self.assertEqual(len(reports), 2)

    def test_onFinishedAfterFailure(self) -> None:
        """A session that fails reports what was unfinished, once."""
        reports: list[int] = []
        d = Dialog(
            self,
            settingsFor(),
            [makeMessage("Q1"), makeMessage("Q2")],
            onFinished=lambda index, results, attempt: reports.append(index),
        )
        d.hello(["PIPELINING"])
        d.client()
        d.server(b"421 4.3.2 closing\r\n")
        d.done()
        self.assertEqual(reports, [0, 1])


def kind(r: DeliveryResult) -> str:
    return "success" if r.success else "permanent" if r.permanent else "transient"


class SizeAndExtensionTests(SynchronousTestCase):
    """What cannot go to an upstream is refused before MAIL."""

    def assertRefused(
        self, capabilities: list[str], message: QueuedMessage, code: int, enhanced: str
    ) -> DeliveryResult:
        d = Dialog(self, settingsFor(), [message])
        d.hello(capabilities)
        [[result]] = d.quit()
        self.assertTrue(result.permanent)
        self.assertEqual((result.code, result.enhanced), (code, enhanced))
        return result

    def test_tooBig(self) -> None:
        result = self.assertRefused(["SIZE 99"], makeMessage(size=100), 552, "5.3.4")
        self.assertEqual(result.text, "message too big for upstream")

    def test_sizeWithoutLimit(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage(size=10**9)])
        d.hello(["SIZE"])
        self.assertEqual(d.client(), b"MAIL FROM:<alice@example.com> SIZE=1000000000\r\n")

    def test_eightBitWithout8BITMIME(self) -> None:
        message = makeMessage(body=BodyType.EIGHTBITMIME)
        result = self.assertRefused(["PIPELINING"], message, 554, "5.6.3")
        self.assertIn("8BITMIME", result.text)

    def test_utf8WithoutSMTPUTF8(self) -> None:
        self.assertRefused(["8BITMIME"], makeMessage(smtputf8=True), 554, "5.6.7")
        self.assertRefused(["8BITMIME"], makeMessage(recipients=["ü@x.test"]), 554, "5.6.7")

    def test_controlCharactersInAddress(self) -> None:
        """
        An address with a control character is never put on the wire
        (defence in depth against command injection).
        """
        message = makeMessage(recipients=["a\r\nRSET@x.test", "ok@x.test"])
        d = Dialog(self, settingsFor(), [message])
        d.hello([])
        d.expect(b"MAIL FROM:<alice@example.com>\r\n")
        d.server(b"250 ok\r\n")
        d.expect(b"RCPT TO:<ok@x.test>\r\n")
        self.assertTrue(d.results == [])
        d.server(b"250 ok\r\n")
        d.client()
        d.server(b"354 go\r\n")
        d.pumpBody()
        d.client()
        d.server(b"250 ok\r\n")
        [results] = d.quit()
        self.assertEqual([r.permanent for r in results], [True, False])
        self.assertEqual(results[0].enhanced, "5.1.3")


class TLSAndAuthDialogTests(SynchronousTestCase):
    def test_startTLSForgetsCapabilities(self) -> None:
        """
        STARTTLS: TLS starts with the given creator, EHLO is sent again and
        what the plain-text EHLO offered is forgotten (RFC 3207 4.2).
        """
        settings = settingsFor(TLSMode.STARTTLS, auth=("u", PASSWORD, "PLAIN"))
        d = Dialog(self, settings, [makeMessage()])
        d.hello(["STARTTLS", "AUTH PLAIN"])
        d.expect(b"STARTTLS\r\n")
        d.server(b"220 2.0.0 go ahead\r\n")
        self.assertEqual(d.transport.tlsCreators, [CREATOR])
        d.expect(b"EHLO gw.example.com\r\n")
        d.server(b"250-upstream.test\r\n250 PIPELINING\r\n")
        [[result]] = d.quit()
        self.assertTrue(result.transient)
        self.assertEqual(result.text, "upstream does not offer AUTH PLAIN")

    def test_authPlainAfterTLS(self) -> None:
        settings = settingsFor(TLSMode.STARTTLS, auth=("u", PASSWORD, "PLAIN"))
        d = Dialog(self, settings, [makeMessage()])
        d.hello(["STARTTLS"])
        d.client()
        d.server(b"220 go\r\n")
        d.client()
        d.server(b"250-upstream.test\r\n250 AUTH LOGIN PLAIN\r\n")
        d.expect(b"AUTH PLAIN AHUAczNjcmV0IHBhc3M=\r\n")
        d.server(b"235 2.7.0 ok\r\n")
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))

    def test_authLogin(self) -> None:
        settings = settingsFor(TLSMode.IMPLICIT, auth=("u", PASSWORD, "LOGIN"))
        d = Dialog(self, settings, [makeMessage()])
        d.hello(["AUTH LOGIN"])
        d.expect(b"AUTH LOGIN\r\n")
        d.server(b"334 VXNlcm5hbWU6\r\n")
        d.expect(b"dQ==\r\n")
        d.server(b"334 UGFzc3dvcmQ6\r\n")
        d.expect(b"czNjcmV0IHBhc3M=\r\n")
        d.server(b"235 2.7.0 ok\r\n")
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))

    def test_authRefused(self) -> None:
        """535 to AUTH: transient for all, text says it is our configuration."""
        settings = settingsFor(TLSMode.IMPLICIT, auth=("u", PASSWORD, "PLAIN"))
        d = Dialog(self, settings, [makeMessage(), makeMessage("Q2")])
        d.hello(["AUTH PLAIN"])
        d.client()
        d.server(b"535 5.7.8 bad credentials\r\n")
        results = d.quit()
        self.assertEqual([r[0].transient for r in results], [True, True])
        self.assertIn("check the relay configuration", results[0][0].text)
        self.assertEqual(results[0][0].code, 0)

    def test_noAuthWithoutTLS(self) -> None:
        """
        Opportunistic mode without STARTTLS offered: AUTH credentials are
        not sent in plain text; nothing is delivered.
        """
        settings = settingsFor(TLSMode.OPPORTUNISTIC, auth=("u", PASSWORD, "PLAIN"))
        d = Dialog(self, settings, [makeMessage()])
        d.hello(["AUTH PLAIN"])
        [[result]] = d.quit()
        self.assertTrue(result.transient)
        self.assertIn("without TLS", result.text)

    def test_opportunisticWithoutTLS(self) -> None:
        d = Dialog(self, settingsFor(TLSMode.OPPORTUNISTIC), [makeMessage()])
        d.hello(["PIPELINING"])
        self.assertTrue(d.client().startswith(b"MAIL FROM:"))
        self.assertEqual(d.transport.tlsCreators, [])

    def test_startTLSRequiredNotOffered(self) -> None:
        d = Dialog(self, settingsFor(TLSMode.STARTTLS), [makeMessage()])
        d.hello(["PIPELINING", "AUTH PLAIN"])
        [[result]] = d.quit()
        self.assertEqual(result.text, "TLS required but upstream did not offer STARTTLS")
        self.assertTrue(result.transient)

    def test_startTLSRefusedNeverFallsBack(self) -> None:
        """A refused STARTTLS is never followed by plain-text mail."""
        d = Dialog(self, settingsFor(TLSMode.OPPORTUNISTIC), [makeMessage()])
        d.hello(["STARTTLS"])
        d.expect(b"STARTTLS\r\n")
        d.server(b"454 4.7.0 TLS not available\r\n")
        [[result]] = d.quit()
        self.assertTrue(result.transient)
        self.assertEqual(result.code, 454)

    def test_startTLSResponseInjection(self) -> None:
        """
        Bytes after the 220 to STARTTLS (sent before TLS, to be read as if
        sent under it) end the session before TLS starts.
        """
        for extra in (b"250-injected\r\n", b"250 injected\r\n", b"25"):
            d = Dialog(self, settingsFor(TLSMode.STARTTLS), [makeMessage()])
            d.hello(["STARTTLS"])
            d.client()
            d.server(b"220 go\r\n" + extra)
            [[result]] = d.done()
            self.assertTrue(result.transient)
            self.assertIn("protocol error", result.text)
            self.assertEqual(d.transport.tlsCreators, [])
            self.assertEqual(d.client(), b"")

    def test_heloFallback(self) -> None:
        """
        EHLO refused with 5xx: HELO when neither TLS nor AUTH is needed; an
        8-bit message then cannot go.
        """
        d = Dialog(self, settingsFor(), [makeMessage(body=BodyType.EIGHTBITMIME)])
        d.server(b"220 hi\r\n")
        d.expect(b"EHLO gw.example.com\r\n")
        d.server(b"502 5.5.1 what?\r\n")
        d.expect(b"HELO gw.example.com\r\n")
        d.server(b"250 hi\r\n")
        [[result]] = d.quit()
        self.assertEqual(result.enhanced, "5.6.3")

    def test_noHeloWhenTLSRequired(self) -> None:
        d = Dialog(self, settingsFor(TLSMode.STARTTLS), [makeMessage()])
        d.server(b"220 hi\r\n")
        d.client()
        d.server(b"502 5.5.1 what?\r\n")
        [[result]] = d.quit()
        self.assertTrue(result.transient)
        self.assertIn("EHLO", result.text)

    def test_greetingRefused(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.server(b"554 5.3.2 go away\r\n")
        [[result]] = d.quit()
        self.assertTrue(result.transient)
        self.assertIn("go away", result.text)

    def test_settingsHidePassword(self) -> None:
        settings = settingsFor(TLSMode.STARTTLS, auth=("u", PASSWORD, "PLAIN"))
        self.assertNotIn(PASSWORD, repr(settings))

    def test_settingsChecks(self) -> None:
        self.assertRaises(ValueError, RelaySettings, "h", "gw", TLSMode.STARTTLS)
        self.assertRaises(ValueError, RelaySettings, "h", "gw\r\nRSET", TLSMode.NONE)
        self.assertRaises(ValueError, RelaySettings, "h", "", TLSMode.NONE)
        self.assertRaises(
            ValueError, RelaySettings, "h", "gw", TLSMode.NONE, auth=("u", "p", "CRAM-MD5")
        )


class TimeoutTests(SynchronousTestCase):
    """Every wait is bounded (RFC 5321 4.5.3.2), on the Clock given."""

    def assertTimedOut(self, d: Dialog, seconds: float, text: str) -> None:
        d.clock.advance(seconds - 0.5)
        self.assertEqual(d.results, [])
        d.clock.advance(0.5)
        [[result]] = d.done()
        self.assertTrue(result.transient)
        self.assertEqual(result.text, text)
        self.assertTrue(d.transport.aborted)
        self.assertEqual(d.clock.getDelayedCalls(), [])

    def test_connect(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()], connect=False)
        d.clock.advance(29)
        self.assertEqual(d.results, [])
        d.clock.advance(1)
        self.assertEqual(d.results[0][0][0].text, "timeout connecting to upstream")
        self.assertEqual(d.clock.getDelayedCalls(), [])

    def test_connectionRefused(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()], connect=False)
        d.endpoint.connecting.errback(error.ConnectionRefusedError())
        [[[result]]] = d.results
        self.assertEqual(result.text, "connection refused")
        self.assertTrue(result.transient)
        self.assertEqual(d.clock.getDelayedCalls(), [])

    def test_greeting(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        self.assertTimedOut(d, 300, "timeout waiting for greeting")

    def test_ehlo(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.server(b"220 hi\r\n")
        self.assertTimedOut(d, 300, "timeout waiting for reply to EHLO")

    def test_rcpt(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.hello(["PIPELINING"])
        d.server(b"250 ok\r\n")
        self.assertTimedOut(d, 300, "timeout waiting for reply to RCPT")

    def test_dataInitiation(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.hello(["PIPELINING"])
        d.server(b"250 ok\r\n250 ok\r\n")
        self.assertTimedOut(d, 120, "timeout waiting for reply to DATA")

    def test_dataBlock(self) -> None:
        """The transport paused (taking no data) for 180 s is a timeout."""
        d = Dialog(self, settingsFor(), [makeMessage()], {"Q1": b"x" * 200_000})
        d.transport.bufferLimit = 1000
        d.hello(["PIPELINING"])
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsNotNone(d.transport.producer)
        self.assertTimedOut(d, 180, "timeout sending message data (upstream took no data)")

    def test_finalDot(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.hello(["PIPELINING"])
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.pumpBody()
        self.assertTimedOut(d, 600, "timeout waiting for reply to the final dot")

    def test_configurable(self) -> None:
        settings = settingsFor(timeouts=RelayTimeouts(greeting=5))
        d = Dialog(self, settings, [makeMessage()])
        self.assertTimedOut(d, 5, "timeout waiting for greeting")

    def test_quitStall(self) -> None:
        """A stalled QUIT delays the results by the quit timeout at most."""
        d = Dialog(self, settingsFor(), [makeMessage(delivered=[]), makeMessage("Q2")])
        d.hello(["8BITMIME"])
        d.client()
        d.server(b"550 no\r\n")
        d.client()
        d.server(b"550 no\r\n")
        d.expect(b"QUIT\r\n")
        d.clock.advance(30)
        results = d.done()
        self.assertEqual([r[0].permanent for r in results], [True, True])

    def test_connectionLostMidData(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()], {"Q1": b"x" * 200_000})
        d.transport.bufferLimit = 1000
        d.hello(["PIPELINING"])
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.transport.closeNow(Failure(error.ConnectionLost()))
        [[result]] = d.done()
        self.assertEqual(result.text, "connection lost while sending message data")
        self.assertEqual(d.clock.getDelayedCalls(), [])


class HostileReplyTests(SynchronousTestCase):
    """An upstream that breaks the rules ends the session, transiently."""

    def assertProtocolError(self, *chunks: bytes, greeted: bool = True) -> DeliveryResult:
        d = Dialog(self, settingsFor(), [makeMessage()])
        if greeted:
            d.hello(["PIPELINING"])
            d.client()
        for chunk in chunks:
            d.server(chunk)
        [[result]] = d.done()
        self.assertTrue(result.transient)
        self.assertIn("protocol error", result.text)
        self.assertTrue(d.transport.aborted)
        return result

    def test_longLineWithoutNewline(self) -> None:
        self.assertProtocolError(b"250 " + b"x" * 5000)

    def test_longLineInPieces(self) -> None:
        self.assertProtocolError(*[b"250-" + b"x" * 1000] * 5)

    def test_longLineWithNewline(self) -> None:
        self.assertProtocolError(b"250 " + b"x" * 4093 + b"\r\n")

    def test_tooManyLines(self) -> None:
        self.assertProtocolError(b"250-x\r\n" * 100 + b"250 x\r\n")

    def test_codeChangesMidReply(self) -> None:
        self.assertProtocolError(b"250-x\r\n550 x\r\n")

    def test_badCodes(self) -> None:
        for line in (b"abc\r\n", b"199 x\r\n", b"260 x\r\n", b"2500 x\r\n", b"\r\n", b"25\r\n"):
            self.assertProtocolError(line, greeted=False)

    def test_replyToNoCommand(self) -> None:
        self.assertProtocolError(b"220 hi\r\n250 extra\r\n", greeted=False)

    def test_unexpectedIntermediate(self) -> None:
        self.assertProtocolError(b"334 what\r\n")

    def test_replyDuringData(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()], {"Q1": b"x" * 200_000})
        d.transport.bufferLimit = 1000
        d.hello(["PIPELINING"])
        d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.server(b"250 done early\r\n")
        [[result]] = d.done()
        self.assertIn("before the end of data", result.text)

    def test_nonPrintableTextSanitised(self) -> None:
        d = Dialog(self, settingsFor(), [makeMessage()])
        d.hello([])
        d.client()
        d.server(b"550 5.1.1 evil\x1b[31m\x00\xff text\r\n")
        [[result]] = d.quit()
        self.assertEqual(result.text, "evil?[31m?\ufffd text")


class ReplyParserTests(SynchronousTestCase):
    def test_multiline(self) -> None:
        parser = ReplyParser()
        self.assertEqual(parser.feed(b"250-5.1.1 one\r\n250-"), [])
        self.assertTrue(parser.pending)
        [reply] = parser.feed(b"5.1.1 two\r\n250 three\r\n")
        self.assertEqual((reply.code, reply.enhanced), (250, ""))
        [reply] = ReplyParser().feed(b"550-5.1.1 one\r\n550 5.1.1 two\r\n")
        self.assertEqual((reply.code, reply.enhanced, reply.lines), (550, "5.1.1", ("one", "two")))
        self.assertEqual(str(reply), "550 5.1.1 one two")

    def test_enhancedCodeMustMatchClass(self) -> None:
        [reply] = ReplyParser().feed(b"550 2.0.0 odd\r\n")
        self.assertEqual((reply.enhanced, reply.text), ("", "2.0.0 odd"))

    def test_bareLFAndBareCode(self) -> None:
        replies = ReplyParser().feed(b"250\n221 bye\n")
        self.assertEqual([(r.code, r.text) for r in replies], [(250, ""), (221, "bye")])

    def test_limitsExact(self) -> None:
        ReplyParser().feed(b"250 " + b"x" * 4092 + b"\r\n")
        ReplyParser().feed(b"250-x\r\n" * 99 + b"250 x\r\n")
        self.assertRaises(ProtocolError, ReplyParser().feed, b"250 " + b"x" * 4093 + b"\r\n")


class CapabilitiesTests(SynchronousTestCase):
    def parse(self, *lines: str) -> Capabilities:
        text = "".join(f"250-{line}\r\n" for line in ("up", *lines)) + "250 HELP\r\n"
        [reply] = ReplyParser().feed(text.encode())
        return Capabilities.fromEHLO(reply)

    def test_keywords(self) -> None:
        caps = self.parse("pipelining", "SIZE 1000", "AUTH plain LOGIN", "-bad", "8BITMIME")
        self.assertTrue(caps.offers("PIPELINING"))
        self.assertTrue(caps.offers("8BITMIME"))
        self.assertEqual(caps.sizeLimit, 1000)
        self.assertEqual(caps.authMechanisms, {"PLAIN", "LOGIN"})
        self.assertFalse(caps.offers("-BAD"))

    def test_sizeValues(self) -> None:
        self.assertIsNone(self.parse().sizeLimit)
        self.assertEqual(self.parse("SIZE").sizeLimit, 0)
        self.assertEqual(self.parse("SIZE x").sizeLimit, 0)
        self.assertEqual(self.parse("SIZE " + "9" * 4000).sizeLimit, 0)


def trickyBody() -> bytes:
    """
    A message whose dot lines fall at 64 KiB read boundaries: between CR
    and LF before a ".", right before a "..", between a "." and its CRLF;
    with 8-bit text and a 5000-octet line.
    """
    size = clientprotocol.BODY_CHUNK

    def fillTo(body: bytes, end: int) -> bytes:
        return body + b"f" * (end - len(body) - 2) + b"\r\n"

    body = b"Subject: tricky\r\n\r\n"
    body += b"a" * (size - 1 - len(body)) + b"\r"
    body += b"\n.\r\n"
    body = fillTo(body, 2 * size) + b"..\r\n"
    body = fillTo(body, 3 * size - 1) + b".\r\n"
    body += "Grüße, 日本語 \u00ff\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"
    body += b"L" * 5000 + b"\r\n"
    body += b".\r\n..\r\n...\r\n.x\r\n\r\n.\r\n"
    return body


class LoopbackTests(TestCase):
    """Real sessions over 127.0.0.1 with the recording upstream."""

    timeout = 60

    def setUp(self) -> None:
        base = self.mktemp()
        self.tlsFiles = makeTLSFiles(os.path.join(base, "good"))
        self.otherTLSFiles = makeTLSFiles(os.path.join(base, "other"))

    @inlineCallbacks
    def upstream(self, **knobs: Any) -> Any:
        upstream = yield startUpstream(reactor, **knobs)
        self.addCleanup(upstream.stop)
        return upstream

    def settings(self, mode: TLSMode = TLSMode.STARTTLS, **kw: Any) -> RelaySettings:
        if mode is not TLSMode.NONE:
            kw.setdefault("tlsCreator", self.tlsFiles.clientCreator("localhost"))
        return RelaySettings("localhost", "gw.example.com", mode, **kw)

    def deliver(
        self,
        upstream: Any,
        settings: RelaySettings,
        messages: list[QueuedMessage],
        bodies: dict[str, bytes] | None = None,
    ) -> Deferred[list[list[DeliveryResult]]]:
        if bodies is None:
            bodies = {m.queueId: b"Subject: hi\r\n\r\nHello.\r\n" for m in messages}
        openBody = opener(bodies)
        return deliverBatch(
            reactor, upstream.endpoint(reactor), settings, [(m, openBody) for m in messages]
        )

    @inlineCallbacks
    def test_startTLSVerifiedAndAuth(self) -> Any:
        """
        STARTTLS with a certificate that verifies, then AUTH PLAIN or LOGIN
        sent only under TLS; the message arrives.
        """
        for mechanism in ("PLAIN", "LOGIN"):
            upstream = yield self.upstream(
                tlsOptions=self.tlsFiles.serverOptions(), credentials=("relay@x", PASSWORD)
            )
            settings = self.settings(auth=("relay@x", PASSWORD, mechanism))
            [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
            self.assertTrue(result.success, result)
            self.assertEqual(result.remote, "localhost")
            [received] = upstream.factory.transactions
            self.assertEqual((received.tls, received.user), (True, "relay@x"))
            self.assertEqual(received.rcpts, ("bob@example.net",))
            self.assertEqual(received.data, b"Subject: hi\r\n\r\nHello.\r\n")
            auth = [c for c in upstream.factory.commands if c.line.startswith(b"AUTH")]
            self.assertEqual(
                [(c.line.split()[1], c.tls) for c in auth], [(mechanism.encode(), True)]
            )

    @inlineCallbacks
    def test_certificateNotTrusted(self) -> Any:
        """A certificate from an unknown issuer: transient, no MAIL sent."""
        upstream = yield self.upstream(tlsOptions=self.tlsFiles.serverOptions())
        settings = self.settings(tlsCreator=self.otherTLSFiles.clientCreator("localhost"))
        [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
        self.assertTrue(result.transient)
        self.assertTrue(result.text.startswith("certificate verification failed"), result.text)
        self.assertEqual(upstream.factory.transactions, [])
        self.assertFalse(any(line.startswith(b"MAIL") for line in upstream.factory.commandLines()))

    @inlineCallbacks
    def test_certificateWrongName(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.tlsFiles.serverOptions())
        settings = self.settings(tlsCreator=self.tlsFiles.clientCreator("mx.other.test"))
        [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
        self.assertTrue(result.transient)
        self.assertTrue(result.text.startswith("certificate verification failed"), result.text)
        self.assertFalse(any(line.startswith(b"MAIL") for line in upstream.factory.commandLines()))

    @inlineCallbacks
    def test_tlsRequiredNotOffered(self) -> Any:
        """
        STARTTLS mode and an upstream without STARTTLS that offers AUTH in
        plain text: transient, neither AUTH nor MAIL sent.
        """
        upstream = yield self.upstream(credentials=("relay@x", PASSWORD), authWithoutTLS=True)
        settings = self.settings(auth=("relay@x", PASSWORD, "PLAIN"))
        [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
        self.assertTrue(result.transient)
        self.assertEqual(result.text, "TLS required but upstream did not offer STARTTLS")
        lines = upstream.factory.commandLines()
        self.assertEqual(lines, [b"EHLO gw.example.com", b"QUIT"])

    @inlineCallbacks
    def test_implicitTLS(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.tlsFiles.serverOptions(), implicitTLS=True)
        [[result]] = yield self.deliver(upstream, self.settings(TLSMode.IMPLICIT), [makeMessage()])
        self.assertTrue(result.success, result)
        self.assertEqual(upstream.factory.transactions[0].tls, True)
        self.assertNotIn(b"STARTTLS", upstream.factory.commandLines())

    @inlineCallbacks
    def test_oneOfThreeRefused(self) -> Any:
        upstream = yield self.upstream(rcptReplies={"b@x.test": "550 5.1.1 no such user"})
        message = makeMessage(recipients=["a@x.test", "b@x.test", "c@x.test"])
        [results] = yield self.deliver(upstream, self.settings(TLSMode.NONE), [message])
        self.assertEqual(
            summary(results),
            [
                ("a@x.test", "success", 250),
                ("b@x.test", "permanent", 550),
                ("c@x.test", "success", 250),
            ],
        )
        self.assertEqual(results[1].text, "no such user")
        self.assertEqual(upstream.factory.transactions[0].rcpts, ("a@x.test", "c@x.test"))

    @inlineCallbacks
    def test_transientAtRcpt(self) -> Any:
        upstream = yield self.upstream(
            rcptReplies={"a@x.test": "451 4.3.0 later"}, pipelining=False
        )
        [[result]] = yield self.deliver(
            upstream, self.settings(TLSMode.NONE), [makeMessage(recipients=["a@x.test"])]
        )
        self.assertEqual(summary([result]), [("a@x.test", "transient", 451)])
        self.assertIn(b"RSET", upstream.factory.commandLines())

    @inlineCallbacks
    def test_finalDot552(self) -> Any:
        upstream = yield self.upstream(dotReply="552 5.3.4 too much")
        message = makeMessage(recipients=["a@x.test", "b@x.test"])
        [results] = yield self.deliver(upstream, self.settings(TLSMode.NONE), [message])
        self.assertEqual(
            summary(results), [("a@x.test", "permanent", 552), ("b@x.test", "permanent", 552)]
        )

    @inlineCallbacks
    def test_droppedMidData(self) -> Any:
        upstream = yield self.upstream(dropAt="body")
        bodies = {"Q1": b"x" * 1000 + b"\r\n" * 500_000}
        [[result]] = yield self.deliver(
            upstream, self.settings(TLSMode.NONE), [makeMessage()], bodies
        )
        self.assertTrue(result.transient)
        self.assertTrue(
            result.text.startswith(("upstream closed the connection", "connection lost")),
            result.text,
        )

    @inlineCallbacks
    def test_stallTimesOut(self) -> Any:
        upstream = yield self.upstream(stallAt="rcpt")
        settings = self.settings(TLSMode.NONE, timeouts=RelayTimeouts(rcpt=0.2))
        [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
        self.assertTrue(result.transient)
        self.assertEqual(result.text, "timeout waiting for reply to RCPT")

    @inlineCallbacks
    def test_bodyArrivesByteForByte(self) -> Any:
        """
        Dot lines at read boundaries, 8-bit text and a 5000-octet line
        arrive exactly, over TLS.
        """
        upstream = yield self.upstream(tlsOptions=self.tlsFiles.serverOptions())
        body = trickyBody()
        message = makeMessage(body=BodyType.EIGHTBITMIME, size=len(body))
        [[result]] = yield self.deliver(upstream, self.settings(), [message], {"Q1": body})
        self.assertTrue(result.success, result)
        [received] = upstream.factory.transactions
        self.assertEqual(received.mailParams, ("BODY=8BITMIME",))
        self.assertEqual(received.data, body)

    @inlineCallbacks
    def test_twentyMebibytes(self) -> Any:
        """
        A 20 MiB message, streamed from a file 64 KiB at a time off the
        reactor thread, arrives byte for byte.
        """
        path = self.mktemp()
        line = b"0123456789" * 7 + b"abcd\r\n"
        with open(path, "wb") as f:
            for i in range(20 * 1024 * 1024 // len(line) + 1):
                f.write(b"." + line if i % 7 == 0 else line)
            size = f.tell()
        upstream = yield self.upstream(size=30 * 1024 * 1024)
        message = makeMessage(size=size)
        reads: list[tuple[int, bool]] = []

        class Recording(io.FileIO):
            def read(self, size: int | None = -1) -> bytes:
                onMain = threading.current_thread() is threading.main_thread()
                reads.append((-1 if size is None else size, onMain))
                return super().read(size)

        results = yield deliverBatch(
            reactor,
            upstream.endpoint(reactor),
            self.settings(TLSMode.NONE),
            [(message, lambda queueId: Recording(path, "rb"))],
            runBlocking=threadPoolRunner(reactor),
        )
        self.assertTrue(results[0][0].success, results)
        # Read in chunks, each in a thread of the pool, never the whole file.
        self.assertEqual({r[0] for r in reads}, {clientprotocol.BODY_CHUNK})
        self.assertEqual({r[1] for r in reads}, {False})
        [received] = upstream.factory.transactions
        self.assertEqual(received.mailParams, (f"SIZE={size}",))
        self.assertGreater(size, 20 * 1024 * 1024)
        with open(path, "rb") as original:
            self.assertTrue(received.data == original.read(), "data differs")

    @inlineCallbacks
    def test_noFactoryNoise(self) -> Any:
        """Issue 14: no "Starting factory <... at 0x...>" line per connection."""
        upstream = yield self.upstream()
        with capturedLogs() as events:
            [[result]] = yield self.deliver(upstream, self.settings(TLSMode.NONE), [makeMessage()])
        self.assertTrue(result.success, result)
        lines = [formatEvent(e) for e in events]
        self.assertFalse([line for line in lines if "factory" in line.lower()], lines)

    @inlineCallbacks
    def test_eightBitWithout8BITMIME(self) -> Any:
        upstream = yield self.upstream(eightBitMIME=False)
        message = makeMessage(body=BodyType.EIGHTBITMIME)
        [[result]] = yield self.deliver(upstream, self.settings(TLSMode.NONE), [message])
        self.assertTrue(result.permanent)
        self.assertEqual((result.code, result.enhanced), (554, "5.6.3"))
        self.assertEqual(upstream.factory.commandLines(), [b"EHLO gw.example.com", b"QUIT"])

    @inlineCallbacks
    def test_twoMessagesOneConnection(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.tlsFiles.serverOptions())
        one = makeMessage("Q1", recipients=["a@x.test"])
        two = makeMessage("Q2", sender=None, recipients=["b@x.test"])
        results = yield self.deliver(
            upstream, self.settings(), [one, two], {"Q1": b"one\r\n", "Q2": b"two\r\n"}
        )
        self.assertEqual([r[0].success for r in results], [True, True])
        self.assertEqual(upstream.factory.connectionCount, 1)
        received = yield upstream.factory.waitForTransactions(2)
        self.assertEqual(
            [(r.mailFrom, r.rcpts, r.data) for r in received],
            [("alice@example.com", ("a@x.test",), b"one\r\n"), ("", ("b@x.test",), b"two\r\n")],
        )
        self.assertNotIn(b"RSET", upstream.factory.commandLines())

    @inlineCallbacks
    def test_wrongCredentials(self) -> Any:
        upstream = yield self.upstream(
            tlsOptions=self.tlsFiles.serverOptions(), credentials=("relay@x", PASSWORD)
        )
        settings = self.settings(auth=("relay@x", "wrong", "LOGIN"))
        [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
        self.assertTrue(result.transient)
        self.assertIn("rejected our AUTH credentials", result.text)
        self.assertEqual(upstream.transactions, [])

    @inlineCallbacks
    def test_droppedAndStalledEarly(self) -> Any:
        """The upstream's drop and stall knobs work at the greeting too."""
        upstream = yield self.upstream(dropAt="greeting")
        [[result]] = yield self.deliver(upstream, self.settings(TLSMode.NONE), [makeMessage()])
        self.assertEqual(result.text, "upstream closed the connection while waiting for greeting")
        upstream = yield self.upstream(stallAt="greeting")
        settings = self.settings(TLSMode.NONE, timeouts=RelayTimeouts(greeting=0.1))
        [[result]] = yield self.deliver(upstream, settings, [makeMessage()])
        self.assertEqual(result.text, "timeout waiting for greeting")
        self.assertEqual(upstream.connectionCount, 1)

    @inlineCallbacks
    def test_connectionRefused(self) -> Any:
        upstream = yield startUpstream(reactor)
        endpoint = upstream.endpoint(reactor)
        yield upstream.stop()
        results = yield deliverBatch(
            reactor, endpoint, self.settings(TLSMode.NONE), [(makeMessage(), opener({}))]
        )
        self.assertEqual(results[0][0].text, "connection refused")
        self.assertTrue(results[0][0].transient)
