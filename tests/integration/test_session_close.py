"""
Closing as operators meet it: TLS clients that go silent, on real sockets,
against the whole gateway, in process and under ``twistd`` with SIGTERM.
Nothing may keep a connection, a place in the connection limits or a
stopping gateway past the close deadline.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from tests.integration import test_twistd
from tests.integration.support import GatewayTestCase


class _Silent(Protocol):
    """Reads the greeting, then never reads again (so never answers a close_notify)."""

    def __init__(self) -> None:
        self.greeted: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted.called:
            self.transport.transport.stopReading()  # type: ignore[attr-defined]
            self.greeted.callback(None)


class GatewayStopTests(GatewayTestCase):
    timeout = 30
    extraConfig = {"server": {"close_timeout": 0.5, "idle_timeout": 600}}

    def silentClient(self) -> Deferred[None]:
        client = _Silent()
        factory = ClientFactory()
        factory.buildProtocol = lambda addr: client  # type: ignore[method-assign]
        reactor.connectTCP(
            "127.0.0.1",
            self.submissionsPort,
            TLSMemoryBIOFactory(CertificateOptions(), True, factory),
        )

        def drop() -> None:
            if client.transport is not None:
                client.transport.transport.abortConnection()  # type: ignore[attr-defined]

        self.addCleanup(drop)
        return client.greeted

    @inlineCallbacks
    def test_stopServiceWithSilentTLSClients(self) -> Any:
        yield gatherResults([self.silentClient() for _ in range(3)])
        limiter = self.service.guards.connections
        assert limiter is not None
        self.assertEqual(limiter.openConnections, 3)
        yield self.service.stopService()
        self.assertEqual([f.connections for f in self.service.factories], [set(), set()])
        self.assertEqual(limiter.openConnections, 0)


class SigtermTests(TestCase):
    """``twistd mailgw`` exits on SIGTERM although a TLS client stays silent."""

    timeout = 120
    # Borrowed, not inherited: TwistdTests' own tests are not run again here.
    start = test_twistd.TwistdTests.start
    shortTemp = test_twistd.TwistdTests.shortTemp

    def test_sigtermWithSilentTLSClient(self) -> Any:
        demo = self.shortTemp()
        d = deferToThread(self.start, "--demo", "--demo-dir", str(demo))

        def silentThenTerm(ports: tuple[int, int]) -> Deferred[int]:
            def inThread() -> int:
                context = ssl.create_default_context(cafile=str(demo / "cert.pem"))
                raw = socket.create_connection(("127.0.0.1", ports[1]), timeout=10)
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    self.assertTrue(tls.recv(1000).startswith(b"220 "))
                    # Silent from here on: never reads, never closes.
                    self.process.send_signal(signal.SIGTERM)
                    try:
                        return self.process.wait(30)
                    except subprocess.TimeoutExpired:
                        self.fail("twistd still runs 30 s after SIGTERM: a silent client holds it")

            return deferToThread(inThread)

        d.addCallback(silentThenTerm)
        # twistd ends by re-raising the signal it stopped for: -SIGTERM is a clean exit.
        d.addCallback(lambda code: self.assertEqual(code, -signal.SIGTERM))
        return d
