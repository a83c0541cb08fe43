"""
Tests for mailgw.server.sasl.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any

from argon2 import PasswordHasher
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from mailgw.auth.passwd import PasswdChecker, addUser, setPassword
from mailgw.config import LimitsConfig
from mailgw.limits import AuthThrottle
from mailgw.server.factory import Guards
from mailgw.server.sasl import (
    Challenge,
    Done,
    SASLFailure,
    availableMechanisms,
    makeExchange,
)
from tests.helpers import FakeTLSTransport, Harness

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class PlainTests(SynchronousTestCase):
    def test_initial(self) -> None:
        step = makeExchange("PLAIN", "h").start(b"\0u\0p")
        assert isinstance(step, Done)
        self.assertEqual((step.credentials.username, step.credentials.password), (b"u", b"p"))

    def test_challengeFirst(self) -> None:
        exchange = makeExchange("PLAIN", "h")
        self.assertEqual(exchange.start(None), Challenge(b""))
        self.assertIsInstance(exchange.respond(b"u\0u\0p"), Done)

    def test_refusals(self) -> None:
        for response, malformed in [
            (b"u\0p", True),
            (b"\0u\0p\0x", True),
            (b"other\0u\0p", False),
            (b"\0\0p", False),
            (b"\0u\0", False),
        ]:
            with self.assertRaises(SASLFailure) as e:
                makeExchange("PLAIN", "h").start(response)
            self.assertEqual(e.exception.malformed, malformed, response)


class LoginTests(SynchronousTestCase):
    def test_steps(self) -> None:
        exchange = makeExchange("LOGIN", "h")
        self.assertEqual(exchange.start(None), Challenge(b"Username:"))
        self.assertEqual(exchange.respond(b"u"), Challenge(b"Password:"))
        step = exchange.respond(b"p")
        assert isinstance(step, Done)
        self.assertEqual(step.credentials.username, b"u")

    def test_emptyPassword(self) -> None:
        exchange = makeExchange("LOGIN", "h")
        exchange.start(b"u")
        self.assertRaises(SASLFailure, exchange.respond, b"")


class CramTests(SynchronousTestCase):
    def test_checkPassword(self) -> None:
        exchange = makeExchange("CRAM-MD5", "mx.test")
        challenge = exchange.start(None)
        assert isinstance(challenge, Challenge)
        digest = hmac.new(b"secret", challenge.data, "md5").hexdigest().encode()
        step = exchange.respond(b"user name " + digest.upper())
        assert isinstance(step, Done)
        self.assertEqual(step.credentials.username, b"user name")
        self.assertTrue(step.credentials.checkPassword(b"secret"))
        self.assertFalse(step.credentials.checkPassword(b"other"))

    def test_challengesDiffer(self) -> None:
        a = makeExchange("CRAM-MD5", "h").start(None)
        b = makeExchange("CRAM-MD5", "h").start(None)
        self.assertNotEqual(a, b)

    def test_malformed(self) -> None:
        for response in (b"nodigest", b"u " + b"z" * 32, b"u abc", b" " + b"0" * 32):
            exchange = makeExchange("CRAM-MD5", "h")
            exchange.start(None)
            self.assertRaises(SASLFailure, exchange.respond, response)


class MechanismTests(SynchronousTestCase):
    def test_available(self) -> None:
        self.assertEqual(availableMechanisms([IUsernamePassword]), ("PLAIN", "LOGIN"))
        self.assertEqual(
            availableMechanisms([IUsernameHashedPassword, IUsernamePassword]),
            ("PLAIN", "LOGIN", "CRAM-MD5"),
        )
        self.assertEqual(availableMechanisms([]), ())


def inline(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class PasswdMechanismTests(SynchronousTestCase):
    """
    Issue 15: with the passwd: backend, EHLO offers CRAM-MD5 only while some
    user can use it, and a user without a CRAM secret who tries it falls
    back without being counted as a guess.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        addUser(self.path, "alice", "sesame", hasher=CHEAP)
        self.harness = Harness(implicitTLS=True, checkers=[PasswdChecker(self.path, inline, CHEAP)])
        self.factory = self.harness.factory
        self.factory.guards = Guards(auth=AuthThrottle(self.harness.clock, LimitsConfig()))

    def connect(self) -> Harness:
        """Another connection to the same factory (same throttle, same users file)."""
        h = self.harness
        h.protocol = self.factory.buildProtocol(None)
        h.transport = FakeTLSTransport(secure=True)
        h.protocol.makeConnection(h.transport)
        h.take()
        return h

    def test_hashOnlyFileOffersNoCram(self) -> None:
        """
        A users file without CRAM secrets: EHLO offers PLAIN and LOGIN only,
        and AUTH CRAM-MD5 is an unknown mechanism; once a user has a secret,
        the next EHLO offers CRAM-MD5, without a restart.
        """
        h = self.harness
        self.assertEqual(self.factory.mechanisms, ("PLAIN", "LOGIN"))
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", h.command(b"EHLO c"))
        self.assertTrue(h.command(b"AUTH CRAM-MD5").startswith(b"504 5.5.4"))
        addUser(self.path, "bob", "b", cram=True, hasher=CHEAP)
        self.assertIn(b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n", h.command(b"EHLO c"))
        setPassword(self.path, "bob", "c", cram=False, hasher=CHEAP)
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", h.command(b"EHLO c"))

    def cramThenPlain(self, h: Harness, login: bytes, password: bytes) -> tuple[bytes, bytes]:
        h.command(b"EHLO c")
        challenge = base64.b64decode(h.command(b"AUTH CRAM-MD5")[4:].strip())
        digest = hmac.new(password, challenge, "md5").hexdigest().encode()
        cram = h.command(base64.b64encode(login + b" " + digest))
        plain = h.command(b"AUTH PLAIN " + base64.b64encode(b"\0" + login + b"\0" + password))
        return cram, plain

    def test_fallbackTwelveTimes(self) -> None:
        """
        With some users holding secrets, a user without one whose client
        tries CRAM-MD5 first (535 5.7.8, as for a wrong password) and then
        PLAIN logs in at once, twelve connections in a row; another user
        at the same address is not slowed down either.
        """
        addUser(self.path, "bob", "b", cram=True, hasher=CHEAP)
        addUser(self.path, "carol", "c", hasher=CHEAP)
        for _ in range(12):
            h = self.connect()
            cram, plain = self.cramThenPlain(h, b"alice", b"sesame")
            self.assertEqual(cram, b"535 5.7.8 Authentication credentials invalid\r\n")
            # At once: a throttle delay would hold the reply until the clock moved.
            self.assertEqual(plain, b"235 2.7.0 Authentication successful\r\n")
        h = self.connect()
        h.command(b"EHLO c")
        reply = h.command(b"AUTH PLAIN " + base64.b64encode(b"\0carol\0c"))
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        # A user with a secret still logs in with CRAM-MD5.
        h = self.connect()
        cram, _ = self.cramThenPlain(h, b"bob", b"b")
        self.assertTrue(cram.startswith(b"235 "), cram)

    def test_unknownUserLooksTheSame(self) -> None:
        """An unknown user trying CRAM-MD5 gets exactly what alice gets."""
        addUser(self.path, "bob", "b", cram=True, hasher=CHEAP)
        replies = []
        for login in (b"alice", b"nobody"):
            h = self.connect()
            replies.append(self.cramThenPlain(h, login, b"sesame")[0])
        self.assertEqual(replies[0], replies[1])
