"""
Tests for L{mailgw.auth.passwd}: the users file and L{PasswdChecker}.
"""

from __future__ import annotations

import hmac
import os
import stat
import threading
from typing import Any

import argon2
from argon2 import PasswordHasher
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    Anonymous,
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, threads
from twisted.logger import capturedLogs
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.auth import ISASLMechanisms, MechanismUnavailable, passwd
from mailgw.auth.cache import VerifiedCache
from mailgw.auth.passwd import (
    PasswdChecker,
    PasswdFileError,
    UserEntry,
    addUser,
    checkLogin,
    hashPassword,
    readUsers,
    removeUser,
    setPassword,
    writeUsers,
)
from mailgw.auth.scram import IScramCredentials

# Cheap parameters keep the suite fast; production uses the defaults.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def cheapHash(password: str) -> str:
    return hashPassword(password, CHEAP)


def write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class HashPasswordTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        Without a hasher, the hash is argon2id with argon2-cffi's default
        parameters, and verifies.
        """
        h = hashPassword("sesame")
        params = argon2.extract_parameters(h)
        defaults = PasswordHasher()
        self.assertEqual(params.type, argon2.Type.ID)
        self.assertEqual(
            (params.time_cost, params.memory_cost, params.parallelism),
            (defaults.time_cost, defaults.memory_cost, defaults.parallelism),
        )
        self.assertTrue(defaults.verify(h, "sesame"))

    def test_salted(self) -> None:
        self.assertNotEqual(cheapHash("sesame"), cheapHash("sesame"))

    def test_empty(self) -> None:
        self.assertRaises(ValueError, hashPassword, "", CHEAP)


class CheckLoginTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for login in ["alice", "Alice", "user@example.com", "rené", "a#b", "x" * 200]:
            self.assertEqual(checkLogin(login), login)

    def test_invalid(self) -> None:
        for login in ["", "a:b", "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb", "a\u2028b", "#a"]:
            e = self.assertRaises(ValueError, checkLogin, login)
            self.assertIn("login", str(e))


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "passwd")

    def test_roundTrip(self) -> None:
        entries = [
            UserEntry("alice", cheapHash("a")),
            UserEntry("rené", cheapHash("pässwörd"), "pässwörd".encode()),
        ]
        writeUsers(self.path, entries)
        self.assertEqual(readUsers(self.path), {e.login: e for e in entries})

    def test_format(self) -> None:
        """
        One user a line, login:HASH[:base64 of the UTF-8 password].
        """
        h = cheapHash("pässwörd")
        writeUsers(self.path, [UserEntry("bob", h), UserEntry("rené", h, "pässwörd".encode())])
        with open(self.path, "rb") as f:
            lines = [line for line in f.read().decode().splitlines() if not line.startswith("#")]
        self.assertEqual(lines, [f"bob:{h}", f"rené:{h}:cMOkc3N3w7ZyZA=="])

    def test_commentsAndBlankLines(self) -> None:
        h = cheapHash("x")
        write(self.path, f"# users\n\n   \n  # indented comment\r\nalice:{h}\r\n\nbob:{h}:eA==\n")
        users = readUsers(self.path)
        self.assertEqual(list(users), ["alice", "bob"])
        self.assertEqual(users["bob"].cramSecret, b"x")
        self.assertEqual(readUsers(self.path).keys(), users.keys())

    def test_emptyFile(self) -> None:
        write(self.path, "")
        self.assertEqual(readUsers(self.path), {})

    def test_missing(self) -> None:
        self.assertRaises(FileNotFoundError, readUsers, self.path)

    def assertParseError(self, text: str | bytes, line: int, problem: str) -> None:
        with open(self.path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        e = self.assertRaises(PasswdFileError, readUsers, self.path)
        self.assertIsInstance(e, ValueError)
        self.assertTrue(str(e).startswith(f"{self.path}, line {line}: "), str(e))
        self.assertIn(problem, str(e))

    def test_parseErrors(self) -> None:
        h = cheapHash("x")
        head = f"# comment\nalice:{h}\n\n"
        self.assertParseError(head + "bob\n", 4, "expected login:HASH")
        self.assertParseError(head + f"bob:{h}:eA==:extra\n", 4, "expected login:HASH")
        self.assertParseError(head + f"b b:{h}\n", 4, "must not contain")
        self.assertParseError(head + f":{h}\n", 4, "must not be empty")
        self.assertParseError(head + "bob:plaintext\n", 4, "not an argon2 hash")
        self.assertParseError(head + f"bob:{h}:!!notbase64\n", 4, "not base64")
        self.assertParseError(head + f"bob:{h}:\n", 4, "secret is empty")
        self.assertParseError(head + f"alice:{h}\n", 4, "'alice' appears twice")
        self.assertParseError(head.encode() + b"b\xffb:x\n", 4, "not UTF-8")
        argon2i = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I)
        self.assertParseError(head + f"bob:{argon2i.hash('x')}\n", 4, "not an argon2id hash")

    def test_parseErrorsHideSecrets(self) -> None:
        """
        A parse error quotes neither the hash nor the secret.
        """
        h = cheapHash("x")
        self.assertParseError(f"bob:{h}:c2VjcmV0:x\n", 1, "expected")
        e = self.assertRaises(PasswdFileError, readUsers, self.path)
        self.assertNotIn("c2VjcmV0", str(e))
        self.assertNotIn(h, str(e))
        self.assertNotIn("c2VjcmV0", repr(UserEntry("bob", h, b"secret")))
        self.assertNotIn("secret", repr(UserEntry("bob", h, b"secret")))

    def test_newFileMode0600(self) -> None:
        """A new file is written mode 0600, whatever the umask."""
        old = os.umask(0)
        try:
            writeUsers(self.path, [UserEntry("alice", cheapHash("a"))])
            addUser(os.path.join(self.dir, "other"), "bob", "b", hasher=CHEAP)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "other")).st_mode), 0o600)

    def test_keepsMode(self) -> None:
        """
        Issue 14: add, change and remove keep the mode of the file they
        replace (a root:mailgw 0640 file stays readable by the service's
        group), whatever the umask; only CRAM secrets are kept from others.
        """
        writeUsers(self.path, [UserEntry("alice", cheapHash("a"))])
        os.chmod(self.path, 0o640)
        old = os.umask(0o077)
        try:
            addUser(self.path, "bob", "b", hasher=CHEAP)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
            setPassword(self.path, "bob", "c", hasher=CHEAP)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
            removeUser(self.path, "alice")
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
            os.chmod(self.path, 0o644)
            addUser(self.path, "carol", "c", hasher=CHEAP)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)
            setPassword(self.path, "carol", "d", cram=True, hasher=CHEAP)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        finally:
            os.umask(old)

    def test_atomicReplace(self) -> None:
        """
        The new file replaces the old by rename (a new inode), after fsync;
        the directory is fsync'd after the rename; no temporary file stays.
        """
        write(self.path, "")
        oldInode = os.stat(self.path).st_ino
        synced: list[tuple[bool, bool]] = []
        realFsync = os.fsync

        def recordingFsync(fd: int) -> None:
            isDir = stat.S_ISDIR(os.fstat(fd).st_mode)
            synced.append((isDir, os.path.exists(self.path) and bool(readUsers(self.path))))
            realFsync(fd)

        self.patch(passwd.os, "fsync", recordingFsync)
        writeUsers(self.path, [UserEntry("alice", cheapHash("a"))])
        # First the file, before the rename; then the directory, after it.
        self.assertEqual(synced, [(False, False), (True, True)])
        self.assertNotEqual(os.stat(self.path).st_ino, oldInode)
        self.assertEqual(os.listdir(self.dir), ["passwd"])

    def test_failedWriteKeepsOld(self) -> None:
        """
        When writing fails, the old file is untouched and the temporary file
        removed.
        """
        writeUsers(self.path, [UserEntry("alice", cheapHash("a"))])
        before = readUsers(self.path)

        def failingFsync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        self.patch(passwd.os, "fsync", failingFsync)
        self.assertRaises(OSError, writeUsers, self.path, [])
        self.assertEqual(readUsers(self.path), before)
        self.assertEqual(os.listdir(self.dir), ["passwd"])

    def test_keepsOwner(self) -> None:
        """
        Replacing a file keeps its owner and group (needs root to test).
        """
        if os.geteuid() != 0:
            self.skipTest("only root can give a file to another user")
        write(self.path, "")
        os.chown(self.path, 4321, 8765)
        writeUsers(self.path, [])
        st = os.stat(self.path)
        self.assertEqual((st.st_uid, st.st_gid), (4321, 8765))
        # root:mailgw 0640 (and another owner's file), edited by root: add,
        # change and remove keep owner, group and mode.
        for uid, gid in [(0, 8765), (4321, 8765)]:
            os.chown(self.path, uid, gid)
            os.chmod(self.path, 0o640)
            for edit in [
                lambda: addUser(self.path, "alice", "a", hasher=CHEAP),
                lambda: setPassword(self.path, "alice", "b", hasher=CHEAP),
                lambda: removeUser(self.path, "alice"),
            ]:
                edit()
                st = os.stat(self.path)
                self.assertEqual(
                    (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (uid, gid, 0o640)
                )

    def test_addUser(self) -> None:
        """
        addUser creates the file if missing and appends; the password
        verifies; a CRAM secret is stored only when asked.
        """
        addUser(self.path, "alice", "a-pw", hasher=CHEAP)
        addUser(self.path, "bob", "b-pw", cram=True, hasher=CHEAP)
        users = readUsers(self.path)
        self.assertEqual(list(users), ["alice", "bob"])
        self.assertTrue(CHEAP.verify(users["alice"].passwordHash, "a-pw"))
        self.assertIsNone(users["alice"].cramSecret)
        self.assertEqual(users["bob"].cramSecret, b"b-pw")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_addUserErrors(self) -> None:
        addUser(self.path, "alice", "a-pw", hasher=CHEAP)
        before = readUsers(self.path)
        e = self.assertRaises(ValueError, addUser, self.path, "alice", "x", hasher=CHEAP)
        self.assertIn("already exists", str(e))
        self.assertRaises(ValueError, addUser, self.path, "b:b", "x", hasher=CHEAP)
        self.assertRaises(ValueError, addUser, self.path, "bob", "", hasher=CHEAP)
        self.assertEqual(readUsers(self.path), before)

    def test_setPassword(self) -> None:
        addUser(self.path, "alice", "old", hasher=CHEAP)
        addUser(self.path, "bob", "old", cram=True, hasher=CHEAP)
        setPassword(self.path, "alice", "new", hasher=CHEAP)
        setPassword(self.path, "bob", "new", hasher=CHEAP)
        users = readUsers(self.path)
        self.assertTrue(CHEAP.verify(users["alice"].passwordHash, "new"))
        self.assertRaises(
            argon2.exceptions.VerifyMismatchError, CHEAP.verify, users["alice"].passwordHash, "old"
        )
        # None keeps whether a secret is stored.
        self.assertIsNone(users["alice"].cramSecret)
        self.assertEqual(users["bob"].cramSecret, b"new")
        setPassword(self.path, "alice", "newer", cram=True, hasher=CHEAP)
        setPassword(self.path, "bob", "newer", cram=False, hasher=CHEAP)
        users = readUsers(self.path)
        self.assertEqual(users["alice"].cramSecret, b"newer")
        self.assertIsNone(users["bob"].cramSecret)
        self.assertEqual(list(users), ["alice", "bob"])

    def test_setPasswordMissing(self) -> None:
        addUser(self.path, "alice", "old", hasher=CHEAP)
        self.assertRaises(KeyError, setPassword, self.path, "bob", "x", hasher=CHEAP)

    def test_removeUser(self) -> None:
        addUser(self.path, "alice", "a", hasher=CHEAP)
        addUser(self.path, "bob", "b", hasher=CHEAP)
        removeUser(self.path, "alice")
        self.assertEqual(list(readUsers(self.path)), ["bob"])
        self.assertRaises(KeyError, removeUser, self.path, "alice")


class RecordingRunner:
    """
    A synchronous runInThread that records what it runs.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        self.calls.append((f, args))
        return defer.maybeDeferred(f, *args)


def cram(login: bytes, password: bytes, challenge: bytes = b"<1.2@mailgw.test>") -> Any:
    credentials = CramMD5Credentials(b"mailgw.test")
    credentials.challenge = challenge
    response = hmac.new(password, challenge, "md5").hexdigest().encode("ascii")
    credentials.setResponse(login + b" " + response)
    return credentials


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        addUser(self.path, "alice", "sesame", hasher=CHEAP)
        addUser(self.path, "rené", "pässwörd", cram=True, hasher=CHEAP)
        self.runner = RecordingRunner()
        self.checker = PasswdChecker(self.path, self.runner, CHEAP)

    def login(self, credentials: Any) -> defer.Deferred[bytes]:
        return self.checker.requestAvatarId(credentials)

    def test_interface(self) -> None:
        verifyObject(ICredentialsChecker, self.checker)
        self.assertEqual(
            self.checker.credentialInterfaces,
            (IUsernamePassword, IUsernameHashedPassword, IScramCredentials),
        )

    def test_rightPassword(self) -> None:
        self.assertEqual(
            self.successResultOf(self.login(UsernamePassword(b"alice", b"sesame"))), b"alice"
        )
        self.assertEqual(
            self.successResultOf(
                self.login(UsernamePassword("rené".encode(), "pässwörd".encode()))
            ),
            "rené".encode(),
        )

    def test_caseSensitive(self) -> None:
        self.failureResultOf(self.login(UsernamePassword(b"Alice", b"sesame")), UnauthorizedLogin)

    def test_wrongAndUnknownAlike(self) -> None:
        """
        A wrong password, an unknown user and an undecodable user name fail
        alike, each after one argon2 verification in the thread.
        """
        failures: list[Failure] = []
        for username, password in [
            (b"alice", b"wrong"),
            (b"mallory", b"sesame"),
            (b"\xff\xfe", b"sesame"),
        ]:
            before = len(self.runner.calls)
            failures.append(
                self.failureResultOf(
                    self.login(UsernamePassword(username, password)), UnauthorizedLogin
                )
            )
            self.assertEqual(len(self.runner.calls), before + 1)
        self.assertEqual({(f.type, str(f.value)) for f in failures}, {(UnauthorizedLogin, "")})
        # The unknown users were verified against the one dummy hash.
        hashes = [args[0] for _, args in self.runner.calls]
        self.assertEqual(hashes[1], hashes[2])
        self.assertNotEqual(hashes[0], hashes[1])
        self.assertTrue(hashes[1].startswith("$argon2id$"))

    def test_dummyPasswordNotAccepted(self) -> None:
        """
        Even a password matching the dummy hash does not log anybody in.
        """
        self.patch(PasswdChecker, "_verify", lambda self, passwordHash, password: True)
        self.failureResultOf(self.login(UsernamePassword(b"mallory", b"x")), UnauthorizedLogin)

    def test_verificationInThread(self) -> None:
        """
        Passwords are verified by the function given to runInThread, not
        before it runs.
        """
        pending: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def deferringRunner(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            pending.append((f, args, d))
            return d

        checker = PasswdChecker(self.path, deferringRunner, CHEAP)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"sesame"))
        self.assertNoResult(d)
        [(f, args, threadResult)] = pending
        self.assertEqual(args[1], b"sesame")
        self.assertTrue(args[0].startswith("$argon2id$"))
        threadResult.callback(f(*args))
        self.assertEqual(self.successResultOf(d), b"alice")

    def test_cramRight(self) -> None:
        result = self.login(cram("rené".encode(), "pässwörd".encode()))
        self.assertEqual(self.successResultOf(result), "rené".encode())

    def test_cramWrong(self) -> None:
        self.failureResultOf(self.login(cram("rené".encode(), b"wrong")), UnauthorizedLogin)

    def test_cramNoSecret(self) -> None:
        """
        A user without a CRAM secret cannot use CRAM-MD5, even with the
        right password; nor can unknown or undecodable users. All three
        fail alike with MechanismUnavailable (an UnauthorizedLogin: 535 on
        the wire, but not counted as a guess) after one HMAC each, as a
        user with a secret does; a wrong response of a user with a secret
        is a plain UnauthorizedLogin.
        """
        checked: list[bytes] = []

        def recording(credentials: Any) -> Any:
            real = credentials.checkPassword

            def checkPassword(secret: bytes) -> bool:
                checked.append(secret)
                return bool(real(secret))

            credentials.checkPassword = checkPassword
            return credentials

        failures = [
            self.failureResultOf(self.login(recording(cram(login, password))), UnauthorizedLogin)
            for login, password in [(b"alice", b"sesame"), (b"mallory", b"x"), (b"\xff", b"x")]
        ]
        self.assertEqual({f.type for f in failures}, {MechanismUnavailable})
        self.assertEqual(len(checked), 3)
        self.assertNotIn(b"sesame", checked)
        wrong = self.failureResultOf(self.login(recording(cram("rené".encode(), b"x"))))
        self.assertIs(wrong.type, UnauthorizedLogin)
        self.assertEqual(checked[-1], "pässwörd".encode())

    def test_mechanisms(self) -> None:
        """
        CRAM-MD5 is offered while at least one user holds a CRAM secret,
        as the file says now; a file broken later keeps the last offer.
        """
        verifyObject(ISASLMechanisms, self.checker)
        self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN", "CRAM-MD5"))
        setPassword(self.path, "rené", "new", cram=False, hasher=CHEAP)
        self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN"))
        addUser(self.path, "carol", "c", cram=True, hasher=CHEAP)
        self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN", "CRAM-MD5"))
        with open(self.path) as f:
            good = f.read()
        with capturedLogs():
            write(self.path, good + "broken\n")
            self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN", "CRAM-MD5"))
            os.unlink(self.path)
            self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN", "CRAM-MD5"))
        addUser(self.path, "dave", "d", hasher=CHEAP)  # a new file, without secrets
        self.assertEqual(self.checker.saslMechanisms(), ("PLAIN", "LOGIN"))

    def test_mechanismsCached(self) -> None:
        """Asking for the mechanisms reads the file only when it changed."""
        self.checker.saslMechanisms()
        parsed: list[bytes] = []
        realParse = passwd.parseUsers

        def recordingParse(data: bytes, path: Any) -> Any:
            parsed.append(data)
            return realParse(data, path)

        self.patch(passwd, "parseUsers", recordingParse)
        for _ in range(3):
            self.checker.saslMechanisms()
        self.assertEqual(parsed, [])

    def test_otherCredentials(self) -> None:
        f = self.failureResultOf(self.login(Anonymous()), UnhandledCredentials)
        self.assertFalse(f.check(UnauthorizedLogin))

    def test_fileChangePickedUp(self) -> None:
        """
        Changes to the file apply to the next login, same checker.
        """
        self.failureResultOf(self.login(UsernamePassword(b"bob", b"b-pw")), UnauthorizedLogin)
        addUser(self.path, "bob", "b-pw", hasher=CHEAP)
        result = self.login(UsernamePassword(b"bob", b"b-pw"))
        self.assertEqual(self.successResultOf(result), b"bob")
        setPassword(self.path, "alice", "new", cram=True, hasher=CHEAP)
        self.failureResultOf(self.login(UsernamePassword(b"alice", b"sesame")), UnauthorizedLogin)
        self.successResultOf(self.login(UsernamePassword(b"alice", b"new")))
        self.successResultOf(self.login(cram(b"alice", b"new")))
        removeUser(self.path, "bob")
        self.failureResultOf(self.login(UsernamePassword(b"bob", b"b-pw")), UnauthorizedLogin)

    def test_fileReadOnlyWhenChanged(self) -> None:
        """
        An unchanged file is not read again.
        """
        self.successResultOf(self.login(UsernamePassword(b"alice", b"sesame")))
        parsed: list[bytes] = []
        realParse = passwd.parseUsers

        def recordingParse(data: bytes, path: Any) -> Any:
            parsed.append(data)
            return realParse(data, path)

        self.patch(passwd, "parseUsers", recordingParse)
        self.successResultOf(self.login(UsernamePassword(b"alice", b"sesame")))
        self.assertEqual(parsed, [])
        addUser(self.path, "bob", "b-pw", hasher=CHEAP)
        parsed.clear()  # addUser reads the file too
        self.successResultOf(self.login(UsernamePassword(b"bob", b"b-pw")))
        self.successResultOf(self.login(UsernamePassword(b"bob", b"b-pw")))
        self.assertEqual(len(parsed), 1)

    def assertBackendFailure(self, exceptionType: type[Exception]) -> None:
        for credentials in [UsernamePassword(b"alice", b"sesame"), cram("rené".encode(), b"x")]:
            f = self.failureResultOf(self.login(credentials), exceptionType)
            self.assertFalse(f.check(UnauthorizedLogin))

    def test_missingFile(self) -> None:
        os.unlink(self.path)
        self.assertBackendFailure(FileNotFoundError)

    def test_unreadableFile(self) -> None:
        # A directory is unreadable as a file, also for root.
        os.unlink(self.path)
        os.mkdir(self.path)
        self.assertBackendFailure(IsADirectoryError)

    def test_badFile(self) -> None:
        """
        A malformed file is a backend failure, logged once (naming the line,
        quoting no secret); mending it mends logins.
        """
        with open(self.path) as f:
            good = f.read()
        write(self.path, good + "broken:c2VjcmV0\n")
        with capturedLogs() as events:
            self.assertBackendFailure(PasswdFileError)
            self.assertBackendFailure(PasswdFileError)
        self.assertEqual(len(events), 1)
        self.assertIn(f"{self.path}, line 5", events[0]["problem"])
        self.assertNotIn("c2VjcmV0", repr(events))
        write(self.path, good)
        self.successResultOf(self.login(UsernamePassword(b"alice", b"sesame")))

    def test_noSecretsLogged(self) -> None:
        with capturedLogs() as events:
            self.successResultOf(self.login(UsernamePassword(b"alice", b"sesame")))
            self.failureResultOf(self.login(UsernamePassword(b"alice", b"wrong")))
            self.successResultOf(self.login(cram("rené".encode(), "pässwörd".encode())))
        for secret in ["sesame", "wrong", "pässwörd", "argon2"]:
            self.assertNotIn(secret, repr(events))


class ThreadPoolTests(TestCase):
    def test_realThread(self) -> defer.Deferred[None]:
        """
        With deferToThread, argon2 runs in another thread than the reactor's.
        """
        path = self.mktemp()
        addUser(path, "alice", "sesame", hasher=CHEAP)
        reactorThread = threading.get_ident()
        verifyThreads: list[int] = []

        def runInThread(f: Any, *args: Any) -> defer.Deferred[Any]:
            def recorded(*args: Any) -> Any:
                verifyThreads.append(threading.get_ident())
                return f(*args)

            return threads.deferToThread(recorded, *args)

        checker = PasswdChecker(path, runInThread, CHEAP)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"sesame"))

        def check(login: bytes) -> None:
            self.assertEqual(login, b"alice")
            self.assertEqual(len(verifyThreads), 1)
            self.assertNotEqual(verifyThreads[0], reactorThread)

        return d.addCallback(check)


class PluginTests(TestCase):
    """
    The C{passwd} auth type, found by L{twisted.plugin} in
    C{twisted/plugins/mailgw_auth.py}.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        addUser(self.path, "alice", "sesame", hasher=CHEAP)

    def test_found(self) -> None:
        factory = strcred.findCheckerFactory("passwd")
        verifyObject(strcred.ICheckerFactory, factory)
        verifyObject(IPlugin, factory)
        self.assertEqual(type(factory).__module__, "twisted.plugins.mailgw_auth")
        self.assertEqual(factory.argStringFormat, "FILE")
        self.assertEqual(
            factory.credentialInterfaces,
            (IUsernamePassword, IUsernameHashedPassword, IScramCredentials),
        )
        self.assertIn("mailgw passwd", factory.authHelp)

    def test_makeChecker(self) -> defer.Deferred[None]:
        """
        passwd:FILE makes a PasswdChecker that verifies in the reactor's
        thread pool, not in the reactor thread.
        """
        checker = strcred.makeChecker("passwd:" + self.path)
        self.assertIsInstance(checker, PasswdChecker)
        self.assertEqual(checker.path, self.path)
        reactorThread = threading.get_ident()
        verifyThreads: list[int] = []
        realVerify = PasswdChecker._verify

        def recordingVerify(self: PasswdChecker, passwordHash: str, password: bytes) -> bool:
            verifyThreads.append(threading.get_ident())
            return realVerify(self, passwordHash, password)

        self.patch(PasswdChecker, "_verify", recordingVerify)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"sesame"))

        def check(login: bytes) -> None:
            self.assertEqual(login, b"alice")
            self.assertEqual(len(verifyThreads), 1)
            self.assertNotEqual(verifyThreads[0], reactorThread)

        return d.addCallback(check)

    def assertRefused(self, argstring: str, message: str) -> None:
        e = self.assertRaises(ValueError, strcred.makeChecker, "passwd:" + argstring)
        self.assertIn(message, str(e))

    def test_noFile(self) -> None:
        self.assertRefused("", "--auth passwd:FILE")
        missing = self.mktemp()
        self.assertRefused(missing, f"{missing}: cannot read users file: No such file")

    def test_unreadableFile(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertRefused(directory, f"{directory}: cannot read users file: Is a directory")

    def test_badFile(self) -> None:
        with open(self.path, "a") as f:
            f.write("carol\n")
        self.assertRefused(self.path, f"{self.path}, line 4: expected")


class VerifiedCacheTests(SynchronousTestCase):
    """The checker's cache of verified passwords (mailgw.auth.cache)."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        addUser(self.path, "alice", "sesame", hasher=CHEAP)
        self.runner = RecordingRunner()
        self.now = 1000.0
        cache = VerifiedCache(maxEntries=2, maxAge=60, now=lambda: self.now)
        self.checker = PasswdChecker(self.path, self.runner, CHEAP, cache)

    def login(self, password: bytes, user: bytes = b"alice") -> defer.Deferred[bytes]:
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_secondLoginSkipsTheHash(self) -> None:
        self.assertEqual(self.successResultOf(self.login(b"sesame")), b"alice")
        self.assertEqual(self.successResultOf(self.login(b"sesame")), b"alice")
        self.assertEqual(len(self.runner.calls), 1)

    def test_wrongPasswordsAlwaysHashed(self) -> None:
        self.successResultOf(self.login(b"sesame"))
        for _ in range(3):
            self.failureResultOf(self.login(b"wrong"), UnauthorizedLogin)
        self.assertEqual(len(self.runner.calls), 4)

    def test_expires(self) -> None:
        self.successResultOf(self.login(b"sesame"))
        self.now += 61
        self.successResultOf(self.login(b"sesame"))
        self.assertEqual(len(self.runner.calls), 2)

    def test_fileChangeDropsIt(self) -> None:
        self.successResultOf(self.login(b"sesame"))
        setPassword(self.path, "alice", "changed", hasher=CHEAP)
        self.failureResultOf(self.login(b"sesame"), UnauthorizedLogin)
        self.assertEqual(self.successResultOf(self.login(b"changed")), b"alice")

    def test_bounded(self) -> None:
        cache = self.checker.cache
        assert cache is not None
        for i in range(5):
            cache.add(f"u{i}", "$hash", b"pw")
        self.assertEqual(len(cache), 2)
        self.assertIn(("u4", "$hash", b"pw"), cache)
        self.assertNotIn(("u0", "$hash", b"pw"), cache)

    def test_noPasswordKept(self) -> None:
        self.successResultOf(self.login(b"sesame"))
        cache = self.checker.cache
        assert cache is not None
        [key] = cache._entries
        self.assertEqual(len(key), 32)
        self.assertNotIn(b"sesame", key)
        self.assertNotIn(b"sesame", repr(vars(cache)).encode())


class SingleFlightTests(SynchronousTestCase):
    """Identical logins under way at once share one verification."""

    def test_burstHashesOnce(self) -> None:
        path = self.mktemp()
        addUser(path, "alice", "sesame", hasher=CHEAP)
        pending: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

        def runInThread(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            pending.append((f, args, d))
            return d

        checker = PasswdChecker(path, runInThread, CHEAP)
        logins = [checker.requestAvatarId(UsernamePassword(b"alice", b"sesame")) for _ in range(5)]
        wrong = checker.requestAvatarId(UsernamePassword(b"alice", b"nope"))
        self.assertEqual(len(pending), 2)  # one for the five, one for the wrong password
        for f, args, d in pending:
            d.callback(f(*args))
        for login in logins:
            self.assertEqual(self.successResultOf(login), b"alice")
        self.failureResultOf(wrong, UnauthorizedLogin)
        self.assertEqual(len(checker._inflight), 0)


class CaseTests(SynchronousTestCase):
    def test_loginsDifferingOnlyInCaseRefused(self) -> None:
        path = self.mktemp()
        addUser(path, "alice@example.com", "pw", hasher=CHEAP)
        error = self.assertRaises(
            ValueError, addUser, path, "Alice@Example.com", "pw2", hasher=CHEAP
        )
        self.assertIn("differ only in case", str(error))
        self.assertEqual(list(readUsers(path)), ["alice@example.com"])
