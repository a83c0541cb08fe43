"""
Tests for L{mailgw.relay.dane} (TLSA records, their lookup and DNSSEC
status) and L{mailgw.relay.dnssec} (the AD bit asked for and read back, over
UDP from a DNS server on 127.0.0.1), and L{mailgw.tls.peercheck}'s names.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.interfaces import ISecureResolver
from mailgw.relay.dane import TLSA, TLSALookup, TLSARecord, lookupTLSA
from mailgw.relay.dnssec import DNSSECResolver
from mailgw.relay.staticdns import StaticDNS
from mailgw.tls.peercheck import nameMatches

EE = bytes([3, 1, 1]) + bytes(32)


class RecordTests(SynchronousTestCase):
    def test_usable(self) -> None:
        self.assertTrue(TLSARecord(3, 1, 1, bytes(32)).usable)
        self.assertTrue(TLSARecord(2, 0, 2, bytes(64)).usable)
        self.assertTrue(TLSARecord(3, 0, 0, b"any DER").usable)
        for unusable in (
            TLSARecord(0, 1, 1, bytes(32)),  # PKIX-TA: not for SMTP (RFC 7672 3.1.3)
            TLSARecord(1, 1, 1, bytes(32)),  # PKIX-EE
            TLSARecord(3, 2, 1, bytes(32)),
            TLSARecord(3, 1, 3, bytes(32)),
            TLSARecord(3, 1, 1, bytes(31)),  # a SHA-256 digest of the wrong length
        ):
            self.assertFalse(unusable.usable, unusable)

    def test_fromWire(self) -> None:
        self.assertEqual(TLSARecord.fromWire(EE), TLSARecord(3, 1, 1, bytes(32)))
        self.assertIsNone(TLSARecord.fromWire(b"\x03\x01\x01"))


class LookupTests(SynchronousTestCase):
    def lookup(self, resolver: Any) -> TLSALookup:
        return self.successResultOf(lookupTLSA(resolver, "mx.example.org"))

    def test_verifyObject(self) -> None:
        self.assertTrue(verifyObject(ISecureResolver, StaticDNS()))
        self.assertTrue(verifyObject(ISecureResolver, DNSSECResolver(servers=[("127.0.0.1", 53)])))

    def test_secure(self) -> None:
        resolver = StaticDNS(tlsa={"_25._tcp.mx.example.org": [EE]}, secure={"*"})
        found = self.lookup(resolver)
        self.assertTrue(found.applies)
        self.assertEqual(found.records, (TLSARecord(3, 1, 1, bytes(32)),))
        self.assertEqual(resolver.queries, [("_25._tcp.mx.example.org", TLSA)])

    def test_insecureIgnored(self) -> None:
        resolver = StaticDNS(tlsa={"_25._tcp.mx.example.org": [EE]})
        self.assertEqual(self.lookup(resolver), TLSALookup(False))

    def test_unusableOnly(self) -> None:
        resolver = StaticDNS(
            tlsa={"_25._tcp.mx.example.org": [bytes([1, 1, 1]) + bytes(32)]}, secure={"*"}
        )
        found = self.lookup(resolver)
        self.assertEqual((found.applies, found.unusable), (False, True))

    def test_nxdomainIsNoRecords(self) -> None:
        self.assertEqual(self.lookup(StaticDNS(secure={"*"})), TLSALookup(False))

    def test_serverFailureFails(self) -> None:
        resolver = StaticDNS(
            failures={"_25._tcp.mx.example.org": dnserror.DNSServerError()}, secure={"*"}
        )
        self.failureResultOf(lookupTLSA(resolver, "mx.example.org"), dnserror.DNSServerError)


class NameTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertTrue(nameMatches("mx.example.org", "mx.example.org"))
        self.assertTrue(nameMatches("mx.example.org", "*.example.org"))
        self.assertFalse(nameMatches("a.mx.example.org", "*.example.org"))
        self.assertFalse(nameMatches("example.org", "*.example.org"))
        self.assertTrue(nameMatches(".example.org", "smtp.example.org"))
        self.assertTrue(nameMatches(".example.org", "*.example.org"))
        self.assertFalse(nameMatches(".example.org", "example.org"))
        self.assertFalse(nameMatches(".example.org", "badexample.org"))


class _ADServer(DatagramProtocol):
    """Answers each query with one TLSA record, echoing the query's AD bit
    as a validating resolver does (RFC 6840 5.7); records the queries."""

    def __init__(self) -> None:
        self.queries: list[dns.Message] = []

    def datagramReceived(self, data: bytes, address: Any) -> None:
        query = dns.Message()
        query.fromStr(data)
        self.queries.append(query)
        answer = dns.Message(query.id, answer=1, recDes=1, recAv=1)
        answer.queries = query.queries
        answer.authenticData = query.authenticData
        name = query.queries[0].name.name
        answer.answers = [dns.RRHeader(name, TLSA, payload=dns.UnknownRecord(EE), ttl=60)]
        self.transport.write(answer.toStr(), address)  # type: ignore[union-attr]


class WireTests(TestCase):
    timeout = 10

    @inlineCallbacks
    def test_adBitAskedAndRead(self) -> Any:
        server = _ADServer()
        port = reactor.listenUDP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        resolver = DNSSECResolver(servers=[("127.0.0.1", port.getHost().port)], reactor=reactor)
        found = yield lookupTLSA(resolver, "mx.example.org")
        self.assertTrue(found.applies)
        self.assertEqual([q.authenticData for q in server.queries], [1])
        self.assertEqual(server.queries[0].queries[0].name.name, b"_25._tcp.mx.example.org")
