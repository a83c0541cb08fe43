"""
The gateway and its shared counts: none without ``[limits] backend``
(every limiter on plain in-process counts, as before), and an engine given
by an embedder (the workers' supervisor) synced while the gateway runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailgw.config import Config, configFromDict
from mailgw.limits._counters import LeakyCounts
from mailgw.limits.shared import CounterChange, MemoryCounters, SyncedCounters, SyncedTable
from mailgw.service import GatewayService
from tests.integration.support import makeFixtures, shortDirectory


def config(testCase: TestCase) -> Config:
    files = makeFixtures(Path(testCase.mktemp()), shortDirectory(testCase) / "spool")
    return configFromDict(
        {
            "server": {"hostname": "localhost", "submissions": ["tcp:0:interface=127.0.0.1"]},
            "tls": {"certificate": files["cert"], "key": files["key"]},
            "auth": {"backends": [f"passwd:{files['passwd']}"]},
            "spool": {"directory": files["spool"]},
        },
        source="test",
    )


class SharedServiceTests(TestCase):
    timeout = 30

    def test_noBackendNothingShared(self) -> None:
        service = GatewayService(config(self), reactor)
        self.assertIsNone(service.sharedCounters)
        auth = service.guards.auth
        assert auth is not None
        self.assertIs(type(auth._addresses), LeakyCounts)

    @inlineCallbacks
    def test_givenEngineSynced(self) -> Any:
        store = MemoryCounters(reactor)
        counters = SyncedCounters(reactor, store, interval=0.01)
        service = GatewayService(config(self), reactor, sharedCounters=counters)
        self.assertIs(service.sharedCounters, counters)
        quota = service.guards.quota
        assert quota is not None
        self.assertIsInstance(quota._messages, SyncedTable)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        yield service.whenListening()
        for _ in range(100):  # bounded: 5 s
            if counters.up:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(counters.up)
        quota.record("alice@example.com", 2)
        for _ in range(100):
            if len(store):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(store), 2)  # messages and recipients of alice
        yield service.stopService()
        quota.record("alice@example.com", 1)
        yield deferLater(reactor, 0.1, lambda: None)
        # Its own counts go on; nothing is sent any more.
        self.assertEqual(quota.usage("alice@example.com")["messages"], 2)
        spec = quota._messages.spec  # type: ignore[attr-defined]
        [level] = store.applyNow([CounterChange(spec, "s:alice@example.com", 0)])
        self.assertLess(level, 1.5)  # the first message only (it leaks as time goes)
        self.assertGreater(level, 0.5)
