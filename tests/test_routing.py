"""
Tests for L{mailgw.relay.routing}: smarthost order, MX preference and
shuffle, implicit MX, null MX, DNS failures, and grouping by destination.
No test queries real DNS: L{StaticResolver} answers from memory.
"""

from __future__ import annotations

from random import Random
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IResolver
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.config import Route, Smarthost, TLSMode
from mailgw.envelope import (
    Address,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
)
from mailgw.relay.routing import (
    MAX_HOSTS,
    Destination,
    DestinationKey,
    PermanentRoutingError,
    RoutingError,
    StaticResolver,
    TransientRoutingError,
    groupRecipients,
    resolveDestinations,
)

MX = Route(mx=True, tls=TLSMode.OPPORTUNISTIC)
SMART = Route(
    smarthosts=(Smarthost("relay1.example.net", 587), Smarthost("relay2.example.net", 2525)),
    tls=TLSMode.STARTTLS,
)


class ResolveTestCase(SynchronousTestCase):
    def resolve(self, resolver: Any, route: Route, domain: str | None, **kw: Any) -> Any:
        return self.successResultOf(resolveDestinations(resolver, route, domain, **kw))

    def failWith(self, resolver: Any, domain: str) -> RoutingError:
        failure = self.failureResultOf(resolveDestinations(resolver, MX, domain), RoutingError)
        reason: RoutingError = failure.value
        return reason

    def hosts(self, destinations: list[Destination]) -> list[str]:
        return [d.host for d in destinations]

    def test_staticResolverIsAResolver(self) -> None:
        verifyObject(IResolver, StaticResolver())

    def test_smarthostsInOrderWithoutDNS(self) -> None:
        resolver = StaticResolver()
        result = self.resolve(resolver, SMART, "example.com")
        self.assertEqual(
            result,
            [
                Destination("relay1.example.net", 587, TLSMode.STARTTLS, SMART),
                Destination("relay2.example.net", 2525, TLSMode.STARTTLS, SMART),
            ],
        )
        self.assertEqual(resolver.queries, [])

    def test_smarthostRouteNeedsNoDomain(self) -> None:
        self.assertEqual(len(self.resolve(StaticResolver(), SMART, None)), 2)

    def test_mxByPreference(self) -> None:
        resolver = StaticResolver(
            {
                "example.com": [
                    (20, "mx2.example.com"),
                    (5, "mx0.example.com."),
                    (10, "mx1.example.com"),
                ]
            }
        )
        result = self.resolve(resolver, MX, "Example.COM")
        self.assertEqual(
            self.hosts(result), ["mx0.example.com", "mx1.example.com", "mx2.example.com"]
        )
        self.assertEqual(
            {(d.port, d.tls, d.route) for d in result}, {(25, TLSMode.OPPORTUNISTIC, MX)}
        )
        self.assertEqual(resolver.queries, [("example.com", dns.MX)])

    def test_equalPreferenceShuffledBySeed(self) -> None:
        """
        Hosts of one preference come in an order chosen by the Random: the
        same seed gives the same order, and some seeds give different
        orders; preferences never interleave.
        """
        records = [(10, f"a{i}.example.com") for i in range(4)]
        records += [(20, f"b{i}.example.com") for i in range(3)]
        resolver = StaticResolver({"example.com": records})
        orders = set()
        for seed in range(20):
            hosts = self.hosts(self.resolve(resolver, MX, "example.com", rng=Random(seed)))
            again = self.hosts(self.resolve(resolver, MX, "example.com", rng=Random(seed)))
            self.assertEqual(hosts, again)
            self.assertEqual(sorted(hosts[:4]), [f"a{i}.example.com" for i in range(4)])
            self.assertEqual(sorted(hosts[4:]), [f"b{i}.example.com" for i in range(3)])
            orders.add(tuple(hosts))
        self.assertGreater(len(orders), 5)

    def test_shuffleIgnoresAnswerOrder(self) -> None:
        """The order depends on the seed alone, not on how DNS listed the records."""
        forward = [(10, f"h{i}.example.com") for i in range(5)]
        one = StaticResolver({"example.com": forward})
        two = StaticResolver({"example.com": forward[::-1]})
        self.assertEqual(
            self.hosts(self.resolve(one, MX, "example.com", rng=Random(7))),
            self.hosts(self.resolve(two, MX, "example.com", rng=Random(7))),
        )

    def test_duplicateHostAtBestPreference(self) -> None:
        resolver = StaticResolver(
            {"example.com": [(30, "mx.example.com"), (10, "MX.example.com"), (20, "b.example.com")]}
        )
        self.assertEqual(
            self.hosts(self.resolve(resolver, MX, "example.com")),
            ["mx.example.com", "b.example.com"],
        )

    def test_atMostTenHosts(self) -> None:
        resolver = StaticResolver({"example.com": [(i, f"mx{i}.example.com") for i in range(30)]})
        result = self.resolve(resolver, MX, "example.com")
        self.assertEqual(MAX_HOSTS, 10)
        self.assertEqual(self.hosts(result), [f"mx{i}.example.com" for i in range(10)])

    def test_implicitMX(self) -> None:
        """RFC 5321 5.1: no MX records -> the domain itself, port 25."""
        resolver = StaticResolver({"example.org": []})
        self.assertEqual(
            self.resolve(resolver, MX, "Example.ORG."),
            [Destination("example.org", 25, TLSMode.OPPORTUNISTIC, MX)],
        )

    def test_implicitMXForIDN(self) -> None:
        """A U-label domain is looked up, and connected to, as its A-label."""
        resolver = StaticResolver({"xn--bcher-kva.example": []})
        self.assertEqual(
            self.hosts(self.resolve(resolver, MX, "bücher.example")), ["xn--bcher-kva.example"]
        )
        self.assertEqual(resolver.queries, [("xn--bcher-kva.example", dns.MX)])

    def test_cnameFollowed(self) -> None:
        """The answer's MX records are used, whichever name the CNAME led to."""
        resolver = StaticResolver(
            {"target.example.net": [(10, "mx.example.net")]},
            aliases={"alias.example.com": "target.example.net"},
        )
        self.assertEqual(
            self.hosts(self.resolve(resolver, MX, "alias.example.com")), ["mx.example.net"]
        )

    def test_cnameWithoutMX(self) -> None:
        """An alias whose target has no MX: implicit MX on the domain asked for."""
        resolver = StaticResolver(
            {"target.example.net": []}, aliases={"alias.example.com": "target.example.net"}
        )
        self.assertEqual(
            self.hosts(self.resolve(resolver, MX, "alias.example.com")), ["alias.example.com"]
        )

    def test_nullMX(self) -> None:
        """RFC 7505: a single MX "." of preference 0 is a permanent failure."""
        reason = self.failWith(StaticResolver({"example.com": [(0, ".")]}), "example.com")
        self.assertIsInstance(reason, PermanentRoutingError)
        self.assertTrue(reason.permanent)
        self.assertEqual(str(reason), "domain does not accept mail (null MX, RFC 7505)")
        self.assertEqual(reason.enhanced, "5.1.10")

    def test_nullMXFromTheWire(self) -> None:
        """On the wire the root name decodes to b"", not b"."."""
        reason = self.failWith(StaticResolver({"example.com": [(0, "")]}), "example.com")
        self.assertIsInstance(reason, PermanentRoutingError)

    def test_nullMXBesideRealOnesIgnored(self) -> None:
        resolver = StaticResolver({"example.com": [(0, "."), (10, "mx.example.com")]})
        self.assertEqual(self.hosts(self.resolve(resolver, MX, "example.com")), ["mx.example.com"])

    def test_nxdomainPermanent(self) -> None:
        reason = self.failWith(StaticResolver(), "nowhere.example")
        self.assertIsInstance(reason, PermanentRoutingError)
        self.assertEqual(reason.enhanced, "5.1.2")

    def test_authoritativeNotFoundPermanent(self) -> None:
        resolver = StaticResolver(failures={"example.com": error.AuthoritativeDomainError("x")})
        self.assertIsInstance(self.failWith(resolver, "example.com"), PermanentRoutingError)

    def test_timeoutTransient(self) -> None:
        resolver = StaticResolver(failures={"example.com": error.DNSQueryTimeoutError(1)})
        reason = self.failWith(resolver, "example.com")
        self.assertIsInstance(reason, TransientRoutingError)
        self.assertFalse(reason.permanent)
        self.assertEqual(reason.enhanced, "4.4.3")

    def test_deferTimeoutTransient(self) -> None:
        resolver = StaticResolver(failures={"example.com": defer.TimeoutError()})
        self.assertIsInstance(self.failWith(resolver, "example.com"), TransientRoutingError)

    def test_serverFailureTransient(self) -> None:
        for exc in (
            error.DNSServerError("x"),
            error.DNSQueryRefusedError("x"),
            error.DomainError(),
        ):
            resolver = StaticResolver(failures={"example.com": exc})
            self.assertIsInstance(self.failWith(resolver, "example.com"), TransientRoutingError)

    def test_resolverBugTransient(self) -> None:
        """A resolver that raises instead of failing its Deferred: transient."""

        class Broken:
            def lookupMailExchange(self, name: bytes) -> Any:
                raise RuntimeError("oops")

        self.assertIsInstance(self.failWith(Broken(), "example.com"), TransientRoutingError)

    def test_malformedExchangeSkipped(self) -> None:
        resolver = StaticResolver(
            {"example.com": [(5, "bad host\r\nX: y"), (10, "mx.example.com")]}
        )
        self.assertEqual(self.hosts(self.resolve(resolver, MX, "example.com")), ["mx.example.com"])

    def test_onlyMalformedExchangesTransient(self) -> None:
        resolver = StaticResolver({"example.com": [(5, "bad host")]})
        self.assertIsInstance(self.failWith(resolver, "example.com"), TransientRoutingError)

    def test_invalidDomainPermanent(self) -> None:
        self.assertIsInstance(self.failWith(StaticResolver(), "a..b"), PermanentRoutingError)

    def test_addressLiteral(self) -> None:
        resolver = StaticResolver()
        self.assertEqual(self.hosts(self.resolve(resolver, MX, "[192.0.2.1]")), ["192.0.2.1"])
        self.assertEqual(
            self.hosts(self.resolve(resolver, MX, "[IPv6:2001:db8::1]")), ["2001:db8::1"]
        )
        self.assertEqual(resolver.queries, [])

    def test_routeWithoutHostsTransient(self) -> None:
        failure = self.failureResultOf(
            resolveDestinations(StaticResolver(), Route(), "example.com"), TransientRoutingError
        )
        self.assertIn("neither", str(failure.value))


def message(queueId: str, *recipients: str, bounced: tuple[str, ...] = ()) -> QueuedMessage:
    def address(text: str) -> Address:
        local, _, domain = text.partition("@")
        return Address(local, domain)

    states = tuple(RecipientState(address(r)) for r in recipients)
    states += tuple(RecipientState(address(r), RecipientStatus.BOUNCED) for r in bounced)
    return QueuedMessage(
        queueId=queueId,
        envelope=Envelope(address("sender@example.org"), tuple(s.address for s in states)),
        session=Session("192.0.2.7"),
        arrival=0.0,
        size=10,
        recipients=states,
    )


class GroupTestCase(SynchronousTestCase):
    def test_grouping(self) -> None:
        """
        Smarthost recipients share one group whatever their domain; MX
        recipients group by lowercased domain; unrouted ones go under None;
        finished recipients are left out; message and recipient order is kept.
        """
        routes = {"smart.example": SMART, "other.example": SMART, "a.example": MX, "b.example": MX}
        calls: list[str] = []

        def routeFor(domain: str, sender: Address | None) -> Route | None:
            calls.append(domain)
            return routes.get(domain)

        m1 = message("m1", "x@smart.example", "y@A.example", "z@other.example", "q@none.example")
        m2 = message("m2", "u@a.example", "v@b.example", bounced=("gone@a.example",))
        groups = groupRecipients([m1, m2], routeFor)

        a = Address
        self.assertEqual(
            groups,
            {
                DestinationKey(SMART, None): [
                    (m1, (a("x", "smart.example"), a("z", "other.example"))),
                ],
                DestinationKey(MX, "a.example"): [
                    (m1, (a("y", "A.example"),)),
                    (m2, (a("u", "a.example"),)),
                ],
                DestinationKey(MX, "b.example"): [(m2, (a("v", "b.example"),))],
                None: [(m1, (a("q", "none.example"),))],
            },
        )
        self.assertEqual(sorted(calls), sorted(set(calls)))
        self.assertEqual(
            set(calls), {"smart.example", "a.example", "other.example", "none.example", "b.example"}
        )

    def test_idnSpellingsShareGroup(self) -> None:
        m = message("m", "a@bücher.example", "b@xn--bcher-kva.example")
        groups = groupRecipients([m], lambda domain, sender: MX)
        self.assertEqual(list(groups), [DestinationKey(MX, "xn--bcher-kva.example")])
        self.assertEqual(len(groups[DestinationKey(MX, "xn--bcher-kva.example")][0][1]), 2)

    def test_nothingPending(self) -> None:
        m = message("m", bounced=("a@a.example",))
        self.assertEqual(groupRecipients([m], lambda domain, sender: MX), {})
