"""
Tests for SCRAM-SHA-256: the keys (L{mailgw.auth.scram}), the exchange
(L{mailgw.server.scram}) against RFC 7677's test vector and against an
independent client (scramp), and every failure through a session.
"""

from __future__ import annotations

import base64
from typing import Any

import scramp
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.auth import MechanismUnavailable
from mailgw.auth.passwd import PasswdChecker, addUser, readUsers, setPassword
from mailgw.auth.scram import (
    MIN_ITERATIONS,
    IScramCredentials,
    IScramKeys,
    ScramKeys,
    makeKeys,
    saslprep,
)
from mailgw.auth.usersfile import parseUsers
from mailgw.config import LimitsConfig
from mailgw.server.sasl import Challenge, Done, SASLFailure
from mailgw.server.scram import NeedKeys, ScramExchange
from tests.helpers import Harness
from tests.test_passwd import CHEAP

# RFC 7677 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def synchronous(f: Any, *args: Any) -> Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class KeysTests(SynchronousTestCase):
    def test_field(self) -> None:
        keys = makeKeys("pencil", 4096, RFC_SALT)
        self.assertEqual(ScramKeys.fromField(keys.toField()), keys)
        self.assertNotIn("pencil", keys.toField())
        self.assertNotIn(base64.b64encode(keys.storedKey).decode(), repr(keys))

    def test_iterationFloor(self) -> None:
        self.assertRaises(ValueError, makeKeys, "pencil", MIN_ITERATIONS - 1)
        field = makeKeys("pencil", 4096).toField().replace("$4096$", "$4095$")
        self.assertRaises(ValueError, ScramKeys.fromField, field)

    def test_badFields(self) -> None:
        good = makeKeys("pencil", 4096).toField()
        for bad in (
            "SCRAM-SHA-256$4096$x",
            good.replace("SCRAM-SHA-256", "SCRAM-SHA-1"),
            good[:-4] + "!!!=",
            good.rsplit("$", 1)[0] + "$" + base64.b64encode(b"short").decode(),
        ):
            self.assertRaises(ValueError, ScramKeys.fromField, bad)

    def test_saslprep(self) -> None:
        self.assertEqual(saslprep("I\u00adX"), "IX")  # mapped to nothing
        self.assertEqual(saslprep("a\u00a0b"), "a b")  # non-ASCII space
        self.assertEqual(saslprep("\u2168"), "IX")  # NFKC
        self.assertRaises(ValueError, saslprep, "a\u0007")

    def test_usersFile(self) -> None:
        path = self.mktemp()
        addUser(path, "alice", "pw", hasher=CHEAP, scram=True, scramIterations=4096)
        addUser(path, "bob", "pw", cram=True, hasher=CHEAP, scram=True)
        addUser(path, "carol", "pw", hasher=CHEAP)
        users = readUsers(path)
        assert users["alice"].scramKeys is not None
        self.assertEqual(users["alice"].scramKeys.iterations, 4096)
        self.assertIsNotNone(users["bob"].cramSecret)
        self.assertIsNotNone(users["bob"].scramKeys)
        self.assertIsNone(users["carol"].scramKeys)
        with open(path, "rb") as f:
            self.assertEqual(parseUsers(f.read()), users)
        # change keeps keys (new ones) unless told otherwise
        old = users["alice"].scramKeys
        setPassword(path, "alice", "new", hasher=CHEAP)
        new = readUsers(path)["alice"].scramKeys
        self.assertIsNotNone(new)
        self.assertNotEqual(new, old)
        setPassword(path, "alice", "new", hasher=CHEAP, scram=False)
        self.assertIsNone(readUsers(path)["alice"].scramKeys)


class VectorTests(SynchronousTestCase):
    """RFC 7677's example, with the RFC's server nonce."""

    def test_rfc7677(self) -> None:
        exchange = ScramExchange(serverNonce=lambda: b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        self.assertEqual(exchange.start(RFC_CLIENT_FIRST), NeedKeys(b"user"))
        keys = makeKeys("pencil", 4096, RFC_SALT)
        self.assertEqual(exchange.keysFound((keys, "source")), Challenge(RFC_SERVER_FIRST))
        done = exchange.respond(RFC_CLIENT_FINAL)
        assert isinstance(done, Done)
        credentials: Any = done.credentials
        verifyObject(IScramCredentials, credentials)
        self.assertTrue(credentials.checkProof())
        self.assertEqual(b"v=" + base64.b64encode(credentials.serverSignature()), RFC_SERVER_FINAL)

    def test_wrongPassword(self) -> None:
        exchange = ScramExchange(serverNonce=lambda: b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        exchange.start(RFC_CLIENT_FIRST)
        exchange.keysFound((makeKeys("pencil2", 4096, RFC_SALT), "source"))
        done = exchange.respond(RFC_CLIENT_FINAL)
        assert isinstance(done, Done)
        self.assertFalse(done.credentials.checkProof())  # type: ignore[attr-defined]


class ExchangeRefusalTests(SynchronousTestCase):
    def final(self, clientFinal: bytes, first: bytes = RFC_CLIENT_FIRST) -> Any:
        exchange = ScramExchange(serverNonce=lambda: b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
        exchange.start(first)
        exchange.keysFound((makeKeys("pencil", 4096, RFC_SALT), "source"))
        return exchange.respond(clientFinal)

    def assertRefused(self, f: Any, *args: Any, malformed: bool) -> None:
        e = self.assertRaises(SASLFailure, f, *args)
        self.assertEqual(e.malformed, malformed, str(e))

    def test_clientFirst(self) -> None:
        for bad, malformed in [
            (b"p=tls-exporter,,n=user,r=abc", False),  # channel binding: clear 535
            (b"x,,n=user,r=abc", True),
            (b"n,n=user,r=abc", True),
            (b"n,,r=abc,n=user", True),
            (b"n,,n=,r=abc", True),
            (b"n,,n=user,r=", True),
            (b"n,,n=us=er,r=abc", True),
            (b"n,,m=ext,n=user,r=abc", True),
            (b"n,,n=user,r=abc,m=ext", True),
            (b"n,,n=user,r=a\x01c", True),
            (b"n,a=other,n=user,r=abc", False),
        ]:
            self.assertRefused(ScramExchange().start, bad, malformed=malformed)

    def test_escapedNames(self) -> None:
        self.assertEqual(ScramExchange().start(b"n,,n=a=2Cb=3Dc,r=x"), NeedKeys(b"a,b=c"))
        self.assertEqual(ScramExchange().start(b"y,a=u,n=u,r=x"), NeedKeys(b"u"))

    def test_clientFinal(self) -> None:
        nonce = b"rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        proof = b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        for bad, malformed in [
            (b"c=biws,r=" + nonce[:-1] + b"X," + proof, False),  # wrong nonce
            (b"c=eSws,r=" + nonce + b"," + proof, False),  # y,, after n,,
            (b"c=biws,r=" + nonce + b",p=!!notbase64", True),
            (b"c=b!ws,r=" + nonce + b"," + proof, True),
            (b"c=biws,r=" + nonce, True),
            (b"r=" + nonce + b",c=biws," + proof, True),
        ]:
            self.assertRefused(self.final, bad, malformed=malformed)

    def test_bindingFlagY(self) -> None:
        # y,, is accepted (we offer no -PLUS) but must be repeated in c=.
        first = b"y,,n=user,r=rOprNGfwEbeRWgbNEkqO"
        nonce = b"rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        done = self.final(b"c=eSws,r=" + nonce + b",p=AAAA", first)
        self.assertIsInstance(done, Done)
        self.assertRefused(self.final, b"c=biws,r=" + nonce + b",p=AAAA", first, malformed=False)


def scramLogin(h: Harness, user: str, password: str, client: Any = None) -> tuple[bytes, Any]:
    """An SMTP AUTH SCRAM-SHA-256 with scramp as the client; the last reply, and the client."""
    client = client or scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = base64.b64encode(client.get_client_first().encode()).decode()
    reply = h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
    if not reply.startswith(b"334 "):
        return reply, client
    client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
    final = base64.b64encode(client.get_client_final().encode())
    reply = h.command(final)
    if not reply.startswith(b"334 "):
        return reply, client
    client.set_server_final(base64.b64decode(reply[4:].strip()).decode())  # checks v=
    return h.command(b""), client


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        addUser(self.path, "alice", "pencil", hasher=CHEAP, scram=True, scramIterations=4096)
        addUser(self.path, "bob", "pencil", hasher=CHEAP)
        self.checker = PasswdChecker(self.path, synchronous, hasher=CHEAP)
        self.h = Harness(implicitTLS=True, checkers=[self.checker], limits=LimitsConfig())
        self.h.command(b"EHLO client.test")

    def test_offered(self) -> None:
        verifyObject(IScramKeys, self.checker)
        self.assertIn(b"SCRAM-SHA-256", self.h.command(b"EHLO client.test"))

    def test_notOfferedWithoutKeys(self) -> None:
        setPassword(self.path, "alice", "pencil", hasher=CHEAP, scram=False)
        self.assertNotIn(b"SCRAM-SHA-256", self.h.command(b"EHLO client.test"))
        reply, _ = scramLogin(self.h, "alice", "pencil")
        self.assertTrue(reply.startswith(b"504 "), reply)

    def test_login(self) -> None:
        reply, client = scramLogin(self.h, "alice", "pencil")
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.h.protocol.session().user, "alice")

    def test_challengeFirst(self) -> None:
        """Without an initial response, the server asks with an empty 334."""
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
        self.assertEqual(self.h.command(b"AUTH SCRAM-SHA-256"), b"334 \r\n")
        reply = self.h.command(base64.b64encode(client.get_client_first().encode()))
        client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
        reply = self.h.command(base64.b64encode(client.get_client_final().encode()))
        client.set_server_final(base64.b64decode(reply[4:].strip()).decode())
        self.assertTrue(self.h.command(b"").startswith(b"235 "))

    def test_wrongPasswordCounted(self) -> None:
        self.trackOutcomes()
        reply, _ = scramLogin(self.h, "alice", "wrong")
        self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.attempts(UnauthorizedLogin), 1)

    def attempts(self, kind: type) -> int:
        return sum(1 for k in self.outcomes if issubclass(k, kind))

    def trackOutcomes(self) -> None:
        self.outcomes: list[type] = []
        original = self.checker._checkScram

        def tracked(credentials: Any) -> Deferred[Any]:
            self.proofsChecked += 1
            d = original(credentials)

            def note(result: Any) -> Any:
                if hasattr(result, "type"):
                    self.outcomes.append(result.type)
                return result

            return d.addBoth(note)

        self.proofsChecked = 0
        self.patch(PasswdChecker, "_checkScram", lambda checker, c: tracked(c))

    def test_unknownUserSameWork(self) -> None:
        """
        An unknown user and a user without keys get a salt, fail after the
        same proof check, with the same 535, and are not counted as guesses.
        """
        self.trackOutcomes()
        checks = []
        from mailgw.auth import scram as scramModule

        realCheck = scramModule.ScramCredentials.checkProof

        def counted(self: Any) -> bool:
            checks.append(self.username)
            return realCheck(self)

        self.patch(scramModule.ScramCredentials, "checkProof", counted)
        replies = [scramLogin(self.h, user, "wrong")[0] for user in ("alice", "nobody", "bob")]
        self.assertEqual(len(set(replies)), 1, replies)
        self.assertTrue(replies[0].startswith(b"535 5.7.8"))
        self.assertEqual(checks, [b"alice", b"nobody", b"bob"])
        self.assertEqual(self.attempts(MechanismUnavailable), 2)
        self.assertEqual(self.attempts(UnauthorizedLogin), 3)  # MechanismUnavailable is one

    def test_decoySaltStable(self) -> None:
        salts = []
        for _ in range(2):
            client = scramp.ScramClient(["SCRAM-SHA-256"], "nobody", "x")
            first = base64.b64encode(client.get_client_first().encode()).decode()
            reply = self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
            salts.append(base64.b64decode(reply[4:]).split(b",")[1])
            self.assertEqual(self.h.command(b"*")[:3], b"501")
        self.assertEqual(salts[0], salts[1])

    def test_badBase64(self) -> None:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
        first = base64.b64encode(client.get_client_first().encode()).decode()
        self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
        self.assertTrue(self.h.command(b"!!!").startswith(b"501 5.5.2"))

    def test_channelBindingRefused(self) -> None:
        first = base64.b64encode(b"p=tls-exporter,,n=alice,r=abc").decode()
        reply = self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
        self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")

    def test_tamperedFinal(self) -> None:
        """A client-final whose nonce or binding was changed gets 535 before any check."""
        self.trackOutcomes()
        for change in (lambda m: m.replace("c=biws", "c=eSws"),
                       lambda m: m.replace(",p=", "X,p=")):  # fmt: skip
            client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
            first = base64.b64encode(client.get_client_first().encode()).decode()
            reply = self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
            client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
            final = change(client.get_client_final())
            reply = self.h.command(base64.b64encode(final.encode()))
            self.assertTrue(reply.startswith(b"535 5.7.8"), reply)
        self.assertEqual(self.proofsChecked, 0)

    def test_nonEmptyAnswerToServerFinal(self) -> None:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
        first = base64.b64encode(client.get_client_first().encode()).decode()
        reply = self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
        client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
        reply = self.h.command(base64.b64encode(client.get_client_final().encode()))
        self.assertTrue(reply.startswith(b"334 "))
        self.assertTrue(self.h.command(base64.b64encode(b"junk")).startswith(b"501"))
        self.assertIsNone(self.h.protocol.session().user)

    def test_backendDownOnLookup(self) -> None:
        with open(self.path, "a") as f:
            f.write("broken line\n")
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
        first = base64.b64encode(client.get_client_first().encode()).decode()
        reply = self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
        self.assertTrue(reply.startswith(b"454 4.7.0"), reply)
        self.assertTrue(self.flushLoggedErrors())

    def test_keysChangedMidExchange(self) -> None:
        """A password changed between the salt and the proof: the old keys no longer log in."""
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pencil")
        first = base64.b64encode(client.get_client_first().encode()).decode()
        reply = self.h.command(f"AUTH SCRAM-SHA-256 {first}".encode())
        client.set_server_first(base64.b64decode(reply[4:].strip()).decode())
        setPassword(self.path, "alice", "other", hasher=CHEAP)
        reply = self.h.command(base64.b64encode(client.get_client_final().encode()))
        self.assertTrue(reply.startswith(b"535 5.7.8"), reply)


class DecoyIterationTests(SynchronousTestCase):
    def setUp(self) -> None:
        from mailgw.server import scram

        self.counts = scram._IterationCounts()
        self.patch(scram, "_SERVED", self.counts)

    def iterations(self, user: bytes, found: object) -> bytes:
        exchange = ScramExchange()
        exchange.start(b"n,,n=" + user + b",r=abc")
        challenge = exchange.keysFound(found)  # type: ignore[arg-type]
        return dict(_pair(p) for p in challenge.data.split(b","))[b"i"]

    def test_decoysCarryTheIterationsServed(self) -> None:
        """
        An unknown user's ``i=`` is the one real keys were served with most
        (keys stored by Dovecot: 4096), so it does not tell who exists.
        """
        self.assertEqual(self.iterations(b"nobody", None), b"10000")  # nothing served yet
        for user in (b"a", b"b", b"c"):
            self.iterations(user, (makeKeys("pw", 4096, b"s" * 16), "source"))
        self.iterations(b"d", (makeKeys("pw", 10000, b"s" * 16), "source"))
        self.assertEqual(self.iterations(b"nobody", None), b"4096")

    def test_bounded(self) -> None:
        for n in range(100):
            self.counts.saw(4096 + n)
        self.assertEqual(len(self.counts.counts), self.counts.limit)


def _pair(part: bytes) -> tuple[bytes, bytes]:
    key, _, value = part.partition(b"=")
    return key, value
