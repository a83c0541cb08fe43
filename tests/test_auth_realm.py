"""
Tests for L{mailgw.auth.realm}.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any

from twisted.cred import strcred
from twisted.cred.checkers import (
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import (
    CramMD5Credentials,
    IAnonymous,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, alsoProvides, implementer
from zope.interface.verify import verifyObject

from mailgw.auth import ISASLMechanisms, MechanismUnavailable
from mailgw.auth.realm import ChainedChecker, Submitter, SubmitterRealm, makePortal
from mailgw.interfaces import ISubmitter
from mailgw.server.sasl import portalMechanisms
from tests.helpers import Harness


class IOther(Interface):
    pass


class SubmitterTests(SynchronousTestCase):
    def test_interface(self) -> None:
        verifyObject(ISubmitter, Submitter("alice"))

    def test_value(self) -> None:
        """
        Submitters are immutable values compared by login.
        """
        self.assertEqual(Submitter("alice"), Submitter("alice"))
        self.assertNotEqual(Submitter("alice"), Submitter("Alice"))
        self.assertEqual(hash(Submitter("alice")), hash(Submitter("alice")))


class SubmitterRealmTests(SynchronousTestCase):
    def test_interface(self) -> None:
        verifyObject(IRealm, SubmitterRealm())

    def test_bytesId(self) -> None:
        interface, avatar, logout = SubmitterRealm().requestAvatar(
            "rené".encode(), None, ISubmitter
        )
        self.assertIs(interface, ISubmitter)
        self.assertEqual(avatar, Submitter("rené"))
        self.assertIsNone(logout())

    def test_strId(self) -> None:
        _, avatar, _ = SubmitterRealm().requestAvatar("bob", None, ISubmitter)
        self.assertEqual(avatar.login, "bob")

    def test_undecodableId(self) -> None:
        """
        Bytes that are not UTF-8 are replaced, not an error.
        """
        _, avatar, _ = SubmitterRealm().requestAvatar(b"a\xffb", None, ISubmitter)
        self.assertEqual(avatar.login, "a\ufffdb")

    def test_otherInterfaceFirst(self) -> None:
        """
        ISubmitter is found among several requested interfaces.
        """
        interface, avatar, _ = SubmitterRealm().requestAvatar(b"bob", None, IOther, ISubmitter)
        self.assertIs(interface, ISubmitter)
        self.assertEqual(avatar, Submitter("bob"))

    def test_notImplemented(self) -> None:
        self.assertRaises(NotImplementedError, SubmitterRealm().requestAvatar, b"bob", None, IOther)
        self.assertRaises(NotImplementedError, SubmitterRealm().requestAvatar, b"bob", None)

    def test_anonymousRefused(self) -> None:
        self.assertRaises(TypeError, SubmitterRealm().requestAvatar, (), None, ISubmitter)


class MakePortalTests(SynchronousTestCase):
    def test_login(self) -> None:
        """
        The portal checks with the given checker and gives a Submitter.
        """
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        portal = makePortal([checker])
        result = self.successResultOf(
            portal.login(UsernamePassword(b"alice", b"secret"), None, ISubmitter)
        )
        self.assertEqual(result[:2], (ISubmitter, Submitter("alice")))
        self.failureResultOf(
            portal.login(UsernamePassword(b"alice", b"wrong"), None, ISubmitter),
            UnauthorizedLogin,
        )

    def test_everyChecker(self) -> None:
        """
        Every checker is registered, for each interface it declares.
        """
        first = InMemoryUsernamePasswordDatabaseDontUse()
        second = AllowAnonymousAccess()
        portal = makePortal([first, second])
        self.assertEqual(
            set(portal.listCredentialsInterfaces()),
            {IUsernamePassword, IUsernameHashedPassword, IAnonymous},
        )
        self.assertIs(portal.checkers[IAnonymous], second)
        self.assertIs(portal.checkers[IUsernamePassword], first)
        self.assertIsInstance(portal.realm, SubmitterRealm)

    def test_severalBackendsAskedInOrder(self) -> None:
        """
        Two backends for the same credentials: a user of either logs in; a
        user of neither gets UnauthorizedLogin.
        """
        first = InMemoryUsernamePasswordDatabaseDontUse(alice=b"a")
        second = InMemoryUsernamePasswordDatabaseDontUse(bob=b"b")
        portal = makePortal([first, second])
        for user, password in ((b"alice", b"a"), (b"bob", b"b")):
            result = self.successResultOf(
                portal.login(UsernamePassword(user, password), None, ISubmitter)
            )
            self.assertEqual(result[1], Submitter(user.decode()))
        self.failureResultOf(
            portal.login(UsernamePassword(b"bob", b"a"), None, ISubmitter), UnauthorizedLogin
        )

    def test_backendErrorWinsOverRefusal(self) -> None:
        """
        When one backend is down and the other refuses, the failure is the
        backend error (454, try again), not a refusal (535).
        """

        @implementer(ICredentialsChecker)
        class Down:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> object:
                raise OSError("ldap down")

        portal = makePortal([Down(), InMemoryUsernamePasswordDatabaseDontUse(bob=b"b")])
        self.failureResultOf(
            portal.login(UsernamePassword(b"alice", b"x"), None, ISubmitter), OSError
        )
        self.successResultOf(portal.login(UsernamePassword(b"bob", b"b"), None, ISubmitter))

    def test_customRealm(self) -> None:
        realm = SubmitterRealm()
        self.assertIs(makePortal([], realm).realm, realm)
        self.assertEqual(makePortal([]).listCredentialsInterfaces(), [])


def cram(login: bytes, password: bytes) -> CramMD5Credentials:
    credentials = CramMD5Credentials(b"mx.test")
    credentials.challenge = b"<1.2@mx.test>"
    digest = hmac.new(password, credentials.challenge, "md5").hexdigest().encode()
    credentials.setResponse(login + b" " + digest)
    return credentials


@implementer(ICredentialsChecker)
class Answering:
    """A checker that answers every login with one failure (or success)."""

    def __init__(self, interface: Any, answer: Any, mechanisms: tuple[str, ...] | None = None):
        self.credentialInterfaces = (interface,)
        self.answer = answer
        if mechanisms is not None:
            self.saslMechanisms = lambda: mechanisms
            alsoProvides(self, ISASLMechanisms)

    def requestAvatarId(self, credentials: object) -> Deferred[Any]:
        if isinstance(self.answer, bytes):
            return succeed(self.answer)
        return fail(self.answer())


class ChainedMechanismTests(SynchronousTestCase):
    def test_mechanismUnavailableOnlyWhenNoneCouldCheck(self) -> None:
        """
        A chain answers MechanismUnavailable only when every checker that
        took the login said so (or could not handle it); a wrong password
        anywhere is a plain UnauthorizedLogin; a backend error wins.
        """
        H = IUsernameHashedPassword
        cases: list[tuple[list[Any], type[Exception]]] = [
            ([MechanismUnavailable, MechanismUnavailable], MechanismUnavailable),
            ([MechanismUnavailable, UnhandledCredentials], MechanismUnavailable),
            ([MechanismUnavailable, UnauthorizedLogin], UnauthorizedLogin),
            ([UnauthorizedLogin, MechanismUnavailable], UnauthorizedLogin),
            ([UnhandledCredentials, UnhandledCredentials], UnauthorizedLogin),
            ([MechanismUnavailable, OSError], OSError),
        ]
        for answers, expected in cases:
            chain = ChainedChecker(H, [Answering(H, answer) for answer in answers])
            failure = self.failureResultOf(chain.requestAvatarId(cram(b"u", b"p")))
            self.assertIs(failure.type, expected, answers)

    def test_unionOfMechanisms(self) -> None:
        """
        A chain serves what any of its checkers serves; checkers that say
        nothing serve what their credential interfaces allow.
        """
        P, H = IUsernamePassword, IUsernameHashedPassword
        none = Answering(H, UnauthorizedLogin, mechanisms=("PLAIN", "LOGIN"))
        some = Answering(H, UnauthorizedLogin, mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"))
        plain = Answering(P, UnauthorizedLogin, mechanisms=())
        verifyObject(ISASLMechanisms, ChainedChecker(H, [none]))
        self.assertEqual(portalMechanisms(makePortal([none])), ())
        self.assertEqual(portalMechanisms(makePortal([none, some])), ("CRAM-MD5",))
        self.assertEqual(portalMechanisms(makePortal([plain])), ())
        memory = InMemoryUsernamePasswordDatabaseDontUse()
        self.assertEqual(
            portalMechanisms(makePortal([plain, none, memory])), ("PLAIN", "LOGIN", "CRAM-MD5")
        )
        self.assertEqual(portalMechanisms(makePortal([plain, none])), ())


class TwistedBackendTests(SynchronousTestCase):
    """
    Issue 14: Twisted's own memory: and file: backends log users in, as
    docs/auth.md says, with every mechanism, through mailgw's portal and
    server.
    """

    def checkers(self) -> list[tuple[str, Any]]:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write("alice:sesame\nrené:pässwörd\n".encode())
        return [
            ("memory", strcred.makeChecker("memory:alice:sesame:rené:pässwörd")),
            ("file", strcred.makeChecker("file:" + path)),
        ]

    def test_portal(self) -> None:
        for name, checker in self.checkers():
            portal = makePortal([checker])
            for credentials in [
                UsernamePassword(b"alice", b"sesame"),
                UsernamePassword("rené".encode(), "pässwörd".encode()),
                cram(b"alice", b"sesame"),
            ]:
                result = self.successResultOf(portal.login(credentials, None, ISubmitter))
                self.assertIn(result[1], (Submitter("alice"), Submitter("rené")), name)
            for credentials in [UsernamePassword(b"alice", b"wrong"), cram(b"alice", b"wrong")]:
                self.failureResultOf(portal.login(credentials, None, ISubmitter), UnauthorizedLogin)

    def test_dialog(self) -> None:
        for name, checker in self.checkers():
            for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
                h = Harness(implicitTLS=True, checkers=[checker])
                self.assertIn(b"AUTH PLAIN LOGIN CRAM-MD5", h.command(b"EHLO c"))
                if mechanism == "PLAIN":
                    reply = h.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0sesame"))
                elif mechanism == "LOGIN":
                    h.command(b"AUTH LOGIN")
                    h.command(base64.b64encode(b"alice"))
                    reply = h.command(base64.b64encode(b"sesame"))
                else:
                    challenge = base64.b64decode(h.command(b"AUTH CRAM-MD5")[4:].strip())
                    digest = hmac.new(b"sesame", challenge, "md5").hexdigest().encode()
                    reply = h.command(base64.b64encode(b"alice " + digest))
                self.assertTrue(reply.startswith(b"235 2.7.0"), (name, mechanism, reply))
