"""
Tests for the server side of L{mailgw.tls}: ALPN offers, session tickets
and their key rotation, and the log line of a failed handshake.

The handshakes run in memory: Python's C{ssl} module (another OpenSSL
client, with its own defaults) on one side, the server's
C{OpenSSL.SSL.Connection} on the other, bytes carried between their memory
BIOs. The real listeners are exercised in
L{tests.integration.test_tls_clients}.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailgw import tls
from mailgw.tls import server as tlsserver


@attrs.define
class _FakeTLSFactory:
    wrappedFactory: object = attrs.Factory(object)


@attrs.define
class _FakeTLSProtocol:
    """
    What Twisted hands to C{serverConnectionForTLS} and sets as the
    connection's app data: a TLSMemoryBIOProtocol, with its factory and peer.
    """

    factory: _FakeTLSFactory = attrs.Factory(_FakeTLSFactory)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.7", 40123)


@attrs.define
class Handshake:
    client: ssl.SSLObject
    server: SSL.Connection
    clientError: Exception | None = None
    serverError: Exception | None = None

    @property
    def done(self) -> bool:
        return self.clientError is None and self.serverError is None


def _serverConnection(options: tls.ServerTLSOptions) -> SSL.Connection:
    protocol = _FakeTLSProtocol()
    server = options.serverConnectionForTLS(protocol)
    server.set_accept_state()
    server.set_app_data(protocol)
    return server


def handshake(
    options: tls.ServerTLSOptions, context: ssl.SSLContext, session: Any = None
) -> Handshake:
    """One TLS handshake between ``context`` and ``options``, in memory."""
    server = _serverConnection(options)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
    result = Handshake(client, server)
    clientDone = serverDone = False
    for _ in range(10):
        if not clientDone and result.clientError is None:
            try:
                client.do_handshake()
                clientDone = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                result.clientError = e
        toServer = outgoing.read()
        if toServer:
            server.bio_write(toServer)
        if not serverDone and result.serverError is None and (toServer or not clientDone):
            try:
                server.do_handshake()
                serverDone = True
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                result.serverError = e
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
        if (clientDone and serverDone) or result.clientError or result.serverError:
            break
    if result.done:
        # TLS 1.3 tickets come after the handshake; reading processes them.
        try:
            client.read(1)
        except ssl.SSLWantReadError:
            pass
    return result


class ServerTLSTestCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        base = self.mktemp()
        os.mkdir(base)
        self.cert, self.key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
        tls.makeSelfSigned(self.cert, self.key, "localhost")
        self.clock = Clock()

    def options(self, **kwargs: Any) -> tls.ServerTLSOptions:
        return tls.serverContextFactory(self.cert, self.key, now=self.clock.seconds, **kwargs)

    def client(self, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.cert)
        if maximum is not None:
            context.maximum_version = maximum
        return context


class ALPNTests(ServerTLSTestCase):
    """
    Offers of protocols the server does not speak are ignored (RFC 7301
    3.2); before, every such offer got a fatal alert.
    """

    def test_interfaces(self) -> None:
        options = self.options()
        self.assertIsInstance(options, CertificateOptions)
        verifyObject(IOpenSSLServerConnectionCreator, options)

    def _offer(self, protocols: list[str], maximum: ssl.TLSVersion | None = None) -> None:
        context = self.client(maximum)
        context.set_alpn_protocols(protocols)
        result = handshake(self.options(), context)
        self.assertTrue(result.done, (result.clientError, result.serverError))
        self.assertIsNone(result.client.selected_alpn_protocol())
        self.assertIsNone(result.server.get_alpn_proto_negotiated() or None)

    def test_smtp(self) -> None:
        self._offer(["smtp"])

    def test_h2(self) -> None:
        self._offer(["h2", "http/1.1"])

    def test_http11(self) -> None:
        self._offer(["http/1.1"])

    def test_tls12(self) -> None:
        self._offer(["h2", "http/1.1"], ssl.TLSVersion.TLSv1_2)

    def test_noOffer(self) -> None:
        result = handshake(self.options(), self.client())
        self.assertTrue(result.done)


class SessionTicketTests(ServerTLSTestCase):
    """A client that comes back with its session skips the full handshake."""

    def _resumes(self, maximum: ssl.TLSVersion | None = None) -> None:
        options, context = self.options(), self.client(maximum)
        first = handshake(options, context)
        self.assertTrue(first.done)
        self.assertFalse(first.client.session_reused)
        self.assertIsNotNone(first.client.session)
        self.assertTrue(first.client.session.has_ticket)
        second = handshake(options, context, session=first.client.session)
        self.assertTrue(second.done)
        self.assertTrue(second.client.session_reused)

    def test_tls13(self) -> None:
        self._resumes()

    def test_tls12(self) -> None:
        self._resumes(ssl.TLSVersion.TLSv1_2)

    def test_ticketLifetimeIsSessionTimeout(self) -> None:
        self.assertEqual(self.options(ticketLifetime=600).getContext().get_timeout(), 600)

    def test_keyReplacedAfterLifetime(self) -> None:
        """
        After C{ticketLifetime} seconds new connections get a new context
        (OpenSSL draws a new ticket key for it): the old ticket no longer
        resumes, the new one does.
        """
        options, context = self.options(ticketLifetime=600), self.client()
        first = handshake(options, context)
        contextBefore = options.getContext()
        self.clock.advance(599)
        self.assertIs(options.getContext(), contextBefore)
        self.assertTrue(handshake(options, context, first.client.session).client.session_reused)
        self.clock.advance(1)
        self.assertIsNot(options.getContext(), contextBefore)
        late = handshake(options, context, session=first.client.session)
        self.assertTrue(late.done)
        self.assertFalse(late.client.session_reused)
        again = handshake(options, context, session=late.client.session)
        self.assertTrue(again.client.session_reused)

    def test_off(self) -> None:
        options, context = self.options(ticketLifetime=0), self.client()
        first = handshake(options, context)
        self.assertTrue(first.done)
        self.clock.advance(10**6)
        self.assertIs(options.getContext(), options.getContext())
        second = handshake(options, context, session=first.client.session)
        self.assertTrue(second.done)
        self.assertFalse(second.client.session_reused)

    def test_negativeLifetime(self) -> None:
        self.assertRaises(ValueError, self.options, ticketLifetime=-1)


class HandshakeFailureLogTests(ServerTLSTestCase):
    """A failed handshake is logged once: the client and OpenSSL's reason."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        self.patch(tlsserver, "_log", Logger(namespace="mailgw.tls", observer=self.events.append))

    def assertLogged(self, reason: str) -> None:
        self.assertEqual(len(self.events), 1, self.events)
        [event] = self.events
        self.assertEqual(event["client"], "192.0.2.7:40123")
        self.assertIn(reason, event["reason"])
        self.assertIn("TLS handshake failed", event["log_format"])

    def test_untrustedCertificate(self) -> None:
        """The client refuses our certificate: its alert is the reason."""
        other = ssl.create_default_context()  # the system store lacks our certificate
        result = handshake(self.options(), other)
        self.assertIsInstance(result.clientError, ssl.SSLCertVerificationError)
        self.assertIsNotNone(result.serverError)
        self.assertLogged("alert")

    def test_notTLS(self) -> None:
        server = _serverConnection(self.options())
        server.bio_write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertRaises(SSL.Error, server.do_handshake)
        self.assertLogged("http request")

    def test_oldProtocol(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        result = handshake(self.options(), context)
        self.assertIsNotNone(result.serverError)
        self.assertLogged("unsupported protocol")

    def test_hangUpMidHandshake(self) -> None:
        """Twisted reads once more when the transport closes: that read fails."""
        server = _serverConnection(self.options())
        server.bio_write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertRaises(SSL.WantReadError, server.do_handshake)
        server.bio_shutdown()
        self.assertRaises(SSL.Error, server.recv, 1024)
        self.assertLogged("")

    def test_probeNotLogged(self) -> None:
        """A connection closed before any byte (a port check) is not a handshake."""
        server = _serverConnection(self.options())
        server.bio_shutdown()
        self.assertRaises(SSL.Error, server.recv, 1024)
        self.assertEqual(self.events, [])

    def test_successNotLogged(self) -> None:
        self.assertTrue(handshake(self.options(), self.client()).done)
        self.assertEqual(self.events, [])
