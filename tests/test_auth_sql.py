"""
The sql: backend (mailgw.auth.sql) on real SQLite files, and the
stored-hash checker (mailgw.auth.stored) it builds on, with in-memory
fetches: parameterised queries, unknown users, backend failures, the cache.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgw.auth.cache import VerifiedCache
from mailgw.auth.passwd import hashPassword
from mailgw.auth.realm import makePortal
from mailgw.auth.sql import (
    SQLSettingsError,
    SQLUnavailable,
    loadSQLSettings,
    makeSQLChecker,
    parseSQLSettings,
    queryParameters,
    sharedDatabase,
)
from mailgw.auth.stored import StoredHashChecker, StoredUser
from mailgw.interfaces import ISubmitter
from twisted.plugins.mailgw_auth import theSQLCheckerFactory

SHA512 = (
    "{SHA512-CRYPT}$6$/vz.v1oY6XKBCmmm$SopKNojxverAwhUH/fIyd5DhMHPJIkXsWd0Vq1dIb7dLTtRok"
    "H2xXwuWYGJQFbATxrDm77ToSW6.AhnHb8D0r/"
)  # doveadm pw -s SHA512-CRYPT -p 'pässword 1'
PASSWORD = "pässword 1".encode()
INJECTIONS = [
    "' OR '1'='1",
    "x' OR 1=1 --",
    "alice@example.com' --",
    "alice@example.com'; DROP TABLE users; --",
    '" OR ""="',
    "%(user)s",
    ":user",
]


def makeUsersDB(path: Path, users: dict[str, str]) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (login TEXT PRIMARY KEY, password TEXT, active INTEGER)")
        db.execute("CREATE TABLE aliases (owner TEXT, address TEXT)")
        db.executemany(
            "INSERT INTO users VALUES (?, ?, 1)", [(login, h) for login, h in users.items()]
        )
    db.close()


def syncThread(f: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class SettingsTests(TestCase):
    def settings(self, **values: Any) -> Any:
        data = {
            "driver": "sqlite",
            "dsn": "/x.db",
            "password_query": "SELECT p FROM u WHERE l = :user",
        }
        data.update(values)
        return parseSQLSettings({k: v for k, v in data.items() if v is not None}, "sql.toml")

    def assertProblem(self, key: str, **values: Any) -> None:
        e = self.assertRaises(SQLSettingsError, self.settings, **values)
        self.assertIn(f"sql.toml: {key}:", str(e))

    def test_defaults(self) -> None:
        s = self.settings()
        self.assertEqual((s.poolSize, s.timeout, s.allowPlain, s.sendersQuery), (4, 5.0, False, ""))

    def test_problemsNamed(self) -> None:
        self.assertProblem("driver", driver="mysql")
        self.assertProblem("dsn", dsn="")
        self.assertProblem("password_query", password_query=None)
        self.assertProblem("password_query", password_query="SELECT p FROM u")  # no parameter
        self.assertProblem("password_query", password_query="SELECT p FROM u WHERE l = :login")
        self.assertProblem("senders_query", senders_query="SELECT a FROM b WHERE o = :who")
        self.assertProblem("pool_size", pool_size=0)
        self.assertProblem("pool_size", pool_size="4")
        self.assertProblem("timeout", timeout=0)
        self.assertProblem("allow_plain", allow_plain="yes")
        self.assertProblem("passwd_query", passwd_query="x")

    def test_postgresqlPlaceholders(self) -> None:
        q = "SELECT p FROM u WHERE l = %(localpart)s AND d = %(domain)s AND x::text = 'a'"
        self.assertEqual(self.settings(driver="postgresql", password_query=q).passwordQuery, q)
        self.assertProblem("password_query", driver="postgresql", password_query="... = %s")

    def test_fileErrors(self) -> None:
        e = self.assertRaises(SQLSettingsError, loadSQLSettings, self.mktemp())
        self.assertIn("cannot read", str(e))
        path = Path(self.mktemp())
        path.write_text("driver = \n")
        self.assertIn(
            "not TOML", str(self.assertRaises(SQLSettingsError, loadSQLSettings, str(path)))
        )

    def test_plugin(self) -> None:
        """The plugin refuses a missing or broken file, naming it."""
        self.assertRaises(ValueError, theSQLCheckerFactory.generateChecker, "")
        path = self.mktemp()
        e = self.assertRaises(ValueError, theSQLCheckerFactory.generateChecker, path)
        self.assertIn(path, str(e))

    def test_parameters(self) -> None:
        self.assertEqual(
            queryParameters("a@b@example.org"),
            {"user": "a@b@example.org", "localpart": "a@b", "domain": "example.org"},
        )
        self.assertEqual(queryParameters("bob"), {"user": "bob", "localpart": "bob", "domain": ""})


class StoredHashCheckerTests(TestCase):
    """The checker with an in-memory fetch and verification in the calling thread."""

    def setUp(self) -> None:
        self.users = {"alice@example.com": SHA512}
        self.fetched: list[str] = []
        self.verified: list[str] = []

        def fetch(login: str) -> defer.Deferred[StoredUser | None]:
            self.fetched.append(login)
            stored = self.users.get(login)
            return defer.succeed(None if stored is None else StoredUser(login, stored))

        def runInThread(f: Any, *args: Any) -> defer.Deferred[Any]:
            self.verified.append(args[0] if len(args) == 2 else "dummy")
            return defer.maybeDeferred(f, *args)

        self.checker = StoredHashChecker(fetch, runInThread)

    def login(self, user: bytes, password: bytes) -> Any:
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    def test_accepts(self) -> None:
        self.assertEqual(self.successResultOf(self.login(b"alice@example.com", PASSWORD)),
                         b"alice@example.com")  # fmt: skip

    def test_wrongAndUnknownCostTheSame(self) -> None:
        """A wrong password and an unknown login both fail after one verification."""
        self.failureResultOf(self.login(b"alice@example.com", b"wrong"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"nobody@example.com", b"wrong"), UnauthorizedLogin)
        self.assertEqual(len(self.verified), 2)
        self.assertEqual(self.fetched, ["alice@example.com", "nobody@example.com"])

    def test_unknownVerifiesAgainstRealScheme(self) -> None:
        """After a real hash was seen, the dummy verification uses it (same cost)."""
        self.failureResultOf(self.login(b"alice@example.com", b"wrong"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"nobody@example.com", PASSWORD), UnauthorizedLogin)
        self.assertEqual(self.verified, [SHA512, "dummy"])
        self.assertEqual(self.checker._dummy, SHA512)

    def test_emptyPasswordAndBadNames(self) -> None:
        self.failureResultOf(self.login(b"alice@example.com", b""), UnauthorizedLogin)
        self.failureResultOf(self.login(b"\xff\xfe", PASSWORD), UnauthorizedLogin)
        self.failureResultOf(self.login(b"a\x00b", PASSWORD), UnauthorizedLogin)
        self.assertEqual(self.fetched, [])

    def test_cramNotHandled(self) -> None:
        creds = CramMD5Credentials()
        self.failureResultOf(self.checker.requestAvatarId(creds), UnhandledCredentials)

    def test_backendFailure(self) -> None:
        """A fetch that fails is not a wrong password: the failure passes through."""
        self.checker.fetch = lambda login: defer.fail(SQLUnavailable("down"))
        self.failureResultOf(self.login(b"alice@example.com", PASSWORD), SQLUnavailable)

    def test_brokenHashIsBackendProblem(self) -> None:
        from mailgw.auth.hashes import HashFormatError

        self.users["alice@example.com"] = "{PLAIN}pässword 1"
        self.failureResultOf(self.login(b"alice@example.com", PASSWORD), HashFormatError)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.checker.allowPlain = True
        self.successResultOf(self.login(b"alice@example.com", PASSWORD))

    def test_cache(self) -> None:
        """A verified password is cached, keyed on the stored hash too."""
        self.successResultOf(self.login(b"alice@example.com", PASSWORD))
        self.successResultOf(self.login(b"alice@example.com", PASSWORD))
        self.assertEqual(len(self.verified), 1)
        self.failureResultOf(self.login(b"alice@example.com", b"wrong"), UnauthorizedLogin)
        self.assertEqual(len(self.verified), 2)  # failures are never cached
        # The password changes in the database: the old one stops working at once.
        self.users["alice@example.com"] = hashPassword("new password")
        self.failureResultOf(self.login(b"alice@example.com", PASSWORD), UnauthorizedLogin)
        self.successResultOf(self.login(b"alice@example.com", b"new password"))

    def test_noCache(self) -> None:
        self.checker.cache = None
        self.successResultOf(self.login(b"alice@example.com", PASSWORD))
        self.successResultOf(self.login(b"alice@example.com", PASSWORD))
        self.assertEqual(len(self.verified), 2)

    def test_inflightShared(self) -> None:
        """Identical logins under way share one verification."""
        pending: list[defer.Deferred[Any]] = []

        def later(f: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            pending.append(d)
            d.addCallback(lambda _: f(*args))
            return d

        self.checker.runInThread = later
        first = self.login(b"alice@example.com", PASSWORD)
        second = self.login(b"alice@example.com", PASSWORD)
        self.assertEqual(len(pending), 1)
        pending[0].callback(None)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))


class SQLiteTests(TestCase):
    """SQLDatabase on a real SQLite file, queries in its own threads."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bcryptHash = bcrypt.hashpw(b"bob's password", bcrypt.gensalt(4)).decode()
        makeUsersDB(self.path, {"alice@example.com": SHA512, "Bob": self.bcryptHash})
        self.settings = parseSQLSettings(
            {
                "driver": "sqlite",
                "dsn": str(self.path),
                "password_query": "SELECT password, login FROM users"
                " WHERE lower(login) = lower(:user) AND active",
                "senders_query": "SELECT address FROM aliases WHERE owner = :user",
                "pool_size": 2,
            },
            "sql.toml",
        )
        self.checker = makeSQLChecker(self.settings, reactor)
        self.database = self.checker.fetch.__self__
        self.addCleanup(self.database.close)

    def login(self, user: str, password: bytes) -> defer.Deferred[Any]:
        return self.checker.requestAvatarId(UsernamePassword(user.encode(), password))

    @defer.inlineCallbacks
    def test_logins(self) -> Any:
        self.assertEqual((yield self.login("alice@example.com", PASSWORD)), b"alice@example.com")
        # The second column is the login as the database spells it.
        self.assertEqual((yield self.login("bob", b"bob's password")), b"Bob")
        yield self.assertFailure(self.login("bob", b"wrong"), UnauthorizedLogin)
        yield self.assertFailure(self.login("carol", b"x"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_injection(self) -> Any:
        """Logins that would rewrite a formatted query match nobody and change nothing."""
        for attempt in INJECTIONS:
            yield self.assertFailure(self.login(attempt, PASSWORD), UnauthorizedLogin)
            self.assertIsNone((yield self.database.fetchUser(attempt)))
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM users").fetchone(), (2,))
        db.close()

    @defer.inlineCallbacks
    def test_readOnly(self) -> Any:
        """The connection cannot write, whatever the query says."""
        self.database.settings = parseSQLSettings(
            {"driver": "sqlite", "dsn": str(self.path),
             "password_query": "DELETE FROM users WHERE login = :user RETURNING password"},
            "sql.toml",
        )  # fmt: skip
        yield self.assertFailure(self.database.fetchUser("Bob"), SQLUnavailable)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM users").fetchone(), (2,))
        db.close()
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_severalRowsRefused(self) -> Any:
        with sqlite3.connect(self.path) as db:
            db.execute("INSERT INTO users VALUES ('BOB', ?, 1)", (self.bcryptHash,))
        db.close()
        yield self.assertFailure(self.login("bob", b"bob's password"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_down(self) -> Any:
        """A database that cannot be opened is a backend failure (454), logged once."""
        self.path.rename(self.path.with_suffix(".gone"))
        yield self.assertFailure(self.login("bob", b"bob's password"), SQLUnavailable)
        yield self.assertFailure(self.login("bob", b"bob's password"), SQLUnavailable)
        self.path.with_suffix(".gone").rename(self.path)
        self.assertEqual((yield self.login("bob", b"bob's password")), b"Bob")

    @defer.inlineCallbacks
    def test_downThroughPortal(self) -> Any:
        """
        Chained after another backend that says no, the database's failure
        wins over UnauthorizedLogin: the server answers 454, not 535.
        """
        self.path.unlink()
        memory = StoredHashChecker(lambda login: defer.succeed(None), syncThread)
        portal = makePortal([memory, self.checker])
        d = portal.login(UsernamePassword(b"bob", b"bob's password"), None, ISubmitter)
        failure = yield self.assertFailure(d, SQLUnavailable)
        self.assertNotIsInstance(failure, UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_senders(self) -> Any:
        with sqlite3.connect(self.path) as db:
            rows = [("Bob", "bob@example.com"), ("Bob", "@example.org"), ("Bob", None)]
            db.executemany("INSERT INTO aliases VALUES (?, ?)", rows)
        db.close()
        self.assertEqual((yield self.database.senders("Bob")), ["bob@example.com", "@example.org"])
        self.assertEqual((yield self.database.senders("' OR '1'='1")), [])

    def test_shared(self) -> None:
        """
        A checker made again (a reload) and the sender map of the same
        settings use the open database: no more threads or connections.
        """
        from mailgw.auth.sendermap import openSenderSource

        again = makeSQLChecker(self.settings, reactor)
        self.assertIs(again.fetch.__self__, self.database)
        path = Path(self.mktemp())
        path.write_text(
            f'driver = "sqlite"\ndsn = "{self.path}"\n'
            f"password_query = {self.settings.passwordQuery!r}\n"
            f"senders_query = {self.settings.sendersQuery!r}\n"
            "pool_size = 2\n"
        )
        source = openSenderSource(f"sql:{path}", reactor)
        other = source.lookup.current()  # type: ignore[union-attr]
        self.addCleanup(other.close)
        self.assertIsNot(other, self.database)  # another file: its own
        self.assertIs(openSenderSource(f"sql:{path}", reactor).lookup.current(), other)  # type: ignore[union-attr]
        self.database.close()
        self.assertIsNot(makeSQLChecker(self.settings, reactor).fetch.__self__, self.database)
        self.addCleanup(sharedDatabase(self.settings, reactor).close)

    def test_poolBounded(self) -> None:
        self.assertEqual(self.database.workers.maxThreads, 2)

    def test_cacheDefault(self) -> None:
        self.assertIsInstance(self.checker.cache, VerifiedCache)


class OutagesTests(TestCase):
    """A backend's outage is logged once when it begins and once when it ends."""

    def test_oncePerOutage(self) -> None:
        from twisted.internet import defer
        from twisted.logger import Logger, formatEvent

        from mailgw.auth.workers import Outages

        events: list[dict[str, object]] = []
        outages = Outages("users.sql", "database", SQLUnavailable, Logger(observer=events.append))
        for _ in range(3):
            self.failureResultOf(outages.watch(defer.fail(SQLUnavailable("refused"))))
        self.failureResultOf(outages.watch(defer.fail(ValueError("a bug"))))  # not an outage
        self.assertEqual(self.successResultOf(outages.watch(defer.succeed(7))), 7)
        outages.watch(defer.succeed(8))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["users.sql: database unavailable: refused", "users.sql: database reachable again"],
        )
