"""
A client that pipelines commands and never reads the replies must
not make the server buffer replies without bound.

The server reads every command as it comes and writes each reply to the
transport; nothing stops it reading when the transport cannot send (the
protocol never registers as a producer), so replies pile up in the
transport's write buffer: NOOP (6 octets in) gives 14 octets out, EHLO
about 150, for as long as the client keeps sending and does not read.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw.auth.realm import makePortal
from mailgw.server.factory import ServerSettings, SubmissionFactory
from mailgw.testing import MemorySpool
from tests.helpers import Harness

# More output than this held for one client that does not read is the bug.
LIMIT = 1024 * 1024
# What the client sends without reading: 16 MiB of NOOP lines.
FLOOD = b"NOOP\r\n" * (16 * 1024 * 1024 // 6)


def _pendingOutput(transport: Any) -> int:
    """Octets a Twisted TCP transport holds that the kernel did not take yet."""
    data = getattr(transport, "dataBuffer", b"")
    temp = getattr(transport, "_tempDataBuffer", [])
    return len(data) + sum(map(len, temp))


class _NonReader(Protocol):
    """Sends the flood and never reads a byte of the replies."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # stop reading: replies stay unread
        self.transport.write(FLOOD)


class OutputBoundedOverSocketsTests(TestCase):
    def test_clientThatNeverReadsCannotGrowServerMemory(self) -> Deferred[None]:
        clock = Clock()  # server timers never fire during the test
        portal = makePortal([InMemoryUsernamePasswordDatabaseDontUse(u=b"p")])
        factory = SubmissionFactory(
            ServerSettings(hostname="mx.test"),
            portal,
            MemorySpool(clock=clock),
            clock,
            tlsContext=None,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _NonReader()
        clientFactory = ClientFactory()
        clientFactory.buildProtocol = lambda addr: client  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)

        def closeBoth() -> Deferred[None]:
            for server in list(factory.connections):
                server.transport.abortConnection()
            if client.transport is not None:
                client.transport.abortConnection()
            closed: Deferred[None] = Deferred()

            def wait(_: object = None) -> None:
                if factory.connections:
                    reactor.callLater(0.01, wait)
                else:
                    closed.callback(None)

            client.lost.addCallback(wait)
            return closed

        self.addCleanup(closeBoth)

        done: Deferred[None] = Deferred()
        state = {"ticks": 0, "peak": 0}

        def poll() -> None:
            state["ticks"] += 1
            servers = list(factory.connections)
            if servers:
                transport = servers[0].transport
                pending = _pendingOutput(transport)
                state["peak"] = max(state["peak"], pending)
                if pending > LIMIT:
                    done.errback(
                        self.failureException(
                            f"server holds {pending} octets of unread replies for one "
                            f"client (limit {LIMIT}): it kept reading commands although "
                            "the client read none of its replies"
                        )
                    )
                    return
                stoppedReading = transport not in reactor.getReaders()
                if stoppedReading and state["ticks"] > 10:
                    done.callback(None)
                    return
            if state["ticks"] >= 150:  # 3 s: the limit was never passed
                done.callback(None)
                return
            reactor.callLater(0.02, poll)

        reactor.callLater(0.02, poll)
        return done


class OutputBoundedInMemoryTests(SynchronousTestCase):
    def test_transportFullStopsCommandHandling(self) -> None:
        """
        When the transport says its buffer is full (it pauses its registered
        producer), the server answers nothing more until it is resumed, and
        then answers everything in order.
        """
        h = Harness()
        producer = h.transport.producer
        self.assertIsNotNone(
            producer, "the server does not register as a producer on its transport"
        )
        self.assertTrue(h.transport.streaming)
        producer.pauseProducing()
        h.send(b"NOOP\r\n" * 5)
        self.assertEqual(h.take(), b"")
        producer.resumeProducing()
        self.assertEqual(h.take(), b"250 2.0.0 Ok\r\n" * 5)
