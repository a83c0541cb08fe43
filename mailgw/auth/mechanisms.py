"""
Which SASL mechanisms a backend can serve, and how it says that one cannot
serve a given login.

A checker's ``credentialInterfaces`` say what kinds of credentials it can
take (plain passwords for PLAIN and LOGIN, CRAM-MD5 responses); a checker
that also provides L{ISASLMechanisms} narrows that to what it can serve
now, so that the server never offers a mechanism nobody can log in with
(clients pick the strongest offered mechanism and many do not fall back).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from zope.interface import Interface

from mailgw.auth.relay import IRelayedCredentials
from mailgw.auth.scram import IScramCredentials

#: Every mechanism mailgw speaks, in the order EHLO offers them.
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")

#: The mechanisms whose credentials provide each interface.
BY_INTERFACE: dict[type, tuple[str, ...]] = {
    IUsernamePassword: ("PLAIN", "LOGIN"),  # type: ignore[dict-item]
    IUsernameHashedPassword: ("CRAM-MD5",),  # type: ignore[dict-item]
    IScramCredentials: ("SCRAM-SHA-256",),  # type: ignore[dict-item]
    # Exchanges a backend's own service conducts (mailgw.auth.relay).
    IRelayedCredentials: ("CRAM-MD5", "SCRAM-SHA-256"),  # type: ignore[dict-item]
}

#: The interfaces of the credentials mailgw's own exchanges build, by mechanism.
LOCAL_INTERFACE: dict[str, type] = {
    "PLAIN": IUsernamePassword,  # type: ignore[dict-item]
    "LOGIN": IUsernamePassword,  # type: ignore[dict-item]
    "CRAM-MD5": IUsernameHashedPassword,  # type: ignore[dict-item]
    "SCRAM-SHA-256": IScramCredentials,  # type: ignore[dict-item]
}


class MechanismUnavailable(UnauthorizedLogin):
    """
    The backend cannot check this login with this mechanism (CRAM-MD5 for a
    user without a CRAM secret, or for an unknown user): nothing was
    verified, so the AUTH throttle does not count it as a guess. The client
    sees the same C{535 5.7.8} as for a wrong password, and is expected to
    fall back to another mechanism.
    """


class ISASLMechanisms(Interface):
    """
    A credentials checker that knows which mechanisms it can serve at the
    moment (for example, from the users file it reads).
    """

    def saslMechanisms() -> tuple[str, ...]:
        """
        The mechanisms of L{MECHANISMS} this checker can serve now. Called
        at every EHLO and AUTH: it must be cheap and must not raise (when
        unsure, answer what the checker's credential interfaces allow).
        """


def ordered(mechanisms: Iterable[str]) -> tuple[str, ...]:
    """``mechanisms`` in the order of L{MECHANISMS}, without duplicates or unknown names."""
    found = set(mechanisms)
    return tuple(m for m in MECHANISMS if m in found)


def byInterfaces(interfaces: Iterable[type]) -> tuple[str, ...]:
    """The mechanisms whose credentials some interface of ``interfaces`` takes."""
    return ordered(m for i in interfaces for m in BY_INTERFACE.get(i, ()))


def checkerMechanisms(checker: object, interface: type | None = None) -> tuple[str, ...]:
    """
    The mechanisms ``checker`` can serve now (as the checker registered for
    ``interface``, when given): what it says if it provides
    L{ISASLMechanisms}, else what its ``credentialInterfaces`` allow.
    """
    if interface is None:
        interfaces = list(getattr(checker, "credentialInterfaces", ()))
    else:
        interfaces = [interface]
    allowed = byInterfaces(interfaces)
    if ISASLMechanisms.providedBy(checker):
        said = set(checker.saslMechanisms())  # type: ignore[attr-defined]
        return tuple(m for m in allowed if m in said)
    return allowed
