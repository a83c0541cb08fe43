"""
Tests for L{mailgw.limits.shared}: the synchronous tables over a shared
engine, and the limiters over them, with a fake engine on a fake clock
whose latency and failures the tests control.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.config import LimitsConfig
from mailgw.interfaces import ISharedCounters
from mailgw.limits import AuthThrottle, ConnectionLimiter, SubmissionQuota
from mailgw.limits._counters import LeakyCounts
from mailgw.limits.shared import (
    CounterChange,
    MemoryCounters,
    SyncedCounters,
    SyncedTable,
    TableSpec,
    keyText,
    makeTable,
)

W = 1e6  # a window long enough that nothing leaks in a test, but where it should
SPEC = TableSpec("t", 10, W)


@implementer(ISharedCounters)
@attrs.define(eq=False)
class FakeEngine:
    """
    A L{MemoryCounters} (the site's counts, on the site's clock) reached
    with ``latency`` seconds of delay on the process's clock; while
    ``broken`` every batch fails, and a batch sent while ``hung`` is never
    answered.
    """

    clock: Clock
    store: MemoryCounters
    latency: float = 0.0
    broken: bool = False
    hung: bool = False
    batches: list[list[CounterChange]] = attrs.field(factory=list)
    closed: bool = False

    def apply(self, changes: Sequence[CounterChange]) -> Deferred[list[float]]:
        self.batches.append(list(changes))
        if self.broken:
            return fail(ConnectionError("engine down"))
        if self.hung:
            return Deferred()
        if self.latency:
            return deferLater(self.clock, self.latency, self.store.applyNow, changes)
        return self.store.apply(changes)

    def close(self) -> Deferred[None]:
        self.closed = True
        return self.store.close()


class Events:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.log = Logger(observer=cast(ILogObserver, lambda e: self.lines.append(formatEvent(e))))


class Metrics:
    def __init__(self) -> None:
        self.states: list[bool] = []
        self.errors = 0

    def sharedLimitsUp(self, up: bool) -> None:
        self.states.append(up)

    def sharedLimitsError(self) -> None:
        self.errors += 1


class Site:
    """One engine shared by processes, each with its own clock-driven sync."""

    def __init__(self, latency: float = 0.0) -> None:
        self.clock = Clock()
        self.store = MemoryCounters(self.clock)
        self.latency = latency
        self.engines: list[FakeEngine] = []

    def process(self, **kwargs: Any) -> tuple[SyncedCounters, FakeEngine, Events, Metrics]:
        engine = FakeEngine(self.clock, self.store, self.latency)
        self.engines.append(engine)
        events, metrics = Events(), Metrics()
        sync = SyncedCounters(self.clock, engine, log=events.log, metrics=metrics, **kwargs)
        sync.start()
        return sync, engine, events, metrics

    def settle(self, seconds: float = 1.0) -> None:
        """Let every background exchange run: ``seconds`` in small steps."""
        for _ in range(int(seconds / 0.05)):
            self.clock.advance(0.05)


class ContractTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        clock = Clock()
        verifyObject(ISharedCounters, MemoryCounters(clock))
        verifyObject(ISharedCounters, FakeEngine(clock, MemoryCounters(clock)))

    def test_memoryLeaksAndClamps(self) -> None:
        clock = Clock()
        store = MemoryCounters(clock)
        SPEC = TableSpec("t", 10, 100)
        self.assertEqual(store.applyNow([CounterChange(SPEC, "a", 4.0)]), [4.0])
        clock.advance(10)  # 10 per 100 s: 1 leaked
        self.assertEqual(store.applyNow([CounterChange(SPEC, "a", 0.0)]), [3.0])
        self.assertEqual(
            store.applyNow([CounterChange(SPEC, "a", -5.0), CounterChange(SPEC, "a", 1.0)]),
            [0.0, 1.0],
        )
        # A read of an unknown bucket stores nothing.
        self.assertEqual(store.applyNow([CounterChange(SPEC, "b", 0.0)]), [0.0])
        self.assertEqual(len(store), 1)
        # Tables are apart.
        other = TableSpec("u", 10, 100)
        self.assertEqual(store.applyNow([CounterChange(other, "a", 0.0)]), [0.0])

    def test_keyText(self) -> None:
        self.assertEqual(keyText((4, 3232235777)), "n:4:3232235777")
        self.assertEqual(keyText("bob"), "s:bob")
        self.assertNotEqual(keyText("n:4:1"), keyText((4, 1)))

    def test_makeTableLocal(self) -> None:
        """With no engine a limiter's table is a plain LeakyCounts (today's behaviour)."""
        table = makeTable(Clock(), None, "t", 10, 100)
        self.assertIs(type(table), LeakyCounts)


class SyncedTableTests(SynchronousTestCase):
    def test_startsLocalThenShares(self) -> None:
        site = Site()
        a, _, eventsA, metricsA = site.process()
        b, _, _, _ = site.process()
        self.assertFalse(a.up)
        site.settle(0.1)
        self.assertTrue(a.up)
        self.assertTrue(b.up)
        self.assertEqual(metricsA.states, [True])
        self.assertEqual(len(eventsA.lines), 1)
        self.assertIn("reachable", eventsA.lines[0])
        ta, tb = a.table("t", 10, W), b.table("t", 10, W)
        for _ in range(3):
            ta.add("k")
        # Read at once: the own count, whatever the engine knows.
        self.assertEqual(ta.count("k"), 3)
        self.assertEqual(tb.count("k"), 0)  # not known yet: asked for in the background
        site.settle(0.3)
        self.assertEqual(tb.count("k"), 3)
        tb.add("k", 2)
        self.assertEqual(tb.count("k"), 5)  # the engine's level plus its own change
        site.settle(0.3)
        self.assertEqual(tb.count("k"), 5)  # counted once, not twice
        self.assertEqual(ta.count("k"), 3)  # a's level is fresh enough: stale by < staleness
        site.settle(1.2)
        self.assertEqual(ta.count("k"), 3)  # stale: answered from what it knows, asked again
        site.settle(0.3)
        self.assertEqual(ta.count("k"), 5)
        self.assertEqual(site.store.applyNow([CounterChange(ta.spec, "s:k", 0)])[0] // 1, 4.0)

    def test_refund(self) -> None:
        site = Site()
        a, _, _, _ = site.process()
        b, _, _, _ = site.process()
        site.settle(0.1)
        ta, tb = a.table("t", 10, W), b.table("t", 10, W)
        ta.add("k", 3)
        tb.add("k", 3)
        site.settle(0.3)
        tb.remove("k", 3)
        self.assertEqual(tb.count("k"), 3)
        site.settle(0.3)
        self.assertEqual(ta.count("k"), 3)
        site.settle(1.2)
        ta.count("k")
        site.settle(0.2)
        self.assertEqual(ta.count("k"), 3)
        self.assertEqual(tb.count("k"), 3)

    def test_leaksBetweenReports(self) -> None:
        site = Site()
        a, _, _, _ = site.process(staleness=1000)
        b, _, _, _ = site.process(staleness=1000)
        site.settle(0.1)
        ta, tb = a.table("t", 10, 100), b.table("t", 10, 100)
        ta.add("k", 9)
        site.settle(0.3)
        tb.count("k")
        site.settle(0.1)
        self.assertEqual(tb.count("k"), 9)
        site.clock.advance(50)  # 5 leaked
        self.assertEqual(tb.count("k"), 4)

    def test_batching(self) -> None:
        """Changes made within one interval travel in one batch, of at most maxBatch."""
        site = Site()
        a, engine, _, _ = site.process(maxBatch=3)
        site.settle(0.1)
        table = a.table("t", 10, W)
        engine.batches.clear()
        for key in "abcde":
            table.add(key)
        self.assertEqual(engine.batches, [])  # nothing on the hot path
        site.clock.advance(0.1)
        self.assertEqual([len(b) for b in engine.batches], [3, 2])
        self.assertEqual(
            [(c.key, c.amount) for c in engine.batches[0]],
            [("s:a", 1.0), ("s:b", 1.0), ("s:c", 1.0)],
        )

    def test_oneBatchInFlight(self) -> None:
        site = Site(latency=0.5)
        a, engine, _, _ = site.process()
        site.clock.advance(0)
        site.clock.advance(0.5)
        self.assertTrue(a.up)
        table = a.table("t", 10, W)
        engine.batches.clear()
        table.add("k")
        site.clock.advance(0.1)
        table.add("k")
        site.clock.advance(0.2)
        self.assertEqual(len(engine.batches), 1)
        self.assertEqual(table.count("k"), 2)  # in flight and pending both count
        site.clock.advance(0.3)  # answered; the second change follows
        site.clock.advance(0.1)
        self.assertEqual(len(engine.batches), 2)
        site.clock.advance(0.5)
        [level] = site.store.applyNow([CounterChange(table.spec, "s:k", 0)])
        self.assertEqual(round(level, 3), 2.0)

    def test_downFallsBackToLocal(self) -> None:
        """Down: reads are this process's own counts, changes kept, one log line each way."""
        site = Site()
        a, engineA, eventsA, metricsA = site.process(retry=5.0)
        b, _, _, _ = site.process()
        site.settle(0.1)
        ta, tb = a.table("t", 10, W), b.table("t", 10, W)
        tb.add("k", 6)
        ta.add("k", 1)
        site.settle(0.3)
        ta.count("k")
        site.settle(0.3)
        self.assertEqual(ta.count("k"), 7)
        engineA.broken = True
        ta.add("k", 2)
        site.settle(0.2)
        self.assertFalse(a.up)
        self.assertEqual(ta.count("k"), 3)  # its own: fail safe, never 0
        ta.add("k")
        site.settle(2.0)  # failing again and again: still one line
        self.assertEqual(metricsA.states, [True, False])
        self.assertEqual(metricsA.errors, 1)
        self.assertEqual([line for line in eventsA.lines if "unreachable" in line][:1],
                         [eventsA.lines[1]])  # fmt: skip
        self.assertIn("engine down", eventsA.lines[1])
        self.assertEqual(len(eventsA.lines), 2)
        engineA.broken = False
        site.settle(5.0)  # the next probe finds it back, and sends what was kept
        self.assertTrue(a.up)
        self.assertEqual(metricsA.states, [True, False, True])
        self.assertEqual(len(eventsA.lines), 3)
        self.assertIn("reachable", eventsA.lines[2])
        tb.count("k")
        site.settle(1.5)
        tb.count("k")
        site.settle(0.2)
        self.assertEqual(tb.count("k"), 10)  # 6 + 1 + 2 + 1: nothing lost

    def test_timeout(self) -> None:
        site = Site()
        a, engine, events, metrics = site.process(timeout=2.0, retry=3.0)
        site.settle(0.1)
        table = a.table("t", 10, W)
        engine.hung = True
        table.add("k")
        site.settle(1.0)
        self.assertTrue(a.up)
        site.settle(1.5)
        self.assertFalse(a.up)
        self.assertEqual(metrics.errors, 1)
        engine.hung = False
        site.settle(3.5)
        self.assertTrue(a.up)
        # At least once: the change whose answer was lost is sent again.
        [level] = site.store.applyNow([CounterChange(table.spec, "s:k", 0)])
        self.assertEqual(round(level, 3), 1.0)

    def test_engineRaising(self) -> None:
        """An engine that raises (against its contract) is an engine down, not a crash."""
        site = Site()

        @implementer(ISharedCounters)
        class Raising(FakeEngine):
            def apply(self, changes: Sequence[CounterChange]) -> Deferred[list[float]]:
                raise RuntimeError("bug")

        metrics = Metrics()
        a = SyncedCounters(site.clock, Raising(site.clock, site.store), metrics=metrics)
        a.start()
        site.settle(0.1)
        self.assertFalse(a.up)
        self.assertEqual(metrics.states, [False])

    def test_stop(self) -> None:
        site = Site()
        a, engine, _, _ = site.process()
        site.settle(0.1)
        table = a.table("t", 10, W)
        a.stop()
        self.assertTrue(engine.closed)
        count = len(engine.batches)
        table.add("k")
        site.settle(1.0)
        self.assertEqual(len(engine.batches), count)
        self.assertEqual(table.count("k"), 1)

    def test_bounded(self) -> None:
        site = Site()
        a, engine, _, _ = site.process()
        site.settle(0.1)
        engine.broken = True
        table = a.table("t", 10, W, maxKeys=5)
        for i in range(50):
            table.add(f"k{i}")
        site.settle(0.3)
        self.assertLessEqual(len(table._pending), 5)
        self.assertLessEqual(len(table), 5)

    def test_tableOnce(self) -> None:
        a, _, _, _ = Site().process()
        a.table("t", 1, 1)
        self.assertRaises(ValueError, a.table, "t", 1, 1)
        self.assertIsInstance(a.table("u", 1, 1), SyncedTable)


def limits(**changes: Any) -> LimitsConfig:
    return attrs.evolve(LimitsConfig(), **changes)


class LimitersOverSharedTests(SynchronousTestCase):
    """The limiters of two processes over one engine count as one."""

    def test_sprayCountedOnce(self) -> None:
        site = Site()
        a, _, _, _ = site.process()
        b, _, _, _ = site.process()
        site.settle(0.1)
        s = limits(authFailuresPerAddress=6, authFreeFailures=100)
        throttles = [AuthThrottle(site.clock, s, shared=a), AuthThrottle(site.clock, s, shared=b)]
        refused = 0
        for i in range(12):
            throttle = throttles[i % 2]
            throttle.prefetch("192.0.2.7")  # as the server does when a connection opens
            site.clock.advance(0)  # the engine answers before the AUTH command comes
            decision = throttle.begin("192.0.2.7", f"user{i}", "PLAIN")
            if decision.refuse:
                refused += 1
                self.assertEqual(decision.reason, "address-budget")
            else:
                assert decision.attempt is not None
                decision.attempt.failed()
            site.settle(0.2)
        # 6 failures across both processes, then every attempt refused.
        self.assertEqual(refused, 6)

    def test_sprayUnsharedGetsTwice(self) -> None:
        """Without an engine each process has its own budget (what sharing fixes)."""
        clock = Clock()
        s = limits(authFailuresPerAddress=6, authFreeFailures=100)
        throttles = [AuthThrottle(clock, s), AuthThrottle(clock, s)]
        refused = 0
        for i in range(12):
            decision = throttles[i % 2].begin("192.0.2.7", f"user{i}", "PLAIN")
            if decision.refuse:
                refused += 1
            else:
                assert decision.attempt is not None
                decision.attempt.failed()
        self.assertEqual(refused, 0)

    def test_successRefundsSiteWide(self) -> None:
        site = Site()
        a, _, _, _ = site.process()
        b, _, _, _ = site.process()
        site.settle(0.1)
        s = limits(authFailuresPerAccount=4, authFreeFailures=100)
        ta, tb = AuthThrottle(site.clock, s, shared=a), AuthThrottle(site.clock, s, shared=b)
        for _ in range(3):
            d = ta.begin("192.0.2.7", "bob", "PLAIN")
            assert d.attempt is not None
            d.attempt.failed()
        d = ta.begin("192.0.2.7", "bob", "PLAIN")
        assert d.attempt is not None
        d.attempt.succeeded()  # forgives the 3 failures, refunds itself
        site.settle(0.3)
        for _ in range(3):
            d = tb.begin("198.51.100.1", "bob", "PLAIN")
            assert d.attempt is not None
            d.attempt.failed()
            site.settle(0.3)
        # 3 on b only: the account budget of 4 is not reached.
        d = tb.begin("198.51.100.1", "bob", "PLAIN")
        self.assertFalse(d.refuse)

    def test_quotaAcrossProcesses(self) -> None:
        site = Site()
        a, _, _, _ = site.process()
        b, _, _, _ = site.process()
        site.settle(0.1)
        s = limits(messagesPerUser=4, recipientsPerUser=10)
        qa, qb = SubmissionQuota(site.clock, s, shared=a), SubmissionQuota(site.clock, s, shared=b)
        qa.record("Alice", 3)
        qa.record("alice", 3)
        qa.record("alice", 3)
        site.settle(0.2)
        self.assertIsNone(qb.checkMessage("ALICE"))  # asks for the level in the background
        site.settle(0.2)
        self.assertIsNone(qb.checkMessage("alice"))
        self.assertIsNotNone(qb.checkRecipient("alice", 1))  # 9 + 1 of 10
        qb.record("alice", 1)
        self.assertIsNotNone(qb.checkMessage("alice"))  # 4 of 4

    def test_connectionRateAcrossProcesses(self) -> None:
        site = Site()
        a, _, _, _ = site.process()
        b, _, _, _ = site.process()
        site.settle(0.1)
        s = limits(connectionRatePerAddress=4)
        ca, cb = (
            ConnectionLimiter(site.clock, s, shared=a),
            ConnectionLimiter(site.clock, s, shared=b),
        )
        for _ in range(4):
            self.assertIsNone(ca.open("203.0.113.9"))
            site.settle(0.2)
        self.assertIsNotNone(ca.open("203.0.113.9"))
        # The first sight of an address on another process is answered from
        # that process's own count (the documented window), and asks for the
        # site's level, which the next connection meets.
        self.assertIsNone(cb.open("203.0.113.9"))
        site.settle(0.2)
        self.assertIsNotNone(cb.open("203.0.113.9"))
        self.assertIsNotNone(ca.open("203.0.113.9"))

    def test_engineDownKeepsLocalLimits(self) -> None:
        """Fail safe: with the engine down each process still holds its own budget."""
        site = Site()
        a, engine, _, _ = site.process()
        site.settle(0.1)
        engine.broken = True
        s = limits(authFailuresPerAddress=3, authFreeFailures=100)
        throttle = AuthThrottle(site.clock, s, shared=a)
        for i in range(3):
            d = throttle.begin("192.0.2.7", f"u{i}", "PLAIN")
            assert d.attempt is not None
            d.attempt.failed()
            site.settle(0.2)
        self.assertFalse(a.up)
        self.assertTrue(throttle.begin("192.0.2.7", "u9", "PLAIN").refuse)
        # ... and a legitimate user elsewhere is not refused.
        d = throttle.begin("198.51.100.1", "bob", "PLAIN")
        self.assertFalse(d.refuse)
