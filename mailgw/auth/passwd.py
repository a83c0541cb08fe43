"""
The mailgw users file and its checker.

One user a line, C{#} comments and blank lines ignored::

    login:ARGON2ID-HASH
    login:ARGON2ID-HASH:CRAMSECRET

The hash is made by argon2-cffi's L{PasswordHasher} (its default
parameters). CRAMSECRET, present only for users added with C{--cram}, is the
base64 of the UTF-8 password itself: CRAM-MD5 (RFC 2195) needs the password
on the server, so the secret is password-equivalent and the file must be
readable by the server's user only (mode 0600; L{writeUsers} makes it so).

L{PasswdChecker} re-reads the file whenever it changes, so edits made with
C{mailgw passwd} apply without a restart.
"""

from __future__ import annotations

import binascii
import os
import secrets
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

import argon2
import attrs
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.auth.cache import VerifiedCache
from mailgw.auth.mechanisms import ISASLMechanisms, MechanismUnavailable

StrPath = str | os.PathLike[str]
RunInThread = Callable[..., defer.Deferred[Any]]

_log = Logger()

_HEADER = (
    "# mailgw users: login:ARGON2ID-HASH[:CRAM-MD5-SECRET]. Edit with `mailgw passwd`.\n"
    "# A CRAM-MD5 secret is the password itself (base64): keep this file mode 0600.\n"
)


class PasswdFileError(ValueError):
    """
    The users file cannot be parsed; the message names the file and line
    (and never quotes a hash or a secret).
    """


def checkLogin(login: str) -> str:
    """
    @return: C{login}, if it can stand in the users file.
    @raise ValueError: C{login} is empty, starts with C{#}, or holds C{:},
        whitespace or a control character.
    """
    if not login:
        raise ValueError("login must not be empty")
    if login.startswith("#"):
        raise ValueError(f"login {login!r} must not start with '#'")
    for c in login:
        if c == ":" or c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            raise ValueError(
                f"login {login!r} must not contain ':', whitespace or control characters"
            )
    return login


def hashPassword(password: str, hasher: PasswordHasher | None = None) -> str:
    """
    An argon2id hash of C{password}, made with C{hasher} (by default a
    L{PasswordHasher} with argon2-cffi's default parameters).

    @raise ValueError: the password is empty.
    """
    if not password:
        raise ValueError("password must not be empty")
    return (hasher if hasher is not None else PasswordHasher()).hash(password)


@attrs.frozen
class UserEntry:
    """
    One user of the file. ``cramSecret`` is the UTF-8 password (for
    CRAM-MD5) or ``None`` when the user may not use CRAM-MD5. The secret is
    left out of C{repr}, so that it never reaches a log by accident.
    """

    login: str
    passwordHash: str = attrs.field(repr=False)
    cramSecret: bytes | None = attrs.field(default=None, repr=False)

    def toLine(self) -> str:
        fields = [checkLogin(self.login), self.passwordHash]
        if self.cramSecret is not None:
            fields.append(binascii.b2a_base64(self.cramSecret, newline=False).decode("ascii"))
        return ":".join(fields)


def _parseLine(line: str) -> UserEntry:
    fields = line.split(":")
    if len(fields) not in (2, 3):
        raise ValueError("expected login:HASH or login:HASH:CRAMSECRET")
    login, passwordHash = fields[0], fields[1]
    checkLogin(login)
    try:
        params = argon2.extract_parameters(passwordHash)
    except InvalidHashError:
        raise ValueError(f"user {login!r}: the hash is not an argon2 hash") from None
    if params.type is not argon2.Type.ID:
        raise ValueError(f"user {login!r}: the hash is not an argon2id hash")
    cramSecret = None
    if len(fields) == 3:
        try:
            cramSecret = binascii.a2b_base64(fields[2], strict_mode=True)
        except binascii.Error:
            raise ValueError(f"user {login!r}: the CRAM-MD5 secret is not base64") from None
        if not cramSecret:
            raise ValueError(f"user {login!r}: the CRAM-MD5 secret is empty")
    return UserEntry(login, passwordHash, cramSecret)


def parseUsers(data: bytes, path: StrPath = "<users>") -> dict[str, UserEntry]:
    """
    Parse the bytes of a users file; C{path} only names it in errors.

    @raise PasswdFileError: a line is malformed or a login repeated.
    """
    users: dict[str, UserEntry] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
            if not line or line.startswith("#"):
                continue
            entry = _parseLine(line)
            if entry.login in users:
                raise ValueError(f"user {entry.login!r} appears twice")
        except (UnicodeDecodeError, ValueError) as e:
            problem = "not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
            raise PasswdFileError(f"{os.fspath(path)}, line {number}: {problem}") from None
        users[entry.login] = entry
    return users


def readUsers(path: StrPath) -> dict[str, UserEntry]:
    """
    The users of file C{path}, in file order, by login.

    @raise OSError: the file cannot be read (e.g. L{FileNotFoundError}).
    @raise PasswdFileError: the file is malformed.
    """
    with open(path, "rb") as f:
        return parseUsers(f.read(), path)


def writeUsers(path: StrPath, entries: Iterable[UserEntry]) -> None:
    """
    Replace file C{path} with C{entries}, atomically: a reader sees either
    the old file or the whole new one, also after a crash. A new file has
    mode 0600. One that replaces a file keeps that file's owner, group and
    permission bits (so that root can edit a C{root:mailgw 0640} file the
    server reads through its group), except that a file holding CRAM
    secrets is never left readable or writable by others.

    @raise OSError: the file cannot be written; the old one is untouched.
    """
    path = os.fspath(path)
    entries = list(entries)
    directory = os.path.dirname(os.path.abspath(path))
    text = _HEADER + "".join(entry.toLine() + "\n" for entry in entries)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    # mkstemp creates the file mode 0600 in the same directory (so rename
    # is atomic), under an unpredictable name.
    fd, tempPath = tempfile.mkstemp(dir=directory, prefix=".mailgw-passwd.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # Owner first: chown may clear set-id bits, and must not widen
            # access while the file is being written (it is 0600 until then).
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.fchmod(f.fileno(), _modeFor(old, entries))
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tempPath, path)
    except BaseException:
        try:
            os.unlink(tempPath)
        except FileNotFoundError:
            pass
        raise
    # The rename is durable only once the directory is on disk.
    dirFd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirFd)
    finally:
        os.close(dirFd)


def _modeFor(old: os.stat_result | None, entries: list[UserEntry]) -> int:
    """The permission bits of a users file replacing ``old`` (None: a new file)."""
    if old is None:
        return 0o600
    mode = stat.S_IMODE(old.st_mode) & 0o777
    if any(entry.cramSecret is not None for entry in entries):
        mode &= 0o770  # password-equivalent secrets: never for others
    return mode


def _readOrEmpty(path: StrPath) -> dict[str, UserEntry]:
    try:
        return readUsers(path)
    except FileNotFoundError:
        return {}


def addUser(
    path: StrPath,
    login: str,
    password: str,
    cram: bool = False,
    hasher: PasswordHasher | None = None,
) -> None:
    """
    Add a user to file C{path}, creating the file if missing. With C{cram},
    also store the CRAM-MD5 secret (password-equivalent).

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
        login, hashPassword(password, hasher), password.encode("utf-8") if cram else None
    )
    writeUsers(path, users.values())


def setPassword(
    path: StrPath,
    login: str,
    password: str,
    cram: bool | None = None,
    hasher: PasswordHasher | None = None,
) -> None:
    """
    Change the password of user C{login}. C{cram} says whether to store a
    CRAM-MD5 secret; C{None} keeps storing one if, and only if, one was.

    @raise KeyError: no such user.
    @raise ValueError: empty password.
    @raise OSError, PasswdFileError: as L{readUsers} and L{writeUsers}.
    """
    users = readUsers(path)
    old = users[login]
    keepCram = old.cramSecret is not None if cram is None else cram
    users[login] = UserEntry(
        login, hashPassword(password, hasher), password.encode("utf-8") if keepCram else None
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


@implementer(ICredentialsChecker, ISASLMechanisms)
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
    unknown user trying CRAM-MD5 (both L{MechanismUnavailable}). A file
    that cannot be read or parsed fails with L{OSError} or
    L{PasswdFileError} instead: a transient, local problem (454 4.7.0), not
    a wrong password.

    @ivar hasher: makes the dummy hash; give it the parameters the file's
        hashes were made with (the default matches C{mailgw passwd}).
    @ivar cache: recently verified passwords (L{VerifiedCache}: keyed
        digests, bounded, dropped when the file changes), or C{None}.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

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
    _inflight: dict[bytes, list[defer.Deferred[bool]]] = attrs.field(
        init=False, factory=dict, repr=False
    )

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
        waiting: defer.Deferred[bool] = defer.Deferred()
        if key in self._inflight:
            self._inflight[key].append(waiting)
            return waiting
        self._inflight[key] = [waiting]

        def done(result: Any) -> None:
            for d in self._inflight.pop(key, []):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        defer.maybeDeferred(self.runInThread, self._verify, passwordHash, password).addBoth(done)
        return waiting

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        """
        @return: a Deferred firing with the login (UTF-8 bytes), or failing
            with L{UnauthorizedLogin} (permanent: 535), or with another
            exception when the file cannot be used (transient: 454).
        """
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


def _mechanismsOf(users: dict[str, UserEntry]) -> tuple[str, ...]:
    if any(entry.cramSecret is not None for entry in users.values()):
        return ("PLAIN", "LOGIN", "CRAM-MD5")
    return ("PLAIN", "LOGIN")


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
