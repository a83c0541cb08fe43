"""
Tests for mailgw.server.sasl.
"""

from __future__ import annotations

import hmac

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.trial.unittest import SynchronousTestCase

from mailgw.server.sasl import (
    Challenge,
    Done,
    SASLFailure,
    availableMechanisms,
    makeExchange,
)


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
