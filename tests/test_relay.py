"""
Tests for L{mailgw.relay.relay}: routes, failover, limits and logging in
memory (a Clock and endpoints whose connections the test decides), then real
sessions over loopback with L{tests.upstream}. Host names are mapped to
127.0.0.1 ports by the endpoint factory; no test queries real DNS.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import error as dnserror
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw.config import RelayConfig, Route, Smarthost, TLSMode
from mailgw.envelope import (
    BodyType,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
    splitAddress,
)
from mailgw.interfaces import IRelay
from mailgw.relay.client import RelayTimeouts
from mailgw.relay.clientprotocol import BODY_CHUNK
from mailgw.relay.relay import Relay
from mailgw.relay.routing import Destination, StaticResolver
from tests.upstream import makeTLSFiles, startUpstream

PASSWORD = "pw-Zq81-never-logged"
BODY = b"Subject: hi\r\n\r\nHello.\r\n"
FAST = RelayTimeouts(
    connect=5,
    greeting=5,
    ehlo=5,
    command=5,
    mail=5,
    rcpt=5,
    dataInitiation=5,
    dataBlock=5,
    finalDot=5,
    quit=2,
)


def makeMessage(
    queueId: str = "Q1", recipients: Iterable[str] = ("bob@example.net",), delivered: Any = ()
) -> QueuedMessage:
    recipients = tuple(recipients)
    states = tuple(
        RecipientState(
            splitAddress(r),
            RecipientStatus.DELIVERED if r in delivered else RecipientStatus.PENDING,
        )
        for r in recipients
    )
    envelope = Envelope(splitAddress("alice@example.com"), tuple(s.address for s in states))
    return QueuedMessage(queueId, envelope, Session("192.0.2.9"), 0.0, len(BODY), states)


def openBody(queueId: str) -> io.BytesIO:
    return io.BytesIO(BODY)


def smart(*hosts: str, **kw: Any) -> Route:
    """A smarthost route over plain text, each host on port 25 (the
    endpoint factory maps names to real ports)."""
    kw.setdefault("tls", TLSMode.NONE)
    kw.setdefault("connectTimeout", 5)
    return Route(smarthosts=tuple(Smarthost(h, 25) for h in hosts), **kw)


def texts(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


def attemptLines(events: Sequence[dict[str, Any]]) -> list[str]:
    """The delivery log's lines, their delay (the wall clock's) as 0.00."""
    return [re.sub(r"delay=[0-9.]+", "delay=0.00", t) for t in texts(events) if "to=<" in t]


@implementer(IStreamClientEndpoint)
class PendingEndpoint:
    """An endpoint whose connection attempt the test ends."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.attempt: Deferred[Any] = Deferred()

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return self.attempt

    def refuse(self) -> None:
        self.attempt.errback(error.ConnectionRefusedError())


class MemoryTests(SynchronousTestCase):
    """Limits, grouping and local failures, with no socket at all."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints: list[PendingEndpoint] = []

    def endpointFactory(self, destination: Destination, timeout: float) -> PendingEndpoint:
        endpoint = PendingEndpoint(destination.host)
        self.endpoints.append(endpoint)
        return endpoint

    def makeRelay(self, config: RelayConfig, **kw: Any) -> Relay:
        kw.setdefault("endpointFactory", self.endpointFactory)
        resolver = kw.pop("resolver", StaticResolver())
        return Relay(self.clock, config, resolver, "gw.example.com", openBody, **kw)

    def waiting(self) -> list[str]:
        return [e.host for e in self.endpoints if not e.attempt.called]

    def refuseNext(self) -> None:
        [endpoint] = [e for e in self.endpoints if not e.attempt.called][:1]
        endpoint.refuse()

    def test_verifyObject(self) -> None:
        self.assertTrue(verifyObject(IRelay, self.makeRelay(RelayConfig())))

    def test_defaultEndpoint(self) -> None:
        """Without a factory: a HostnameEndpoint with the route's timeout."""
        relay = Relay(self.clock, RelayConfig(), StaticResolver(), "gw.example.com", openBody)
        route = smart("relay.example.net", connectTimeout=7)
        endpoint = relay.endpointFactory(
            Destination("relay.example.net", 2525, TLSMode.NONE, route), 7
        )
        self.assertIsInstance(endpoint, HostnameEndpoint)
        self.assertEqual(endpoint._timeout, 7)  # type: ignore[attr-defined]
        self.assertEqual(endpoint._port, 2525)  # type: ignore[attr-defined]

    def test_perHostLimitAcrossCalls(self) -> None:
        """
        maxPerHost=1: three batches (two from one call, one from another)
        to one host are made one after the other.
        """
        relay = self.makeRelay(
            RelayConfig(default=smart("a.test")), maxPerHost=1, maxMessagesPerConnection=1
        )
        first = relay.deliverMany([makeMessage("Q1"), makeMessage("Q2")])
        second = relay.deliver(makeMessage("Q3"))
        for remaining in (3, 2, 1):
            self.assertEqual(self.waiting(), ["a.test"], remaining)
            self.refuseNext()
        self.assertEqual(self.waiting(), [])
        results = self.successResultOf(first)
        self.assertEqual(sorted(results), ["Q1", "Q2"])
        [result] = self.successResultOf(second)
        self.assertEqual((result.transient, result.text), (True, "connection refused"))
        self.assertTrue(relay.slots.idle)
        self.assertEqual(relay.slots._active, {})  # idle hosts are forgotten

    def test_routeConnectTimeout(self) -> None:
        """The route's connect timeout bounds the attempt, not timeouts.connect."""
        route = smart("a.test", connectTimeout=7)
        relay = self.makeRelay(RelayConfig(default=route), timeouts=RelayTimeouts(connect=100))
        d = relay.deliver(makeMessage())
        self.clock.advance(6.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        [result] = self.successResultOf(d)
        self.assertEqual((result.transient, result.text), (True, "timeout connecting to upstream"))

    def test_globalLimit(self) -> None:
        """maxConcurrency=2 over three hosts: two attempts at a time."""
        config = RelayConfig(
            default=smart("a.test"),
            domains={"b.test": smart("b.test"), "c.test": smart("c.test")},
        )
        relay = self.makeRelay(config, maxConcurrency=2)
        d = relay.deliver(makeMessage(recipients=["x@a.test", "x@b.test", "x@c.test"]))
        self.assertEqual(self.waiting(), ["a.test", "b.test"])
        self.refuseNext()
        self.assertEqual(self.waiting(), ["b.test", "c.test"])
        self.refuseNext()
        self.refuseNext()
        self.assertEqual([r.transient for r in self.successResultOf(d)], [True] * 3)

    def test_batchesOfMaxMessages(self) -> None:
        """Five messages, at most two per connection: three connections."""
        relay = self.makeRelay(RelayConfig(default=smart("a.test")), maxMessagesPerConnection=2)
        d = relay.deliverMany([makeMessage(f"Q{i}") for i in range(5)])
        self.assertEqual(self.waiting(), ["a.test"] * 3)
        while self.waiting():
            self.refuseNext()
        self.assertEqual(len(self.successResultOf(d)), 5)

    def test_noRoute(self) -> None:
        """No route: transient, saying why; no connection, one log line."""
        relay = self.makeRelay(RelayConfig(domains={"b.test": smart("b.test")}))
        with capturedLogs() as events:
            d = relay.deliver(makeMessage(recipients=["x@a.test"]))
        [result] = self.successResultOf(d)
        self.assertTrue(result.transient)
        self.assertEqual(result.text, "no relay route configured for a.test")
        self.assertEqual(self.endpoints, [])
        self.assertIn(
            "Q1: to=<x@a.test>, relay=none, tls=none, delay=0.00, dsn=4.3.5, status=deferred "
            "(4.3.5 no relay route configured for a.test)",
            texts(events),
        )

    def test_onlyPendingRecipients(self) -> None:
        """Delivered recipients get no result; a finished message gets []."""
        relay = self.makeRelay(RelayConfig())
        done = makeMessage("Q1", ["a@x.test"], delivered={"a@x.test"})
        partly = makeMessage("Q2", ["a@x.test", "b@x.test"], delivered={"a@x.test"})
        results = self.successResultOf(relay.deliverMany([done, partly, done]))
        self.assertEqual(results["Q1"], [])
        self.assertEqual([str(r.recipient) for r in results["Q2"]], ["b@x.test"])

    def test_duplicateRecipient(self) -> None:
        """A recipient listed twice gets two results."""
        relay = self.makeRelay(RelayConfig())
        d = relay.deliver(makeMessage(recipients=["a@x.test", "a@x.test"]))
        self.assertEqual(len(self.successResultOf(d)), 2)

    def test_mxRoutingErrors(self) -> None:
        """Null MX and NXDOMAIN bounce; a DNS server failure waits."""
        resolver = StaticResolver(
            {"null.test": [(0, ".")]}, failures={"broken.test": dnserror.DNSServerError()}
        )
        relay = self.makeRelay(RelayConfig(default=Route(mx=True)), resolver=resolver)
        message = makeMessage(recipients=["a@null.test", "b@nx.test", "c@broken.test"])
        null, nx, broken = self.successResultOf(relay.deliver(message))
        self.assertEqual((null.permanent, null.enhanced), (True, "5.1.10"))
        self.assertIn("null MX", null.text)
        self.assertEqual((nx.permanent, nx.enhanced), (True, "5.1.2"))
        self.assertEqual((broken.transient, broken.enhanced), (True, "4.4.3"))
        self.assertEqual(self.endpoints, [])

    def test_passwordFileUnreadable(self) -> None:
        """
        Missing, empty or non-UTF-8 password file: transient, the file named,
        the password neither in the result nor in the log; no connection.
        """
        base = self.mktemp()
        os.mkdir(base)
        cases = {
            "missing": None,
            "empty": b"\n" + PASSWORD.encode(),
            "latin1": PASSWORD.encode() + b"\xe9\n",
        }
        for name, content in cases.items():
            path = os.path.join(base, name)
            if content is not None:
                with open(path, "wb") as f:
                    f.write(content)
            route = smart("a.test", authUser="relay", authPasswordFile=path)
            relay = self.makeRelay(RelayConfig(default=route))
            with capturedLogs() as events:
                [result] = self.successResultOf(relay.deliver(makeMessage()))
            self.assertTrue(result.transient, name)
            self.assertIn(f"relay password file {path} cannot be read", result.text)
            self.assertNotIn(PASSWORD[:6], result.text)
            self.assertNotIn("xe9", result.text)
            self.assertFalse(any(PASSWORD[:6] in repr(e) for e in events), name)
        self.assertEqual(self.endpoints, [])

    def test_badCAFile(self) -> None:
        """An unusable CA file: transient, with the reason; no connection."""
        missing = os.path.abspath(self.mktemp())
        route = smart("a.test", tls=TLSMode.STARTTLS, caFile=missing)
        relay = self.makeRelay(RelayConfig(default=route))
        [result] = self.successResultOf(relay.deliver(makeMessage()))
        self.assertTrue(result.transient)
        self.assertIn("relay CA file unusable", result.text)
        self.assertIn(missing, result.text)
        self.assertEqual(self.endpoints, [])

    def test_bugBecomesTransient(self) -> None:
        """An endpoint factory that raises: transient, traceback logged."""

        def broken(destination: Destination, timeout: float) -> Any:
            raise RuntimeError("boom")

        relay = self.makeRelay(RelayConfig(default=smart("a.test")), endpointFactory=broken)
        [result] = self.successResultOf(relay.deliver(makeMessage()))
        self.assertTrue(result.transient)
        self.assertEqual(result.text, "internal error in the relay; will retry")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(relay.slots.idle)

    def test_routeLookupBug(self) -> None:
        """Even routeFor raising yields a transient result per recipient."""

        class Broken(RelayConfig):
            def routeFor(self, domain: str, sender: Any = None) -> Route | None:
                raise KeyError(domain)

        relay = self.makeRelay(Broken())
        [result] = self.successResultOf(relay.deliver(makeMessage()))
        self.assertTrue(result.transient)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class ReportTests(SynchronousTestCase):
    """
    deliverMany's report: each message once, as soon as its results are
    known, whatever the others do (issue 13, defect 9).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints: list[PendingEndpoint] = []
        self.reports: list[tuple[str, list[Any]]] = []

    def endpointFactory(self, destination: Destination, timeout: float) -> PendingEndpoint:
        endpoint = PendingEndpoint(destination.host)
        self.endpoints.append(endpoint)
        return endpoint

    def report(self, queueId: str, results: list[Any]) -> None:
        self.reports.append((queueId, results))

    def makeRelay(self, config: RelayConfig, **kw: Any) -> Relay:
        kw.setdefault("endpointFactory", self.endpointFactory)
        return Relay(self.clock, config, StaticResolver(), "gw.example.com", openBody, **kw)

    def end(self, host: str) -> None:
        """Refuse the oldest connection attempt to C{host} still waiting."""
        [e for e in self.endpoints if e.host == host and not e.attempt.called][0].refuse()

    def test_fastReportedWhileSlowInFlight(self) -> None:
        """
        Q1 goes to a slow host, Q2 to a fast one, Q3 to both: Q2 is
        reported while Q1 and Q3 are in flight; Q3 when its last route is
        done; the Deferred fires last, with the same results.
        """
        config = RelayConfig(default=smart("slow.test"), domains={"b.test": smart("fast.test")})
        relay = self.makeRelay(config)
        d = relay.deliverMany(
            [
                makeMessage("Q1", ["x@a.test"]),
                makeMessage("Q2", ["y@b.test"]),
                makeMessage("Q3", ["z@b.test", "w@a.test"]),
            ],
            report=self.report,
        )
        self.assertEqual(self.reports, [])
        self.end("fast.test")
        self.assertEqual([q for q, _ in self.reports], ["Q2"])
        self.assertNoResult(d)
        self.end("slow.test")
        self.assertEqual([q for q, _ in self.reports], ["Q2", "Q1", "Q3"])
        results = self.successResultOf(d)
        self.assertEqual(dict(self.reports), results)
        self.assertEqual([str(r.recipient) for r in results["Q3"]], ["z@b.test", "w@a.test"])

    def test_batchesOfOneHostReportIndependently(self) -> None:
        """Two connections to one host: the one that ends first reports first."""
        relay = self.makeRelay(RelayConfig(default=smart("a.test")), maxMessagesPerConnection=1)
        d = relay.deliverMany([makeMessage("Q1"), makeMessage("Q2")], report=self.report)
        self.endpoints[1].refuse()
        self.assertEqual([q for q, _ in self.reports], ["Q2"])
        self.endpoints[0].refuse()
        self.assertEqual([q for q, _ in self.reports], ["Q2", "Q1"])
        self.successResultOf(d)

    def test_failoverReportsAfterTheLastHost(self) -> None:
        """A transient result at the first host is not reported: the second
        host's is."""
        relay = self.makeRelay(RelayConfig(default=smart("a.test", "b.test")))
        d = relay.deliverMany([makeMessage("Q1")], report=self.report)
        self.end("a.test")
        self.assertEqual(self.reports, [])
        self.end("b.test")
        [(queueId, [result])] = self.reports
        self.assertEqual((queueId, result.remote), ("Q1", "b.test"))
        self.successResultOf(d)

    def test_nothingPendingAndNoRouteAtOnce(self) -> None:
        """A message with nothing pending, or with no route, is reported
        at once; a duplicate queue id once."""
        relay = self.makeRelay(RelayConfig(domains={"b.test": smart("b.test")}))
        done = makeMessage("Q1", ["a@b.test"], delivered={"a@b.test"})
        d = relay.deliverMany(
            [done, makeMessage("Q2", ["a@nowhere.test"]), makeMessage("Q3", ["a@b.test"]), done],
            report=self.report,
        )
        self.assertEqual([(q, len(r)) for q, r in self.reports], [("Q1", 0), ("Q2", 1)])
        self.end("b.test")
        self.assertEqual([q for q, _ in self.reports], ["Q1", "Q2", "Q3"])
        self.successResultOf(d)

    def test_onceEvenWhenReportRaises(self) -> None:
        """A report that raises is logged; the others still come, once each."""

        def report(queueId: str, results: list[Any]) -> None:
            self.reports.append((queueId, results))
            raise ValueError(queueId)

        relay = self.makeRelay(RelayConfig(default=smart("a.test")))
        d = relay.deliverMany([makeMessage("Q1"), makeMessage("Q2")], report=report)
        self.end("a.test")
        self.assertEqual([q for q, _ in self.reports], ["Q1", "Q2"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        results = self.successResultOf(d)
        self.assertEqual(sorted(results), ["Q1", "Q2"])

    def test_onceEvenOnRelayBug(self) -> None:
        """
        A bug after some results are known: every message is reported once,
        its unfinished recipients transient.
        """
        config = RelayConfig(default=smart("a.test"), domains={"b.test": smart("b.test")})
        relay = self.makeRelay(config)
        d = relay.deliverMany(
            [makeMessage("Q1", ["x@b.test"]), makeMessage("Q2", ["y@b.test", "z@a.test"])],
            report=self.report,
        )
        self.end("b.test")
        self.assertEqual([q for q, _ in self.reports], ["Q1"])
        # The connection to a.test goes wrong inside the relay itself.
        [endpoint] = [e for e in self.endpoints if not e.attempt.called]
        endpoint.attempt.callback(object())  # not a protocol: the client chokes
        self.flushLoggedErrors()
        self.assertEqual([q for q, _ in self.reports], ["Q1", "Q2"])
        [y, z] = dict(self.reports)["Q2"]
        self.assertEqual((y.text, z.transient), ("connection refused", True))
        self.assertEqual(self.successResultOf(d)["Q2"], [y, z])

    def test_onceEvenOnRouteLookupBug(self) -> None:
        class Broken(RelayConfig):
            def routeFor(self, domain: str, sender: Any = None) -> Route | None:
                raise KeyError(domain)

        relay = self.makeRelay(Broken())
        d = relay.deliverMany([makeMessage("Q1"), makeMessage("Q2")], report=self.report)
        self.assertEqual(self.flushLoggedErrors(KeyError)[0].type, KeyError)
        self.assertEqual([q for q, _ in self.reports], ["Q1", "Q2"])
        self.assertTrue(all(r.transient for _, rs in self.reports for r in rs))
        self.successResultOf(d)

    def test_slowHostLeavesSlotsForOthers(self) -> None:
        """
        maxConcurrency=4, maxPerHost=4: a slow host with four connections'
        worth of mail gets three; the fourth slot goes to another host's
        first connection, which would otherwise wait for the slow host.
        """
        config = RelayConfig(default=smart("slow.test"), domains={"b.test": smart("fast.test")})
        relay = self.makeRelay(config, maxConcurrency=4, maxPerHost=4, maxMessagesPerConnection=1)
        messages = [makeMessage(f"S{i}") for i in range(4)]
        d = relay.deliverMany([*messages, makeMessage("F", ["a@b.test"])])
        waiting = sorted(e.host for e in self.endpoints if not e.attempt.called)
        self.assertEqual(waiting, ["fast.test", "slow.test", "slow.test", "slow.test"])
        self.end("fast.test")
        # The freed slot is the reserve: it stays free for a new host.
        self.assertEqual(len([e for e in self.endpoints if not e.attempt.called]), 3)
        self.end("slow.test")
        # Now two are free, one above the reserve: the slow host's fourth.
        self.assertEqual(len([e for e in self.endpoints if not e.attempt.called]), 3)
        while [e for e in self.endpoints if not e.attempt.called]:
            self.end("slow.test")
        self.assertEqual(len(self.successResultOf(d)), 5)
        self.assertTrue(relay.slots.idle)


class LoopbackTests(TestCase):
    """Real sessions over 127.0.0.1 with recording upstreams."""

    timeout = 20

    def setUp(self) -> None:
        self.ports: dict[str, int] = {}
        self.connects: list[tuple[str, int, float]] = []

    @inlineCallbacks
    def upstream(self, name: str, **knobs: Any) -> Any:
        upstream = yield startUpstream(reactor, **knobs)
        self.addCleanup(upstream.stop)
        self.ports[name] = upstream.portNumber
        return upstream

    @inlineCallbacks
    def closedPort(self, name: str) -> Any:
        """A port nothing listens on any more: connections are refused."""
        upstream = yield startUpstream(reactor)
        self.ports[name] = upstream.portNumber
        yield upstream.stop()

    def endpointFactory(self, destination: Destination, timeout: float) -> Any:
        self.connects.append((destination.host, destination.port, timeout))
        port = self.ports[destination.host]
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)

    def makeRelay(self, config: RelayConfig, **kw: Any) -> Relay:
        resolver = kw.pop("resolver", StaticResolver())
        kw.setdefault("timeouts", FAST)
        return Relay(
            reactor,
            config,
            resolver,
            "gw.example.com",
            openBody,
            endpointFactory=self.endpointFactory,
            **kw,
        )

    @inlineCallbacks
    def test_startTLSVerifiedAndAuth(self) -> Any:
        """
        STARTTLS with the certificate verified against the route's CA file,
        AUTH PLAIN with the password from a 0600 file; the log line says so.
        """
        base = os.path.abspath(self.mktemp())
        files = makeTLSFiles(base)
        passwordFile = os.path.join(base, "relay-password")
        fd = os.open(passwordFile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(PASSWORD + "\n")
        upstream = yield self.upstream(
            "localhost", tlsOptions=files.serverOptions(), credentials=("relay", PASSWORD)
        )
        route = smart(
            "localhost",
            tls=TLSMode.STARTTLS,
            caFile=files.certificate,
            authUser="relay",
            authPasswordFile=passwordFile,
        )
        with capturedLogs() as events:
            [result] = yield self.makeRelay(RelayConfig(default=route)).deliver(makeMessage())
        self.assertTrue(result.success, result)
        self.assertEqual(result.remote, "localhost")
        [received] = upstream.transactions
        self.assertEqual((received.tls, received.user), (True, "relay"))
        self.assertEqual((received.rcpts, received.data), (("bob@example.net",), BODY))
        port = upstream.portNumber
        [line] = [t for t in texts(events) if "to=<" in t]
        self.assertRegex(
            line,
            rf"^Q1: to=<bob@example.net>, relay=localhost\[127\.0\.0\.1\]:{port}, "
            r"tls=TLSv1\.[23]/[A-Z0-9_-]+, delay=[0-9.]+, dsn=2\.0\.0, "
            r"status=sent \(250 2\.0\.0 Ok: queued\)$",
        )
        self.assertFalse(any("Starting factory" in t for t in texts(events)))
        self.assertFalse(any(PASSWORD in repr(e) for e in events))

    @inlineCallbacks
    def test_untrustedCertificateFailsOver(self) -> Any:
        """A certificate the CA file does not vouch for is transient at
        that host; the next host is tried."""
        base = os.path.abspath(self.mktemp())
        good, other = makeTLSFiles(os.path.join(base, "a")), makeTLSFiles(os.path.join(base, "b"))
        bad = yield self.upstream("localhost", tlsOptions=other.serverOptions())
        yield self.upstream("127.0.0.1", tlsOptions=good.serverOptions())
        route = smart("localhost", "127.0.0.1", tls=TLSMode.STARTTLS, caFile=good.certificate)
        [result] = yield self.makeRelay(RelayConfig(default=route)).deliver(makeMessage())
        self.assertTrue(result.success, result)
        self.assertEqual(result.remote, "127.0.0.1")
        self.assertEqual(bad.transactions, [])

    @inlineCallbacks
    def test_failoverConnectionRefused(self) -> Any:
        yield self.closedPort("a.test")
        second = yield self.upstream("b.test")
        config = RelayConfig(default=smart("a.test", "b.test"))
        [result] = yield self.makeRelay(config).deliver(makeMessage())
        self.assertTrue(result.success, result)
        self.assertEqual(result.remote, "b.test")
        self.assertEqual([c[0] for c in self.connects], ["a.test", "b.test"])
        self.assertEqual(len(second.transactions), 1)

    @inlineCallbacks
    def test_failoverGreeting421(self) -> Any:
        first = yield self.upstream("a.test", greetingReply="421 4.3.2 busy, try later")
        second = yield self.upstream("b.test")
        config = RelayConfig(default=smart("a.test", "b.test"))
        [result] = yield self.makeRelay(config).deliver(makeMessage())
        self.assertTrue(result.success, result)
        self.assertEqual(result.remote, "b.test")
        self.assertEqual((first.connectionCount, len(second.transactions)), (1, 1))

    @inlineCallbacks
    def test_failoverRcpt4xxOnlyTransientRecipients(self) -> Any:
        """
        4xx to one RCPT at the first host: only that recipient goes to the
        second; the others were delivered by the first.
        """
        first = yield self.upstream("a.test", rcptReplies={"b@x.test": "451 4.3.0 later"})
        second = yield self.upstream("b.test")
        config = RelayConfig(default=smart("a.test", "b.test"))
        message = makeMessage(recipients=["a@x.test", "b@x.test", "c@x.test"])
        results = yield self.makeRelay(config).deliver(message)
        self.assertEqual([r.success for r in results], [True, True, True])
        self.assertEqual([r.remote for r in results], ["a.test", "b.test", "a.test"])
        self.assertEqual(first.transactions[0].rcpts, ("a@x.test", "c@x.test"))
        self.assertEqual(second.transactions[0].rcpts, ("b@x.test",))

    @inlineCallbacks
    def test_permanentIsNotRetried(self) -> Any:
        """5xx for one of three: two delivered, one permanent, and the
        second host is never contacted."""
        yield self.upstream("a.test", rcptReplies={"b@x.test": "550 5.1.1 no such user"})
        second = yield self.upstream("b.test")
        config = RelayConfig(default=smart("a.test", "b.test"))
        message = makeMessage(recipients=["a@x.test", "b@x.test", "c@x.test"])
        with capturedLogs() as events:
            results = yield self.makeRelay(config).deliver(message)
        self.assertEqual([r.success for r in results], [True, False, True])
        bounced = results[1]
        self.assertEqual(
            (bounced.permanent, bounced.code, bounced.enhanced, bounced.remote),
            (True, 550, "5.1.1", "a.test"),
        )
        self.assertEqual(second.connectionCount, 0)
        port = self.ports["a.test"]
        self.assertIn(
            f"Q1: to=<b@x.test>, relay=a.test[127.0.0.1]:{port}, tls=none, delay=0.00, "
            "dsn=5.1.1, status=bounced (550 5.1.1 no such user)",
            attemptLines(events),
        )

    @inlineCallbacks
    def test_transientEverywhereKeepsTheLastHost(self) -> Any:
        yield self.upstream("a.test", rcptReplies={"a@x.test": "450 4.2.0 first"})
        yield self.upstream("b.test", rcptReplies={"a@x.test": "452 4.2.2 second"})
        config = RelayConfig(default=smart("a.test", "b.test"))
        [result] = yield self.makeRelay(config).deliver(makeMessage(recipients=["a@x.test"]))
        self.assertTrue(result.transient)
        self.assertEqual((result.code, result.remote, result.text), (452, "b.test", "second"))

    @inlineCallbacks
    def test_domainRouteAndDefault(self) -> Any:
        """
        Recipients split between the default route and a domain route, one
        connection each, results in the message's order.
        """
        default = yield self.upstream("default.test")
        special = yield self.upstream("special.test")
        config = RelayConfig(
            default=smart("default.test"), domains={"example.org": smart("special.test")}
        )
        message = makeMessage(
            recipients=["a@example.net", "b@EXAMPLE.org", "c@other.test", "d@example.org"]
        )
        results = yield self.makeRelay(config).deliver(message)
        self.assertEqual(
            [(str(r.recipient), r.success, r.remote) for r in results],
            [
                ("a@example.net", True, "default.test"),
                ("b@EXAMPLE.org", True, "special.test"),
                ("c@other.test", True, "default.test"),
                ("d@example.org", True, "special.test"),
            ],
        )
        self.assertEqual((default.connectionCount, special.connectionCount), (1, 1))
        self.assertEqual(default.transactions[0].rcpts, ("a@example.net", "c@other.test"))
        self.assertEqual(special.transactions[0].rcpts, ("b@EXAMPLE.org", "d@example.org"))

    @inlineCallbacks
    def test_mxPreferenceOrder(self) -> Any:
        """The lower preference first (it refuses with 421), then the next;
        port 25 is asked of the endpoint factory."""
        best = yield self.upstream("mx1.test", greetingReply="421 4.7.0 not now")
        backup = yield self.upstream("mx2.test")
        resolver = StaticResolver({"example.com": [(20, "mx2.test"), (10, "mx1.test")]})
        config = RelayConfig(default=Route(mx=True, tls=TLSMode.NONE, connectTimeout=5))
        relay = self.makeRelay(config, resolver=resolver)
        [result] = yield relay.deliver(makeMessage(recipients=["u@example.com"]))
        self.assertTrue(result.success, result)
        self.assertEqual(result.remote, "mx2.test")
        self.assertEqual(self.connects, [("mx1.test", 25, 5), ("mx2.test", 25, 5)])
        self.assertEqual((best.connectionCount, len(backup.transactions)), (1, 1))

    @inlineCallbacks
    def test_noMXMeansTheDomainItself(self) -> Any:
        upstream = yield self.upstream("nomx.test")
        resolver = StaticResolver({"nomx.test": []})
        config = RelayConfig(default=Route(mx=True, tls=TLSMode.NONE, connectTimeout=5))
        relay = self.makeRelay(config, resolver=resolver)
        [result] = yield relay.deliver(makeMessage(recipients=["u@nomx.test"]))
        self.assertTrue(result.success, result)
        self.assertEqual(result.remote, "nomx.test")
        self.assertEqual(len(upstream.transactions), 1)

    @inlineCallbacks
    def test_severalMessagesOneConnection(self) -> Any:
        upstream = yield self.upstream("a.test")
        messages = [makeMessage(f"Q{i}", [f"r{i}@x.test"]) for i in range(3)]
        results = yield self.makeRelay(RelayConfig(default=smart("a.test"))).deliverMany(messages)
        self.assertEqual(
            {q: [r.success for r in rs] for q, rs in results.items()},
            {"Q0": [True], "Q1": [True], "Q2": [True]},
        )
        self.assertEqual(upstream.connectionCount, 1)
        self.assertEqual(
            [t.rcpts for t in upstream.transactions],
            [("r0@x.test",), ("r1@x.test",), ("r2@x.test",)],
        )

    @inlineCallbacks
    def test_perHostLimitSeenByUpstream(self) -> Any:
        """
        Three one-message batches at once: with maxPerHost=1 the upstream
        never has two connections open; with 3 (the control) it does.
        """
        for limit, overlapping in ((1, False), (3, True)):
            upstream = yield self.upstream(f"h{limit}.test")
            peak = trackPeak(upstream)
            messages = [makeMessage(f"Q{i}") for i in range(3)]
            relay = self.makeRelay(
                RelayConfig(default=smart(f"h{limit}.test")),
                maxPerHost=limit,
                maxMessagesPerConnection=1,
            )
            results = yield relay.deliverMany(messages)
            self.assertTrue(all(r.success for rs in results.values() for r in rs))
            self.assertEqual(upstream.connectionCount, 3)
            self.assertEqual(peak[0] > 1, overlapping, (limit, peak))

    @inlineCallbacks
    def test_fastUpstreamReportedWhileSlowStalls(self) -> Any:
        """
        Issue 13, defect 9, over real sockets: one upstream stalls at the
        final dot; the message to the other is reported sent while the
        stalled one is still in flight.
        """
        slow = yield self.upstream("slow.test", stallAt="dot")
        yield self.upstream("fast.test")
        config = RelayConfig(default=smart("slow.test"), domains={"b.test": smart("fast.test")})
        reported: Deferred[Any] = Deferred()
        reports: list[tuple[str, list[Any]]] = []

        def report(queueId: str, results: list[Any]) -> None:
            reports.append((queueId, results))
            if queueId == "Q2":
                reported.callback(None)

        relay = self.makeRelay(config)
        d = relay.deliverMany(
            [makeMessage("Q1", ["a@a.test"]), makeMessage("Q2", ["b@b.test"])], report=report
        )
        yield reported
        [(queueId, [result])] = reports
        self.assertEqual((queueId, result.success), ("Q2", True))
        self.assertFalse(d.called)
        yield slow.stop()  # the stalled session ends: connection lost
        results = yield d
        self.assertEqual([q for q, _ in reports], ["Q2", "Q1"])
        self.assertTrue(results["Q1"][0].transient)

    @inlineCallbacks
    def test_fourSlowUpstreamsDoNotStallTheRest(self) -> Any:
        """
        Issue 13, defect 9: four upstreams that never answer, with mail
        enough to fill every slot (maxConcurrency 8, maxPerHost 2), and a
        fast one: the fast one's message is delivered and reported while
        all four still hold their connections.
        """
        slow = []
        for i in range(4):
            upstream = yield self.upstream(f"slow{i}.test", stallAt="greeting")
            slow.append(upstream)
        yield self.upstream("fast.test")
        config = RelayConfig(
            default=smart("fast.test"),
            domains={f"d{i}.test": smart(f"slow{i}.test") for i in range(4)},
        )
        patient = attrs.evolve(FAST, greeting=120)
        relay = self.makeRelay(
            config, maxConcurrency=8, maxPerHost=2, maxMessagesPerConnection=1, timeouts=patient
        )
        messages = [makeMessage(f"S{i}{j}", [f"x@d{i}.test"]) for i in range(4) for j in range(3)]
        reported: Deferred[Any] = Deferred()
        reports: list[str] = []

        def report(queueId: str, results: list[Any]) -> None:
            reports.append(queueId)
            if queueId == "F":
                reported.callback(results)

        d = relay.deliverMany([*messages, makeMessage("F", ["y@fast.test"])], report=report)
        [result] = yield reported
        self.assertTrue(result.success, result)
        self.assertEqual(reports, ["F"])
        # Second connections stopped at the reserve (2 of 8): slow0-2 got two
        # each, slow3 only its first (from the reserve), fast.test the last.
        active = [relay.slots.active(f"slow{i}.test") for i in range(4)]
        self.assertEqual(active, [2, 2, 2, 1])
        for upstream in slow:
            yield upstream.stop()
        results = yield d
        self.assertEqual(len(results), 13)
        self.assertTrue(relay.slots.idle)

    @inlineCallbacks
    def test_bodyReadInThreads(self) -> Any:
        """
        With the default runBlocking (the reactor's thread pool) the spool
        file is opened and read off the reactor thread, in chunks of at
        most BODY_CHUNK octets.
        """
        upstream = yield self.upstream("a.test")
        body = b"x" * (3 * BODY_CHUNK) + b"\r\n"
        threads: list[bool] = []
        reads: list[int] = []

        class Recording(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                threads.append(threading.current_thread() is threading.main_thread())
                reads.append(-1 if size is None else size)
                return super().read(size)

        def opener(queueId: str) -> Recording:
            threads.append(threading.current_thread() is threading.main_thread())
            return Recording(body)

        relay = Relay(
            reactor,
            RelayConfig(default=smart("a.test")),
            StaticResolver(),
            "gw.example.com",
            opener,
            timeouts=FAST,
            endpointFactory=self.endpointFactory,
        )
        [result] = yield relay.deliver(makeMessage())
        self.assertTrue(result.success, result)
        self.assertEqual(upstream.transactions[0].data, body)
        self.assertTrue(threads)
        self.assertNotIn(True, threads)
        self.assertEqual(set(reads), {BODY_CHUNK})

    @inlineCallbacks
    def test_eightBitEnvelopeSendsBody8BITMIME(self) -> Any:
        """
        Issue 15: a message whose envelope says 8BITMIME (as the spool
        records for 8-bit content) goes up with BODY=8BITMIME; a 7-bit one
        without it.
        """
        upstream = yield self.upstream("a.test")
        eight = makeMessage("Q1")
        eight = attrs.evolve(
            eight, envelope=attrs.evolve(eight.envelope, body=BodyType.EIGHTBITMIME)
        )
        results = yield self.makeRelay(RelayConfig(default=smart("a.test"))).deliverMany(
            [eight, makeMessage("Q2")]
        )
        self.assertTrue(all(rs[0].success for rs in results.values()), results)
        self.assertEqual([t.mailParams for t in upstream.transactions], [("BODY=8BITMIME",), ()])


def trackPeak(upstream: Any) -> list[int]:
    """Record the most connections the upstream ever had open at once."""
    peak = [0]

    class Tracking(set):  # type: ignore[type-arg]
        def add(self, item: Any) -> None:
            super().add(item)
            peak[0] = max(peak[0], len(self))

    upstream.factory.protocols = Tracking()
    return peak
