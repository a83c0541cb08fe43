"""
CRAM-MD5 and SCRAM-SHA-256 from stored values (L{mailgw.auth.stored},
L{mailgw.auth.hashes}): the C{sql:} backend's C{mechanisms} setting, plain
values serving both, Dovecot's C{{SCRAM-SHA-256}} values serving SCRAM
(checked with scramp as the client), and L{MechanismUnavailable} for a
user whose value cannot serve the mechanism.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.auth import ISASLMechanisms, MechanismUnavailable
from mailgw.auth.hashes import HashFormatError, cleartext, scramKeysOf, verifyStored
from mailgw.auth.scram import IScramKeys, makeKeys
from mailgw.auth.sql import SQLSettingsError, parseSQLSettings
from mailgw.auth.stored import StoredHashChecker, StoredUser
from mailgw.config import LimitsConfig
from mailgw.server.sasl import portalMechanisms
from tests.helpers import Harness
from tests.test_scram import scramLogin

# doveadm pw -s SCRAM-SHA-256 -p pencil
DOVECOT_SCRAM = (
    "{SCRAM-SHA-256}4096,fCGkyuA97GCMG8wKXxI23A==,oNT4ixa5emAYxs8cEdnx0T9AeVLixo1fNNwju5zUQD4="
    ",7c5aF8zfeBRxD+CxBQ7dAOSu38rJ5uKZ0hN1BA8AlGY="
)
# doveadm pw -s SHA512-CRYPT -p pencil
SHA512 = (
    "{SHA512-CRYPT}$6$QUgOxmgk9FWP/R1F$LYIPHjKF7z1uXiGoED4hky.T98LcbLTL/4wRoD2dxNnJMw"
    "7ulwUbH2ttN3g2S5ueSU43ezNTkU3pDf9L.A0mp1"
)
USERS = {
    "scram@example.com": DOVECOT_SCRAM,
    "plain@example.com": "{PLAIN}pencil",
    "hashed@example.com": SHA512,
}
ALL = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")


def cram(challenge: bytes, user: bytes, password: bytes) -> CramMD5Credentials:
    credentials = CramMD5Credentials("mx.test")
    credentials.challenge = challenge
    credentials.username = user  # type: ignore[assignment]
    credentials.response = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
    return credentials


class ValuesTests(SynchronousTestCase):
    def test_dovecotScram(self) -> None:
        keys = scramKeysOf(DOVECOT_SCRAM)
        assert keys is not None
        self.assertEqual(keys, makeKeys("pencil", keys.iterations, keys.salt))
        self.assertTrue(verifyStored(DOVECOT_SCRAM, b"pencil"))
        self.assertFalse(verifyStored(DOVECOT_SCRAM, b"pencik"))
        self.assertFalse(verifyStored(DOVECOT_SCRAM, b"\xff"))
        self.assertIsNone(scramKeysOf(SHA512))
        for bad in (
            "{SCRAM-SHA-256}x",
            "{SCRAM-SHA-256}100,AA==,AA==,AA==",
            "{SCRAM-SHA-256}4096,!!,AA==,AA==",
            "{SCRAM-SHA-256}4096,AA==,AA==,AA==",
        ):
            self.assertRaises(HashFormatError, scramKeysOf, bad)

    def test_cleartext(self) -> None:
        self.assertEqual(cleartext("{PLAIN}pencil", True), b"pencil")
        self.assertEqual(cleartext("{clear}pencil", True), b"pencil")
        self.assertIsNone(cleartext("{PLAIN}pencil", False))
        self.assertIsNone(cleartext(SHA512, True))
        self.assertIsNone(cleartext("pencil", True))


class SettingsTests(SynchronousTestCase):
    def settings(self, **values: Any) -> Any:
        data = {
            "driver": "sqlite",
            "dsn": "/x.db",
            "password_query": "SELECT p FROM u WHERE l = :user",
        }
        data.update(values)
        return parseSQLSettings(data, "sql.toml")

    def test_default(self) -> None:
        self.assertEqual(self.settings().mechanisms, ("PLAIN", "LOGIN"))

    def test_chosen(self) -> None:
        settings = self.settings(mechanisms=["scram-sha-256", "PLAIN"])
        self.assertEqual(settings.mechanisms, ("PLAIN", "SCRAM-SHA-256"))

    def test_problems(self) -> None:
        for value in ([], "PLAIN", ["PLAIN", 3], ["NTLM"], ["CRAM-MD5"]):
            e = self.assertRaises(SQLSettingsError, self.settings, mechanisms=value)
            self.assertIn("sql.toml: mechanisms:", str(e))
        e = self.assertRaises(SQLSettingsError, self.settings, mechanisms=["CRAM-MD5"])
        self.assertIn("allow_plain", str(e))
        self.settings(mechanisms=["CRAM-MD5"], allow_plain=True)


class CheckerTests(SynchronousTestCase):
    def makeChecker(self, mechanisms: tuple[str, ...] = ALL, allowPlain: bool = True) -> Any:
        self.fetched: list[str] = []

        def fetch(login: str) -> defer.Deferred[StoredUser | None]:
            self.fetched.append(login)
            stored = USERS.get(login)
            return defer.succeed(None if stored is None else StoredUser(login.upper(), stored))

        return StoredHashChecker(
            fetch, defer.maybeDeferred, allowPlain=allowPlain, mechanisms=mechanisms
        )

    def test_interfaces(self) -> None:
        checker = self.makeChecker()
        verifyObject(ISASLMechanisms, checker)
        verifyObject(IScramKeys, checker)
        self.assertEqual(len(checker.credentialInterfaces), 3)
        plainOnly = self.makeChecker(("PLAIN", "LOGIN"))
        self.assertEqual(len(plainOnly.credentialInterfaces), 1)
        self.failureResultOf(
            plainOnly.requestAvatarId(cram(b"<1@h>", b"plain@example.com", b"pencil")),
            UnhandledCredentials,
        )

    def test_advertised(self) -> None:
        """EHLO offers what the settings say, and only that."""
        for mechanisms in (("PLAIN", "LOGIN"), ("PLAIN", "LOGIN", "SCRAM-SHA-256"), ALL):
            h = Harness(implicitTLS=True, checkers=[self.makeChecker(mechanisms)])
            self.assertEqual(portalMechanisms(h.portal), mechanisms)
            ehlo = h.command(b"EHLO client.test")
            self.assertIn(b"AUTH " + " ".join(mechanisms).encode() + b"\r\n", ehlo)

    def test_cram(self) -> None:
        checker = self.makeChecker()
        ok = checker.requestAvatarId(cram(b"<1@h>", b"plain@example.com", b"pencil"))
        self.assertEqual(self.successResultOf(ok), b"PLAIN@EXAMPLE.COM")
        wrong = checker.requestAvatarId(cram(b"<1@h>", b"plain@example.com", b"pencik"))
        f = self.failureResultOf(wrong, UnauthorizedLogin)
        self.assertFalse(f.check(MechanismUnavailable))
        for user in (b"hashed@example.com", b"scram@example.com", b"nobody@example.com", b"\xff"):
            d = checker.requestAvatarId(cram(b"<1@h>", user, b"pencil"))
            self.failureResultOf(d, MechanismUnavailable)

    def test_cramPlainNotAllowed(self) -> None:
        checker = self.makeChecker(allowPlain=False)
        d = checker.requestAvatarId(cram(b"<1@h>", b"plain@example.com", b"pencil"))
        self.failureResultOf(d, MechanismUnavailable)

    def test_plainLoginWithScramValue(self) -> None:
        checker = self.makeChecker()
        d = checker.requestAvatarId(UsernamePassword(b"scram@example.com", b"pencil"))
        self.assertEqual(self.successResultOf(d), b"SCRAM@EXAMPLE.COM")


class ScramSessionTests(SynchronousTestCase):
    """SCRAM-SHA-256 through a session, scramp as the client."""

    def setUp(self) -> None:
        self.checker = CheckerTests.makeChecker(self)  # type: ignore[arg-type]
        self.h = Harness(implicitTLS=True, checkers=[self.checker], limits=LimitsConfig())
        self.h.command(b"EHLO client.test")
        throttle = self.h.factory.guards.auth
        assert throttle is not None
        self.attempts: list[Any] = []
        begin = throttle.begin

        def counted(*args: Any, **kwargs: Any) -> Any:
            decision = begin(*args, **kwargs)
            if decision.attempt is not None:
                self.attempts.append(decision.attempt)
            return decision

        self.patch(throttle, "begin", counted)

    def outcomes(self) -> list[str | None]:
        return [a.outcome for a in self.attempts]

    def test_dovecotValue(self) -> None:
        reply, _ = scramLogin(self.h, "scram@example.com", "pencil")
        self.assertTrue(reply.startswith(b"235 "), reply)
        self.assertEqual(self.h.protocol.session().user, "SCRAM@EXAMPLE.COM")
        self.assertEqual(self.outcomes(), ["succeeded"])

    def test_plainValue(self) -> None:
        reply, _ = scramLogin(self.h, "plain@example.com", "pencil")
        self.assertTrue(reply.startswith(b"235 "), reply)

    def test_plainValueSaltStable(self) -> None:
        """Keys made from a plain value keep their salt, as a decoy's does."""
        first = self.h.command(b"AUTH SCRAM-SHA-256 " + _first(b"plain@example.com"))
        self.h.command(b"*")
        second = self.h.command(b"AUTH SCRAM-SHA-256 " + _first(b"plain@example.com"))
        self.assertEqual(_salt(first), _salt(second))

    def test_wrong(self) -> None:
        reply, _ = scramLogin(self.h, "scram@example.com", "pencik")
        self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.outcomes(), ["failed"])

    def test_cannotServe(self) -> None:
        """A hashed value cannot serve SCRAM: 535, and no guess is counted."""
        for user in ("hashed@example.com", "nobody@example.com"):
            reply, _ = scramLogin(self.h, user, "pencil")
            self.assertEqual(reply, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(self.outcomes(), ["notApplicable", "notApplicable"])


def _first(user: bytes) -> bytes:
    import base64

    return base64.b64encode(b"n,,n=" + user + b",r=abcdefgh")


def _salt(reply: bytes) -> bytes:
    import base64

    fields = dict(part.split(b"=", 1) for part in base64.b64decode(reply[4:].strip()).split(b","))
    return fields[b"s"]
