"""
The C{passwd:} backend: editing the mailgw users file (L{addUser},
L{setPassword}, L{removeUser}; the file format is in
L{mailgw.auth.usersfile}, whose names this module re-exports) and its
checker, L{PasswdChecker}.

L{PasswdChecker} re-reads the file whenever it changes, so edits made with
C{mailgw passwd} apply without a restart.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.auth.cache import InFlight, VerifiedCache
from mailgw.auth.mechanisms import ISASLMechanisms, MechanismUnavailable
from mailgw.auth.scram import (
    DEFAULT_ITERATIONS,
    IScramCredentials,
    IScramKeys,
    ScramKeys,
    makeKeys,
)
from mailgw.auth.usersfile import (
    PasswdFileError,
    StrPath,
    UserEntry,
    checkLogin,
    parseUsers,
    readUsers,
    writeUsers,
)

__all__ = [
    "PasswdChecker",
    "PasswdFileError",
    "UserEntry",
    "addUser",
    "checkLogin",
    "hashPassword",
    "parseUsers",
    "readUsers",
    "removeUser",
    "setPassword",
    "writeUsers",
]

RunInThread = Callable[..., defer.Deferred[Any]]

_log = Logger()


def hashPassword(password: str, hasher: PasswordHasher | None = None) -> str:
    """
    An argon2id hash of C{password}, made with C{hasher} (by default a
    L{PasswordHasher} with argon2-cffi's default parameters).

    @raise ValueError: the password is empty.
    """
    if not password:
        raise ValueError("password must not be empty")
    return (hasher if hasher is not None else PasswordHasher()).hash(password)


def _readOrEmpty(path: StrPath) -> dict[str, UserEntry]:
    try:
        return readUsers(path)
    except FileNotFoundError:
        return {}


def _scram(password: str, scram: bool, iterations: int) -> ScramKeys | None:
    return makeKeys(password, iterations) if scram else None


def addUser(
    path: StrPath,
    login: str,
    password: str,
    cram: bool = False,
    hasher: PasswordHasher | None = None,
    scram: bool = False,
    scramIterations: int = DEFAULT_ITERATIONS,
) -> None:
    """
    Add a user to file C{path}, creating the file if missing. With C{cram},
    also store the CRAM-MD5 secret (password-equivalent); with C{scram},
    SCRAM-SHA-256 keys (L{mailgw.auth.scram.makeKeys}).

    @raise ValueError: bad login or empty password, or the user exists (also
        under another case: sender ownership compares addresses regardless
        of case, so two such logins would own the same address).
    @raise OSError, PasswdFileError: as L{readUsers} and L{writeUsers}.
    """
    checkLogin(login)
    users = _readOrEmpty(path)
    if login in users:
        raise ValueError(f"user {login!r} already exists")
    for existing in users:
        if existing.casefold() == login.casefold():
            raise ValueError(f"user {existing!r} already exists (logins differ only in case)")
    users[login] = UserEntry(
        login,
        hashPassword(password, hasher),
        password.encode("utf-8") if cram else None,
        _scram(password, scram, scramIterations),
    )
    writeUsers(path, users.values())


def setPassword(
    path: StrPath,
    login: str,
    password: str,
    cram: bool | None = None,
    hasher: PasswordHasher | None = None,
    scram: bool | None = None,
    scramIterations: int = DEFAULT_ITERATIONS,
) -> None:
    """
    Change the password of user C{login}. C{cram} says whether to store a
    CRAM-MD5 secret, C{scram} whether to store SCRAM-SHA-256 keys; C{None}
    keeps storing one if, and only if, one was.

    @raise KeyError: no such user.
    @raise ValueError: empty password.
    @raise OSError, PasswdFileError: as L{readUsers} and L{writeUsers}.
    """
    users = readUsers(path)
    old = users[login]
    keepCram = old.cramSecret is not None if cram is None else cram
    keepScram = old.scramKeys is not None if scram is None else scram
    users[login] = UserEntry(
        login,
        hashPassword(password, hasher),
        password.encode("utf-8") if keepCram else None,
        _scram(password, keepScram, scramIterations),
    )
    writeUsers(path, users.values())


def removeUser(path: StrPath, login: str) -> None:
    """
    Remove user C{login} from file C{path}.

    @raise KeyError: no such user.
    @raise OSError, PasswdFileError: as L{readUsers} and L{writeUsers}.
    """
    users = readUsers(path)
    del users[login]
    writeUsers(path, users.values())


def _fileKey(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@implementer(ICredentialsChecker, ISASLMechanisms, IScramKeys)
@attrs.define
class PasswdChecker:
    """
    Checks credentials against the users file at C{path}.

    Plain passwords (L{IUsernamePassword}: PLAIN, LOGIN) are verified
    against the argon2id hash by C{runInThread(f, *args) -> Deferred}, off
    the reactor thread. CRAM-MD5 responses (L{IUsernameHashedPassword}) are
    checked against the stored CRAM secret; CRAM-MD5 is offered
    (L{saslMechanisms}) only while some user has one, and a CRAM-MD5 login
    of a user without one fails with L{MechanismUnavailable}.

    A wrong password, an unknown user and an undecodable username all fail
    with the same L{UnauthorizedLogin} after the same work (an unknown user
    is verified against a dummy hash), so that replies and timing do not
    tell which logins exist; so do a user without a CRAM secret and an
    unknown user trying CRAM-MD5 (both L{MechanismUnavailable}); the same
    holds for SCRAM-SHA-256 (L{scramKeys}, L{IScramCredentials}). A file
    that cannot be read or parsed fails with L{OSError} or
    L{PasswdFileError} instead: a transient, local problem (454 4.7.0), not
    a wrong password.

    @ivar hasher: makes the dummy hash; give it the parameters the file's
        hashes were made with (the default matches C{mailgw passwd}).
    @ivar cache: recently verified passwords (L{VerifiedCache}: keyed
        digests, bounded, dropped when the file changes), or C{None}.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword, IScramCredentials)

    path: StrPath
    runInThread: RunInThread
    hasher: PasswordHasher = attrs.field(factory=PasswordHasher)
    cache: VerifiedCache | None = attrs.field(factory=VerifiedCache)
    _dummyHash: str = attrs.field(init=False, repr=False)
    _loadedKey: tuple[int, ...] | None = attrs.field(init=False, default=None, repr=False)
    _loaded: dict[str, UserEntry] | PasswdFileError = attrs.field(
        init=False, factory=dict, repr=False
    )
    # The mechanisms of the last file that parsed: a file broken later
    # changes what EHLO offers no more than it changes who may log in.
    _mechanisms: tuple[str, ...] = attrs.field(init=False, default=("PLAIN", "LOGIN"))
    _dummyCram: bytes = attrs.field(init=False, factory=lambda: secrets.token_bytes(16))
    # Verifications under way, by cache key: a burst of logins with the same
    # password (a client opening many connections at once) hashes once.
    _inflight: InFlight = attrs.field(init=False, factory=InFlight, repr=False)

    def __attrs_post_init__(self) -> None:
        # Made once: hashing costs as much as verifying.
        self._dummyHash = self.hasher.hash(secrets.token_urlsafe(32))

    def _users(self) -> dict[str, UserEntry]:
        """
        The users, re-read only when the file changed (a stat per request).

        @raise OSError: the file cannot be read.
        @raise PasswdFileError: the file is malformed.
        """
        key = _fileKey(os.stat(self.path))
        if key != self._loadedKey:
            with open(self.path, "rb") as f:
                # Key on what was read, so a replace between the stat and
                # the open only costs one more read later.
                key = _fileKey(os.fstat(f.fileno()))
                data = f.read()
            try:
                self._loaded = parseUsers(data, self.path)
                self._mechanisms = _mechanismsOf(self._loaded)
            except PasswdFileError as e:
                # Logged once per change of the file, not per login.
                _log.error("Cannot use users file: {problem}", problem=str(e))
                self._loaded = e
            self._loadedKey = key
            if self.cache is not None:
                self.cache.clear()  # a changed or removed password must not linger
        if isinstance(self._loaded, PasswdFileError):
            raise PasswdFileError(str(self._loaded))
        return self._loaded

    def saslMechanisms(self) -> tuple[str, ...]:
        """
        PLAIN and LOGIN, and CRAM-MD5 while at least one user of the file
        holds a CRAM secret; re-read when the file changed (a stat per
        call). A file that cannot be read or parsed leaves the last answer.
        """
        try:
            self._users()
        except Exception:
            pass  # logged by _users, and answered 454 at the next login
        return self._mechanisms

    def _verify(self, passwordHash: str, password: bytes) -> bool:
        """
        Runs in a thread. Other argon2 errors than a mismatch mean a broken
        hash: a backend problem, raised as it is.
        """
        try:
            return self.hasher.verify(passwordHash, password)
        except VerifyMismatchError:
            return False

    def _verifyOnce(self, key: bytes, passwordHash: str, password: bytes) -> defer.Deferred[bool]:
        """L{_verify} in a thread, shared by identical requests under way."""
        return self._inflight.run(
            key, lambda: defer.maybeDeferred(self.runInThread, self._verify, passwordHash, password)
        )

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        """
        @return: a Deferred firing with the login (UTF-8 bytes), or failing
            with L{UnauthorizedLogin} (permanent: 535), or with another
            exception when the file cannot be used (transient: 454).
        """
        if IScramCredentials.providedBy(credentials):
            return self._checkScram(credentials)
        isPassword = IUsernamePassword.providedBy(credentials)
        if not (isPassword or IUsernameHashedPassword.providedBy(credentials)):
            return defer.fail(UnhandledCredentials(f"cannot check {type(credentials).__name__}"))
        try:
            users = self._users()
        except Exception:
            return defer.fail()
        entry = _lookup(users, credentials.username)

        if isPassword:
            passwordHash = entry.passwordHash if entry is not None else self._dummyHash
            password = credentials.password
            cache = self.cache
            if entry is not None and cache is not None:
                if (entry.login, passwordHash, password) in cache:
                    return defer.succeed(entry.login.encode("utf-8"))
                d = self._verifyOnce(cache.key(entry.login, passwordHash, password),
                                     passwordHash, password)  # fmt: skip
            else:
                d = defer.maybeDeferred(self.runInThread, self._verify, passwordHash, password)

            def verified(ok: bool) -> bytes:
                if ok and entry is not None:
                    if cache is not None:
                        cache.add(entry.login, passwordHash, password)
                    return entry.login.encode("utf-8")
                raise UnauthorizedLogin()

            return d.addCallback(verified)

        # CRAM-MD5. HMAC-MD5 is cheap: no thread. Each attempt has a fresh
        # challenge, so the comparison's timing reveals nothing useful. A
        # user without a secret (or unknown) costs one HMAC too, against a
        # random secret, and is told apart from a wrong response only by
        # the exception type, which the client never sees: it gets 535
        # either way, but the throttle does not count a mechanism the user
        # cannot use.
        secret = entry.cramSecret if entry is not None else None
        matched = credentials.checkPassword(secret if secret is not None else self._dummyCram)
        if entry is None or secret is None:
            return defer.fail(MechanismUnavailable())
        if matched:
            return defer.succeed(entry.login.encode("utf-8"))
        return defer.fail(UnauthorizedLogin())

    def scramKeys(self, username: bytes) -> defer.Deferred[ScramKeys | None]:
        """
        The SCRAM-SHA-256 keys of C{username}, or C{None} (unknown, or
        without keys); fails as L{requestAvatarId} does when the file
        cannot be used.
        """
        try:
            entry = _lookup(self._users(), username)
        except Exception:
            return defer.fail()
        return defer.succeed(entry.scramKeys if entry is not None else None)

    def _checkScram(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        """
        The client's proof, against the keys this checker gave the
        exchange, if they are still the user's: a proof made for keys of
        another backend, or decoy keys (unknown user, or one without keys),
        is L{MechanismUnavailable} after the same HMACs as a wrong one.
        """
        matched = credentials.checkProof()
        try:
            entry = _lookup(self._users(), credentials.username)
        except Exception:
            return defer.fail()
        if credentials.source is not self or entry is None or entry.scramKeys is None:
            return defer.fail(MechanismUnavailable())
        if matched and hmac.compare_digest(entry.scramKeys.storedKey, credentials.keys.storedKey):
            return defer.succeed(entry.login.encode("utf-8"))
        return defer.fail(UnauthorizedLogin())


def _mechanismsOf(users: dict[str, UserEntry]) -> tuple[str, ...]:
    mechanisms = ["PLAIN", "LOGIN"]
    if any(entry.cramSecret is not None for entry in users.values()):
        mechanisms.append("CRAM-MD5")
    if any(entry.scramKeys is not None for entry in users.values()):
        mechanisms.append("SCRAM-SHA-256")
    return tuple(mechanisms)


def _lookup(users: dict[str, UserEntry], username: bytes | str) -> UserEntry | None:
    """
    The entry of C{username} as it arrives in credentials (UTF-8 bytes), or
    C{None} if there is none or the name is not UTF-8.
    """
    if isinstance(username, bytes):
        try:
            username = username.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return users.get(username)
