"""
Where a recipient's mail goes: from a recipient domain and its configured
route to the ordered list of upstream hosts to try, and the grouping of
pending recipients into one batch per destination.

A route either names smarthosts (tried in the configured order, no DNS) or
asks for MX delivery (RFC 5321 5.1): MX records by preference, the domain
itself when there are none (implicit MX), and no delivery at all for a null
MX (RFC 7505).

Failures are L{RoutingError}s: L{PermanentRoutingError} (the domain does not
exist or accepts no mail; the recipient bounces) or L{TransientRoutingError}
(DNS timed out or failed; try again later).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from random import Random
from typing import TYPE_CHECKING, Any

import attrs
import idna
from twisted.internet import defer
from twisted.internet.interfaces import IResolver
from twisted.names import common, dns, error
from zope.interface import implementer

from mailgw.config import normalizeDomain
from mailgw.envelope import Address, QueuedMessage

if TYPE_CHECKING:
    from mailgw.config import Route, TLSMode

#: At most this many hosts are tried for one destination: enough for any
#: sane MX set, and a bound on the work a hostile zone can cause.
MAX_HOSTS = 10

#: The port MX hosts take relayed mail on (IANA "smtp"; RFC 8314 keeps 25 for relay).
SMTP_PORT = 25

_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z"
)

_module_random = Random()


class RoutingError(Exception):
    """
    No upstream host could be found for a destination.

    ``enhanced`` is the RFC 3463 status code to record for the recipients.
    """

    permanent = False
    enhanced = "4.4.3"

    def __init__(self, message: str, enhanced: str | None = None) -> None:
        super().__init__(message)
        if enhanced is not None:
            self.enhanced = enhanced


class PermanentRoutingError(RoutingError):
    """The destination can never take mail (NXDOMAIN, null MX): bounce."""

    permanent = True
    enhanced = "5.1.2"


class TransientRoutingError(RoutingError):
    """DNS timed out or failed, or the route is unusable now: retry later."""

    permanent = False
    # RFC 3463 X.4.3: routing server failure.
    enhanced = "4.4.3"


@attrs.frozen
class Destination:
    """
    One upstream host to try: ``host`` is both the name to connect to and
    the name the upstream certificate is verified against; ``tls`` is the
    route's TLS mode and ``route`` the route it came from. ``mxSecure``:
    the MX answer it came from was DNSSEC-validated (DANE applies);
    ``security`` is what its TLS must prove
    (L{mailgw.relay.tlspolicy.PeerSecurity}; None: as ``tls`` says).
    """

    host: str
    port: int
    tls: TLSMode
    route: Route
    mxSecure: bool = False
    security: Any = None


@attrs.frozen
class DestinationKey:
    """
    What recipients sharing one delivery batch have in common: the route
    and, for MX routes only, the (lowercased) domain. ``domain`` is ``None``
    for a smarthost route: every domain it carries goes to the same hosts.
    """

    route: Route
    domain: str | None


def resolveDestinations(
    resolver: Any,
    route: Route,
    domain: str | None,
    *,
    rng: Random | None = None,
    maxHosts: int = MAX_HOSTS,
    secureResolver: Any = None,
) -> defer.Deferred[list[Destination]]:
    """
    The hosts to try, in order, for mail to ``domain`` over ``route``.

    Smarthost routes give their smarthosts in the configured order without
    any DNS (``domain`` may be ``None``). MX routes ask ``resolver`` (an
    L{IResolver}, e.g. from L{twisted.names.client.createResolver}) for the
    domain's MX records; equal preferences are shuffled with ``rng``
    (RFC 5321 5.1), port 25. An address literal (``[192.0.2.1]``) is
    delivered to directly. With ``secureResolver`` (an L{ISecureResolver},
    for DANE routes) the MX records are asked of it instead, and the
    destinations say whether its answer was validated.

    @return: a Deferred firing with at most ``maxHosts`` destinations, or
        failing with L{PermanentRoutingError} (NXDOMAIN, null MX) or
        L{TransientRoutingError} (timeout, server failure, anything else).
    """
    if route.smarthosts:
        return defer.succeed(
            [Destination(s.host, s.port, route.tls, route) for s in route.smarthosts][:maxHosts]
        )
    if not route.mx:
        # Config should refuse such a route; a misconfiguration is retried,
        # not bounced, so the operator can fix it without losing mail.
        return defer.fail(TransientRoutingError("route has neither smarthosts nor MX"))
    if domain is None:
        raise ValueError("an MX route needs a domain")
    literal = _addressLiteral(domain)
    if literal is not None:
        return defer.succeed([Destination(literal, SMTP_PORT, route.tls, route)])
    try:
        name = _aLabel(domain)
    except ValueError:
        return defer.fail(PermanentRoutingError("invalid domain name", "5.1.2"))
    rng = rng or _module_random
    if secureResolver is not None:
        d = defer.maybeDeferred(secureResolver.lookupSecure, name, dns.MX)
        d.addCallback(
            lambda answer: [
                attrs.evolve(destination, mxSecure=answer.authenticated)
                for destination in _fromAnswer(
                    (list(answer.records), [], []), name, route, rng, maxHosts
                )
            ]
        )
        d.addErrback(_translateFailure)
        return d
    d = defer.maybeDeferred(resolver.lookupMailExchange, name.encode("ascii"))
    d.addCallbacks(
        lambda result: _fromAnswer(result, name, route, rng, maxHosts), _translateFailure
    )
    return d


def _addressLiteral(domain: str) -> str | None:
    """The IP address inside an address literal (RFC 5321 4.1.3), or None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    return inner


def _aLabel(domain: str) -> str:
    """``domain`` as DNS knows it: ASCII (A-labels, RFC 5890), no final dot."""
    domain = domain.rstrip(".").lower()
    if not domain:
        raise ValueError("empty domain")
    if not domain.isascii():
        try:
            domain = normalizeDomain(domain)  # the same A-label config routes use
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(str(e)) from e
    if not _HOSTNAME.match(domain) or len(domain) > 253:
        raise ValueError("not a host name")
    return domain


def _fromAnswer(
    result: tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]],
    domain: str,
    route: Route,
    rng: Random,
    maxHosts: int,
) -> list[Destination]:
    answers = result[0]
    # An MX query for an alias is answered with the CNAME chain followed by
    # the target's MX records (RFC 1034 3.6.2): those MX records are the
    # ones to use, so CNAME records themselves are simply skipped.
    records: list[Any] = [rr.payload for rr in answers if rr.type == dns.MX]
    if not records:
        # RFC 5321 5.1: no MX records -> the domain itself is an implicit
        # MX of preference 0.
        return [Destination(domain, SMTP_PORT, route.tls, route)]
    hosts = [(r.preference, r.name.name.decode("ascii", "replace").rstrip(".")) for r in records]
    real = [(pref, host) for pref, host in hosts if host]
    if not real:
        # RFC 7505 3: a single MX of preference 0 and exchange "." says the
        # domain accepts no mail; RFC 7505 4.2 names the status 5.1.10.
        raise PermanentRoutingError("domain does not accept mail (null MX, RFC 7505)", "5.1.10")
    # RFC 7505 3 forbids a null MX beside others; if one is there anyway it
    # names no host, so it is dropped and the real ones are used.
    usable = [(pref, host.lower()) for pref, host in real if _HOSTNAME.match(host)]
    if not usable:
        raise TransientRoutingError("no usable MX host names")
    ordered = _orderByPreference(usable, rng)
    return [Destination(host, SMTP_PORT, route.tls, route) for host in ordered[:maxHosts]]


def _orderByPreference(hosts: list[tuple[int, str]], rng: Random) -> list[str]:
    """
    Hosts by ascending preference, each preference's hosts shuffled
    (RFC 5321 5.1: spread the load), each host once at its best preference.
    """
    best: dict[str, int] = {}
    for pref, host in hosts:
        best[host] = min(pref, best.get(host, pref))
    byPref: dict[int, list[str]] = {}
    for host, pref in best.items():
        byPref.setdefault(pref, []).append(host)
    ordered: list[str] = []
    for pref in sorted(byPref):
        # Sort first so the order depends on ``rng`` alone, not on the
        # order the DNS answer happened to list the records in.
        group = sorted(byPref[pref])
        rng.shuffle(group)
        ordered.extend(group)
    return ordered


def _translateFailure(failure: Any) -> None:
    reason = failure.value
    if isinstance(reason, RoutingError):
        raise reason
    if isinstance(reason, (error.DNSNameError, error.AuthoritativeDomainError)):
        raise PermanentRoutingError("domain not found (NXDOMAIN)", "5.1.2") from reason
    if isinstance(reason, (error.DNSQueryTimeoutError, defer.TimeoutError)):
        raise TransientRoutingError("DNS lookup timed out") from reason
    if isinstance(reason, error.DNSServerError):
        raise TransientRoutingError("DNS server failure (SERVFAIL)") from reason
    # Anything else (refused, format error, a bug in a resolver) may well
    # pass: retrying is safe, bouncing is not undoable.
    raise TransientRoutingError(f"DNS lookup failed ({type(reason).__name__})") from reason


def groupRecipients(
    messages: Iterable[QueuedMessage],
    routeFor: Callable[[str, Address | None], Route | None],
) -> dict[DestinationKey | None, list[tuple[QueuedMessage, tuple[Address, ...]]]]:
    """
    Group each message's pending recipients by destination so that one
    batch (one connection, one transaction per message) serves each.

    ``routeFor(domain, sender)`` is called once per distinct lowercased
    domain and sender.
    Recipients on the same smarthost route share a group whatever their
    domain; MX routes group by domain (its A-label form, so both spellings
    of an IDN share a group). Recipients for which ``routeFor``
    returns ``None`` are gathered under the key ``None``: the caller leaves
    them pending and logs. Messages keep their order, and so do recipients
    within a message.
    """
    routes: dict[tuple[str, str], Route | None] = {}
    groups: dict[DestinationKey | None, list[tuple[QueuedMessage, tuple[Address, ...]]]] = {}
    for message in messages:
        perKey: dict[DestinationKey | None, list[Address]] = {}
        sender = message.envelope.sender
        senderText = "" if sender is None else str(sender).lower()
        for state in message.pendingRecipients:
            domain = state.address.domain.lower()
            if (domain, senderText) not in routes:
                routes[domain, senderText] = routeFor(domain, sender)
            route = routes[domain, senderText]
            key: DestinationKey | None
            if route is None:
                key = None
            elif route.smarthosts:
                key = DestinationKey(route, None)
            else:
                key = DestinationKey(route, _groupDomain(domain))
            perKey.setdefault(key, []).append(state.address)
        for key, addresses in perKey.items():
            groups.setdefault(key, []).append((message, tuple(addresses)))
    return groups


def _groupDomain(domain: str) -> str:
    """One spelling per domain: the A-label form, so that U-label and
    A-label recipients of one IDN domain share a batch."""
    try:
        return _aLabel(domain)
    except ValueError:
        return domain  # an address literal (or junk): as it is, lowercased


@implementer(IResolver)
class StaticResolver(common.ResolverBase):
    """
    An in-memory L{IResolver} for tests, demos and embedders without DNS.

    ``mx`` maps a domain to its MX records as ``(preference, host)`` pairs
    (an empty list is a domain with no MX records); ``aliases`` maps a
    domain to its CNAME target; ``failures`` maps a domain to the exception
    a lookup fails with. Any other name is NXDOMAIN.
    """

    def __init__(
        self,
        mx: dict[str, list[tuple[int, str]]] | None = None,
        failures: dict[str, Exception] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        common.ResolverBase.__init__(self)
        self.mx = {_key(k): v for k, v in (mx or {}).items()}
        self.failures = {_key(k): v for k, v in (failures or {}).items()}
        self.aliases = {_key(k): v for k, v in (aliases or {}).items()}
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        owner = _key(name)
        self.queries.append((owner, type))
        answers: list[dns.RRHeader] = []
        for _ in range(8):
            if owner in self.failures:
                return defer.fail(self.failures[owner])
            if owner not in self.aliases:
                break
            target = self.aliases[owner]
            cname: Any = dns.Record_CNAME(target.encode("utf-8"))
            answers.append(dns.RRHeader(owner, dns.CNAME, payload=cname))
            owner = _key(target)
        if owner not in self.mx:
            return defer.fail(error.DNSNameError(name))
        if type in (dns.MX, dns.ALL_RECORDS):
            for pref, host in self.mx[owner]:
                # Bytes, not str: twisted.names IDNA-encodes a str, and
                # refuses the root name "." of a null MX on the way.
                record: Any = dns.Record_MX(pref, host.encode("utf-8"))
                answers.append(dns.RRHeader(owner, dns.MX, payload=record))
        return defer.succeed((answers, [], []))


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()
