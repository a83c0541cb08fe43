"""
Checkers replaced by a reload let go of what they hold
(L{mailgw.auth.workers}: L{Workers.closeWhenIdle}, the leases of
L{SharedByKey}, L{retireReplaced}), once their requests under way are done;
the gateway's reload retires the old ones (L{mailgw.service}).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.auth.dovecot import DovecotChecker
from mailgw.auth.sql import loadSQLSettings, makeSQLChecker, sharedDatabase
from mailgw.auth.workers import IRetirable, SharedByKey, Workers, WorkersClosed, retireReplaced
from tests.test_auth_sql import makeUsersDB
from tests.test_dovecot import FakeEndpoint, outcome
from tests.test_dovecot_relay import RELAY_HANDSHAKE


class WorkersTests(TestCase):
    def test_closeWhenIdle(self) -> Any:
        """Closing waits for the calls under way; later calls fail at once, never hang."""
        workers = Workers(reactor, 2, "test-retire")
        self.addCleanup(workers.close)
        release = threading.Event()
        d = workers.run(release.wait, 10)
        workers.closeWhenIdle()
        self.assertFalse(workers.closed)
        self.assertEqual(workers.busy, 1)
        release.set()

        def done(result: Any) -> Any:
            self.assertTrue(result)
            self.assertTrue(workers.closed)
            return self.assertFailure(workers.run(lambda: None), WorkersClosed)

        return d.addCallback(done)

    def test_closeWhenIdleAtOnce(self) -> None:
        workers = Workers(reactor, 1, "test-retire-idle")
        workers.closeWhenIdle()
        self.assertTrue(workers.closed)


class LeaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.shared = SharedByKey()
        self.reactor = _FakeReactor()

    def make(self) -> Any:
        return _Object(self.reactor)

    def test_lastReleaseCloses(self) -> None:
        first = self.shared.acquire("settings", self.reactor, self.make)
        second = self.shared.acquire("settings", self.reactor, self.make)
        self.assertIs(first, second)
        self.shared.release("settings", self.reactor, first)
        self.assertFalse(first.workers.closed)
        self.shared.release("settings", self.reactor, first)
        self.assertTrue(first.workers.closed)
        # Forgotten: the next user gets a new one.
        self.assertIsNot(self.shared.get("settings", self.reactor, self.make), first)

    def test_otherSettingsUntouched(self) -> None:
        old = self.shared.acquire("old", self.reactor, self.make)
        new = self.shared.acquire("new", self.reactor, self.make)
        self.shared.release("old", self.reactor, old)
        self.assertTrue(old.workers.closed)
        self.assertFalse(new.workers.closed)

    def test_retireReplaced(self) -> None:
        retired: list[str] = []

        from zope.interface import implementer

        @implementer(IRetirable)
        class Checker:
            def __init__(self, name: str) -> None:
                self.name = name

            def retire(self) -> None:
                retired.append(self.name)

        kept, gone = Checker("kept"), Checker("gone")
        verifyObject(IRetirable, kept)
        retireReplaced([kept, gone, object()], [kept])
        self.assertEqual(retired, ["gone"])


class _FakeReactor:
    """Enough of a reactor for Workers that are never started."""

    def callWhenRunning(self, f: Any) -> None:
        pass

    def addSystemEventTrigger(self, *args: Any) -> object:
        return object()

    def removeSystemEventTrigger(self, trigger: object) -> None:
        pass


class _Object:
    def __init__(self, reactor: Any) -> None:
        self.workers = Workers(reactor, 1, "lease-test")


class SQLRetireTests(TestCase):
    def test_retiredCheckerClosesItsPool(self) -> Any:
        db = Path(self.mktemp())
        db.parent.mkdir(parents=True, exist_ok=True)
        makeUsersDB(db, {"alice@example.com": "{PLAIN}pencil"})
        path = Path(self.mktemp())
        query = 'password_query = "SELECT password FROM users WHERE login = :user"\n'
        path.write_text(f'driver = "sqlite"\ndsn = "{db}"\nallow_plain = true\n{query}')
        old = makeSQLChecker(loadSQLSettings(str(path)), reactor)
        verifyObject(IRetirable, old)
        database = sharedDatabase(loadSQLSettings(str(path)), reactor)
        self.addCleanup(database.close)
        same = makeSQLChecker(loadSQLSettings(str(path)), reactor)  # a reload, file unchanged
        retireReplaced([old], [same])
        self.assertFalse(database.workers.closed)
        from twisted.cred.credentials import UsernamePassword

        login = same.requestAvatarId(UsernamePassword(b"alice@example.com", b"pencil"))
        # The file changes; the reload's new checker has its own pool.
        path.write_text(
            f'driver = "sqlite"\ndsn = "{db}"\nallow_plain = true\npool_size = 2\n{query}'
        )
        new = makeSQLChecker(loadSQLSettings(str(path)), reactor)
        self.addCleanup(new.retire)
        retireReplaced([same], [new])
        # The query under way finishes on the old pool, which then closes.
        self.assertFalse(database.workers.closed)

        @defer.inlineCallbacks
        def check() -> Any:
            self.assertEqual((yield login), b"alice@example.com")
            self.assertTrue(database.workers.closed)
            answer = yield new.requestAvatarId(UsernamePassword(b"alice@example.com", b"pencil"))
            self.assertEqual(answer, b"alice@example.com")

        return check()


class DovecotRetireTests(SynchronousTestCase):
    def test_closedWhenIdle(self) -> None:
        endpoint = FakeEndpoint()
        checker = DovecotChecker(endpoint, Clock())
        verifyObject(IRetirable, checker)
        conversation = checker.converse("CRAM-MD5", "192.0.2.7")
        d = conversation.step(None)
        server = endpoint.accept(RELAY_HANDSHAKE)
        checker.retire()
        self.assertFalse(server.transport.disconnecting)  # an exchange is under way
        server.answer(b"FAIL")
        outcome(d)
        self.assertTrue(server.transport.disconnecting)


class LDAPRetireTests(SynchronousTestCase):
    def test_releasedOnce(self) -> None:
        from mailgw.auth.ldap import LDAPChecker

        released: list[int] = []
        checker = LDAPChecker(object(), lambda: released.append(1))  # type: ignore[arg-type]
        verifyObject(IRetirable, checker)
        checker.retire()
        checker.retire()
        self.assertEqual(released, [1])
