"""
The realm: turns an authenticated avatar id into an L{ISubmitter}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth.mechanisms import ISASLMechanisms, MechanismUnavailable, checkerMechanisms
from mailgw.interfaces import ISubmitter


@implementer(ISubmitter)
@attrs.frozen
class Submitter:
    """
    An authenticated client: ``login`` is the identity the checker vouched
    for, exactly as the backend knows it (case kept).
    """

    login: str


def _logout() -> None:
    # A Submitter holds no resources; nothing to release.
    pass


@implementer(IRealm)
@attrs.frozen
class SubmitterRealm:
    """
    Gives every authenticated avatar id an L{ISubmitter} avatar.
    """

    def requestAvatar(  # type: ignore[override]
        self, avatarId: bytes | str, mind: object, *interfaces: Any
    ) -> tuple[Any, Submitter, Callable[[], None]]:
        """
        @param avatarId: the login as a checker returns it: L{bytes} (UTF-8;
            undecodable bytes are replaced, never an error) or L{str}.
        @return: C{(ISubmitter, Submitter(login), logout)}.
        @raise NotImplementedError: C{ISubmitter} is not among
            C{interfaces} (a programming error, not a failed login).
        @raise TypeError: C{avatarId} is neither bytes nor str (for example
            the anonymous id: mailgw has no anonymous submitters).
        """
        if ISubmitter not in interfaces:
            raise NotImplementedError(
                f"SubmitterRealm only provides ISubmitter, not {interfaces!r}"
            )
        if isinstance(avatarId, bytes):
            login = avatarId.decode("utf-8", errors="replace")
        elif isinstance(avatarId, str):
            login = avatarId
        else:
            raise TypeError(f"avatar id must be bytes or str, not {type(avatarId).__name__}")
        return ISubmitter, Submitter(login), _logout


@implementer(ICredentialsChecker, ISASLMechanisms)
class ChainedChecker:
    """
    Several checkers for one kind of credentials, asked in order: the first
    that accepts wins. When none accepts, the answer is UnauthorizedLogin,
    unless one of them failed otherwise (a backend down): then that failure,
    so the client hears 454 4.7.0 and tries again rather than 535; and
    unless none of them could check this login with this mechanism: then
    L{MechanismUnavailable}. It serves the mechanisms any of its checkers
    serves.
    """

    def __init__(self, interface: type, checkers: list[ICredentialsChecker]) -> None:
        self.credentialInterfaces = (interface,)
        self.checkers = checkers

    def saslMechanisms(self) -> tuple[str, ...]:
        interface = self.credentialInterfaces[0]
        return tuple({m: None for c in self.checkers for m in checkerMechanisms(c, interface)})

    def requestAvatarId(self, credentials: object) -> Deferred[Any]:
        failures: list[Failure] = []

        def tryNext(index: int) -> Deferred[Any]:
            if index == len(self.checkers):
                for failure in failures:
                    if not failure.check(UnauthorizedLogin, UnhandledCredentials):
                        return fail(failure)
                if any(f.check(MechanismUnavailable) for f in failures) and all(
                    f.check(MechanismUnavailable, UnhandledCredentials) for f in failures
                ):
                    return fail(MechanismUnavailable())
                return fail(UnauthorizedLogin())
            d = maybeDeferred(self.checkers[index].requestAvatarId, credentials)

            def next(failure: Failure) -> Deferred[Any]:
                failures.append(failure)
                return tryNext(index + 1)

            return d.addErrback(next)

        return tryNext(0)


def _utf8(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def bytesUsers(checker: ICredentialsChecker) -> ICredentialsChecker:
    """
    C{checker}, ready for the credentials mailgw's SASL layer builds (user
    name and password as UTF-8 L{bytes}). Twisted's C{memory:} plugin fills
    an L{InMemoryUsernamePasswordDatabaseDontUse} with L{str} user names and
    passwords from its argument string, which no bytes credentials match:
    they are encoded to UTF-8 here, in place (the checker documents bytes).
    Other checkers are returned as they are.
    """
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {_utf8(user): _utf8(password) for user, password in checker.users.items()}
    return checker


def makePortal(checkers: Iterable[ICredentialsChecker], realm: IRealm | None = None) -> Portal:
    """
    A L{Portal} on C{realm} (a new L{SubmitterRealm} by default) with every
    checker in C{checkers} registered for the credential interfaces it
    declares; where several declare the same interface, they are asked in
    the order given (L{ChainedChecker}). Checkers of Twisted's own that
    hold text are adapted to bytes credentials (L{bytesUsers}).
    """
    portal = Portal(realm if realm is not None else SubmitterRealm())
    byInterface: dict[type, list[ICredentialsChecker]] = {}
    for checker in map(bytesUsers, checkers):
        for interface in checker.credentialInterfaces:
            byInterface.setdefault(interface, []).append(checker)
    for interface, found in byInterface.items():
        if len(found) == 1:
            portal.registerChecker(found[0], interface)
        else:
            portal.registerChecker(ChainedChecker(interface, found), interface)
    return portal
