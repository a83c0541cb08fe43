"""
CRAM-MD5 and SCRAM-SHA-256 relayed to Dovecot (L{mailgw.auth.dovecot}'s
L{DovecotConversation}, L{mailgw.auth.relay}, and the AUTH phase that
drives it), against an in-memory Dovecot that speaks the wire as Dovecot
2.3 does: it checks CRAM-MD5 itself and runs SCRAM with scramp's server
(an independent implementation). The real Dovecot is in
L{tests.integration.test_dovecot}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import scramp
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.auth.dovecot import DovecotChecker, DovecotUnavailable
from mailgw.auth.passwd import PasswdChecker, addUser
from mailgw.auth.relay import ISASLConversation, ISASLRelay, RelayChallenge, RelayVerdict
from mailgw.config import LimitsConfig
from mailgw.server.sasl import claimedLogin, relayFor, servedLocally
from tests.helpers import Harness
from tests.test_dovecot import FakeDovecot, FakeEndpoint
from tests.test_passwd import CHEAP

RELAY_HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
    b"MECH\tCRAM-MD5\tdictionary\tactive\nMECH\tSCRAM-SHA-256\tmutual-auth\n"
    b"SPID\t42\nCUID\t1\nCOOKIE\t0123abcd\nDONE\n"
)
USERS = {"carol@example.com": "dovecot horse", "dave@example.com": "other"}
_SCRAM = scramp.ScramMechanism("SCRAM-SHA-256")


def _keys(user: str) -> Any:
    salt, stored, server, iterations = _SCRAM.make_auth_info(USERS[user], iteration_count=4096)
    return salt, stored, server, iterations


class ScriptedDovecot:
    """
    The server side of one connection, answering the lines the client has
    written so far at each L{pump}, as Dovecot's auth service does.
    """

    def __init__(self, server: FakeDovecot) -> None:
        self.server = server
        self.seen = 0
        self.state: dict[bytes, Any] = {}
        self.cancelled: list[bytes] = []
        self.hold = False  # leave requests unanswered (a slow Dovecot)
        # SCRAM's server-final message in the OK (resp=), not in a CONT.
        self.finalInOK = False

    def pump(self) -> None:
        if self.hold:
            return
        lines = self.server.lines()
        new, self.seen = lines[self.seen :], len(lines)
        for fields in new:
            self.handle(fields)

    def send(self, *fields: bytes) -> None:
        self.server.send(b"\t".join(fields) + b"\n")

    def handle(self, fields: list[bytes]) -> None:
        kind, rid = fields[0], fields[1] if len(fields) > 1 else b""
        if kind == b"CANCEL":
            self.cancelled.append(rid)
            self.state.pop(rid, None)
        elif kind == b"AUTH" and fields[2] == b"CRAM-MD5":
            challenge = b"<1234.5678@dovecot.test>"
            self.state[rid] = ("cram", challenge)
            self.send(b"CONT", rid, base64.b64encode(challenge))
        elif kind == b"AUTH" and fields[2] == b"SCRAM-SHA-256":
            names: list[str] = []

            def keys(user: str) -> Any:
                names.append(user)
                return _keys(user)

            server = _SCRAM.make_server(keys)
            server.names = names
            self.state[rid] = ("scram", server)
            resp = [f[5:] for f in fields if f.startswith(b"resp=")]
            if resp:
                self.scram(rid, server, base64.b64decode(resp[0]))
            else:
                self.send(b"CONT", rid, b"")
        elif kind == b"CONT":
            what, data = self.state[rid], base64.b64decode(fields[2])
            if what[0] == "cram":
                self.cram(rid, what[1], data)
            else:
                self.scram(rid, what[1], data)

    def cram(self, rid: bytes, challenge: bytes, data: bytes) -> None:
        user, _, digest = data.decode().rpartition(" ")
        password = USERS.get(user, "").encode()
        expected = hmac.new(password, challenge, hashlib.md5).hexdigest()
        del self.state[rid]
        if user in USERS and hmac.compare_digest(expected, digest):
            self.send(b"OK", rid, b"user=" + user.encode())
        else:
            self.send(b"FAIL", rid, b"user=" + user.encode())

    def scram(self, rid: bytes, server: Any, data: bytes) -> None:
        try:
            if server.stage is None:
                server.set_client_first(data.decode())
                self.send(b"CONT", rid, base64.b64encode(server.get_server_first().encode()))
            elif server.stage.name == "get_server_first":
                server.set_client_final(data.decode())
                final = base64.b64encode(server.get_server_final().encode())
                if self.finalInOK:
                    del self.state[rid]
                    user = server.names[0].encode()
                    self.send(b"OK", rid, b"user=" + user, b"resp=" + final)
                else:
                    self.send(b"CONT", rid, final)
            else:  # the client's empty answer to the server-final message
                del self.state[rid]
                self.send(b"OK", rid, b"user=" + server.names[0].encode())
        except (scramp.ScramException, KeyError):
            self.state.pop(rid, None)
            self.send(b"FAIL", rid)


class ConversationTests(SynchronousTestCase):
    """The conversation on its own, against scripted answers."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.checker = DovecotChecker(self.endpoint, self.clock, timeout=10.0)

    def test_interfaces(self) -> None:
        verifyObject(ICredentialsChecker, self.checker)
        verifyObject(ISASLRelay, self.checker)
        verifyObject(ISASLConversation, self.checker.converse("CRAM-MD5", "192.0.2.7"))
        self.assertRaises(ValueError, self.checker.converse, "PLAIN", "192.0.2.7")

    def test_mechanismsFromHandshake(self) -> None:
        self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN"))
        # The first call starts a connection, so the next EHLO knows.
        self.endpoint.accept(RELAY_HANDSHAKE)
        self.assertEqual(
            self.checker.saslMechanisms(), ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")
        )

    def test_steps(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        [request] = server.requests()
        self.assertEqual(request[2], b"CRAM-MD5")
        self.assertIn(b"service=smtp", request)
        self.assertIn(b"secured", request)
        self.assertIn(b"rip=192.0.2.7", request)
        self.assertFalse([f for f in request if f.startswith(b"resp=")])
        server.answer(b"CONT", base64.b64encode(b"<1.2@h>"))
        self.assertEqual(self.successResultOf(d), RelayChallenge(b"<1.2@h>"))
        d = conversation.step(b"carol digest")
        cont = server.lines()[-1]
        self.assertEqual(cont, [b"CONT", request[1], base64.b64encode(b"carol digest")])
        server.answer(b"OK", b"user=Carol", b"resp=" + base64.b64encode(b"fin"))
        verdict = self.successResultOf(d)
        self.assertEqual(
            (verdict.login, verdict.final, verdict.source), (b"Carol", b"fin", self.checker)
        )
        # Finished: no longer in flight, so the idle connection is closed later.
        self.assertEqual(self.checker._inFlight, 0)
        self.failureResultOf(conversation.step(b""), DovecotUnavailable)

    def test_initialResponse(self) -> None:
        conversation = self.checker.converse("SCRAM-SHA-256", "192.0.2.7")
        conversation.step(b"")
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        self.assertIn(b"resp=", server.requests()[0])

    def test_fail(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        server.answer(b"FAIL", b"user=carol")
        self.assertEqual(self.successResultOf(d), RelayVerdict(self.checker, None))

    def test_failTempAndGarbage(self) -> None:
        for answer in (
            (b"FAIL", b"temp"),
            (b"CONT", b"not base64!"),
            (b"OK",),  # an OK must say whom it accepted
        ):
            conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
            d = conversation.step(None)
            if not self.endpoint.servers:
                self.endpoint.accept(RELAY_HANDSHAKE)
            self.endpoint.servers[-1].answer(*answer)
            self.failureResultOf(d, DovecotUnavailable)
        self.assertEqual(self.checker._inFlight, 0)

    def test_unreachable(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        self.endpoint.refuse()
        self.failureResultOf(d, DovecotUnavailable)
        self.assertEqual(self.checker._inFlight, 0)

    def test_lostBetweenSteps(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        server.answer(b"CONT", b"")
        self.successResultOf(d)
        server.close()
        self.failureResultOf(conversation.step(b"x y"), DovecotUnavailable)

    def test_timeout(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        self.clock.advance(10)
        self.failureResultOf(d, DovecotUnavailable)
        self.assertTrue(server.transport.disconnecting)

    def test_cancelWaitingForClient(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        server.answer(b"CONT", b"")
        self.successResultOf(d)
        conversation.cancel()
        self.assertEqual(server.lines()[-1], [b"CANCEL", server.requests()[0][1]])
        self.assertEqual(self.checker._inFlight, 0)
        conversation.cancel()  # twice is harmless
        self.assertEqual(self.checker._inFlight, 0)

    def test_cancelWaitingForDovecot(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        conversation.cancel()
        self.assertEqual(server.lines()[-1], [b"CANCEL", server.requests()[0][1]])
        self.failureResultOf(d)
        # No timer is left to drop the connection under other logins.
        self.clock.advance(10)
        self.assertFalse(server.transport.disconnecting)

    def test_cancelWhileConnecting(self) -> None:
        conversation = self.checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        conversation.cancel()
        server = self.endpoint.accept(RELAY_HANDSHAKE)
        self.failureResultOf(d, DovecotUnavailable)
        self.assertEqual(server.requests(), [])

    def test_relayedCredentialsOfAnotherChecker(self) -> None:
        from mailgw.auth.relay import RelayedCredentials

        other = DovecotChecker(FakeEndpoint(), self.clock)
        credentials = RelayedCredentials(b"carol", RelayVerdict(other, b"carol"))
        self.failureResultOf(self.checker.requestAvatarId(credentials))
        mine = RelayedCredentials(b"carol", RelayVerdict(self.checker, b"carol"))
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(mine)), b"carol")
        refused = RelayedCredentials(b"carol", RelayVerdict(self.checker, None))
        self.failureResultOf(self.checker.requestAvatarId(refused), UnauthorizedLogin)

    def test_claimedLogin(self) -> None:
        self.assertEqual(claimedLogin("CRAM-MD5", b"carol@x 0123"), b"carol@x")
        self.assertIsNone(claimedLogin("CRAM-MD5", b"nospace"))
        self.assertEqual(claimedLogin("SCRAM-SHA-256", b"n,,n=a=2Cb,r=xyz"), b"a,b")
        self.assertEqual(claimedLogin("SCRAM-SHA-256", b"n,a=a,n=a,r=xyz"), b"a")
        self.assertIsNone(claimedLogin("SCRAM-SHA-256", b"garbage"))


def cramResponse(challenge: bytes, user: str, password: str) -> bytes:
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return base64.b64encode(f"{user} {digest}".encode())


class _DovecotSession(SynchronousTestCase):
    """A session whose backend is a scripted Dovecot (after ``extra`` backends)."""

    def setUp(self, extra: list[Any] | None = None) -> None:
        from twisted.internet.task import Clock

        self.endpoint = FakeEndpoint()
        self.checker = DovecotChecker(self.endpoint, Clock(), timeout=10.0)
        self.addCleanup(self.checker.stop)
        self.h = Harness(
            implicitTLS=True, checkers=[*(extra or []), self.checker], limits=LimitsConfig()
        )
        # The checker's clock is the session's, so deadlines and delays agree.
        self.checker.clock = self.h.clock
        self.h.command(b"EHLO client.test")  # starts the connection to Dovecot
        self.dovecot = ScriptedDovecot(self.endpoint.accept(RELAY_HANDSHAKE))
        throttle = self.h.factory.guards.auth
        assert throttle is not None
        self.throttle = throttle
        self.attempts: list[Any] = []
        begin = throttle.begin

        def counted(*args: Any, **kwargs: Any) -> Any:
            decision = begin(*args, **kwargs)
            if decision.attempt is not None:
                self.attempts.append(decision.attempt)
            return decision

        self.patch(throttle, "begin", counted)

    def say(self, line: bytes) -> bytes:
        """Send a line, let Dovecot answer what it was asked, and return the server's reply."""
        self.h.send(line + b"\r\n")
        self.dovecot.pump()
        return self.h.take()

    def outcomes(self) -> list[str | None]:
        return [attempt.outcome for attempt in self.attempts]

    def challenge(self, reply: bytes) -> bytes:
        self.assertTrue(reply.startswith(b"334 "), reply)
        return base64.b64decode(reply[4:].strip())

    def scram(self, user: str, password: str, initial: bool = True) -> bytes:
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
        first = base64.b64encode(client.get_client_first().encode())
        if initial:
            reply = self.say(b"AUTH SCRAM-SHA-256 " + first)
        else:
            self.assertEqual(self.challenge(self.say(b"AUTH SCRAM-SHA-256")), b"")
            reply = self.say(first)
        client.set_server_first(self.challenge(reply).decode())
        reply = self.say(base64.b64encode(client.get_client_final().encode()))
        if not reply.startswith(b"334 "):
            return reply
        client.set_server_final(self.challenge(reply).decode())  # checks Dovecot's v=
        return self.say(b"")


class SessionTests(_DovecotSession):
    """Through a session: AUTH, the 334 lines, the throttle and the replies."""

    def test_offered(self) -> None:
        ehlo = self.h.command(b"EHLO client.test")
        self.assertIn(b"AUTH PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256\r\n", ehlo)

    def test_cramMD5(self) -> None:
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        self.assertEqual(challenge, b"<1234.5678@dovecot.test>")  # Dovecot's own
        self.assertEqual(self.outcomes(), [])  # nothing verified yet
        reply = self.say(cramResponse(challenge, "carol@example.com", USERS["carol@example.com"]))
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.h.protocol.session().user, "carol@example.com")
        self.assertEqual(self.outcomes(), ["succeeded"])
        self.assertEqual(self.throttle.inFlight, 0)

    def test_cramMD5Wrong(self) -> None:
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        reply = self.say(cramResponse(challenge, "carol@example.com", "wrong"))
        self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.outcomes(), ["failed"])
        self.assertEqual(self.attempts[0].login, "carol@example.com")
        self.assertIsNone(self.h.protocol.session().user)

    def test_scram(self) -> None:
        reply = self.scram("carol@example.com", USERS["carol@example.com"])
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.outcomes(), ["succeeded"])

    def test_scramWithoutInitialResponse(self) -> None:
        reply = self.scram("dave@example.com", USERS["dave@example.com"], initial=False)
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.h.protocol.session().user, "dave@example.com")
        self.assertEqual(self.outcomes(), ["succeeded"])

    def test_scramFinalInOK(self) -> None:
        """Dovecot's server-final message in its OK: a 334 the client acknowledges, then 235."""
        self.dovecot.finalInOK = True
        reply = self.scram("carol@example.com", USERS["carol@example.com"])
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.outcomes(), ["succeeded"])

    def test_scramWrong(self) -> None:
        reply = self.scram("carol@example.com", "wrong")
        self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.outcomes(), ["failed"])

    def test_cancelBeforeAnswer(self) -> None:
        self.say(b"AUTH CRAM-MD5")
        self.assertEqual(self.say(b"*"), b"501 5.7.0 Authentication cancelled\r\n")
        self.assertEqual(self.dovecot.cancelled, [self.dovecot.server.requests()[0][1]])
        self.assertEqual(self.outcomes(), [])  # the client sent nothing to check
        self.assertEqual(self.checker._inFlight, 0)

    def test_cancelMidScramCounted(self) -> None:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "carol@example.com", "x")
        first = base64.b64encode(client.get_client_first().encode())
        self.challenge(self.say(b"AUTH SCRAM-SHA-256 " + first))
        self.assertEqual(self.say(b"*"), b"501 5.7.0 Authentication cancelled\r\n")
        self.assertEqual(self.outcomes(), ["abandoned"])  # counted once, and it stays
        self.assertEqual(len(self.dovecot.cancelled), 1)
        # The session goes on: a new AUTH works.
        reply = self.scram("carol@example.com", USERS["carol@example.com"])
        self.assertTrue(reply.startswith(b"235 "), reply)
        self.assertEqual(self.outcomes(), ["abandoned", "succeeded"])

    def test_badBase64Ends(self) -> None:
        self.say(b"AUTH CRAM-MD5")
        self.assertEqual(self.say(b"!!!"), b"501 5.5.2 Cannot decode response\r\n")
        self.assertEqual(len(self.dovecot.cancelled), 1)
        self.assertEqual(self.checker._inFlight, 0)

    def test_lineTooLong(self) -> None:
        self.say(b"AUTH CRAM-MD5")
        reply = self.say(b"A" * (self.h.factory.settings.maxLineLength + 10))
        self.assertTrue(reply.startswith(b"500 5.5.6"), reply)
        self.assertEqual(len(self.dovecot.cancelled), 1)
        # The next line is a command again, not an AUTH response.
        self.assertTrue(self.say(b"NOOP").startswith(b"250 "))

    def test_unreachable(self) -> None:
        self.dovecot.server.close()
        reply = self.say(b"AUTH CRAM-MD5")
        self.endpoint.refuse()
        reply += self.h.take()
        self.assertEqual(reply, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.outcomes(), [])
        self.assertTrue(self.flushLoggedErrors(DovecotUnavailable))
        # Back after the back-off: a new connection, and logins work again.
        self.h.clock.advance(self.checker.minBackoff)
        self.h.send(b"AUTH CRAM-MD5\r\n")
        self.dovecot = ScriptedDovecot(self.endpoint.accept(RELAY_HANDSHAKE))
        self.dovecot.pump()
        challenge = self.challenge(self.h.take())
        reply = self.say(cramResponse(challenge, "carol@example.com", USERS["carol@example.com"]))
        self.assertTrue(reply.startswith(b"235 "), reply)

    def test_lostMidExchange(self) -> None:
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        self.dovecot.server.close()
        reply = self.say(cramResponse(challenge, "carol@example.com", USERS["carol@example.com"]))
        self.assertEqual(reply, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.outcomes(), ["unavailable"])
        self.assertTrue(self.flushLoggedErrors(DovecotUnavailable))

    def test_dovecotSlow(self) -> None:
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        self.dovecot.hold = True
        reply = self.say(cramResponse(challenge, "carol@example.com", USERS["carol@example.com"]))
        self.assertEqual(reply, b"")
        self.h.clock.advance(self.checker.timeout)
        self.assertEqual(self.h.take(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.outcomes(), ["unavailable"])
        self.assertTrue(self.flushLoggedErrors(DovecotUnavailable))

    def test_hangUpWhileDovecotChecks(self) -> None:
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        self.dovecot.hold = True
        self.say(cramResponse(challenge, "carol@example.com", USERS["carol@example.com"]))
        self.h.hangUp()
        self.assertEqual(self.outcomes(), ["abandoned"])
        self.assertEqual(self.dovecot.server.lines()[-1][0], b"CANCEL")
        self.assertEqual(self.checker._inFlight, 0)
        self.assertEqual(self.throttle.inFlight, 0)

    def test_throttleRefusesRelayed(self) -> None:
        """After the failure budget is spent, a relayed attempt is refused like any other."""
        for _ in range(50):
            challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
            reply = self.say(cramResponse(challenge, "carol@example.com", "wrong"))
            if not reply:
                # The throttle's delay: then Dovecot is asked.
                self.h.clock.advance(60)
                self.dovecot.pump()
                reply = self.h.take()
            if not reply.startswith(b"535 "):
                break
        self.assertFalse(reply.startswith(b"535 "), "never throttled")
        self.assertTrue(reply[:3] in (b"421", b"454"), reply)
        self.assertEqual(self.checker._inFlight, 0)


class MixedTests(_DovecotSession):
    """
    A C{passwd:} file with CRAM-MD5 secrets and SCRAM keys before Dovecot:
    CRAM-MD5 answers Dovecot's challenge and is checked by Dovecot, then by
    the file; SCRAM is served by the file for its users, by Dovecot for the
    others (chosen at client-first).
    """

    def setUp(self) -> None:  # type: ignore[override]
        path = self.mktemp()
        addUser(path, "erin@example.com", "pencil", hasher=CHEAP, cram=True, scram=True,
                scramIterations=4096)  # fmt: skip
        addUser(path, "frank@example.com", "pencil", hasher=CHEAP)
        from twisted.internet import defer

        self.passwd = PasswdChecker(path, defer.maybeDeferred, hasher=CHEAP)
        super().setUp(extra=[self.passwd])

    def test_routing(self) -> None:
        self.assertIs(relayFor(self.h.portal, "CRAM-MD5"), self.checker)
        self.assertIs(relayFor(self.h.portal, "SCRAM-SHA-256"), self.checker)
        self.assertIsNone(relayFor(self.h.portal, "PLAIN"))
        self.assertTrue(servedLocally(self.h.portal, "CRAM-MD5"))

    def test_cramBoth(self) -> None:
        for user, password in (("erin@example.com", "pencil"), ("carol@example.com", None)):
            challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
            self.assertEqual(challenge, b"<1234.5678@dovecot.test>")  # Dovecot's
            reply = self.say(cramResponse(challenge, user, password or USERS[user]))
            self.assertTrue(reply.startswith(b"235 "), reply)
            self.assertEqual(self.h.protocol.session().user, user)
            self.h.connect()
            self.h.command(b"EHLO client.test")
        self.assertEqual(self.outcomes(), ["succeeded", "succeeded"])

    def test_cramWrongEverywhere(self) -> None:
        """Dovecot refused and the file has no secret for the user: a counted failure."""
        for user in ("erin@example.com", "frank@example.com", "nobody@example.com"):
            challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
            reply = self.say(cramResponse(challenge, user, "wrong"))
            self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.outcomes(), ["failed"] * 3)

    def test_scramLocalUser(self) -> None:
        reply = self.scram("erin@example.com", "pencil")
        self.assertTrue(reply.startswith(b"235 "), reply)
        self.assertEqual(self.dovecot.server.requests(), [])  # Dovecot never asked

    def test_scramDovecotUser(self) -> None:
        for initial in (True, False):
            reply = self.scram("carol@example.com", USERS["carol@example.com"], initial)
            self.assertTrue(reply.startswith(b"235 "), reply)
            self.h.connect()
            self.h.command(b"EHLO client.test")
        self.assertEqual(len(self.dovecot.server.requests()), 2)
        self.assertEqual(self.outcomes(), ["succeeded", "succeeded"])

    def test_scramDovecotUnreachable(self) -> None:
        self.dovecot.server.close()
        client = scramp.ScramClient(["SCRAM-SHA-256"], "carol@example.com", "x")
        first = base64.b64encode(client.get_client_first().encode())
        self.h.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        self.endpoint.refuse()
        self.assertEqual(self.h.take(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.outcomes(), ["unavailable"])
        self.assertTrue(self.flushLoggedErrors(DovecotUnavailable))

    def test_cramDovecotDownBeforeChallenge(self) -> None:
        """Dovecot unreachable: CRAM-MD5 goes on with mailgw's challenge for the local users."""
        self.dovecot.server.close()
        self.h.send(b"AUTH CRAM-MD5\r\n")
        self.endpoint.refuse()
        challenge = self.challenge(self.h.take())
        self.assertNotEqual(challenge, b"<1234.5678@dovecot.test>")  # ours
        reply = self.say(cramResponse(challenge, "erin@example.com", "pencil"))
        self.assertTrue(reply.startswith(b"235 "), reply)
        self.assertEqual(self.outcomes(), ["succeeded"])
        self.assertTrue(self.flushLoggedErrors(DovecotUnavailable))

    def test_cramDovecotDownOthers454(self) -> None:
        """A login no local backend accepts could be Dovecot's: 454, not 535."""
        self.dovecot.server.close()
        for user, password in (("carol@example.com", USERS["carol@example.com"]),
                               ("erin@example.com", "wrong")):  # fmt: skip
            self.h.send(b"AUTH CRAM-MD5\r\n")
            if self.endpoint.waiting:  # else: within the back-off, no new attempt
                self.endpoint.refuse()
            challenge = self.challenge(self.h.take())
            reply = self.say(cramResponse(challenge, user, password))
            self.assertEqual(reply, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.outcomes(), ["unavailable", "unavailable"])
        self.flushLoggedErrors(DovecotUnavailable)

    def test_cramDovecotLostAfterChallenge(self) -> None:
        """Lost after its challenge: the answer is checked by the local backends."""
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        self.dovecot.server.close()
        reply = self.say(cramResponse(challenge, "erin@example.com", "pencil"))
        self.assertTrue(reply.startswith(b"235 "), reply)
        self.assertEqual(self.outcomes(), ["succeeded"])
        self.flushLoggedErrors(DovecotUnavailable)

    def test_cramDovecotLostAfterChallengeWrong(self) -> None:
        challenge = self.challenge(self.say(b"AUTH CRAM-MD5"))
        self.dovecot.server.close()
        reply = self.say(cramResponse(challenge, "erin@example.com", "wrong"))
        self.assertEqual(reply, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(self.outcomes(), ["unavailable"])
        self.flushLoggedErrors(DovecotUnavailable)

    def test_throttleAfterScramLookup(self) -> None:
        """
        The throttle's verdict met when Dovecot takes a SCRAM exchange over
        (after the local lookup) is kept: a refusal is the reply, a
        disconnect closes the session.
        """

        def answered(line: bytes) -> bytes:
            reply = self.say(line)
            if not reply:  # the throttle's delay, then Dovecot is asked
                self.h.clock.advance(60)
                self.dovecot.pump()
                reply = self.h.take()
            return reply

        codes: list[bytes] = []
        for _ in range(50):
            client = scramp.ScramClient(["SCRAM-SHA-256"], "carol@example.com", "wrong")
            first = base64.b64encode(client.get_client_first().encode())
            reply = answered(b"AUTH SCRAM-SHA-256 " + first)
            if reply.startswith(b"334 "):
                client.set_server_first(self.challenge(reply).decode())
                reply = answered(base64.b64encode(client.get_client_final().encode()))
            codes.append(reply[:3])
            if not reply.startswith(b"535 ") or self.h.closing:
                break
        self.assertIn(codes[-1], (b"421", b"454"), codes)
        self.assertEqual(self.h.closing, codes[-1] == b"421")
        self.assertEqual(self.checker._inFlight, 0)
