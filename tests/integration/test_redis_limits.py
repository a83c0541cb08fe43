"""
The shared counts on a real Redis (L{mailgw.limits.redisengine}): the Lua
leaky bucket, atomic across processes, expiring, namespaced, over TCP and
a UNIX socket, with a password from a file; and L{SyncedCounters} over it
falling back to local counts while Redis is stopped, then coming back.
"""

from __future__ import annotations

import os
from typing import Any, cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgw._configparse import ConfigError
from mailgw.config import LimitsConfig
from mailgw.interfaces import ISharedCounters
from mailgw.limits.backend import makeSharedCounters
from mailgw.limits.redisengine import RedisCounters
from mailgw.limits.shared import CounterChange, SyncedCounters, TableSpec
from mailgw.sharedconfig import parseBackend
from tests.integration.redisserver import RedisServer

LONG = TableSpec("t", 10, 1e6)  # leaks nothing a test could see


def change(key: str, amount: float, spec: TableSpec = LONG) -> CounterChange:
    return CounterChange(spec, key, amount)


class Metrics:
    def __init__(self) -> None:
        self.states: list[bool] = []
        self.errors = 0

    def sharedLimitsUp(self, up: bool) -> None:
        self.states.append(up)

    def sharedLimitsError(self) -> None:
        self.errors += 1


class RedisEngineTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.redis.start()

    def engine(self, namespace: str = "test", **kwargs: Any) -> RedisCounters:
        address = kwargs.pop("address", parseBackend(self.redis.url))
        engine = RedisCounters(reactor, address, namespace, **kwargs)
        self.addCleanup(engine.close)
        return engine

    def raw(self) -> Any:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis.port, password=self.redis.password)
        self.addCleanup(client.close)
        return client

    def test_interface(self) -> None:
        verifyObject(ISharedCounters, self.engine())

    @inlineCallbacks
    def test_addReadRefund(self) -> Any:
        engine = self.engine()
        levels = yield engine.apply([change("a", 3), change("a", 2), change("b", 0)])
        self.assertEqual([round(x, 3) for x in levels], [3.0, 5.0, 0.0])
        levels = yield engine.apply([change("a", -9), change("a", 0)])
        self.assertEqual(levels, [0.0, 0.0])
        # A bucket refunded to 0 is gone; a read stores nothing.
        self.assertEqual(self.raw().keys("*"), [])

    @inlineCallbacks
    def test_emptyBatchIsAProbe(self) -> Any:
        engine = self.engine()
        levels = yield engine.apply([])
        self.assertEqual(levels, [])
        self.redis.stop()
        yield self.assertFailure(engine.apply([]), Exception)

    @inlineCallbacks
    def test_keysNamespacedAndExpiring(self) -> Any:
        spec = TableSpec("auth-address", 10, 100)  # 0.1 per second: 5 leak in 50 s
        yield self.engine("site1").apply([change("n:4:1", 5, spec)])
        yield self.engine("site2").apply([change("n:4:1", 1, spec)])
        raw = self.raw()
        self.assertEqual(
            sorted(raw.keys("*")), [b"site1:auth-address:n:4:1", b"site2:auth-address:n:4:1"]
        )
        ttl = raw.pttl("site1:auth-address:n:4:1")
        self.assertTrue(49_000 < ttl <= 51_000, ttl)  # gone once leaked to 0, plus a second
        levels = yield self.engine("site1").apply([change("n:4:1", 0, spec)])
        self.assertGreater(levels[0], 4.9)
        self.assertLessEqual(levels[0], 5.0)

    @inlineCallbacks
    def test_leaks(self) -> Any:
        spec = TableSpec("fast", 1000, 1)  # 1000 per second
        engine = self.engine()
        yield engine.apply([change("k", 500, spec)])
        yield deferLater(reactor, 0.05, lambda: None)
        [level] = yield engine.apply([change("k", 0, spec)])
        self.assertLess(level, 500)
        self.assertGreaterEqual(level, 0)

    @inlineCallbacks
    def test_atomicAcrossClients(self) -> Any:
        """Two nodes adding at once lose nothing (the script is atomic)."""
        nodes = [self.engine(), self.engine()]
        batches = [nodes[i % 2].apply([change("k", 1)] * 10) for i in range(20)]
        yield gatherResults(batches)
        [level] = yield nodes[0].apply([change("k", 0)])
        self.assertEqual(round(level, 3), 200.0)

    @inlineCallbacks
    def test_unixSocket(self) -> Any:
        engine = self.engine(address=parseBackend(f"unix://{self.redis.socket}?db=3"))
        yield engine.apply([change("k", 2)])
        raw = self.raw()
        raw.select(3)
        self.assertEqual(raw.keys("*"), [b"test:t:k"])


class RedisPasswordTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer(self, password="s3cret-for-redis")
        self.redis.start()

    def limits(self, **changes: Any) -> LimitsConfig:
        return attrs.evolve(LimitsConfig(), backend=self.redis.url, **changes)

    @inlineCallbacks
    def test_passwordFromFile(self) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret-for-redis\n")
        os.chmod(path, 0o600)
        counters = makeSharedCounters(
            self.limits(backendPasswordFile=path, namespace="pw"), "test.toml", reactor
        )
        assert counters is not None
        self.addCleanup(counters.stop)
        levels = yield counters.engine.apply([change("k", 1)])
        self.assertEqual(levels, [1.0])
        self.assertIn("redis://127.0.0.1:", counters.description)
        self.assertNotIn("s3cret", counters.description)

    @inlineCallbacks
    def test_noPasswordFails(self) -> Any:
        engine = RedisCounters(reactor, parseBackend(self.redis.url), "pw")
        self.addCleanup(engine.close)
        yield self.assertFailure(engine.apply([change("k", 1)]), Exception)

    def test_passwordFileReadableByOthers(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x\n")
        os.chmod(path, 0o644)
        e = self.assertRaises(
            ConfigError,
            makeSharedCounters,
            self.limits(backendPasswordFile=path),
            "test.toml",
            reactor,
        )
        self.assertEqual(e.key, "limits.backend_password_file")
        self.assertNotIn("x", e.problem.replace(path, ""))


class SyncedOverRedisTests(TestCase):
    """SyncedCounters on the real reactor over a real Redis that stops and comes back."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.redis.start()
        self.lines: list[str] = []

    def node(self) -> tuple[SyncedCounters, Metrics]:
        metrics = Metrics()
        engine = RedisCounters(reactor, parseBackend(self.redis.url), "sync", timeout=1.0)
        log = Logger(observer=cast(ILogObserver, lambda e: self.lines.append(formatEvent(e))))
        counters = SyncedCounters(
            reactor,
            engine,
            interval=0.01,
            staleness=0.2,
            timeout=1.0,
            retry=0.2,
            log=log,
            metrics=metrics,
            description="Redis test",
        )
        counters.start()
        self.addCleanup(counters.stop)
        return counters, metrics

    @inlineCallbacks
    def waitFor(self, condition: Any, what: str) -> Any:
        for _ in range(200):  # bounded: 10 s
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"never: {what}")

    @inlineCallbacks
    def test_sharedThenLocalThenShared(self) -> Any:
        (a, metricsA), (b, _) = self.node(), self.node()
        yield self.waitFor(lambda: a.up and b.up, "both up")
        ta, tb = a.table("t", 10, 1e6), b.table("t", 10, 1e6)
        ta.add("k", 4)
        tb.count("k")
        yield self.waitFor(lambda: tb.count("k") == 4, "b sees a's 4")
        self.redis.stop()
        ta.add("k")
        tb.add("j")
        yield self.waitFor(lambda: not a.up and not b.up, "both notice")
        self.assertEqual(ta.count("k"), 5)  # its own counts: never less
        self.assertEqual(tb.count("k"), 0)  # b counted none of "k" itself
        self.assertEqual(metricsA.states, [True, False])
        self.assertGreaterEqual(metricsA.errors, 1)
        self.redis.start()  # empty: no persistence
        yield self.waitFor(lambda: a.up and b.up, "both back")
        self.assertEqual(metricsA.states, [True, False, True])
        # What each counted while Redis was down reached it once it was back.
        yield self.waitFor(lambda: tb.count("k") == 1, "b sees a's change made while down")
        yield self.waitFor(lambda: ta.count("j") == 1, "a sees b's change made while down")
        ups = [line for line in self.lines if "reachable, counting site-wide" in line]
        downs = [line for line in self.lines if "unreachable" in line]
        self.assertEqual((len(ups), len(downs)), (4, 2))  # one line per change of state
