"""
Tests for L{mailgw.relay.mtasts} (policy and record parsing, the cache
with its max_age on a Clock, on disk across a restart) and
L{mailgw.relay.mtastsfetch} (HTTPS from an in-process twisted.web server
on 127.0.0.1 with a test CA).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.names import error as dnserror
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.util import Redirect

from mailgw.relay.mtasts import (
    MTASTSPolicies,
    Policy,
    PolicyError,
    mxMatches,
    parsePolicy,
    parseRecord,
)
from mailgw.relay.mtastsfetch import FetchError, PolicyFetcher
from mailgw.relay.staticdns import StaticDNS
from tests.pki import TestCA

GOOD = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmx: *.example.net\r\n"
    b"max_age: 600\r\n"
)


class ParseTests(SynchronousTestCase):
    def test_policy(self) -> None:
        self.assertEqual(
            parsePolicy(GOOD), Policy("enforce", ("mx1.example.org", "*.example.net"), 600)
        )
        self.assertEqual(parsePolicy(GOOD.replace(b"\r\n", b"\n")), parsePolicy(GOOD))

    def test_unknownFieldsIgnored(self) -> None:
        self.assertEqual(parsePolicy(GOOD + b"x_future: 1\r\n").mode, "enforce")

    def test_modeNoneNeedsNoMX(self) -> None:
        policy = parsePolicy(b"version: STSv1\nmode: none\nmax_age: 0\n")
        self.assertEqual((policy.mode, policy.mx), ("none", ()))

    def test_invalid(self) -> None:
        bad = [
            GOOD.replace(b"STSv1", b"STSv2"),
            GOOD.replace(b"version: STSv1\r\n", b""),
            GOOD.replace(b"enforce", b"strict"),
            GOOD + b"mode: testing\r\n",
            GOOD.replace(b"600", b"31557601"),
            GOOD.replace(b"600", b"-1"),
            GOOD.replace(b"max_age: 600\r\n", b""),
            b"version: STSv1\nmode: enforce\nmax_age: 60\n",
            GOOD.replace(b"mx1.example.org", b"mx1.exa mple.org"),
            GOOD.replace(b"mx1.example.org", b"*.*.example.org"),
            GOOD + b"no colon here\r\n",
            GOOD + "mx: m\u00fc.example\r\n".encode(),
            GOOD + b"x: " + b"a" * (64 * 1024) + b"\r\n",
        ]
        for body in bad:
            with self.assertRaises(PolicyError, msg=body[:100]):
                parsePolicy(body)

    def test_record(self) -> None:
        self.assertEqual(parseRecord(["v=STSv1; id=20260101T1;"]), "20260101T1")
        self.assertEqual(parseRecord(["v=STSv1;id=abc"]), "abc")
        self.assertEqual(parseRecord(["spf stuff", "v=STSv1; id=abc; ext=1"]), "abc")

    def test_recordRefused(self) -> None:
        for texts in (
            [],
            ["v=STSv1; id=a;", "v=STSv1; id=b;"],
            ["v=STSv1;"],
            ["v=STSv1; id=not-alnum;"],
            ["v=STSv1; id=" + "a" * 33],
            ["id=abc; v=STSv1"],
        ):
            self.assertIsNone(parseRecord(texts), texts)

    def test_mxPatterns(self) -> None:
        self.assertTrue(mxMatches("*.example.org", "mx.example.org"))
        self.assertTrue(mxMatches("*.example.org", "MX.Example.org."))
        self.assertFalse(mxMatches("*.example.org", "a.mx.example.org"))
        self.assertFalse(mxMatches("*.example.org", "example.org"))
        self.assertTrue(mxMatches("mx.example.org", "mx.example.org"))
        self.assertFalse(mxMatches("mx.example.org", "mx2.example.org"))


def dns(policyId: str | None = "1") -> StaticDNS:
    txt = {"_mta-sts.example.org": [f"v=STSv1; id={policyId};"]} if policyId else {}
    return StaticDNS({"example.org": []}, txt=txt)


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bodies: list[Any] = [GOOD]
        self.fetches = 0
        self.reports: list[tuple[str, str]] = []

    def fetch(self, domain: str) -> Deferred[bytes]:
        self.fetches += 1
        body = self.bodies[min(self.fetches, len(self.bodies)) - 1]
        if isinstance(body, Exception):
            return fail(body)
        return succeed(body)

    def policies(self, resolver: Any, directory: str | None = None) -> MTASTSPolicies:
        return MTASTSPolicies(
            self.clock,
            resolver,
            self.fetch,
            directory=directory,
            report=lambda *a: self.reports.append(a),
        )

    def policyFor(self, policies: MTASTSPolicies, domain: str = "example.org") -> Any:
        return self.successResultOf(policies.policyFor(domain))

    def test_cachedForMaxAge(self) -> None:
        policies = self.policies(dns())
        self.assertEqual(self.policyFor(policies).mode, "enforce")
        self.clock.advance(599)
        self.assertEqual(self.policyFor(policies).mode, "enforce")
        self.assertEqual(self.fetches, 1)
        self.clock.advance(2)
        self.policyFor(policies)
        self.assertEqual(self.fetches, 2)

    def test_newIdRefetches(self) -> None:
        resolver = dns("1")
        policies = self.policies(resolver)
        self.bodies = [GOOD, GOOD.replace(b"enforce", b"testing")]
        self.assertEqual(self.policyFor(policies).mode, "enforce")
        resolver.txt["_mta-sts.example.org"] = ["v=STSv1; id=2;"]
        self.assertEqual(self.policyFor(policies).mode, "testing")
        self.assertEqual(self.fetches, 2)

    def test_recordGoneCacheStillSpeaks(self) -> None:
        """RFC 8461 5.1: a stripped TXT record does not strip a cached policy."""
        resolver = dns("1")
        policies = self.policies(resolver)
        self.policyFor(policies)
        del resolver.txt["_mta-sts.example.org"]
        self.assertEqual(self.policyFor(policies).mode, "enforce")
        self.clock.advance(601)
        self.assertIsNone(self.policyFor(policies))

    def test_noRecordNoPolicy(self) -> None:
        self.assertIsNone(self.policyFor(self.policies(dns(None))))
        self.assertEqual(self.fetches, 0)

    def test_fetchFailureKeepsTheFreshPolicy(self) -> None:
        resolver = dns("1")
        policies = self.policies(resolver)
        self.bodies = [GOOD, FetchError("HTTP status 500"), b"garbage"]
        self.policyFor(policies)
        resolver.txt["_mta-sts.example.org"] = ["v=STSv1; id=2;"]
        self.assertEqual(self.policyFor(policies).mode, "enforce")
        self.assertEqual(self.policyFor(policies).mode, "enforce")
        self.assertEqual(
            self.reports,
            [("example.org", "sts-policy-fetch-error"), ("example.org", "sts-policy-invalid")],
        )

    def test_dnsFailure(self) -> None:
        resolver = StaticDNS(failures={"_mta-sts.example.org": dnserror.DNSServerError()})
        self.assertIsNone(self.policyFor(self.policies(resolver)))

    def test_oneFetchForLookupsAtOnce(self) -> None:
        waiting: Deferred[bytes] = Deferred()
        policies = MTASTSPolicies(self.clock, dns(), lambda domain: waiting)
        first, second = policies.policyFor("example.org"), policies.policyFor("example.org")
        waiting.callback(GOOD)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))

    def test_badDomainNames(self) -> None:
        policies = self.policies(dns())
        for name in ("../etc", "a/b", "", "-x.example", "a..b"):
            self.assertIsNone(self.policyFor(policies, name))
        self.assertEqual(self.fetches, 0)

    def test_keptAcrossARestart(self) -> None:
        """Written to disk; a new instance (the same clock) uses it without a
        fetch, even when the TXT record is stripped; until it expires."""
        directory = os.path.abspath(self.mktemp())
        self.policyFor(self.policies(dns(), directory))
        self.assertEqual(os.listdir(directory), ["example.org"])
        self.assertEqual(os.stat(os.path.join(directory, "example.org")).st_mode & 0o777, 0o600)
        restarted = self.policies(dns(None), directory)
        self.assertEqual(self.policyFor(restarted).mx, ("mx1.example.org", "*.example.net"))
        self.assertEqual(self.fetches, 1)
        self.clock.advance(601)
        self.assertIsNone(self.policyFor(self.policies(dns(None), directory)))

    def test_corruptFileIgnored(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "example.org"), "w") as f:
            f.write("{not json")
        self.assertIsNone(self.policyFor(self.policies(dns(None), directory)))


class _Policy(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = GOOD
        self.contentType = b"text/plain"
        self.requests: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(request.getRequestHostname())
        request.setHeader(b"content-type", self.contentType)
        return self.body


class FetchTests(TestCase):
    """The real fetcher against an HTTPS server on 127.0.0.1."""

    timeout = 20

    @inlineCallbacks
    def setUp(self) -> Any:
        base = os.path.abspath(self.mktemp())
        self.ca = TestCA(os.path.join(base, "ca"))
        leaf = self.ca.issue("mta-sts.example.org")
        self.policy = _Policy()
        root = Resource()
        wellKnown = Resource()
        root.putChild(b".well-known", wellKnown)
        wellKnown.putChild(b"mta-sts.txt", self.policy)
        self.root = root
        from twisted.internet.endpoints import SSL4ServerEndpoint

        endpoint = SSL4ServerEndpoint(reactor, 0, leaf.serverOptions(), interface="127.0.0.1")
        self.port = yield endpoint.listen(Site(root))
        self.addCleanup(self.port.stopListening)
        self.connected: list[tuple[str, int]] = []

    def fetcher(self, caFile: str | None = None, **kw: Any) -> PolicyFetcher:
        def tcp(host: str, port: int) -> Any:
            self.connected.append((host, port))
            return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)

        return PolicyFetcher(reactor, caFile=caFile or self.ca.rootFile, tcpEndpoint=tcp, **kw)

    @inlineCallbacks
    def test_fetch(self) -> Any:
        body = yield self.fetcher()("example.org")
        self.assertEqual(body, GOOD)
        self.assertEqual(self.connected, [("mta-sts.example.org", 443)])

    @inlineCallbacks
    def test_untrustedCertificate(self) -> Any:
        other = TestCA(os.path.abspath(self.mktemp()), "Other Root")
        with self.assertRaises(FetchError):
            yield self.fetcher(other.rootFile)("example.org")

    @inlineCallbacks
    def test_wrongName(self) -> Any:
        """The certificate names mta-sts.example.org, not mta-sts.example.net."""
        with self.assertRaises(FetchError):
            yield self.fetcher()("example.net")

    @inlineCallbacks
    def test_redirectNotFollowed(self) -> Any:
        self.root.putChild(b".well-known", Redirect(b"https://elsewhere.example/"))
        with self.assertRaises(FetchError) as caught:
            yield self.fetcher()("example.org")
        self.assertIn("status", str(caught.exception))

    @inlineCallbacks
    def test_notTextPlain(self) -> Any:
        self.policy.contentType = b"text/html"
        with self.assertRaises(FetchError):
            yield self.fetcher()("example.org")

    @inlineCallbacks
    def test_tooBig(self) -> Any:
        self.policy.body = GOOD + b"x: " + b"a" * 70000 + b"\r\n"
        with self.assertRaises(FetchError) as caught:
            yield self.fetcher()("example.org")
        self.assertIn("larger", str(caught.exception))

    @inlineCallbacks
    def test_throughTheCache(self) -> Any:
        """TXT record, HTTPS fetch, parse, disk: the pieces together."""
        directory = os.path.abspath(self.mktemp())
        policies = MTASTSPolicies(reactor, dns(), self.fetcher(), directory=directory)
        policy = yield policies.policyFor("example.org")
        self.assertEqual(policy, parsePolicy(GOOD))
        self.assertEqual(os.listdir(directory), ["example.org"])
        self.assertEqual(len(self.policy.requests), 1)
