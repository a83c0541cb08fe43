"""
The parts of ``[server] workers``: shard paths and the move of a
single-process spool, the restart policy on a clock, the fan-out of the
control socket and the merge of its answers, worker options and metrics
ports, the supervisor's restarts with a fake process spawner, and the
counts shared over AMP.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.config import ConfigError, configFromDict
from mailgw.control import ControlError
from mailgw.interfaces import IQueueControl, ISharedCounters
from mailgw.limits.shared import CounterChange, TableSpec
from mailgw.queue.spool import SpoolReader
from mailgw.workers import shards
from mailgw.workers.fanout import FanOutControl
from mailgw.workers.listeners import metricsEndpoint
from mailgw.workers.restart import Backoff, RestartPolicy
from mailgw.workers.supervisor import WorkerSupervisor, listenerDescriptions


def shortSocketPath(testCase: Any) -> str:
    """A socket path short enough for AF_UNIX, removed after the test."""
    directory = tempfile.mkdtemp(prefix="mailgw-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "counters.sock")


class ShardTests(SynchronousTestCase):
    def test_paths(self) -> None:
        self.assertEqual(shards.shardDirectory("/s", 0), os.path.join("/s", "shard-0"))
        self.assertEqual(shards.shardDirectory("/s", 12), os.path.join("/s", "shard-12"))
        self.assertRaises(ValueError, shards.shardDirectory, "/s", -1)

    def test_directoriesInIndexOrder(self) -> None:
        spool = Path(self.mktemp())
        for name in ("shard-10", "shard-2", "shard-0", "shard-01", "shard-x", "queue"):
            (spool / name).mkdir(parents=True)
        (spool / "shard-3").write_text("a file, not a shard")
        self.assertEqual(
            shards.shardDirectories(str(spool)),
            [str(spool / "shard-0"), str(spool / "shard-2"), str(spool / "shard-10")],
        )
        self.assertEqual(shards.shardDirectories(str(spool / "missing")), [])

    def test_lockExcludesASecondSupervisor(self) -> None:
        spool = self.mktemp()
        fd = shards.lockSpool(spool)
        self.addCleanup(os.close, fd)
        self.assertRaises(shards.SpoolError, shards.lockSpool, spool)

    def legacySpool(self) -> tuple[str, list[str]]:
        from mailgw.queue.spool import Spool
        from tests.test_spool import ENVELOPE, SESSION

        spool = self.mktemp()
        s = Spool(spool, Clock(), lambda f, *a: succeed(f(*a)))
        ids = []
        for i in range(3):
            writer = s.begin(ENVELOPE, SESSION)
            writer.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
            ids.append(self.successResultOf(writer.commit()))
        s.close()
        return spool, ids

    def test_migrateMovesCommittedMessagesToShard0(self) -> None:
        spool, ids = self.legacySpool()
        queue = Path(spool, "queue")
        (queue / "0000000000000000000A.msg").write_bytes(b"uncommitted")
        self.assertEqual(shards.migrateLegacy(spool), 3)
        moved = sorted(m.queueId for m in SpoolReader(shards.shardDirectory(spool, 0)).pending())
        self.assertEqual(moved, sorted(ids))
        self.assertEqual(sorted(os.listdir(queue)), ["0000000000000000000A.msg"])
        self.assertEqual(shards.migrateLegacy(spool), 0)

    def test_migrateFinishesAnInterruptedMove(self) -> None:
        """A move cut short after the links: the next start finishes it, nothing lost."""
        spool, ids = self.legacySpool()
        shard = Path(shards.shardDirectory(spool, 0), "queue")
        shard.mkdir(parents=True)
        os.link(Path(spool, "queue", ids[0] + ".msg"), shard / (ids[0] + ".msg"))
        self.assertEqual(shards.migrateLegacy(spool), 3)
        moved = sorted(m.queueId for m in SpoolReader(shards.shardDirectory(spool, 0)).pending())
        self.assertEqual(moved, sorted(ids))


class RestartPolicyTests(SynchronousTestCase):
    def test_backoffDoublesThenResetsWhenStable(self) -> None:
        clock = Clock()
        policy = RestartPolicy(Backoff(first=1, longest=8, stable=30))
        delays = []
        for _ in range(6):
            policy.started(clock.seconds())
            clock.advance(2)
            delay = policy.died(clock.seconds())
            delays.append(delay)
            clock.advance(delay)
        self.assertEqual(delays, [0, 1, 2, 4, 8, 8])
        policy.started(clock.seconds())
        clock.advance(31)
        self.assertEqual(policy.died(clock.seconds()), 0)


@attrs.define
class FakeShards:
    """What each shard's control socket answers, and the requests it got."""

    held: dict[str, set[str]]
    down: set[str] = attrs.field(factory=set)
    asked: list[tuple[str, str, tuple[str, ...]]] = attrs.field(factory=list)

    def ask(self, shard: str, command: str, ids: Any, domain: Any) -> dict[str, Any]:
        self.asked.append((shard, command, tuple(ids)))
        if shard in self.down:
            return {"ok": False, "error": "disk on fire", "count": 0}
        if command == "flush" and not ids:
            return {"ok": True, "count": len(self.held[shard])}
        if command == "flush-domain":
            return {"ok": True, "count": 1, "held": 2}
        if command == "reload":
            return {"ok": shard != "s1", "count": 0}
        unknown = [i for i in ids if i not in self.held[shard]]
        if unknown:
            return {"ok": False, "error": f"unknown queue id {unknown[0]}", "count": 0}
        return {"ok": True, "count": len(ids)}


class FanOutTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor as real

        self.fake = FakeShards({"s0": {"A", "B"}, "s1": {"C"}})
        self.control = FanOutControl(real, lambda: ["s0", "s1"], self.fake.ask)

    def test_interface(self) -> None:
        verifyObject(IQueueControl, self.control)

    @inlineCallbacks
    def test_flushAllSumsEveryShard(self) -> Any:
        count = yield self.control.flush(None)
        self.assertEqual(count, 3)

    @inlineCallbacks
    def test_perMessageFindsTheOwningShard(self) -> Any:
        yield self.control.hold("C")
        self.assertIn(("s1", "hold", ("C",)), self.fake.asked)
        yield self.assertFailure(self.control.delete("Z"), KeyError)

    @inlineCallbacks
    def test_anotherErrorIsNotUnknown(self) -> Any:
        self.fake.down.add("s0")
        yield self.assertFailure(self.control.release("C"), ControlError)
        yield self.assertFailure(self.control.flush(None), ControlError)

    @inlineCallbacks
    def test_flushDomainMerges(self) -> Any:
        counts = yield self.control.flushDomain("example.org", True)
        self.assertEqual((counts.started, counts.held), (2, 4))
        self.assertIn(("s0", "flush-domain", ()), self.fake.asked)

    @inlineCallbacks
    def test_reloadAppliedOnlyWhenEveryWorkerApplied(self) -> Any:
        applied = yield self.control.reload()
        self.assertFalse(applied)
        self.fake.held = {"s0": set(), "s2": set()}
        self.control.shards = lambda: ["s0", "s2"]
        applied = yield self.control.reload()
        self.assertTrue(applied)

    @inlineCallbacks
    def test_queueListingMergesShards(self) -> Any:
        """`mailgw queue list` reads every shard (and a single-process spool)."""
        from mailgw.cli.queue import _pending, spoolParts

        spool, ids = ShardTests.legacySpool(self)  # type: ignore[arg-type]
        shards.migrateLegacy(spool)
        other, moreIds = ShardTests.legacySpool(self)  # type: ignore[arg-type]
        os.rename(other, shards.shardDirectory(spool, 1))
        self.assertEqual(len(spoolParts(spool)), 3)

        class Args:
            pass

        args: Any = Args()
        args.spool = spool
        listed = yield succeed(_pending(args))
        self.assertEqual(sorted(m.queueId for m in listed), sorted(ids + moreIds))


class MetricsEndpointTests(SynchronousTestCase):
    def test_portPlusIndex(self) -> None:
        self.assertEqual(metricsEndpoint("tcp:9466:interface=::1", 1), "tcp:9467:interface=::1")
        self.assertEqual(metricsEndpoint("tcp:port=9466", 2), "tcp:port=9468")
        self.assertEqual(
            metricsEndpoint("tcp:0:interface=127.0.0.1", 3), "tcp:0:interface=127.0.0.1"
        )
        self.assertEqual(metricsEndpoint("", 3), "")
        self.assertRaises(ValueError, metricsEndpoint, "unix:/run/m.sock", 1)
        self.assertRaises(ValueError, metricsEndpoint, "tcp:65535", 1)


class ConfigTests(SynchronousTestCase):
    def test_workers(self) -> None:
        self.assertEqual(configFromDict({}).server.workers, 1)
        self.assertEqual(configFromDict({"server": {"workers": 3}}).server.workers, 3)
        auto = configFromDict({"server": {"workers": "auto"}}).server.workers
        self.assertEqual(auto, len(os.sched_getaffinity(0)))
        for bad in (0, -1, "many", True, 1.5):
            with self.assertRaises(ConfigError) as caught:
                configFromDict({"server": {"workers": bad}}, source="f.toml")
            self.assertIn("server.workers", str(caught.exception))

    def test_optionsGiveTheCommandLineAgain(self) -> None:
        from mailgw import tap
        from mailgw.workers.supervisor import optionsArgv

        options = tap.Options()
        argv = ["--config", "x.toml", "--submission", "tcp:1", "--submission", "tcp:2"]
        options.parseOptions([*argv, "--workers", "auto", "--demo"])
        again = tap.Options()
        again.parseOptions(optionsArgv(options))
        self.assertEqual(again.overrides(), options.overrides())
        self.assertEqual(again["demo"], 1)
        self.assertEqual(options.overrides()["server.workers"], "auto")


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[Any] = []

    def signalProcess(self, signum: Any) -> None:
        self.signals.append(signum)


class SupervisorTests(SynchronousTestCase):
    """The supervisor's restarts and signals, with a fake spawner on a clock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.spawned: list[tuple[int, FakeProcess]] = []
        spool = self.mktemp()
        config = configFromDict(
            {
                "server": {"workers": 2, "submission": ["tcp:0:interface=127.0.0.1"]},
                "spool": {"directory": spool},
            }
        )
        self.supervisor = WorkerSupervisor(
            config, self.reactor, lambda index, sockets: ["python", str(index)]
        )
        self.supervisor.ports = []

        def spawnProcess(protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
            process = FakeProcess(1000 + len(self.spawned))
            self.spawned.append((int(args[1]), process))
            return process

        self.reactor.spawnProcess = spawnProcess  # type: ignore[method-assign]
        self.supervisor.descriptions = []

    def test_listenersInGatewayOrder(self) -> None:
        config = configFromDict(
            {"server": {"submission": ["tcp:1"], "submissions": ["tcp:2"]}, "reinject": {}}
        )
        self.assertEqual(listenerDescriptions(config), ["tcp:1", "tcp:2"])

    def test_restartSameIndexWithBackoff(self) -> None:
        for w in self.supervisor.workers:
            self.supervisor.spawn(w.index)
        self.assertEqual([i for i, _ in self.spawned], [0, 1])
        self.reactor.advance(1)
        self.supervisor.ended(1, ProcessTerminated(signal=signal.SIGKILL))
        self.assertEqual(len(self.spawned), 2)
        self.reactor.advance(0)
        self.assertEqual(self.spawned[-1][0], 1)  # the first restart: at once
        self.supervisor.ended(1, ProcessTerminated(exitCode=1))
        self.reactor.advance(0.5)
        self.assertEqual(len(self.spawned), 3)
        self.reactor.advance(0.5)
        self.assertEqual([i for i, _ in self.spawned], [0, 1, 1, 1])

    def test_signalsPassedOnAndStopWaitsForEveryWorker(self) -> None:
        for w in self.supervisor.workers:
            self.supervisor.spawn(w.index)
        self.assertTrue(self.supervisor.reload())
        self.assertEqual([p.signals for _, p in self.spawned], [[signal.SIGHUP]] * 2)
        d = self.supervisor.stopService()
        self.assertEqual([p.signals[-1] for _, p in self.spawned], [signal.SIGTERM] * 2)
        self.supervisor.ended(0, ProcessDone(0))
        self.assertNoResult(d)
        self.supervisor.ended(1, ProcessDone(0))
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(len(self.spawned), 2)  # nothing restarted while stopping


class CounterTests(TestCase):
    """The AMP engine against the supervisor's store on a real UNIX socket."""

    @inlineCallbacks
    def test_workersCountInOneStore(self) -> Any:
        from twisted.internet import reactor

        from mailgw.limits.shared import MemoryCounters
        from mailgw.workers.counters import AMPCounters, CounterService

        path = shortSocketPath(self)
        store = MemoryCounters(reactor)
        service = CounterService(path, store, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        one, two = AMPCounters(reactor, path), AMPCounters(reactor, path)
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        verifyObject(ISharedCounters, one)
        spec = TableSpec("auth-address", 10, 3600)
        yield one.apply([CounterChange(spec, "n:1", 1.0)] * 3)
        levels = yield two.apply([CounterChange(spec, "n:1", 2.0), CounterChange(spec, "n:2", 0)])
        self.assertEqual([round(x) for x in levels], [5, 0])
        many = yield one.apply([CounterChange(spec, f"s:user{i}", 1.0) for i in range(250)])
        self.assertEqual(len(many), 250)
        self.assertEqual(len(store), 251)

    @inlineCallbacks
    def test_unreachableFailsThenReconnects(self) -> Any:
        """No supervisor: apply fails (the limits count locally); later it connects."""
        from twisted.internet import reactor

        from mailgw.limits.shared import MemoryCounters
        from mailgw.workers.counters import AMPCounters, CounterService

        path = shortSocketPath(self)
        engine = AMPCounters(reactor, path)
        self.addCleanup(engine.close)
        spec = TableSpec("quota-messages", 10, 3600)
        yield self.assertFailure(engine.apply([CounterChange(spec, "s:a", 1.0)]), Exception)
        service = CounterService(path, MemoryCounters(reactor), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        levels = yield engine.apply([CounterChange(spec, "s:a", 1.0)])
        self.assertEqual(levels, [1.0])


class StoppedGatewayTests(SynchronousTestCase):
    """With the gateway stopped, hold/release/delete change the shard holding the message."""

    def test_holdInTheOwningShard(self) -> None:
        from mailgw.cli.queue import _inSpools

        spool, ids = ShardTests.legacySpool(self)  # type: ignore[arg-type]
        shards.migrateLegacy(spool)
        other, moreIds = ShardTests.legacySpool(self)  # type: ignore[arg-type]
        os.rename(other, shards.shardDirectory(spool, 1))
        count, errors = _inSpools(spool, "unused", "hold", [moreIds[1], ids[0], "nope"])
        self.assertEqual(count, 2)
        self.assertEqual(errors, ["unknown queue id nope"])
        one = SpoolReader(shards.shardDirectory(spool, 1))
        self.assertTrue(one.load(moreIds[1]).held)
        self.assertFalse(one.load(moreIds[0]).held)
        self.assertTrue(SpoolReader(shards.shardDirectory(spool, 0)).load(ids[0]).held)


class CounterKeyTests(TestCase):
    @inlineCallbacks
    def test_longAndOddKeysStillSent(self) -> Any:
        """Client-chosen keys (long logins, a lone surrogate) never make a batch unsendable."""
        from twisted.internet import reactor

        from mailgw.limits.shared import MemoryCounters
        from mailgw.workers.counters import MAX_KEY, AMPCounters, CounterService

        path = shortSocketPath(self)
        store = MemoryCounters(reactor)
        service = CounterService(path, store, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        engine = AMPCounters(reactor, path)
        self.addCleanup(engine.close)
        spec = TableSpec("auth-account", 10, 3600)
        keys = [f"s:{i}" + "\u00e9" * 2000 for i in range(150)] + ["s:bad\udc80"]
        levels = yield engine.apply([CounterChange(spec, k, 1.0) for k in keys])
        self.assertEqual([round(x) for x in levels], [1] * len(keys))
        again = yield engine.apply([CounterChange(spec, keys[0][: MAX_KEY + 5], 1.0)])
        self.assertEqual([round(x) for x in again], [2])  # cut alike: the same bucket
