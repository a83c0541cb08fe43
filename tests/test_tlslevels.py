"""
Tests for the relay's TLS levels, MTA-STS and DANE over real sessions on
127.0.0.1 (mailgw.relay.tlspolicy, mailgw.relay.relay, mailgw.relay.client):
an in-memory DNS with a controllable AD bit (L{StaticDNS}), upstreams with
self-signed, mismatched and CA-issued certificates.
"""

from __future__ import annotations

import io
import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw import tls
from mailgw.config import QueueConfig, RelayConfig, Route, Smarthost, TLSLevel, TLSMode
from mailgw.envelope import Envelope, QueuedMessage, RecipientState, Session, splitAddress
from mailgw.metrics import Metrics
from mailgw.queue.runner import QueueRunner
from mailgw.relay.client import deliverBatch
from mailgw.relay.clientsettings import Attempt, RelaySettings
from mailgw.relay.mtasts import MTASTSPolicies
from mailgw.relay.relay import Relay
from mailgw.relay.routing import Destination
from mailgw.relay.staticdns import StaticDNS
from mailgw.relay.tlspolicy import TLSPolicy
from mailgw.testing import MemorySpool
from mailgw.tls.peercheck import NameCheck
from tests.pki import TestCA
from tests.test_relay import BODY, FAST, texts
from tests.upstream import makeTLSFiles, startUpstream

DOMAIN = "example.org"
MX = "mx.example.org"
POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: *.example.org\r\nmax_age: 86400\r\n"


def message(sender: str = "alice@example.com", rcpt: str = f"bob@{DOMAIN}") -> QueuedMessage:
    state = RecipientState(splitAddress(rcpt))
    envelope = Envelope(splitAddress(sender), (state.address,))
    return QueuedMessage("Q1", envelope, Session("192.0.2.9"), 0.0, len(BODY), (state,))


def mxRoute(level: TLSLevel = TLSLevel.MAY, **kw: Any) -> Route:
    return Route(mx=True, tlsLevel=level, connectTimeout=5, **kw)


class TLSLevelTests(TestCase):
    """One MX (``mx.example.org``) per test unless said otherwise."""

    timeout = 20

    def setUp(self) -> None:
        self.ports: dict[str, int] = {}
        base = os.path.abspath(self.mktemp())
        self.ca = TestCA(os.path.join(base, "ca"))
        self.selfSigned = makeTLSFiles(os.path.join(base, "self"))
        self.metrics = Metrics(CollectorRegistry())
        self.fetched: list[str] = []
        self.policies: dict[str, bytes] = {}

    @inlineCallbacks
    def upstream(self, name: str = MX, **knobs: Any) -> Any:
        upstream = yield startUpstream(reactor, **knobs)
        self.addCleanup(upstream.stop)
        self.ports[name] = upstream.portNumber
        return upstream

    def endpoint(self, destination: Destination, timeout: float) -> Any:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports[destination.host], timeout=5)

    def fetch(self, domain: str) -> Any:
        self.fetched.append(domain)
        return succeed(self.policies[domain])

    def relay(self, route: Route, dns: StaticDNS | None = None, **kw: Any) -> Relay:
        dns = dns or StaticDNS({DOMAIN: [(10, MX)]})
        policies = MTASTSPolicies(reactor, dns, self.fetch)
        relay = Relay(
            reactor,
            RelayConfig(default=route, **kw),
            dns,
            "gw.example.com",
            lambda queueId: io.BytesIO(BODY),
            endpointFactory=self.endpoint,
            timeouts=FAST,
            tlsPolicy=TLSPolicy(mtasts=policies, secureResolver=dns),
        )
        relay.metrics = self.metrics
        return relay

    def failures(self, **labels: str) -> float:
        """The TLS-RPT failures counted with these labels (others any)."""
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name != "mailgw_tlsrpt_failures_total":
                    continue
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    # -- may, encrypt, verify, secure ---------------------------------------

    @inlineCallbacks
    def test_mayDeliversToSelfSigned(self) -> Any:
        """The common MX: a self-signed certificate. ``may`` uses TLS, unverified."""
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        [result] = yield self.relay(mxRoute()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [True])

    @inlineCallbacks
    def test_mayWithoutSTARTTLS(self) -> Any:
        upstream = yield self.upstream()
        [result] = yield self.relay(mxRoute()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [False])

    @inlineCallbacks
    def test_mayGoesOnWhenSTARTTLSRefused(self) -> Any:
        upstream = yield self.upstream(
            tlsOptions=self.selfSigned.serverOptions(), starttlsReply="454 4.7.0 TLS not now"
        )
        [result] = yield self.relay(mxRoute()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [False])

    @inlineCallbacks
    def test_mayReconnectsInPlainTextWhenTheHandshakeFails(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions(), brokenTLS=True)
        with capturedLogs() as events:
            [result] = yield self.relay(mxRoute()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual(upstream.connectionCount, 2)
        self.assertEqual([t.tls for t in upstream.transactions], [False])
        self.assertTrue(any("trying again without TLS" in t for t in texts(events)))

    @inlineCallbacks
    def test_encryptRefusesPlainText(self) -> Any:
        upstream = yield self.upstream()
        [result] = yield self.relay(mxRoute(TLSLevel.ENCRYPT)).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertIn("did not offer STARTTLS", result.text)
        self.assertEqual(upstream.transactions, [])

    @inlineCallbacks
    def test_encryptBrokenHandshakeIsDeferred(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions(), brokenTLS=True)
        [result] = yield self.relay(mxRoute(TLSLevel.ENCRYPT)).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual((upstream.connectionCount, upstream.transactions), (1, []))

    @inlineCallbacks
    def test_encryptDeliversToSelfSigned(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        [result] = yield self.relay(mxRoute(TLSLevel.ENCRYPT)).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [True])

    @inlineCallbacks
    def test_verifyRefusesSelfSigned(self) -> Any:
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        route = mxRoute(TLSLevel.VERIFY, caFile=self.ca.rootFile)
        [result] = yield self.relay(route).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual(upstream.transactions, [])

    @inlineCallbacks
    def test_verifyDeliversToIssuedCertificate(self) -> Any:
        leaf = self.ca.issue(MX)
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions())
        route = mxRoute(TLSLevel.VERIFY, caFile=self.ca.rootFile)
        [result] = yield self.relay(route).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual(len(upstream.transactions), 1)

    @inlineCallbacks
    def test_secureChecksTheNextHopNotTheMXName(self) -> Any:
        """
        ``secure`` without tls_match: the certificate must name the
        recipient domain or a subdomain of it; the MX name alone (from DNS)
        does not count.
        """
        outside = self.ca.issue("mx.attacker.example")
        upstream = yield self.upstream(tlsOptions=outside.serverOptions())
        dns = StaticDNS({DOMAIN: [(10, MX)]})
        route = mxRoute(TLSLevel.SECURE, caFile=self.ca.rootFile)
        [result] = yield self.relay(route, dns).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertIn("certificate names none of", result.text)
        self.assertEqual(upstream.transactions, [])
        self.assertEqual(
            self.failures(policy_domain=DOMAIN, result_type="certificate-host-mismatch"), 1
        )

    @inlineCallbacks
    def test_secureAcceptsASubdomainOfTheNextHop(self) -> Any:
        leaf = self.ca.issue("smtp.example.org")
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions())
        route = mxRoute(TLSLevel.SECURE, caFile=self.ca.rootFile)
        [result] = yield self.relay(route).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual(len(upstream.transactions), 1)

    @inlineCallbacks
    def test_secureSmarthostWithTLSMatch(self) -> Any:
        leaf = self.ca.issue("relay.provider.example")
        yield self.upstream("smtp.provider.example", tlsOptions=leaf.serverOptions())
        route = Route(
            smarthosts=(Smarthost("smtp.provider.example", 25),),
            tlsLevel=TLSLevel.SECURE,
            tlsMatch=(".provider.example",),
            caFile=self.ca.rootFile,
            connectTimeout=5,
        )
        [result] = yield self.relay(route).deliver(message())
        self.assertTrue(result.success, result)
        other = Route(
            smarthosts=(Smarthost("smtp.provider.example", 25),),
            tlsLevel=TLSLevel.SECURE,
            tlsMatch=("provider.example",),
            caFile=self.ca.rootFile,
            connectTimeout=5,
        )
        [result] = yield self.relay(other).deliver(message())
        self.assertTrue(result.transient, result)

    # -- MTA-STS ---------------------------------------------------------------

    def stsDNS(self, *mx: str, policyId: str = "20260101") -> StaticDNS:
        return StaticDNS(
            {DOMAIN: [(10 * (i + 1), host) for i, host in enumerate(mx or (MX,))]},
            txt={f"_mta-sts.{DOMAIN}": [f"v=STSv1; id={policyId};"]},
        )

    @inlineCallbacks
    def test_stsEnforceRefusesUnverifiedTLS(self) -> Any:
        self.policies[DOMAIN] = POLICY
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        route = mxRoute(mtaSts=True, caFile=self.ca.rootFile)
        [result] = yield self.relay(route, self.stsDNS()).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual(upstream.transactions, [])
        self.assertEqual(self.fetched, [DOMAIN])
        self.assertEqual(
            self.failures(
                policy_domain=DOMAIN, policy_type="sts", result_type="certificate-not-trusted"
            ),
            1,
        )

    @inlineCallbacks
    def test_stsEnforceRefusesPlainText(self) -> Any:
        self.policies[DOMAIN] = POLICY
        upstream = yield self.upstream()
        route = mxRoute(mtaSts=True, caFile=self.ca.rootFile)
        [result] = yield self.relay(route, self.stsDNS()).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual(upstream.transactions, [])
        self.assertEqual(self.failures(result_type="starttls-not-supported"), 1)

    @inlineCallbacks
    def test_stsEnforceDeliversOverVerifiedTLS(self) -> Any:
        self.policies[DOMAIN] = POLICY
        leaf = self.ca.issue(MX)
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions())
        route = mxRoute(mtaSts=True, caFile=self.ca.rootFile)
        [result] = yield self.relay(route, self.stsDNS()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [True])

    @inlineCallbacks
    def test_stsEnforceSkipsMXOutsideThePatterns(self) -> Any:
        """The MX outside ``*.example.org`` is never connected to; with no
        other MX the recipients are deferred (4.7.5)."""
        self.policies[DOMAIN] = POLICY
        rogue = yield self.upstream("mx.attacker.example")
        route = mxRoute(mtaSts=True, caFile=self.ca.rootFile)
        [result] = yield self.relay(route, self.stsDNS("mx.attacker.example")).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual(result.enhanced, "4.7.5")
        self.assertEqual(rogue.connectionCount, 0)

    @inlineCallbacks
    def test_stsEnforceUsesTheMatchingMX(self) -> Any:
        self.policies[DOMAIN] = POLICY
        leaf = self.ca.issue("mx2.example.org")
        rogue = yield self.upstream("mx.attacker.example")
        good = yield self.upstream("mx2.example.org", tlsOptions=leaf.serverOptions())
        route = mxRoute(mtaSts=True, caFile=self.ca.rootFile)
        dns = self.stsDNS("mx.attacker.example", "mx2.example.org")
        [result] = yield self.relay(route, dns).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual((rogue.connectionCount, len(good.transactions)), (0, 1))

    @inlineCallbacks
    def test_stsTestingDeliversAndLogs(self) -> Any:
        self.policies[DOMAIN] = POLICY.replace(b"enforce", b"testing")
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        route = mxRoute(mtaSts=True, caFile=self.ca.rootFile)
        with capturedLogs() as events:
            [result] = yield self.relay(route, self.stsDNS()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [True])
        self.assertTrue(any("testing mode" in t for t in texts(events)))
        self.assertEqual(self.failures(policy_type="sts", result_type="certificate-not-trusted"), 1)

    @inlineCallbacks
    def test_stsOffForTheRoute(self) -> Any:
        self.policies[DOMAIN] = POLICY
        yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        [result] = yield self.relay(mxRoute(), self.stsDNS()).deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual(self.fetched, [])

    # -- DANE --------------------------------------------------------------------

    def daneDNS(self, *records: bytes, secure: bool | set[str] = True) -> StaticDNS:
        if isinstance(secure, bool):
            secure = {"*"} if secure else set()
        return StaticDNS(
            {DOMAIN: [(10, MX)]}, tlsa={f"_25._tcp.{MX}": list(records)}, secure=secure
        )

    @inlineCallbacks
    def test_daneEEMatchesASelfSignedCertificate(self) -> Any:
        leaf = self.ca.issue("anything.invalid")
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions())
        relay = self.relay(mxRoute(TLSLevel.DANE), self.daneDNS(leaf.tlsa(3, 1, 1)))
        [result] = yield relay.deliver(message())
        self.assertTrue(result.success, result)
        self.assertEqual([t.tls for t in upstream.transactions], [True])

    @inlineCallbacks
    def test_daneEEFullCertificateAndSHA512(self) -> Any:
        leaf = self.ca.issue("anything.invalid")
        yield self.upstream(tlsOptions=leaf.serverOptions())
        dns = self.daneDNS(leaf.tlsa(3, 0, 2))
        [result] = yield self.relay(mxRoute(TLSLevel.DANE), dns).deliver(message())
        self.assertTrue(result.success, result)

    @inlineCallbacks
    def test_daneEEMismatchIsDeferred(self) -> Any:
        leaf, other = self.ca.issue(MX), self.ca.issue(MX)
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions())
        relay = self.relay(mxRoute(TLSLevel.DANE), self.daneDNS(other.tlsa(3, 1, 1)))
        [result] = yield relay.deliver(message())
        self.assertTrue(result.transient, result)
        self.assertIn("DANE", result.text)
        self.assertEqual(upstream.transactions, [])
        self.assertEqual(self.failures(policy_type="tlsa", result_type="validation-failure"), 1)

    @inlineCallbacks
    def test_daneTAWithTheMXName(self) -> Any:
        leaf = self.ca.issue(MX)
        yield self.upstream(tlsOptions=leaf.serverOptions())
        dns = self.daneDNS(self.ca.intermediateTLSA())
        [result] = yield self.relay(mxRoute(TLSLevel.DANE), dns).deliver(message())
        self.assertTrue(result.success, result)

    @inlineCallbacks
    def test_daneTAWrongNameIsDeferred(self) -> Any:
        leaf = self.ca.issue("other.example.net")
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions())
        dns = self.daneDNS(self.ca.intermediateTLSA())
        [result] = yield self.relay(mxRoute(TLSLevel.DANE), dns).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual(upstream.transactions, [])

    @inlineCallbacks
    def test_withoutTheADBitTLSAIsIgnored(self) -> Any:
        """An unvalidated answer could be forged: its TLSA records count for
        nothing, and delivery is ``may`` (here to a self-signed MX)."""
        leaf = self.ca.issue(MX)
        upstream = yield self.upstream(tlsOptions=self.selfSigned.serverOptions())
        # Neither answer validated; the MX answer alone; the TLSA answer alone.
        for secure in (set(), {DOMAIN}, {f"_25._tcp.{MX}"}):
            dns = self.daneDNS(leaf.tlsa(3, 1, 1), secure=secure)
            [result] = yield self.relay(mxRoute(TLSLevel.DANE), dns).deliver(message())
            self.assertTrue(result.success, (secure, result))
        self.assertEqual(len(upstream.transactions), 3)

    @inlineCallbacks
    def test_usableTLSAWithoutSTARTTLSIsDeferred(self) -> Any:
        leaf = self.ca.issue(MX)
        upstream = yield self.upstream()
        dns = self.daneDNS(leaf.tlsa(3, 1, 1))
        [result] = yield self.relay(mxRoute(TLSLevel.DANE), dns).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual(upstream.transactions, [])

    @inlineCallbacks
    def test_usableTLSAWithBrokenHandshakeNeverFallsBack(self) -> Any:
        leaf = self.ca.issue(MX)
        upstream = yield self.upstream(tlsOptions=leaf.serverOptions(), brokenTLS=True)
        dns = self.daneDNS(leaf.tlsa(3, 1, 1))
        [result] = yield self.relay(mxRoute(TLSLevel.DANE), dns).deliver(message())
        self.assertTrue(result.transient, result)
        self.assertEqual((upstream.connectionCount, upstream.transactions), (1, []))

    @inlineCallbacks
    def test_daneBeforeMTASTS(self) -> Any:
        """RFC 8461 2: with DANE records, the MTA-STS policy is not used (a
        self-signed certificate that DANE-EE pins is fine)."""
        self.policies[DOMAIN] = POLICY
        leaf = self.ca.issue("anything.invalid")
        yield self.upstream(tlsOptions=leaf.serverOptions())
        dns = self.daneDNS(leaf.tlsa(3, 1, 1))
        dns.txt[f"_mta-sts.{DOMAIN}"] = ["v=STSv1; id=1;"]
        relay = self.relay(mxRoute(TLSLevel.DANE, mtaSts=True, caFile=self.ca.rootFile), dns)
        [result] = yield relay.deliver(message())
        self.assertTrue(result.success, result)


class SenderRouteTests(TestCase):
    """Sender-dependent smarthosts and credentials, over 127.0.0.1."""

    timeout = 20

    @inlineCallbacks
    def test_routeAndCredentialsChosenBySender(self) -> Any:
        base = os.path.abspath(self.mktemp())
        files = makeTLSFiles(base)
        ports: dict[str, int] = {}
        upstreams = {}
        for name, user in (("a.test", "alice-relay"), ("b.test", "domain-relay")):
            upstream = yield startUpstream(
                reactor, tlsOptions=files.serverOptions(), credentials=(user, "pw-" + user)
            )
            self.addCleanup(upstream.stop)
            ports[name], upstreams[name] = upstream.portNumber, upstream
        default = yield startUpstream(reactor)
        self.addCleanup(default.stop)
        ports["default.test"] = default.portNumber

        def route(host: str, user: str) -> Route:
            path = os.path.join(base, user)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("pw-" + user + "\n")
            return Route(
                smarthosts=(Smarthost(host, 25),),
                tls=TLSMode.STARTTLS,
                caFile=files.certificate,
                authUser=user,
                authPasswordFile=path,
                connectTimeout=5,
            )

        config = RelayConfig(
            default=Route(smarthosts=(Smarthost("default.test", 25),), tls=TLSMode.NONE),
            senders={
                "alice@example.com": route("a.test", "alice-relay"),
                "@example.com": route("b.test", "domain-relay"),
            },
        )

        def endpoint(destination: Destination, timeout: float) -> Any:
            # The certificate names localhost; each name maps to its port.
            return TCP4ClientEndpoint(reactor, "127.0.0.1", ports[destination.host], timeout=5)

        relay = Relay(
            reactor,
            config,
            StaticDNS(),
            "gw.example.com",
            lambda queueId: io.BytesIO(BODY),
            endpointFactory=endpoint,
            timeouts=FAST,
        )
        relay._settings = _localhostNames(relay._settings)  # type: ignore[method-assign]
        for sender in ("Alice@Example.com", "bob@example.com", "carol@example.net"):
            [result] = yield relay.deliver(message(sender, "x@elsewhere.test"))
            self.assertTrue(result.success, result)
        self.assertEqual([t.user for t in upstreams["a.test"].transactions], ["alice-relay"])
        self.assertEqual([t.user for t in upstreams["b.test"].transactions], ["domain-relay"])
        self.assertEqual([t.mailFrom for t in default.transactions], ["carol@example.net"])


def _localhostNames(settings: Any) -> Any:
    """The test certificate names localhost: verify every smarthost against it."""
    import attrs

    async def wrapped(destination: Destination, auth: Any) -> Any:
        return await settings(attrs.evolve(destination, host="localhost"), auth)

    return wrapped


class QueueLifetimeTests(SynchronousTestCase):
    """In memory, on a Clock: the queue keeps a domain whose MTA-STS policy
    cannot be met, and bounces it after its lifetime, as any deferral."""

    def test_deferredThenBounced(self) -> None:
        clock = Clock()
        clock.advance(1_800_000_000)
        spool = MemorySpool(clock=clock)
        dns = StaticDNS(
            {DOMAIN: [(10, "mx.attacker.example")]},
            txt={f"_mta-sts.{DOMAIN}": ["v=STSv1; id=1;"]},
        )
        connected: list[Destination] = []

        def endpoint(destination: Destination, timeout: float) -> Any:
            connected.append(destination)
            raise AssertionError("no connection may be made")

        relay = Relay(
            clock,
            RelayConfig(default=mxRoute(mtaSts=True)),
            dns,
            "gw.example.com",
            spool.openMessage,
            endpointFactory=endpoint,
            tlsPolicy=TLSPolicy(mtasts=MTASTSPolicies(clock, dns, lambda d: succeed(POLICY))),
        )
        config = QueueConfig(
            retryMin=300,
            retryMax=3600,
            retryJitter=0,
            maxLifetime=86400,
            bounceLifetime=86400,
            delayWarning=0,
        )
        runner = QueueRunner(spool, relay, clock, config, "gw.example.com")
        runner.startService()
        self.addCleanup(runner.stopService)
        writer = runner.begin(
            Envelope(splitAddress("alice@example.com"), (splitAddress(f"bob@{DOMAIN}"),)),
            Session("192.0.2.9"),
        )
        writer.write(BODY)
        self.successResultOf(writer.commit())
        clock.pump([600] * 6 * 23)
        self.assertEqual([w for w in spool.writers if w.envelope.sender is None], [])
        clock.pump([600] * 6 * 2)
        [bounce] = [w for w in spool.writers if w.envelope.sender is None]
        self.assertIn(b"4.7.5", bytes(bounce.data))
        self.assertIn(b"MTA-STS", bytes(bounce.data))
        self.assertEqual(connected, [])


class VerifiedFlagTests(TestCase):
    """The session's tlsVerified, as each report's Attempt carries it."""

    timeout = 20

    @inlineCallbacks
    def attempt(self, upstream: Any, **settings: Any) -> Any:
        attempts: list[Attempt] = []
        yield deliverBatch(
            reactor,
            upstream.endpoint(reactor),
            RelaySettings(hostname=MX, ehloHostname="gw.example.com", timeouts=FAST, **settings),
            [(message(), lambda queueId: io.BytesIO(BODY))],
            onFinished=lambda index, results, attempt: attempts.append(attempt),
        )
        [attempt] = attempts
        return attempt

    @inlineCallbacks
    def test_flag(self) -> Any:
        ca = TestCA(os.path.abspath(self.mktemp()))
        leaf = ca.issue(MX)
        upstream = yield startUpstream(reactor, tlsOptions=leaf.serverOptions())
        self.addCleanup(upstream.stop)
        verified = yield self.attempt(upstream, tlsCreator=tls.clientCreator(MX, ca.rootFile))
        unverified = yield self.attempt(
            upstream, tlsCreator=tls.PeerTLSCreator(MX), tlsVerifies=False
        )
        plain = yield self.attempt(upstream, tlsMode=TLSMode.NONE)
        store = tls.trustStore(ca.rootFile)
        checked = yield self.attempt(
            upstream,
            tlsCreator=tls.PeerTLSCreator(MX),
            tlsVerifies=False,
            peerCheck=NameCheck(store, (MX,)),
        )
        self.assertEqual(
            [a.tlsVerified for a in (verified, unverified, plain, checked)],
            [True, False, False, True],
        )
        self.assertEqual([t.tls for t in upstream.transactions], [True, True, False, True])


class PolicyUnitTests(SynchronousTestCase):
    def test_addressLiteralOnADANERoute(self) -> None:
        """No DNS name, no TLSA records: an address literal gets ``may``."""
        route = mxRoute(TLSLevel.DANE)
        destination = Destination("192.0.2.1", 25, TLSMode.STARTTLS, route)
        policy = TLSPolicy(secureResolver=StaticDNS(secure={"*"}))
        [chosen] = self.successResultOf(
            Deferred.fromCoroutine(policy.secure(route, "[192.0.2.1]", [destination], True))
        )
        self.assertEqual(chosen.security.level, TLSLevel.MAY)
