"""
Tests for the reinjection listener (L{mailgw.filter.build.reinjectFactory}
over our own server): the network check at the greeting, no STARTTLS or
AUTH, sender ownership off, and the submission listeners' limits kept; in
memory, on a StringTransport with a peer address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.auth.realm import makePortal
from mailgw.config import Config
from mailgw.filter.build import reinjectFactory
from mailgw.filter.settings import LOOPBACK, ReinjectConfig
from mailgw.networks import inNetworks
from mailgw.policy.senders import SenderLoginPolicy
from mailgw.server.factory import ServerSettings
from mailgw.testing import MemorySpool
from tests.helpers import FakeTLSTransport

MESSAGE = (
    b"Received: from pc ([192.0.2.7])\r\n\tby gw.example.org (mailgw) with ESMTPSA\r\n"
    b"\tid 0005F1A2B3C4D0000001; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"X-Virus-Scanned: amavis at example.org\r\n"
    b"From: Alice <alice@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"
)


class PeerTransport(FakeTLSTransport):
    def __init__(self, peer: Any) -> None:
        super().__init__()
        self.peer = peer

    def getPeer(self) -> Any:
        return self.peer


class ReinjectListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool(self.clock)

    def connect(
        self, host: str = "127.0.0.1", networks: tuple[Any, ...] = LOOPBACK, **settings: Any
    ) -> PeerTransport:
        config = Config(reinject=ReinjectConfig(("tcp:10025",), networks))
        self.factory = reinjectFactory(
            config,
            ServerSettings(hostname="gw.example.org", **settings),
            makePortal([]),
            self.spool,
            self.clock,
        )
        self.protocol = self.factory.buildProtocol(None)
        peer = IPv6Address("TCP", host, 4000) if ":" in host else IPv4Address("TCP", host, 4000)
        transport = PeerTransport(peer)
        transport.protocol = self.protocol
        self.protocol.makeConnection(transport)
        return transport

    def command(self, transport: PeerTransport, line: bytes) -> bytes:
        transport.clear()
        self.protocol.dataReceived(line + b"\r\n")
        return transport.value()

    def test_otherNetworkRefusedAtGreeting(self) -> None:
        """A client outside [reinject] networks: 554 5.7.1 instead of 220, then closed."""
        transport = self.connect("192.0.2.7")
        self.assertEqual(
            transport.value(), b"554 5.7.1 Not allowed to reinject mail from this address\r\n"
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.spool.writers, [])

    def test_listedNetworkOnly(self) -> None:
        """networks = ["127.0.0.1/32"]: 127.0.0.2 is refused, 127.0.0.1 is not."""
        only = (ipaddress.ip_network("127.0.0.1/32"),)
        self.assertTrue(self.connect("127.0.0.2", only).value().startswith(b"554 5.7.1 "))
        self.assertTrue(self.connect("127.0.0.1", only).value().startswith(b"220 "))

    def test_ipv6Loopback(self) -> None:
        self.assertTrue(self.connect("::1").value().startswith(b"220 "))
        self.assertTrue(self.connect("2001:db8::1").value().startswith(b"554 "))

    def test_inNetworks(self) -> None:
        self.assertTrue(inNetworks("::ffff:127.0.0.1", LOOPBACK))
        self.assertTrue(inNetworks("127.1.2.3", LOOPBACK))
        self.assertFalse(inNetworks("10.0.0.1", LOOPBACK))
        self.assertFalse(inNetworks("local", LOOPBACK))
        self.assertFalse(inNetworks("", LOOPBACK))

    def test_noTLSNoAuth(self) -> None:
        transport = self.connect()
        ehlo = self.command(transport, b"EHLO localhost")
        self.assertTrue(ehlo.startswith(b"250-gw.example.org\r\n"), ehlo)
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertNotIn(b"AUTH", ehlo)
        self.assertNotIn(b"ETRN", ehlo)

    def test_acceptsWithoutAuth(self) -> None:
        """MAIL without AUTH, any sender (ownership off), the message queued as received."""
        transport = self.connect()
        self.command(transport, b"EHLO localhost")
        self.assertTrue(
            self.command(transport, b"MAIL FROM:<someone@elsewhere.example>").startswith(b"250 ")
        )
        self.assertTrue(self.command(transport, b"RCPT TO:<bob@example.com>").startswith(b"250 "))
        self.assertTrue(self.command(transport, b"DATA").startswith(b"354 "))
        transport.clear()
        self.protocol.dataReceived(MESSAGE + b".\r\n")
        self.assertTrue(transport.value().startswith(b"250 2.0.0 Ok: queued as "))
        [(message, data)] = self.spool.committed.values()
        self.assertEqual(message.session.listener, "reinject")
        self.assertEqual(message.session.user, None)
        self.assertEqual(message.envelope.contentFilter, "")
        self.assertTrue(data.endswith(MESSAGE), data)
        self.assertTrue(data.startswith(b"Received: from localhost ([127.0.0.1])"))

    def test_chunkedWithoutAuth(self) -> None:
        """BDAT works there too, as MAIL does, without AUTH (a filter may use CHUNKING)."""
        transport = self.connect()
        self.command(transport, b"EHLO localhost")
        self.command(transport, b"MAIL FROM:<someone@elsewhere.example>")
        self.command(transport, b"RCPT TO:<bob@example.com>")
        reply = self.command(transport, b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
        self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)
        [(_, data)] = self.spool.committed.values()
        self.assertTrue(data.endswith(MESSAGE), data)

    def test_limitsKept(self) -> None:
        """The size limit and the line limit of the submission listeners hold here too."""
        transport = self.connect(maxMessageSize=100)
        self.command(transport, b"EHLO localhost")
        self.assertTrue(
            self.command(transport, b"MAIL FROM:<a@example.org> SIZE=101").startswith(b"552 ")
        )
        self.command(transport, b"MAIL FROM:<a@example.org>")
        self.command(transport, b"RCPT TO:<bob@example.com>")
        self.command(transport, b"DATA")
        transport.clear()
        self.protocol.dataReceived(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n.\r\n")
        self.assertTrue(transport.value().startswith(b"552 "), transport.value())
        self.assertEqual(self.spool.committed, {})

    def test_noSmuggling(self) -> None:
        """A bare-LF end of data does not end the message (nor start a second one)."""
        transport = self.connect()
        self.command(transport, b"EHLO localhost")
        self.command(transport, b"MAIL FROM:<a@example.org>")
        self.command(transport, b"RCPT TO:<bob@example.com>")
        self.command(transport, b"DATA")
        transport.clear()
        self.protocol.dataReceived(
            b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.org>\r\n"
            b"RCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n"
        )
        reply = transport.value()
        self.assertEqual(reply.count(b"\r\n"), 1, reply)  # one reply: one message, or none
        self.assertLessEqual(len(self.spool.committed), 1)
        for message, _ in self.spool.committed.values():
            self.assertEqual([str(r) for r in message.envelope.recipients], ["bob@example.com"])

    def test_noPreAuthTimeout(self) -> None:
        """Nobody logs in here: the pre-AUTH deadline does not apply."""
        transport = self.connect(preAuthTimeout=30)
        self.command(transport, b"EHLO localhost")
        self.clock.advance(45)
        self.assertFalse(transport.disconnecting)

    def test_submissionPolicyNotUsed(self) -> None:
        """The factory's policy is not sender ownership."""
        self.connect()
        self.assertNotIsInstance(self.factory.policy, SenderLoginPolicy)
        self.assertEqual(self.factory.listenerName, "reinject")
