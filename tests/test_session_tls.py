"""
D2 over real sockets: a TLS client on 127.0.0.1 that never answers the
server's close_notify cannot keep its connection, its place in the
connection limits or a stopping listener.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from mailgw.auth.realm import makePortal
from mailgw.config import LimitsConfig
from mailgw.limits import ConnectionLimiter
from mailgw.server.factory import Guards, ServerSettings, SubmissionFactory
from mailgw.testing import MemorySpool
from mailgw.tls import makeSelfSigned, serverContextFactory


class SilentTLSClient(Protocol):
    """
    Completes the handshake, reads the greeting, then never reads again:
    it never sees, let alone answers, the server's close_notify.
    """

    def __init__(self) -> None:
        self.greeted: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted.called:
            # The TCP transport under the TLS layer stops reading.
            self.transport.transport.stopReading()  # type: ignore[attr-defined]
            self.greeted.callback(None)


def until(condition: Any) -> Deferred[None]:
    """Fires once ``condition()`` is true (checked every 10 ms); trial's timeout bounds it."""
    d: Deferred[None] = Deferred()

    def check() -> None:
        if condition():
            d.callback(None)
        else:
            reactor.callLater(0.01, check)

    check()
    return d


class SilentTLSPeerOverSocketsTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        cert, key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
        makeSelfSigned(cert, key, "localhost")
        self.serverContext = serverContextFactory(cert, key)

    @inlineCallbacks
    def connect(self, **settings: Any) -> Any:
        self.limiter = ConnectionLimiter(reactor, LimitsConfig())
        self.factory = SubmissionFactory(
            ServerSettings(hostname="localhost", **settings),
            makePortal([InMemoryUsernamePasswordDatabaseDontUse(u=b"p")]),
            MemorySpool(),
            reactor,
            self.serverContext,
            implicitTLS=True,
            guards=Guards(connections=self.limiter),
        )
        port = reactor.listenTCP(
            0, TLSMemoryBIOFactory(self.serverContext, False, self.factory), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.client = SilentTLSClient()
        clientFactory = ClientFactory()
        clientFactory.buildProtocol = lambda addr: self.client  # type: ignore[method-assign]
        wrapped = TLSMemoryBIOFactory(CertificateOptions(), True, clientFactory)
        reactor.connectTCP("127.0.0.1", port.getHost().port, wrapped)
        self.addCleanup(self.dropClient)
        yield self.client.greeted
        self.assertEqual(len(self.factory.connections), 1)
        self.assertEqual(self.limiter.openConnections, 1)

    def dropClient(self) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.transport.abortConnection()  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_shutdownCompletes(self) -> Any:
        yield self.connect(closeTimeout=0.3)
        yield self.factory.shutdown()
        self.assertEqual(self.factory.connections, set())
        self.assertEqual(self.limiter.openConnections, 0)

    @inlineCallbacks
    def test_idleDeadlineEndsTheConnection(self) -> Any:
        yield self.connect(idleTimeout=0.2, closeTimeout=0.3)
        yield until(lambda: not self.factory.connections)
        self.assertEqual(self.limiter.openConnections, 0)
