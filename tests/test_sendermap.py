"""
The sender login map from a backend's source (mailgw.auth.sendermap) and
SenderLoginPolicy asking it: cached briefly, shared lookups, bad entries
skipped, a source that cannot answer refused with 451 (never accepted).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailgw.address import parseMailbox
from mailgw.auth.sendermap import CachedSenderSource, openSenderSource
from mailgw.auth.sql import SQLUnavailable
from mailgw.envelope import Session
from mailgw.policy.senders import SenderLoginPolicy


def session(user: str) -> Any:
    return Session(clientAddress="127.0.0.1", user=user)  # type: ignore[call-arg]


class CachedSourceTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lookups: list[str] = []
        self.table = {"bob": ["bob@example.com", "@example.org", "not an address", ""]}
        self.pending: list[defer.Deferred[list[str]]] | None = None

        def lookup(login: str) -> defer.Deferred[list[str]]:
            self.lookups.append(login)
            if self.pending is not None:
                d: defer.Deferred[list[str]] = defer.Deferred()
                self.pending.append(d)
                return d
            return defer.succeed(list(self.table.get(login, [])))

        self.source = CachedSenderSource(lookup, self.clock, maxAge=60)

    def test_grantAndBadEntriesSkipped(self) -> None:
        grant = self.successResultOf(self.source.grant("bob"))
        self.assertTrue(grant.allows("bob", "example.com"))
        self.assertTrue(grant.allows("anyone", "example.org"))
        self.assertFalse(grant.allows("alice", "example.com"))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_cachedBriefly(self) -> None:
        self.successResultOf(self.source.grant("bob"))
        self.table["bob"] = []
        self.clock.advance(59)
        self.assertTrue(self.successResultOf(self.source.grant("bob")).allows("bob", "example.com"))
        self.assertEqual(self.lookups, ["bob"])
        self.clock.advance(1)
        self.assertFalse(
            self.successResultOf(self.source.grant("bob")).allows("bob", "example.com")
        )
        self.assertEqual(self.lookups, ["bob", "bob"])

    def test_sharedLookup(self) -> None:
        self.pending = []
        first, second = self.source.grant("bob"), self.source.grant("bob")
        self.assertEqual(len(self.pending), 1)
        self.pending[0].callback(["x@example.com"])
        self.assertTrue(self.successResultOf(first).allows("x", "example.com"))
        self.assertTrue(self.successResultOf(second).allows("x", "example.com"))

    def test_failureNotCached(self) -> None:
        self.pending = []
        d = self.source.grant("bob")
        self.pending[0].errback(SQLUnavailable("down"))
        self.failureResultOf(d, SQLUnavailable)
        self.pending = None
        self.successResultOf(self.source.grant("bob"))
        self.assertEqual(self.lookups, ["bob", "bob"])

    def test_bounded(self) -> None:
        self.source.maxEntries = 2
        for login in ("a", "b", "c"):
            self.successResultOf(self.source.grant(login))
        self.assertEqual(list(self.source._entries), ["b", "c"])


class PolicyWithSourceTests(TestCase):
    def setUp(self) -> None:
        self.answer: Any = ["sales@example.com"]

        class Source:
            def grant(inner, login: str) -> Any:
                if isinstance(self.answer, Exception):
                    return defer.fail(self.answer)
                return CachedSenderSource(lambda _: defer.succeed(self.answer), Clock()).grant(
                    login
                )

        self.policy = SenderLoginPolicy(None, source=Source(), checkHeaderFrom=True)

    def check(self, user: str, sender: str) -> Any:
        d = self.policy.checkSender(session(user), parseMailbox(sender, utf8=True))
        return self.successResultOf(defer.maybeDeferred(lambda: d))

    def test_sourceGrants(self) -> None:
        self.assertIsNone(self.check("alice@example.com", "sales@example.com"))
        self.assertIsNone(self.check("alice@example.com", "alice@example.com"))
        self.assertEqual(self.check("alice@example.com", "ceo@example.com").code, 553)

    def test_headerFrom(self) -> None:
        s = session("alice@example.com")
        ok = self.policy.checkMessage(s, None, b"From: sales@example.com\r\n\r\n")  # type: ignore[arg-type]
        self.assertIsNone(self.successResultOf(defer.maybeDeferred(lambda: ok)))
        bad = self.policy.checkMessage(s, None, b"From: ceo@example.com\r\n\r\n")  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(defer.maybeDeferred(lambda: bad)).code, 550)

    def test_sourceDown(self) -> None:
        """A source that cannot answer: 451 4.3.0, not acceptance and not 553."""
        self.answer = SQLUnavailable("down")
        reply = self.check("alice@example.com", "alice@example.com")
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))
        self.flushLoggedErrors()


class OpenSourceTests(TestCase):
    def test_errors(self) -> None:
        self.assertRaises(ValueError, openSenderSource, "sql:", reactor)
        self.assertRaises(ValueError, openSenderSource, "nis:x", reactor)
        self.assertRaises(ValueError, openSenderSource, "sql:/nonexistent.toml", None)
        path = Path(self.mktemp())
        path.write_text(
            'driver = "sqlite"\ndsn = "x.db"\npassword_query = "SELECT 1 WHERE :user"\n'
        )
        e = self.assertRaises(ValueError, openSenderSource, f"sql:{path}", reactor)
        self.assertIn("senders_query", str(e))
        e = self.assertRaises(ValueError, SenderLoginPolicy, f"sql:{path}", clock=reactor)
        self.assertIn("senders_query", str(e))

    def test_checkOnly(self) -> None:
        """Without a reactor (check-config) the settings are checked, nothing opened."""
        path = Path(self.mktemp())
        path.write_text(
            'driver = "sqlite"\ndsn = "x.db"\npassword_query = "SELECT 1 WHERE :user"\n'
            'senders_query = "SELECT 1 WHERE :user"\n'
        )
        policy = SenderLoginPolicy(f"sql:{path}")
        reply = self.successResultOf(
            policy.checkSender(session("alice"), parseMailbox("a@example.com"))
        )
        self.assertEqual(reply.code, 451)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_sqlite(self) -> Any:
        db = Path(self.mktemp())
        db.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE alias (address TEXT, goto TEXT)")
            conn.execute("INSERT INTO alias VALUES ('sales@example.com', 'alice')")
        conn.close()
        path = Path(self.mktemp())
        path.write_text(
            f'driver = "sqlite"\ndsn = "{db}"\n'
            'password_query = "SELECT NULL WHERE :user"\n'
            'senders_query = "SELECT address FROM alias WHERE goto = :user"\n'
        )
        policy = SenderLoginPolicy(f"sql:{path}", clock=reactor)
        self.addCleanup(lambda: policy._source.lookup.current().close())
        reply = yield policy.checkSender(session("alice"), parseMailbox("sales@example.com"))
        self.assertIsNone(reply)
        reply = yield policy.checkSender(session("bob"), parseMailbox("sales@example.com"))
        self.assertEqual(reply.code, 553)
