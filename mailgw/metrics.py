"""
The gateway's Prometheus metrics (docs/metrics.md).

L{Metrics} holds every metric, registered in the
L{prometheus_client.CollectorRegistry} it is given: library code never
touches prometheus-client's global registry, so tests and embedders each get
their own. The parts of the gateway that count hold an optional
L{Metrics} (``None`` when metrics are off: the hot path then pays one
``is None`` test). Queue gauges are read from the queue runner when scraped
(L{QueueCollector}), never kept up to date by hand.

Label values come from a closed set (listener names, reply codes, TLS
versions, mechanisms the server offers, the configured relay hosts), never
from what a client chose, so a client cannot grow the label space.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Every metric name this module exports (the dashboard test checks against it).
PREFIX = "mailgw_"

# Seconds: an fsync'd commit takes milliseconds; a relay attempt may take a minute.
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class QueueView(Protocol):
    """What the queue gauges read (L{mailgw.queue.runner.QueueRunner} provides it)."""

    def queueGauges(self) -> tuple[int, float | None]:
        """The number of messages queued and the arrival time of the oldest (None: empty)."""


class QueueCollector(Collector):
    """``mailgw_queue_messages`` and ``mailgw_queue_oldest_age_seconds``, read when scraped."""

    def __init__(self, queue: QueueView, clock: Any) -> None:
        self.queue, self.clock = queue, clock

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families(0, None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size, oldest = self.queue.queueGauges()
        return self._families(size, oldest)

    def _families(self, size: int, oldest: float | None) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "mailgw_queue_messages", "Messages in the queue (held ones included).", value=size
        )
        age = 0.0 if oldest is None else max(0.0, self.clock.seconds() - oldest)
        yield GaugeMetricFamily(
            "mailgw_queue_oldest_age_seconds",
            "Age of the oldest message in the queue (0 when empty).",
            value=age,
        )


class Metrics:
    """
    The gateway's counters and histograms, registered in ``registry``.
    Each method is one event the gateway counts.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        self.connections = counter(
            "connections", "Client connections, by listener and outcome.", ("listener", "outcome")
        )
        self.tlsHandshakes = counter(
            "tls_handshakes", "Completed server TLS handshakes, by protocol version.", ("version",)
        )
        self.tlsFailures = counter(
            "tls_handshake_failures", "Server TLS handshakes that did not complete.", ("listener",)
        )
        self.authAttempts = counter(
            "auth_attempts", "AUTH attempts, by mechanism and result.", ("mechanism", "result")
        )
        self.throttle = counter(
            "throttle_decisions",
            "Abuse-defence decisions that delayed, refused or disconnected.",
            ("reason", "action"),
        )
        self.accepted = counter("messages_accepted", "Messages queued (250 after DATA).")
        self.refused = counter(
            "messages_refused", "Messages refused at the end of DATA, by reply code.", ("code",)
        )
        self.acceptedBytes = counter("accepted_bytes", "Octets of the messages queued.")
        self.deliveries = counter(
            "delivery_attempts",
            "Recipient results of relay attempts, by relay host and status.",
            ("relay", "status"),
        )
        self.tlsrptFailures = counter(
            "tlsrpt_failures",
            "Outbound TLS policy failures as TLS-RPT (RFC 8460) counts them, by policy "
            "domain, policy type (sts, tlsa, no-policy-found) and result type.",
            ("policy_domain", "policy_type", "result_type"),
        )
        self.bounces = counter(
            "bounces", "Delivery status notifications queued, by kind.", ("kind",)
        )
        self.webhooks = counter(
            "webhook_deliveries",
            "Webhook deliveries, by outcome (sent, retried, failed, dropped).",
            ("outcome",),
        )
        self.sharedUp = Gauge(
            PREFIX + "shared_limits_up",
            "1 while the shared limits engine answers; 0 while counting locally (or no engine).",
            registry=registry,
        )
        self.sharedErrors = counter(
            "shared_limits_errors", "Batches the shared limits engine failed or did not answer."
        )
        self.commitSeconds = Histogram(
            PREFIX + "spool_commit_seconds",
            "Time from the end of DATA's checks to the durable commit (fsync).",
            buckets=_COMMIT_BUCKETS,
            registry=registry,
        )
        self.relaySeconds = Histogram(
            PREFIX + "relay_attempt_seconds",
            "Duration of one relay connection attempt (connect to QUIT), by relay host.",
            ("relay",),
            buckets=_RELAY_BUCKETS,
            registry=registry,
        )

    def watchQueue(self, queue: QueueView, clock: Any) -> None:
        """Export ``queue``'s gauges from now on."""
        self.registry.register(QueueCollector(queue, clock))

    # -- events ---------------------------------------------------------------

    def connectionClosed(self, listener: str, outcome: str) -> None:
        self.connections.labels(listener, outcome).inc()

    def tlsHandshake(self, version: str) -> None:
        self.tlsHandshakes.labels(version).inc()

    def tlsFailed(self, listener: str) -> None:
        self.tlsFailures.labels(listener).inc()

    def authAttempt(self, mechanism: str, result: str) -> None:
        self.authAttempts.labels(mechanism, result).inc()

    def throttleDecision(self, reason: str, action: str) -> None:
        self.throttle.labels(reason, action).inc()

    def messageAccepted(self, size: int, commitSeconds: float) -> None:
        self.accepted.inc()
        self.acceptedBytes.inc(size)
        self.commitSeconds.observe(max(0.0, commitSeconds))

    def messageRefused(self, code: int) -> None:
        self.refused.labels(str(code)).inc()

    def delivery(self, relay: str, status: str) -> None:
        self.deliveries.labels(relay, status).inc()

    def relayAttempt(self, relay: str, seconds: float) -> None:
        self.relaySeconds.labels(relay).observe(max(0.0, seconds))

    def tlsFailure(self, policyDomain: str, policyType: str, resultType: str) -> None:
        self.tlsrptFailures.labels(policyDomain, policyType, resultType).inc()

    def bounce(self, kind: str) -> None:
        self.bounces.labels(kind).inc()

    def webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def sharedLimitsUp(self, up: bool) -> None:
        self.sharedUp.set(1 if up else 0)

    def sharedLimitsError(self) -> None:
        self.sharedErrors.inc()


def metricNames(registry: CollectorRegistry) -> set[str]:
    """
    Every series name ``registry`` exports or will export (with the
    ``_total``, ``_bucket``, ``_count`` and ``_sum`` suffixes), also for
    labelled metrics that have counted nothing yet.
    """
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
    }
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names
