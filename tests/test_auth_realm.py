"""
Tests for L{mailgw.auth.realm}.
"""

from __future__ import annotations

from twisted.cred.checkers import (
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import (
    IAnonymous,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from mailgw.auth.realm import Submitter, SubmitterRealm, makePortal
from mailgw.interfaces import ISubmitter


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
