"""
The realm: turns an authenticated avatar id into an L{ISubmitter}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from zope.interface import implementer

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

    def requestAvatar(
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


def makePortal(checkers: Iterable[ICredentialsChecker], realm: IRealm | None = None) -> Portal:
    """
    A L{Portal} on C{realm} (a new L{SubmitterRealm} by default) with every
    checker in C{checkers} registered for the credential interfaces it
    declares; a later checker wins for an interface two of them declare.
    """
    portal = Portal(realm if realm is not None else SubmitterRealm())
    for checker in checkers:
        portal.registerChecker(checker)
    return portal
