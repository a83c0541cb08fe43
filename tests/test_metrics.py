"""
The metrics object (no global registry), the queue gauges, the relay's and
the throttle's counts, and the Grafana dashboard in docs/grafana/, whose
every expression must name metrics the gateway exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import LimitsConfig
from mailgw.limits import AuthThrottle
from mailgw.metrics import Metrics, metricNames

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "mailgw.json"
_NAME = re.compile(r"\bmailgw_[a-z0-9_]+")


class _Queue:
    def __init__(self, size: int, oldest: float | None) -> None:
        self.size, self.oldest = size, oldest

    def queueGauges(self) -> tuple[int, float | None]:
        return self.size, self.oldest


def allMetrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.watchQueue(_Queue(0, None), Clock())
    return metrics


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        for value in node.values():
            found += expressions(value)
        return found
    if isinstance(node, list):
        return [e for value in node for e in expressions(value)]
    return []


class RegistryTests(SynchronousTestCase):
    def test_ownRegistry(self) -> None:
        """Two gateways in one process count apart; the global registry stays clean."""
        one, two = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
        one.messageAccepted(100, 0.01)
        self.assertEqual(one.registry.get_sample_value("mailgw_messages_accepted_total"), 1)
        self.assertEqual(two.registry.get_sample_value("mailgw_messages_accepted_total"), 0)
        exported = metricNames(prometheus_client.REGISTRY)
        self.assertFalse({n for n in exported if n.startswith("mailgw_")})

    def test_everyNamePrefixed(self) -> None:
        names = metricNames(allMetrics().registry)
        self.assertIn("mailgw_messages_accepted_total", names)
        self.assertIn("mailgw_queue_oldest_age_seconds", names)
        self.assertEqual({n for n in names if not n.startswith("mailgw_")}, set())

    def test_queueGauges(self) -> None:
        clock = Clock()
        clock.advance(1000)
        queue = _Queue(0, None)
        metrics = Metrics(CollectorRegistry())
        metrics.watchQueue(queue, clock)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("mailgw_queue_messages"), 0)
        self.assertEqual(value("mailgw_queue_oldest_age_seconds"), 0)
        queue.size, queue.oldest = 3, 400.0
        self.assertEqual(value("mailgw_queue_messages"), 3)
        self.assertEqual(value("mailgw_queue_oldest_age_seconds"), 600)

    def test_throttleDecisions(self) -> None:
        """The AUTH throttle counts each decision that refuses, by reason and action."""
        metrics = Metrics(CollectorRegistry())
        throttle = AuthThrottle(Clock(), LimitsConfig(authConcurrentTotal=1))
        throttle.metrics = metrics
        first = throttle.begin("192.0.2.1", "a@example.com", "PLAIN")
        second = throttle.begin("192.0.2.2", "b@example.com", "PLAIN")
        self.assertFalse(first.refuse)
        self.assertTrue(second.refuse)
        labels = {"reason": second.reason, "action": "refuse"}
        self.assertEqual(
            metrics.registry.get_sample_value("mailgw_throttle_decisions_total", labels), 1
        )


class DashboardTests(SynchronousTestCase):
    def test_expressionsNameExportedMetrics(self) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = expressions(dashboard)
        self.assertGreaterEqual(len(exprs), 10)
        exported = metricNames(allMetrics().registry)
        used = set()
        for expr in exprs:
            names = set(_NAME.findall(expr))
            self.assertTrue(names, f"no mailgw metric in {expr!r}")
            self.assertEqual(names - exported, set(), expr)
            used |= names
        # Every metric the gateway exports has a panel.
        bases = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported}
        shown = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used}
        self.assertEqual(bases - shown, set())


class RelayMetricsTests(SynchronousTestCase):
    def test_attemptCounted(self) -> None:
        """Each recipient's result by relay host and status; the attempt's duration."""
        from mailgw.config import RelayConfig
        from tests.test_relay import MemoryTests, makeMessage, smart

        memory = MemoryTests()
        memory.setUp()
        relay = memory.makeRelay(RelayConfig(default=smart("A.test", connectTimeout=7)))
        metrics = Metrics(CollectorRegistry())
        relay.metrics = metrics
        d = relay.deliver(makeMessage(recipients=["x@a.test", "y@a.test"]))
        memory.clock.advance(7)
        self.assertEqual(len(self.successResultOf(d)), 2)
        value = metrics.registry.get_sample_value
        labels = {"relay": "a.test", "status": "deferred"}
        self.assertEqual(value("mailgw_delivery_attempts_total", labels), 2)
        self.assertEqual(value("mailgw_relay_attempt_seconds_count", {"relay": "a.test"}), 1)
        self.assertEqual(value("mailgw_relay_attempt_seconds_sum", {"relay": "a.test"}), 7)


class BounceMetricsTests(SynchronousTestCase):
    def test_bounceCounted(self) -> None:
        from tests.test_runner import BOB, CAROL, RunnerTestCase, permanent

        case = RunnerTestCase()
        case.setUp()
        case.submit(BOB, CAROL)
        case.relay.script[str(CAROL)] = [permanent("550 5.1.1 no such user")]
        runner = case.makeRunner()
        metrics = Metrics(CollectorRegistry())
        runner.metrics = metrics
        metrics.watchQueue(runner, case.clock)
        runner.startService()
        self.assertEqual(len(case.dsns()), 1)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("mailgw_bounces_total", {"kind": "bounce"}), 1)
        self.assertEqual(value("mailgw_queue_messages"), 0)


class ShowConfigTests(SynchronousTestCase):
    def test_metricsShown(self) -> None:
        """`mailgw show-config` prints [metrics], and reads back the same."""
        import tomllib

        from mailgw.cli.show import render
        from mailgw.config import configFromDict

        config = configFromDict({"metrics": {"listen": "tcp:port=9466:interface=127.0.0.1"}})
        text = render(config, changed=True)
        self.assertIn('[metrics]\nlisten = "tcp:port=9466:interface=127.0.0.1"', text)
        self.assertEqual(configFromDict(tomllib.loads(text)), config)
