"""
A checker for backends that hand over a user's stored hash (a SQL table,
an LDAP C{userPassword} read by a service account): fetch the hash, then
verify the password against it on our side (L{mailgw.auth.hashes}), off
the reactor thread and behind the verified-password cache.

Where the stored value allows, and the backend is configured to offer
them, the same checker serves CRAM-MD5 (a plain value) and SCRAM-SHA-256
(a Dovecot C{{SCRAM-SHA-256}} value, or a plain one): L{IScramKeys} gives
the exchange the user's keys, and a user whose value cannot serve the
mechanism fails with L{MechanismUnavailable}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from argon2 import PasswordHasher
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth.cache import InFlight, VerifiedCache
from mailgw.auth.hashes import HashFormatError, cleartext, hashScheme, scramKeysOf, verifyStored
from mailgw.auth.mechanisms import BY_INTERFACE, ISASLMechanisms, MechanismUnavailable
from mailgw.auth.scram import DEFAULT_ITERATIONS, IScramCredentials, IScramKeys, ScramKeys, makeKeys
from mailgw.auth.workers import IRetirable

__all__ = ["Fetch", "StoredHashChecker", "StoredUser"]

RunInThread = Callable[..., defer.Deferred[Any]]


@attrs.frozen
class StoredUser:
    """
    What a backend knows of a login: ``login`` as the backend spells it
    (the identity mailgw records) and its ``stored`` hash.
    """

    login: str
    stored: str = attrs.field(repr=False)


#: ``fetch(login) -> Deferred[StoredUser | None]``: ``None`` for an unknown
#: login; a failure (any exception) when the backend cannot answer.
Fetch = Callable[[str], defer.Deferred[StoredUser | None]]


#: Salts of SCRAM keys made from a plain value: stable per login while the
#: process runs, as the decoys of unknown users are (mailgw.server.scram).
_SALT_SECRET = os.urandom(32)


@implementer(ICredentialsChecker, ISASLMechanisms, IScramKeys, IRetirable)
@attrs.define
class StoredHashChecker:
    """
    Checks plain passwords (PLAIN, LOGIN) against the hash ``fetch``
    returns for the login, verified by ``runInThread(f, *args)``.

    A wrong password, an unknown login, an empty password and a user name
    that is not UTF-8 all fail with L{UnauthorizedLogin} (535); an unknown
    login costs a dummy verification against the last hash the backend
    returned (the same scheme and cost as a real one), or an argon2id hash
    before any. A backend that cannot answer, and a stored value in no
    supported format (logged, without the value), fail with another
    exception: 454 4.7.0.

    @ivar allowPlain: verify C{{PLAIN}} values (refused by default).
    @ivar cache: recently verified passwords (keyed on the stored hash
        too, so a changed password in the backend misses it), or C{None}.
    @ivar mechanisms: the SASL mechanisms offered: PLAIN and LOGIN, and
        CRAM-MD5 and SCRAM-SHA-256 where the backend's values allow them.
    @ivar release: called once by L{retire} (the backend lets go of its
        connections), or C{None}.
    """

    fetch: Fetch
    runInThread: RunInThread
    allowPlain: bool = False
    cache: VerifiedCache | None = attrs.field(factory=VerifiedCache)
    name: str = "stored"
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    release: Callable[[], None] | None = None
    credentialInterfaces: tuple[type, ...] = attrs.field(init=False)
    _dummy: str = attrs.field(init=False, repr=False)
    _inflight: InFlight = attrs.field(init=False, factory=InFlight, repr=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._dummy = PasswordHasher().hash(secrets.token_urlsafe(32))
        self.credentialInterfaces = tuple(
            interface  # type: ignore[misc]
            for interface, served in BY_INTERFACE.items()
            if interface in (IUsernamePassword, IUsernameHashedPassword, IScramCredentials)
            and set(served) & set(self.mechanisms)
        )

    def saslMechanisms(self) -> tuple[str, ...]:
        return self.mechanisms

    def retire(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def _verify(self, stored: str, password: bytes) -> bool:
        """Runs in a thread."""
        return verifyStored(stored, password, self.allowPlain)

    def _dummyVerify(self, password: bytes) -> None:
        """Runs in a thread: the cost of a verification, its answer ignored."""
        try:
            verifyStored(self._dummy, password, self.allowPlain)
        except HashFormatError:
            pass

    def _verifyOnce(self, key: bytes, stored: str, password: bytes) -> defer.Deferred[bool]:
        """L{_verify} in a thread, shared by identical requests under way."""
        return self._inflight.run(
            key, lambda: defer.maybeDeferred(self.runInThread, self._verify, stored, password)
        )

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        """
        @return: a Deferred firing with the login (UTF-8 bytes) as the
            backend spells it, or failing with L{UnauthorizedLogin}
            (permanent: 535) or another exception (transient: 454).
        """
        if IScramCredentials.providedBy(credentials) and "SCRAM-SHA-256" in self.mechanisms:
            return self._checkScram(credentials)
        if IUsernameHashedPassword.providedBy(credentials) and "CRAM-MD5" in self.mechanisms:
            return self._checkCram(credentials)
        if not IUsernamePassword.providedBy(credentials):
            return defer.fail(UnhandledCredentials(f"cannot check {type(credentials).__name__}"))
        password: bytes = credentials.password
        raw: bytes | str = credentials.username
        username: str | None
        try:
            username = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            username = None
        if not password:
            return defer.fail(UnauthorizedLogin())
        if not username or "\x00" in username:
            return self._unknown(password)
        d = defer.maybeDeferred(self.fetch, username)
        return d.addCallback(self._found, password)

    def _unknown(self, password: bytes) -> defer.Deferred[bytes | tuple[()]]:
        d = defer.maybeDeferred(self.runInThread, self._dummyVerify, password)

        def refuse(_: object) -> bytes | tuple[()]:
            raise UnauthorizedLogin()

        return d.addCallback(refuse)

    def _found(self, user: StoredUser | None, password: bytes) -> defer.Deferred[bytes | tuple[()]]:
        if user is None:
            return self._unknown(password)
        # Later dummies cost what this backend's real hashes cost.
        self._dummy = user.stored
        cache = self.cache
        # The cache keys on the stored value as ASCII: a {PLAIN} one may not be.
        tag = user.stored if user.stored.isascii() else user.stored.encode("utf-8").hex()
        if cache is not None:
            if (user.login, tag, password) in cache:
                return defer.succeed(user.login.encode("utf-8"))  # type: ignore[arg-type]
            d = self._verifyOnce(cache.key(user.login, tag, password), user.stored, password)
        else:
            d = defer.maybeDeferred(self.runInThread, self._verify, user.stored, password)

        def verified(ok: bool) -> bytes | tuple[()]:
            if not ok:
                raise UnauthorizedLogin()
            if cache is not None:
                cache.add(user.login, tag, password)
            return user.login.encode("utf-8")

        def broken(failure: Failure) -> Failure:
            if failure.check(HashFormatError):
                self.log.error(
                    "{backend}: cannot verify the password of {login!r}: {problem}"
                    " (scheme {scheme!r})",
                    backend=self.name,
                    login=user.login,
                    problem=failure.getErrorMessage(),
                    scheme=hashScheme(user.stored),
                )
            return failure

        return d.addCallbacks(verified, broken)

    # -- CRAM-MD5 and SCRAM-SHA-256 -----------------------------------------

    def _fetchName(self, raw: bytes | str) -> defer.Deferred[StoredUser | None]:
        try:
            username = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return defer.succeed(None)
        if not username or "\x00" in username:
            return defer.succeed(None)
        return defer.maybeDeferred(self.fetch, username)

    def _checkCram(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        """
        RFC 2195 against a plain stored value. A user whose value is a hash
        (or an unknown one) costs the same HMAC and fails with
        L{MechanismUnavailable}: 535 for the client, no guess for the throttle.
        """

        def found(user: StoredUser | None) -> bytes:
            secret = cleartext(user.stored, self.allowPlain) if user is not None else None
            matched = credentials.checkPassword(secret or secrets.token_bytes(16))
            if user is None or secret is None:
                raise MechanismUnavailable()
            if not matched:
                raise UnauthorizedLogin()
            return user.login.encode("utf-8")

        return self._fetchName(credentials.username).addCallback(found)

    def scramKeys(self, username: bytes) -> defer.Deferred[ScramKeys | None]:
        """
        The SCRAM-SHA-256 keys of ``username``: from a C{{SCRAM-SHA-256}}
        value, or made from a plain one (in a thread: PBKDF2, under a salt
        that is the same at every attempt, as a decoy's); None when the
        value can serve neither (or the user is unknown), so that the
        exchange goes on with decoys. Fails as a login does when the
        backend cannot answer or the value is malformed (454).
        """

        def found(user: StoredUser | None) -> Any:
            if user is None:
                return None
            keys = scramKeysOf(user.stored)
            if keys is not None:
                return keys
            plain = cleartext(user.stored, self.allowPlain)
            if plain is None:
                return None
            return defer.maybeDeferred(self.runInThread, _plainKeys, plain, username)

        return self._fetchName(username).addCallback(found)

    def _checkScram(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        """
        The client's proof against the keys this checker gave the exchange;
        keys of another backend, or decoys, are L{MechanismUnavailable}
        after the same HMACs as a wrong proof. The login is the backend's
        spelling of it, fetched again.
        """
        matched = credentials.checkProof()
        if credentials.source is not self:
            return defer.fail(MechanismUnavailable())

        def found(user: StoredUser | None) -> bytes:
            if user is None:
                raise MechanismUnavailable()  # gone since the keys were given
            if not matched:
                raise UnauthorizedLogin()
            return user.login.encode("utf-8")

        return self._fetchName(credentials.username).addCallback(found)


def _plainKeys(plain: bytes, username: bytes) -> ScramKeys | None:
    """Runs in a thread: SCRAM keys of a plain stored password."""
    salt = hmac.new(_SALT_SECRET, b"salt\0" + username, hashlib.sha256).digest()[:16]
    try:
        return makeKeys(plain.decode("utf-8"), DEFAULT_ITERATIONS, salt)
    except (UnicodeDecodeError, ValueError):
        return None  # a password SASLprep refuses cannot be used with SCRAM
