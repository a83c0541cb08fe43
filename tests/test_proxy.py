"""
Tests for L{mailgw.proxy}: the PROXY protocol parser, the wrapper in memory
(trusted and untrusted peers, every split, garbage, the timeout), and the
real gateway behind it on loopback sockets (STARTTLS and implicit TLS).
"""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocol, ISSLTransport, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides
from zope.interface.verify import verifyObject

from mailgw.auth.realm import makePortal
from mailgw.proxy import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyFactory,
    ProxyHeader,
    ProxyHeaderError,
    parseProxyHeader,
)
from mailgw.server.factory import ServerSettings, SubmissionFactory
from mailgw.testing import MemorySpool
from mailgw.tls import makeSelfSigned, serverContextFactory

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48")]
PROXY_PEER = IPv4Address("TCP", "10.0.0.2", 51000)
STRANGER = IPv4Address("TCP", "198.51.100.7", 52000)
LISTENER = IPv4Address("TCP", "10.0.0.1", 587)
CLIENT = IPv4Address("TCP", "203.0.113.9", 40000)
DESTINATION = IPv4Address("TCP", "192.0.2.25", 587)

V1_TCP4 = b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 587\r\n"
V1_TCP6 = b"PROXY TCP6 2001:DB8:0:0::9 2001:db8::25 40000 587\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


def v2(command: int = 1, family: int = 0x11, body: bytes | None = None, version: int = 2) -> bytes:
    """A v2 header; ``body`` defaults to CLIENT -> DESTINATION for ``family``."""
    if body is None:
        if family == 0x21:
            body = (
                ipaddress.IPv6Address("2001:db8::9").packed
                + ipaddress.IPv6Address("2001:db8::25").packed
                + struct.pack("!HH", 40000, 587)
            )
        else:
            body = bytes([203, 0, 113, 9, 192, 0, 2, 25]) + struct.pack("!HH", 40000, 587)
    return (
        V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body
    )


V2_TCP4 = v2()
V2_TCP6 = v2(family=0x21)
V2_LOCAL = v2(command=0, family=0x00, body=b"")
# A NOOP TLV (type 0x04) and an authority TLV after the addresses: skipped.
V2_TLVS = v2(body=v2()[16:] + b"\x04\x00\x03abc" + b"\x02\x00\x0bexample.org")

VALID = [
    (V1_TCP4, CLIENT, DESTINATION),
    (V1_TCP6, IPv6Address("TCP", "2001:db8::9", 40000), IPv6Address("TCP", "2001:db8::25", 587)),
    (V2_TCP4, CLIENT, DESTINATION),
    (V2_TCP6, IPv6Address("TCP", "2001:db8::9", 40000), IPv6Address("TCP", "2001:db8::25", 587)),
    (V2_TLVS, CLIENT, DESTINATION),
    (V1_UNKNOWN, None, None),
    (V2_LOCAL, None, None),
]

GARBAGE = [
    b"EHLO client.example\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"proxy TCP4 203.0.113.9 192.0.2.25 40000 587\r\n",
    b"PROXY\r\n",
    b"PROXY \r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY TCP5 203.0.113.9 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 40000\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 587 25\r\n",
    b"PROXY TCP4  203.0.113.9 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 <script> 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 mail.example 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 203.0.113.009 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 203.0.113.256 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 2001:db8::9 2001:db8::25 40000 587\r\n",
    b"PROXY TCP6 203.0.113.9 192.0.2.25 40000 587\r\n",
    b"PROXY TCP6 fe80::9%eth0 fe80::25 40000 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 65536 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 -1 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 +1 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 040000 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 587\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 587\r\r\n",
    b"PROXY TCP4 203.0.113.9\x00 192.0.2.25 40000 587\r\n",
    b"PROXY TCP4 203.0.113.9 192.0.2.25 4\xd9\xa0 587\r\n",
    b"\r\n\r\nQUIT\r\n",  # v2 signature without its NUL
    V2_SIGNATURE[:-1] + b"X" + V2_TCP4[12:],
    v2(version=1),
    v2(version=3),
    v2(command=2),
    v2(command=0xF),
    v2(family=0x31, body=bytes(216)),  # UNIX stream
    v2(family=0x12),  # UDP over IPv4
    v2(family=0x22, body=bytes(36)),  # UDP over IPv6
    v2(family=0x10),  # INET, unspecified transport
    v2(family=0x11, body=bytes(11)),  # address block too short
    v2(family=0x21, body=bytes(35)),
]


class ParserTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for data, source, destination in VALID:
            header = parseProxyHeader(data + b"EHLO x\r\n")
            self.assertEqual(
                header,
                ProxyHeader(
                    version=1 if data.startswith(b"PROXY") else 2,
                    length=len(data),
                    source=source,
                    destination=destination,
                ),
                data,
            )

    def test_everyPrefixIsIncomplete(self) -> None:
        for data, _, _ in VALID:
            for end in range(len(data)):
                self.assertIsNone(parseProxyHeader(data[:end]), data[:end])

    def test_unknownIgnoresRestOfLine(self) -> None:
        header = parseProxyHeader(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
        self.assertEqual(header, ProxyHeader(version=1, length=35))

    def test_ipv4MappedIsIPv4(self) -> None:
        header = parseProxyHeader(b"PROXY TCP6 ::ffff:203.0.113.9 ::ffff:192.0.2.25 40000 587\r\n")
        assert header is not None
        self.assertEqual((header.source, header.destination), (CLIENT, DESTINATION))

    def test_v2UnspecifiedFamilyKeepsPeer(self) -> None:
        self.assertEqual(parseProxyHeader(v2(family=0, body=b"")), ProxyHeader(2, 16))

    def test_v2LocalIgnoresFamily(self) -> None:
        # spec 2.2: with LOCAL the family and address block are skipped.
        self.assertEqual(
            parseProxyHeader(v2(command=0, family=0x31, body=b"x")), ProxyHeader(2, 17)
        )

    def test_garbage(self) -> None:
        for data in GARBAGE:
            self.assertRaises(ProxyHeaderError, parseProxyHeader, data)

    def test_garbageIsRefusedEarly(self) -> None:
        # No need to wait for a line end or a length once the start is wrong.
        for data in (
            b"EHLO",
            b"PROXZ",
            b"\r\n\r\n\x01",
            V2_SIGNATURE + b"\x31",
            v2(command=2)[:13],
        ):
            self.assertRaises(ProxyHeaderError, parseProxyHeader, data)

    def test_v1Length(self) -> None:
        longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
        self.assertEqual(len(longest), V1_MAX_LENGTH)
        self.assertEqual(parseProxyHeader(longest), ProxyHeader(1, V1_MAX_LENGTH))
        tooLong = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
        self.assertRaises(ProxyHeaderError, parseProxyHeader, tooLong)
        # Refused at octet 107 without waiting for the line end.
        self.assertIsNone(parseProxyHeader(tooLong[: V1_MAX_LENGTH - 1]))
        self.assertRaises(ProxyHeaderError, parseProxyHeader, tooLong[:V1_MAX_LENGTH])

    def test_v2Length(self) -> None:
        largest = v2(body=v2()[16:] + bytes(V2_MAX_LENGTH - 28))
        self.assertEqual(
            parseProxyHeader(largest), ProxyHeader(2, V2_MAX_LENGTH, CLIENT, DESTINATION)
        )
        tooLarge = v2(body=bytes(V2_MAX_LENGTH - 15))
        # Refused on its length field, before the body arrives.
        self.assertRaises(ProxyHeaderError, parseProxyHeader, tooLarge[:16])


class Recorder(Protocol):
    """The wrapped protocol: writes a greeting, records what reaches it."""

    def __init__(self, closeAtOnce: bool = False) -> None:
        self.closeAtOnce = closeAtOnce
        self.made = 0
        self.received: list[bytes] = []
        self.lost: list[Failure] = []
        self.peer: Any = None
        self.host: Any = None

    def connectionMade(self) -> None:
        self.made += 1
        self.peer, self.host = self.transport.getPeer(), self.transport.getHost()  # type: ignore[union-attr]
        self.transport.write(b"220 hello\r\n")  # type: ignore[union-attr]
        if self.closeAtOnce:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.append(reason)


class RecorderFactory(Factory):
    def __init__(self, refuse: bool = False, closeAtOnce: bool = False) -> None:
        self.built: list[Recorder] = []
        self.addresses: list[Any] = []
        self.refuse = refuse
        self.closeAtOnce = closeAtOnce

    def buildProtocol(self, addr: Any) -> Recorder | None:  # type: ignore[override]
        self.addresses.append(addr)
        if self.refuse:
            return None
        protocol = Recorder(self.closeAtOnce)
        self.built.append(protocol)
        return protocol


class TCPLikeTransport(StringTransport):
    """A StringTransport with the TCP extras the server uses."""

    def __init__(self, peer: Any) -> None:
        super().__init__(hostAddress=LISTENER, peerAddress=peer)
        self.noDelay: list[bool] = []
        self.tlsContexts: list[Any] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay.append(enabled)

    def startTLS(self, context: Any, normal: bool = True) -> None:
        self.tlsContexts.append(context)
        directlyProvides(self, ISSLTransport)


class Connection:
    """A ProxyFactory connection from ``peer`` on a fake transport."""

    def __init__(self, peer: Any = PROXY_PEER, **knobs: bool) -> None:
        self.clock = Clock()
        self.wrapped = RecorderFactory(**knobs)
        self.factory = ProxyFactory(self.wrapped, TRUSTED, self.clock)
        self.transport = TCPLikeTransport(peer)
        protocol = self.factory.buildProtocol(peer)
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    @property
    def recorder(self) -> Recorder | None:
        return self.wrapped.built[0] if self.wrapped.built else None

    @property
    def received(self) -> bytes:
        return b"".join(self.recorder.received) if self.recorder else b""

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def logged(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


class TrustedPeerTests(SynchronousTestCase):
    def test_headerThenStream(self) -> None:
        for data, source, destination in VALID:
            c = Connection()
            c.send(data + b"EHLO x\r\n")
            self.assertFalse(c.closed, data)
            assert c.recorder is not None
            self.assertEqual(c.recorder.made, 1)
            self.assertEqual(c.received, b"EHLO x\r\n")
            self.assertEqual(c.recorder.peer, source or PROXY_PEER, data)
            self.assertEqual(c.recorder.host, destination or LISTENER, data)
            self.assertEqual(c.wrapped.addresses, [source or PROXY_PEER])
            self.assertEqual(c.transport.value(), b"220 hello\r\n")

    def test_nothingBeforeTheHeader(self) -> None:
        # The wrapped protocol is not even built (no greeting) before the header.
        c = Connection()
        self.assertEqual(c.wrapped.built, [])
        self.assertEqual(c.transport.value(), b"")

    def test_everySplit(self) -> None:
        for data, source, _ in VALID:
            stream = data + b"EHLO x\r\nMAIL"
            for cut in range(1, len(stream)):
                c = Connection()
                c.send(stream[:cut])
                self.assertEqual(c.wrapped.built != [], cut >= len(data), (data, cut))
                c.send(stream[cut:])
                self.assertEqual(c.received, b"EHLO x\r\nMAIL", (data, cut))
                assert c.recorder is not None
                self.assertEqual(c.recorder.peer, source or PROXY_PEER)

    def test_byteByByte(self) -> None:
        for data, source, _ in VALID:
            c = Connection()
            for i in range(len(data)):
                self.assertIsNone(c.recorder, data[:i])
                c.send(data[i : i + 1])
            c.send(b"Q", b"UIT\r\n")
            self.assertEqual(c.received, b"QUIT\r\n")
            assert c.recorder is not None
            self.assertEqual(c.recorder.peer, source or PROXY_PEER)

    def test_garbageCloses(self) -> None:
        for data in GARBAGE:
            c = Connection()
            with capturedLogs() as events:
                c.send(data + b"EHLO x\r\n")
                c.send(b"MAIL FROM:<>\r\n")
            self.assertTrue(c.closed, data)
            self.assertEqual(c.wrapped.built, [], data)
            self.assertEqual(c.transport.value(), b"", data)
            [line] = logged(events)
            self.assertIn("Bad PROXY header from trusted peer 10.0.0.2: ", line)
            # A trusted proxy getting it wrong is a misconfiguration: warn.
            self.assertEqual(events[0]["log_level"], LogLevel.warn)

    def test_oversizeCloses(self) -> None:
        for data in (b"PROXY UNKNOWN " + b"x" * 100, v2(body=bytes(2000))[:16]):
            c = Connection()
            c.send(data)
            self.assertTrue(c.closed)
            self.assertEqual(c.wrapped.built, [])

    def test_timeout(self) -> None:
        for sent in (b"", b"PROXY TCP4 203.0.113.9", V2_TCP4[:20]):
            c = Connection()
            c.send(sent)
            with capturedLogs() as events:
                c.clock.advance(4.9)
                self.assertFalse(c.closed)
                c.clock.advance(0.1)
            self.assertTrue(c.closed)
            self.assertEqual(c.wrapped.built, [])
            self.assertEqual(
                logged(events),
                ["No complete PROXY header from trusted peer 10.0.0.2 within 5.0s; closed"],
            )

    def test_timerStopsWithTheHeader(self) -> None:
        c = Connection()
        c.send(V1_TCP4)
        self.assertEqual(c.clock.getDelayedCalls(), [])
        c.clock.advance(60)
        self.assertFalse(c.closed)

    def test_timerStopsWithTheConnection(self) -> None:
        c = Connection()
        c.protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(c.clock.getDelayedCalls(), [])
        self.assertEqual(c.factory.protocols, {})

    def test_wrappedFactoryRefuses(self) -> None:
        c = Connection(refuse=True)
        c.send(V1_TCP4 + b"EHLO x\r\n")
        self.assertTrue(c.closed)
        self.assertEqual(c.wrapped.addresses, [CLIENT])

    def test_wrappedProtocolClosesAtOnce(self) -> None:
        # Like a TCP transport after loseConnection: nothing more is delivered.
        c = Connection(closeAtOnce=True)
        c.send(V1_TCP4 + b"EHLO x\r\n")
        self.assertTrue(c.closed)
        self.assertEqual(c.received, b"")

    def test_ipv6AndMappedPeers(self) -> None:
        for peer in (
            IPv6Address("TCP", "2001:db8:1::5", 1),
            IPv6Address("TCP", "::ffff:10.1.2.3", 1),
        ):
            c = Connection(peer)
            self.assertEqual(c.wrapped.built, [])  # waits for a header
            c.send(V1_TCP4)
            assert c.recorder is not None
            self.assertEqual(c.recorder.peer, CLIENT)


class UntrustedPeerTests(SynchronousTestCase):
    def test_passesThroughUnchanged(self) -> None:
        c = Connection(STRANGER)
        assert c.recorder is not None
        self.assertEqual(c.recorder.made, 1)  # at once: the greeting goes out
        self.assertEqual(c.transport.value(), b"220 hello\r\n")
        self.assertEqual(c.recorder.peer, STRANGER)
        self.assertEqual(c.recorder.host, LISTENER)
        c.send(b"E")
        self.assertEqual(c.received, b"E")  # not held back
        c.send(b"HLO x\r\n", b"STARTTLS\r\n")
        self.assertEqual(c.received, b"EHLO x\r\nSTARTTLS\r\n")
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_headerLaterIsJustData(self) -> None:
        c = Connection(STRANGER)
        c.send(b"NOOP\r\n", V1_TCP4, V2_TCP4)
        self.assertFalse(c.closed)
        self.assertEqual(c.received, b"NOOP\r\n" + V1_TCP4 + V2_TCP4)

    def test_headerRefused(self) -> None:
        for header in (V1_TCP4, V2_TCP4, V1_UNKNOWN, V2_LOCAL, b"PROXY garbage\r\n"):
            for cut in range(1, len(header)):
                c = Connection(STRANGER)
                with capturedLogs() as events:
                    c.send(header[:cut], header[cut:], b"EHLO x\r\n")
                self.assertTrue(c.closed, (header, cut))
                self.assertEqual(c.received, b"", (header, cut))
                self.assertEqual(
                    logged(events), ["PROXY header from untrusted peer 198.51.100.7 refused"]
                )
                self.assertEqual(events[0]["log_level"], LogLevel.info)

    def test_headerRefusedByteByByte(self) -> None:
        for header, signature in ((V1_TCP4, 6), (V2_TCP4, 12)):
            c = Connection(STRANGER)
            for i in range(signature):
                self.assertFalse(c.closed)
                c.send(header[i : i + 1])
            self.assertTrue(c.closed)
            self.assertEqual(c.received, b"")
            c.send(header[signature:])
            self.assertEqual(c.received, b"")

    def test_refusedConnectionIsLostToTheWrappedProtocol(self) -> None:
        c = Connection(STRANGER)
        c.send(V1_TCP4)
        c.protocol.connectionLost(Failure(Exception("closed")))
        assert c.recorder is not None
        self.assertEqual(len(c.recorder.lost), 1)
        self.assertEqual(c.factory.protocols, {})

    def test_prefixThenSomethingElse(self) -> None:
        for first, rest in ((b"P", b"ROBE\r\n"), (b"PROXY", b"\r\n"), (b"\r\n", b"\r\nQUIT\r\n")):
            c = Connection(STRANGER)
            c.send(first)
            self.assertEqual(c.received, b"")
            c.send(rest)
            self.assertFalse(c.closed)
            self.assertEqual(c.received, first + rest)

    def test_prefixThenSilence(self) -> None:
        # A client that sent "\r\n" and waits for an answer is not stuck.
        c = Connection(STRANGER)
        c.send(b"\r\n")
        c.clock.advance(4.9)
        self.assertEqual(c.received, b"")
        c.clock.advance(0.1)
        self.assertEqual(c.received, b"\r\n")
        self.assertFalse(c.closed)
        c.send(b"QUIT\r\n")
        self.assertEqual(c.received, b"\r\nQUIT\r\n")

    def test_unixPeerIsUntrusted(self) -> None:
        c = Connection(UNIXAddress(None))
        self.assertIsNotNone(c.recorder)
        c.send(V1_TCP4)
        self.assertTrue(c.closed)


class TransparencyTests(SynchronousTestCase):
    def connected(self, peer: Any = PROXY_PEER) -> tuple[Connection, Any]:
        c = Connection(peer)
        if peer is PROXY_PEER:
            c.send(V1_TCP4)
        assert c.recorder is not None
        return c, c.recorder.transport

    def test_interfaces(self) -> None:
        c, transport = self.connected()
        self.assertIs(transport, c.protocol)
        verifyObject(IProtocol, c.protocol)
        verifyObject(ITransport, transport)

    def test_transportMethods(self) -> None:
        for peer in (PROXY_PEER, STRANGER):
            c, transport = self.connected(peer)
            transport.write(b"a")
            transport.writeSequence([b"b", b"c"])
            transport.setTcpNoDelay(True)
            transport.pauseProducing()
            self.assertEqual(c.transport.producerState, "paused")
            transport.resumeProducing()
            self.assertEqual(c.transport.producerState, "producing")
            producer = object()
            transport.registerProducer(producer, True)
            self.assertIs(c.transport.producer, producer)
            transport.unregisterProducer()
            self.assertFalse(ISSLTransport.providedBy(transport))
            transport.startTLS("context")
            self.assertEqual(c.transport.tlsContexts, ["context"])
            self.assertTrue(ISSLTransport.providedBy(transport))
            self.assertEqual(c.transport.noDelay, [True])
            self.assertEqual(c.transport.value(), b"220 hello\r\nabc")
            transport.loseConnection()
            self.assertTrue(c.transport.disconnecting)

    def test_logPrefix(self) -> None:
        self.assertEqual(Connection().protocol.logPrefix(), "RecorderFactory (PROXY)")
        self.assertEqual(Connection(STRANGER).protocol.logPrefix(), "Recorder (PROXY)")

    def test_abortConnection(self) -> None:
        c, transport = self.connected()
        transport.abortConnection()
        self.assertTrue(c.transport.disconnected)

    def test_connectionLostReachesWrapped(self) -> None:
        c, _ = self.connected()
        c.protocol.connectionLost(Failure(Exception("gone")))
        assert c.recorder is not None
        self.assertEqual(len(c.recorder.lost), 1)
        self.assertEqual(c.factory.protocols, {})


class FactoryTests(SynchronousTestCase):
    def test_isTrusted(self) -> None:
        factory = ProxyFactory(RecorderFactory(), ["10.0.0.0/8", "2001:db8:1::/48"], Clock())
        for address, expected in (
            (IPv4Address("TCP", "10.9.8.7", 1), True),
            (IPv4Address("TCP", "11.0.0.1", 1), False),
            (IPv6Address("TCP", "2001:db8:1::1", 1), True),
            (IPv6Address("TCP", "2001:db8:2::1", 1), False),
            (IPv6Address("TCP", "::ffff:10.0.0.1", 1), True),
            (IPv6Address("TCP", "2001:db8:1::1%eth0", 1), True),
            (UNIXAddress(b"/run/x"), False),
            (None, False),
        ):
            self.assertEqual(factory.isTrusted(address), expected, address)

    def test_badArguments(self) -> None:
        self.assertRaises(ValueError, ProxyFactory, RecorderFactory(), ["10.0.0.1/8"], Clock())
        self.assertRaises(ValueError, ProxyFactory, RecorderFactory(), ["proxy"], Clock())
        self.assertRaises(ValueError, ProxyFactory, RecorderFactory(), [], Clock(), 0)

    def test_refusedUntrustedConnection(self) -> None:
        factory = ProxyFactory(RecorderFactory(refuse=True), TRUSTED, Clock())
        self.assertIsNone(factory.buildProtocol(STRANGER))


# -- the real gateway on loopback sockets -------------------------------

USER, PASSWORD = "alice@example.com", "correct horse"
MESSAGE = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


class ProxiedSMTP(smtplib.SMTP):
    """smtplib that sends ``proxyHeader`` first, on the plain socket."""

    proxyHeader = b""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self.proxyHeader)
        return sock  # type: ignore[no-any-return]


class ProxiedSMTPSSL(smtplib.SMTP_SSL, ProxiedSMTP):
    """SMTP_SSL wraps what ProxiedSMTP returns: the header goes before TLS."""


def readAll(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


class GatewayBehindProxyTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        base = Path(self.mktemp())
        base.mkdir(parents=True)
        self.cert, key = str(base / "cert.pem"), str(base / "key.pem")
        makeSelfSigned(self.cert, key, "localhost")
        self.tlsContext = serverContextFactory(self.cert, key)
        self.spool = MemorySpool()
        self.portal = makePortal(
            [InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})]
        )

    @inlineCallbacks
    def listen(self, trusted: list[str], implicitTLS: bool = False) -> Any:
        factory = SubmissionFactory(
            ServerSettings(hostname="localhost"),
            self.portal,
            self.spool,
            reactor,
            self.tlsContext,
            implicitTLS=implicitTLS,
        )
        inner = TLSMemoryBIOFactory(self.tlsContext, False, factory) if implicitTLS else factory
        self.proxyFactory = ProxyFactory(inner, trusted, reactor)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port = yield endpoint.listen(self.proxyFactory)
        self.addCleanup(self.closed)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def closed(self) -> Any:
        # Let the server side of every connection finish closing.
        for _ in range(500):
            if not self.proxyFactory.protocols:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("connections left open")

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)

    def submit(self, client: type[ProxiedSMTP], header: bytes, port: int, **kwargs: Any) -> None:
        """AUTH and send one message; STARTTLS first unless implicit TLS."""
        proxied = type(client.__name__, (client,), {"proxyHeader": header})
        with proxied("127.0.0.1", port, timeout=30, **kwargs) as smtp:
            smtp.ehlo("client.test")
            if not isinstance(smtp, smtplib.SMTP_SSL):
                smtp.starttls(context=self.context())
                smtp.ehlo("client.test")
            smtp.login(USER, PASSWORD)
            smtp.sendmail(USER, ["bob@example.org"], MESSAGE)

    def onlyMessage(self) -> tuple[Any, bytes]:
        [(queued, data)] = self.spool.committed.values()
        return queued, data

    @inlineCallbacks
    def test_starttlsBehindProxy(self) -> Any:
        port = yield self.listen(["127.0.0.0/8"])
        header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\n"
        yield deferToThread(self.submit, ProxiedSMTP, header, port)
        queued, data = self.onlyMessage()
        self.assertEqual(
            (queued.session.clientAddress, queued.session.clientPort), ("203.0.113.9", 40000)
        )
        self.assertEqual(queued.session.user, USER)
        # The TLS details come through the wrapper (getHandle) too.
        self.assertTrue(queued.session.tlsProtocol.startswith("TLSv1."))
        self.assertIn(b"Received: from client.test ([203.0.113.9])", data)
        self.assertIn(b"with ESMTPSA", data)

    @inlineCallbacks
    def test_implicitTLSBehindProxy(self) -> Any:
        port = yield self.listen(["127.0.0.0/8"], implicitTLS=True)
        header = v2(
            family=0x21,
            body=(
                ipaddress.IPv6Address("2001:db8::9").packed
                + ipaddress.IPv6Address("::1").packed
                + struct.pack("!HH", 40000, 465)
            ),
        )
        yield deferToThread(self.submit, ProxiedSMTPSSL, header, port, context=self.context())
        queued, data = self.onlyMessage()
        self.assertEqual(queued.session.clientAddress, "2001:db8::9")
        self.assertEqual(queued.session.listener, "submissions")
        self.assertIn(b"([IPv6:2001:db8::9])", data)

    @inlineCallbacks
    def test_untrustedClientPassesThrough(self) -> Any:
        # STARTTLS through the wrapper in pass-through mode; the real peer.
        port = yield self.listen(["192.0.2.0/24"])
        yield deferToThread(self.submit, ProxiedSMTP, b"", port)
        queued, _ = self.onlyMessage()
        self.assertEqual(queued.session.clientAddress, "127.0.0.1")

    def exchange(self, port: int, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(data)
            return readAll(sock)

    @inlineCallbacks
    def test_untrustedHeaderRefused(self) -> Any:
        port = yield self.listen(["192.0.2.0/24"])
        with capturedLogs() as events:
            header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\nEHLO x\r\n"
            answer = yield deferToThread(self.exchange, port, header)
        # The greeting went out before the header arrived; nothing after it.
        self.assertEqual(answer, b"220 localhost ESMTP mailgw\r\n")
        self.assertIn("PROXY header from untrusted peer 127.0.0.1 refused", logged(events))

    @inlineCallbacks
    def test_trustedPeerWithoutHeaderRefused(self) -> Any:
        port = yield self.listen(["127.0.0.0/8"])
        with capturedLogs() as events:
            answer = yield deferToThread(self.exchange, port, b"EHLO x\r\n")
        self.assertEqual(answer, b"")  # not even a greeting
        self.assertIn(
            "Bad PROXY header from trusted peer 127.0.0.1: no PROXY header; closed",
            logged(events),
        )
