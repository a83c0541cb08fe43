"""
SASL exchanges for SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN
(draft-murchison-sasl-login), CRAM-MD5 (RFC 2195) and SCRAM-SHA-256
(L{mailgw.server.scram}), each turned into a L{twisted.cred} credentials
object for the portal.

An exchange sees only decoded bytes; base64, ``*`` (cancel) and line
lengths are the protocol's business. No payload is ever logged.
"""

from __future__ import annotations

import secrets
from typing import Protocol

import attrs
from twisted.cred.credentials import CramMD5Credentials, ICredentials, UsernamePassword
from twisted.cred.portal import Portal

from mailgw.auth.mechanisms import (
    LOCAL_INTERFACE,
    MECHANISMS,
    byInterfaces,
    checkerMechanisms,
    ordered,
)
from mailgw.auth.relay import IRelayedCredentials, ISASLConversation, ISASLRelay

__all__ = [
    "MECHANISMS",
    "Challenge",
    "Done",
    "Exchange",
    "RelayedExchange",
    "SASLFailure",
    "availableMechanisms",
    "fromClient",
    "makeExchange",
    "portalMechanisms",
    "relayFor",
    "servedLocally",
]


class SASLFailure(Exception):
    """
    The client's response is not acceptable. ``malformed`` responses get
    501 5.5.2; the others get the same 535 5.7.8 as a wrong password, so
    nothing tells a client which part of its credentials was wrong.
    """

    def __init__(self, reason: str, malformed: bool = False) -> None:
        super().__init__(reason)
        self.malformed = malformed


@attrs.frozen
class Challenge:
    """Send ``334 base64(data)`` and wait for a response."""

    data: bytes


@attrs.frozen
class Done:
    """The exchange is complete; log in with ``credentials``."""

    credentials: ICredentials


Step = Challenge | Done


class Exchange(Protocol):
    def start(self, initial: bytes | None) -> Step: ...

    def respond(self, response: bytes) -> Step: ...


@attrs.define
class PlainExchange:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``, in one response."""

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        fields = response.split(b"\0")
        if len(fields) != 3:
            raise SASLFailure("PLAIN response must have exactly three fields", malformed=True)
        authzid, authcid, password = fields
        if not authcid or not password:
            raise SASLFailure("empty authentication identity or password")
        # Acting for another identity is not supported: a client that asks
        # for it is refused rather than silently logged in as itself.
        if authzid and authzid != authcid:
            raise SASLFailure("authorization identity differs from authentication identity")
        return Done(UsernamePassword(authcid, password))


@attrs.define
class LoginExchange:
    """The LOGIN mechanism: username and password, each in its own step."""

    _username: bytes | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        if self._username is None:
            self._username = response
            return Challenge(b"Password:")
        if not self._username or not response:
            raise SASLFailure("empty username or password")
        return Done(UsernamePassword(self._username, response))


@attrs.define
class CramMD5Exchange:
    """
    RFC 2195: a challenge, then ``user SP hex(HMAC-MD5(secret, challenge))``.
    ``_challenge`` is another's challenge (Dovecot's) to check an answer to.
    """

    hostname: str
    _credentials: CramMD5Credentials | None = None
    _challenge: bytes | None = None

    def __attrs_post_init__(self) -> None:
        if self._challenge is not None:
            self._credentials = CramMD5Credentials(self.hostname)
            self._credentials.challenge = self._challenge

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            raise SASLFailure("CRAM-MD5 takes no initial response", malformed=True)
        credentials = CramMD5Credentials(self.hostname)
        # Our own challenge from a CSPRNG (RFC 2195 asks for a unique one).
        credentials.challenge = (
            f"<{secrets.token_hex(8)}.{secrets.randbelow(10**9)}@{self.hostname}>".encode()
        )
        self._credentials = credentials
        return Challenge(credentials.challenge)

    def respond(self, response: bytes) -> Done:
        assert self._credentials is not None
        username, space, digest = response.rpartition(b" ")
        if not space or not username or len(digest) != 32:
            raise SASLFailure("CRAM-MD5 response is not 'user digest'", malformed=True)
        try:
            int(digest, 16)
        except ValueError:
            raise SASLFailure("CRAM-MD5 digest is not hexadecimal", malformed=True) from None
        self._credentials.username = username  # type: ignore[assignment]
        self._credentials.response = digest.lower()
        return Done(self._credentials)


class ClientUsernamePassword(UsernamePassword):
    """
    A plain password, with the address of the client that sent it: a
    backend that asks another service (Dovecot) passes it on, for that
    service's logs and its own penalties.
    """

    def __init__(self, username: bytes, password: bytes, clientAddress: str) -> None:
        super().__init__(username, password)
        self.clientAddress = clientAddress


def fromClient(credentials: ICredentials, clientAddress: str) -> ICredentials:
    """C{credentials}, telling the client's address where they are a plain password."""
    if type(credentials) is UsernamePassword:
        return ClientUsernamePassword(
            credentials.username,  # type: ignore[arg-type]
            credentials.password,  # type: ignore[arg-type]
            clientAddress,
        )
    return credentials


def availableMechanisms(credentialInterfaces: list[type]) -> tuple[str, ...]:
    """
    The mechanisms checkers of these credential interfaces can verify:
    PLAIN and LOGIN need a checker of plain passwords, CRAM-MD5 one of
    hashed passwords.
    """
    return byInterfaces(credentialInterfaces)


def portalMechanisms(portal: Portal) -> tuple[str, ...]:
    """
    The mechanisms the portal's checkers can serve now: for each registered
    checker, what its credential interface allows, narrowed by the checker
    itself when it provides L{mailgw.auth.ISASLMechanisms} (the C{passwd:}
    backend offers CRAM-MD5 only while some user has a CRAM secret).
    """
    return ordered(
        m
        for interface, checker in portal.checkers.items()
        for m in checkerMechanisms(checker, interface)
    )


@attrs.define
class RelayedExchange:
    """
    An exchange a backend's service conducts (L{mailgw.auth.relay}): the
    AUTH phase carries each response to ``conversation`` and each of its
    challenges back. ``claimed`` is the login the client named (for the
    throttle and the logs, never trusted); ``counted`` is set once the
    throttle has counted the attempt. With ``localFallback`` (CRAM-MD5
    only), a login the service refuses is checked by the local backends
    against the service's challenge (L{localCram}).
    """

    mechanism: str
    conversation: ISASLConversation
    claimed: bytes | None = None
    counted: bool = False
    localFallback: bool = False
    challenge: bytes | None = None
    response: bytes | None = None

    def localCram(self, hostname: str) -> CramMD5Credentials | None:
        """
        The CRAM-MD5 credentials of the last response against the service's
        challenge (RFC 2195 asks only that the challenge be unique, and the
        service's is), for the local backends; None when there is no
        fallback or the response is not ``user SP 32 hex digits``.
        """
        if not self.localFallback or self.challenge is None or self.response is None:
            return None
        try:
            done = CramMD5Exchange(hostname, challenge=self.challenge).respond(self.response)
        except SASLFailure:
            return None
        return done.credentials  # type: ignore[return-value]

    def claim(self, response: bytes) -> None:
        """Note the login a response names, where the mechanism puts one."""
        if self.claimed is None:
            self.claimed = claimedLogin(self.mechanism, response)


def claimedLogin(mechanism: str, response: bytes) -> bytes | None:
    """
    The login a client response names: CRAM-MD5's ``user SP digest``, a
    SCRAM client-first's ``n=user``; None when it names none (or it is not
    well formed: the service will say so).
    """
    if mechanism == "CRAM-MD5":
        user, space, _ = response.rpartition(b" ")
        return user if space and user else None
    if mechanism.startswith("SCRAM-"):
        for part in response.split(b",")[2:3]:
            if part.startswith(b"n=") and len(part) > 2:
                return part[2:].replace(b"=2C", b",").replace(b"=3D", b"=")
    return None


def servedLocally(portal: Portal, mechanism: str) -> bool:
    """Whether a checker of mailgw's own exchange's credentials serves ``mechanism`` now."""
    local = LOCAL_INTERFACE.get(mechanism)
    checker = portal.checkers.get(local) if local is not None else None  # type: ignore[call-overload]
    return checker is not None and mechanism in checkerMechanisms(checker, local)


def relayFor(portal: Portal, mechanism: str) -> ISASLRelay | None:
    """
    The first relaying checker, in the portal's order, that serves
    ``mechanism`` now; None when none does.

    Where local backends serve the mechanism too, the AUTH phase combines
    them: a CRAM-MD5 answer to the service's challenge is checked by the
    service, then by the local backends; a SCRAM-SHA-256 exchange (whose
    server-first message carries one backend's salt) is served locally for
    a user a local backend has keys for, and relayed otherwise.
    """
    registered = portal.checkers.get(IRelayedCredentials)  # type: ignore[call-overload]
    candidates = getattr(registered, "checkers", [registered] if registered else [])
    for candidate in candidates:
        if ISASLRelay.providedBy(candidate) and mechanism in checkerMechanisms(
            candidate, IRelayedCredentials
        ):
            return candidate  # type: ignore[no-any-return]
    return None


def makeExchange(mechanism: str, hostname: str) -> Exchange:
    if mechanism == "PLAIN":
        return PlainExchange()
    if mechanism == "LOGIN":
        return LoginExchange()
    if mechanism == "CRAM-MD5":
        return CramMD5Exchange(hostname)
    if mechanism == "SCRAM-SHA-256":
        from mailgw.server.scram import ScramExchange  # it builds on this module

        return ScramExchange()  # type: ignore[return-value]
    raise KeyError(mechanism)
