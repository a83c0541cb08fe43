"""
Tests for L{mailgw.auth.dovecot} and L{mailgw.auth.dovecotwire}: the
client of Dovecot's auth protocol, against an in-memory Dovecot that
answers every protocol path (the real one is in
L{tests.integration.test_dovecot}).
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.auth import ISASLMechanisms
from mailgw.auth.dovecot import DovecotChecker, DovecotUnavailable
from mailgw.auth.dovecotwire import DovecotAuthProtocol, tabEscape, tabUnescape
from mailgw.auth.realm import makePortal
from mailgw.server.sasl import ClientUsernamePassword, fromClient, portalMechanisms

HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
    b"SPID\t42\nCUID\t1\nCOOKIE\t0123abcd\nDONE\n"
)


class FakeDovecot:
    """One connection's server side: what the client sent, and our answers."""

    def __init__(self, protocol: DovecotAuthProtocol) -> None:
        self.protocol = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def lines(self) -> list[list[bytes]]:
        return [line.split(b"\t") for line in self.transport.value().split(b"\n") if line]

    def requests(self) -> list[list[bytes]]:
        return [f for f in self.lines() if f[0] == b"AUTH"]

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answer(self, kind: bytes, *fields: bytes, index: int = -1) -> None:
        requestId = self.requests()[index][1]
        self.send(b"\t".join([kind, requestId, *fields]) + b"\n")

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionRefusedError()))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connections are made when the test says, and each gets a L{FakeDovecot}."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Factory, Deferred[Any]]] = []
        self.servers: list[FakeDovecot] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((factory, d))
        return d

    def accept(self, handshake: bytes | None = HANDSHAKE) -> FakeDovecot:
        factory, d = self.waiting.pop(0)
        server = FakeDovecot(factory.buildProtocol(None))
        self.servers.append(server)
        d.callback(server.protocol)
        if handshake is not None:
            server.send(handshake)
        return server

    def refuse(self) -> None:
        _, d = self.waiting.pop(0)
        d.errback(ConnectionRefusedError())


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no answer yet"
    return results[0]


class ProtocolTests(SynchronousTestCase):
    def test_handshake(self) -> None:
        protocol = DovecotAuthProtocol()
        server = FakeDovecot(protocol)
        sent = server.lines()
        self.assertEqual(sent[0], [b"VERSION", b"1", b"1"])
        self.assertEqual(sent[1][0], b"CPID")
        self.assertTrue(sent[1][1].isdigit())
        mechanisms: list[Any] = []
        protocol.ready.addCallback(mechanisms.append)
        server.send(HANDSHAKE[:20])
        self.assertEqual(mechanisms, [])
        server.send(HANDSHAKE[20:])
        self.assertEqual(mechanisms, [("PLAIN", "LOGIN")])

    def test_wrongVersion(self) -> None:
        protocol = DovecotAuthProtocol()
        server = FakeDovecot(protocol)
        server.send(b"VERSION\t2\t0\n")
        self.assertTrue(server.transport.disconnecting)

    def test_doneWithoutVersion(self) -> None:
        server = FakeDovecot(DovecotAuthProtocol())
        server.send(b"MECH\tPLAIN\nDONE\n")
        self.assertTrue(server.transport.disconnecting)

    def test_longLine(self) -> None:
        server = FakeDovecot(DovecotAuthProtocol())
        server.send(b"x" * 20000 + b"\n")
        self.assertTrue(server.transport.disconnecting)

    def test_lostInHandshake(self) -> None:
        protocol = DovecotAuthProtocol()
        server = FakeDovecot(protocol)
        server.close()
        self.failureResultOf(protocol.ready, DovecotUnavailable)

    def test_escaping(self) -> None:
        for value in (b"plain", b"a\tb\nc\rd\x01e\0f", b"\x01\x01t"):
            self.assertEqual(tabUnescape(tabEscape(value)), value)
            self.assertNotIn(b"\t", tabEscape(value))
            self.assertNotIn(b"\n", tabEscape(value))
        self.assertEqual(tabUnescape(b"a\x01tb"), b"a\tb")


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.checker = DovecotChecker(self.endpoint, self.clock, timeout=10.0)

    def login(
        self, user: bytes = b"alice", password: bytes = b"secret", address: str = "192.0.2.7"
    ) -> Deferred[Any]:
        return self.checker.requestAvatarId(ClientUsernamePassword(user, password, address))

    def connected(self) -> FakeDovecot:
        return self.endpoint.accept()

    def test_interfaces(self) -> None:
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(ISASLMechanisms, self.checker)

    def test_ok(self) -> None:
        d = self.login()
        server = self.connected()
        [request] = server.requests()
        self.assertEqual(request[2], b"PLAIN")
        params = request[3:]
        self.assertIn(b"service=smtp", params)
        self.assertIn(b"secured", params)
        self.assertIn(b"rip=192.0.2.7", params)
        self.assertIn(b"resp=" + base64.b64encode(b"\0alice\0secret"), params)
        server.answer(b"OK", b"user=Alice")
        self.assertEqual(self.successResultOf(d), b"Alice")

    def test_okWithoutUser(self) -> None:
        d = self.login()
        self.connected().answer(b"OK")
        self.assertEqual(self.successResultOf(d), b"alice")

    def test_fail(self) -> None:
        d = self.login()
        self.connected().answer(b"FAIL", b"user=alice")
        self.failureResultOf(d, UnauthorizedLogin)

    def test_failTemp(self) -> None:
        d = self.login()
        self.connected().answer(b"FAIL", b"temp", b"reason=db down")
        f = self.failureResultOf(d)
        self.assertTrue(f.check(DovecotUnavailable))
        self.assertFalse(f.check(UnauthorizedLogin))

    def test_unexpectedCont(self) -> None:
        d = self.login()
        self.connected().answer(b"CONT", b"")
        self.failureResultOf(d, DovecotUnavailable)

    def test_noAddressNoRip(self) -> None:
        self.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        request = self.connected().requests()[0]
        self.assertFalse([p for p in request if p.startswith(b"rip=")])

    def test_addressInjection(self) -> None:
        self.login(address="1.2.3.4\tuser=root")
        request = self.connected().requests()[0]
        self.assertFalse([p for p in request if p.startswith(b"rip=")])
        self.assertFalse([p for p in request if p.startswith(b"user=")])

    def test_nulRefusedWithoutAsking(self) -> None:
        self.failureResultOf(self.login(user=b"al\0ice"), UnauthorizedLogin)
        self.failureResultOf(self.login(password=b""), UnauthorizedLogin)
        self.assertEqual(self.endpoint.waiting, [])

    def test_unhandled(self) -> None:
        d = self.checker.requestAvatarId(CramMD5Credentials("host"))
        self.failureResultOf(d, UnhandledCredentials)

    def test_connectionReused(self) -> None:
        first, second = self.login(b"a", b"1"), self.login(b"b", b"2")
        self.assertEqual(len(self.endpoint.waiting), 1)
        server = self.connected()
        self.assertEqual(len(server.requests()), 2)
        # Answers come back in any order, matched by id.
        server.answer(b"OK", b"user=b", index=1)
        server.answer(b"FAIL", index=0)
        self.assertEqual(self.successResultOf(second), b"b")
        self.failureResultOf(first, UnauthorizedLogin)
        third = self.login(b"c", b"3")
        self.assertEqual(self.endpoint.waiting, [])
        server.answer(b"OK", b"user=c")
        self.assertEqual(self.successResultOf(third), b"c")
        ids = [r[1] for r in server.requests()]
        self.assertEqual(len(set(ids)), 3)

    def test_unknownAndLateAnswersIgnored(self) -> None:
        d = self.login()
        server = self.connected()
        server.send(b"OK\t999\tuser=mallory\nSOMETHING\telse\n")
        self.assertNoResult(d)
        server.answer(b"OK", b"user=alice")
        self.assertEqual(self.successResultOf(d), b"alice")

    def test_nonNumericIdDropsConnection(self) -> None:
        d = self.login()
        server = self.connected()
        server.send(b"OK\tx\n")
        self.assertTrue(server.transport.disconnecting)
        server.close()
        self.failureResultOf(d, DovecotUnavailable)

    def test_refusedThenBackoff(self) -> None:
        d = self.login()
        self.endpoint.refuse()
        self.failureResultOf(d, DovecotUnavailable)
        # Within the back-off: no new attempt, an immediate 454.
        self.failureResultOf(self.login(), DovecotUnavailable)
        self.assertEqual(self.endpoint.waiting, [])
        self.clock.advance(0.5)
        d = self.login()
        self.endpoint.refuse()
        self.failureResultOf(d, DovecotUnavailable)
        # The back-off doubled.
        self.clock.advance(0.5)
        self.failureResultOf(self.login(), DovecotUnavailable)
        self.assertEqual(self.endpoint.waiting, [])
        self.clock.advance(0.5)
        d = self.login()
        self.connected().answer(b"OK", b"user=alice")
        self.assertEqual(self.successResultOf(d), b"alice")
        # Success resets the back-off: a later loss is retried at once.
        self.endpoint.servers[-1].close()
        d = self.login()
        self.assertEqual(len(self.endpoint.waiting), 1)

    def test_backoffCapped(self) -> None:
        for _ in range(20):
            self.clock.advance(self.checker.maxBackoff)
            d = self.login()
            self.endpoint.refuse()
            self.failureResultOf(d, DovecotUnavailable)
        self.assertEqual(self.checker._backoff, self.checker.maxBackoff)

    def test_lostWhileWaiting(self) -> None:
        d = self.login()
        server = self.connected()
        server.close()
        self.failureResultOf(d, DovecotUnavailable)
        # Reconnects for the next login.
        d = self.login()
        self.connected().answer(b"OK")
        self.successResultOf(d)

    def test_timeout(self) -> None:
        d = self.login()
        server = self.connected()
        self.clock.advance(10)
        self.failureResultOf(d, DovecotUnavailable)
        # The request is cancelled and the connection dropped.
        self.assertIn([b"CANCEL", server.requests()[0][1]], server.lines())
        self.assertTrue(server.transport.disconnecting)
        server.close()
        d = self.login()
        self.connected().answer(b"OK")
        self.successResultOf(d)

    def test_idleConnectionClosed(self) -> None:
        self.checker = DovecotChecker(self.endpoint, self.clock, timeout=1000.0)
        first, second = self.login(), self.login()
        server = self.connected()
        server.answer(b"OK", index=0)
        self.successResultOf(first)
        self.clock.advance(60)
        self.assertFalse(server.transport.disconnecting, "closed with a login in flight")
        server.answer(b"OK", index=1)
        self.successResultOf(second)
        self.clock.advance(59)
        d = self.login()  # a login in time keeps the connection
        self.clock.advance(1)
        self.assertFalse(server.transport.disconnecting)
        server.answer(b"OK")
        self.successResultOf(d)
        self.clock.advance(60)
        self.assertTrue(server.transport.disconnecting)
        server.close()
        d = self.login()
        self.connected().answer(b"OK")
        self.successResultOf(d)
        self.checker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handshakeHangs(self) -> None:
        d = self.login()
        server = self.endpoint.accept(handshake=None)
        self.clock.advance(10)
        self.failureResultOf(d, DovecotUnavailable)
        self.assertTrue(server.transport.disconnecting)

    def test_connectHangs(self) -> None:
        d = self.login()
        self.clock.advance(10)
        self.failureResultOf(d, DovecotUnavailable)
        # The attempt was given up (cancelled), so the next login tries anew.
        self.assertTrue(self.endpoint.waiting[0][1].called)

    def test_mechanisms(self) -> None:
        self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN"))
        d = self.login()
        server = self.endpoint.accept(b"VERSION\t1\t2\nMECH\tCRAM-MD5\nDONE\n")
        # Without PLAIN, no PLAIN or LOGIN; CRAM-MD5 is relayed.
        self.assertEqual(self.checker.saslMechanisms(), ("CRAM-MD5",))
        server.answer(b"FAIL")
        self.failureResultOf(d, UnauthorizedLogin)
        portal = makePortal([self.checker])
        self.assertEqual(portalMechanisms(portal), ("CRAM-MD5",))

    def test_plugin(self) -> None:
        checker = strcred.makeChecker("dovecot:tcp:127.0.0.1:12345")
        self.assertIsInstance(checker, DovecotChecker)
        checker = strcred.makeChecker("dovecot:/run/dovecot/auth-client")
        self.assertIsInstance(checker, DovecotChecker)
        for bad in ("dovecot:", "dovecot:tcp:127.0.0.1", "dovecot:tcp::1", "dovecot:tcp:h:0"):
            self.assertRaises(ValueError, strcred.makeChecker, bad)


class FromClientTests(SynchronousTestCase):
    def test_plainPasswordGetsAddress(self) -> None:
        credentials = fromClient(UsernamePassword(b"a", b"b"), "192.0.2.1")
        self.assertIsInstance(credentials, ClientUsernamePassword)
        self.assertEqual(credentials.clientAddress, "192.0.2.1")  # type: ignore[attr-defined]
        self.assertTrue(credentials.checkPassword(b"b"))  # type: ignore[attr-defined]

    def test_othersUnchanged(self) -> None:
        cram = CramMD5Credentials("h")
        self.assertIs(fromClient(cram, "192.0.2.1"), cram)
