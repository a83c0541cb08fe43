"""
What each upstream host's TLS must prove (L{PeerSecurity}): the route's
TLS level, raised for MX delivery by the recipient domain's own policy,
DANE (RFC 7672) first, MTA-STS (RFC 8461) otherwise, as RFC 8461 2 asks.

- ``dane`` level, MX RRset validated, the host's TLSA records validated and
  usable: the chain must match them (no plain text, no unverified TLS);
  validated but unusable records: TLS required, unverified (RFC 7672 2.2);
  a failed TLSA lookup: the host is skipped (RFC 7672 2.2.1);
  otherwise ``may``.
- MTA-STS ``enforce``: only hosts matching the policy's ``mx`` patterns,
  each with verified TLS for its own name (``verify``); none matching: the
  recipients are deferred. ``testing``: every host, at the route's level,
  failures logged and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.logger import Logger

from mailgw.config import Route, TLSLevel, TLSMode
from mailgw.relay.dane import TLSARecord, lookupTLSA
from mailgw.relay.routing import Destination, TransientRoutingError

__all__ = ["PeerSecurity", "TLSPolicy", "routeLevel"]

log = Logger()

_UNVERIFIED = (TLSLevel.MAY, TLSLevel.ENCRYPT)

#: RFC 3463 X.7.5 "cryptographic failure": the policy cannot be met now.
POLICY_UNMET = "4.7.5"


@attrs.frozen
class PeerSecurity:
    """
    What one host's TLS must prove. ``names`` are the reference identifiers
    (``verify``, ``secure``, DANE-TA); ``policy`` is the TLS-RPT policy type
    (``tlsa``, ``sts`` or ``no-policy-found``) of ``policyDomain``;
    ``testing``: check (MTA-STS testing mode) but deliver whatever the result.
    """

    level: TLSLevel
    names: tuple[str, ...] = ()
    tlsa: tuple[TLSARecord, ...] = ()
    policy: str = "no-policy-found"
    policyDomain: str = ""
    testing: bool = False


def routeLevel(route: Route) -> TLSLevel:
    """The route's level: its ``tls_level``, else what ``tls`` has always meant."""
    if route.tlsLevel is not None:
        return route.tlsLevel
    return TLSLevel.NONE if route.tls is TLSMode.NONE else TLSLevel.VERIFY


@attrs.define
class TLSPolicy:
    """
    Attaches a L{PeerSecurity} to each destination (L{secure}).

    @ivar mtasts: L{mailgw.relay.mtasts.MTASTSPolicies}, or None (no MTA-STS).
    @ivar secureResolver: an L{ISecureResolver}, or None (no DANE).
    @ivar report: told C{(policyDomain, policyType, resultType)} of each
        policy failure found here (TLS-RPT counting), or None.
    """

    mtasts: Any = None
    secureResolver: Any = None
    report: Callable[[str, str, str], None] | None = None

    async def secure(
        self, route: Route, domain: str | None, destinations: list[Destination], mxSecure: bool
    ) -> list[Destination]:
        """
        ``destinations`` with their security set, those the domain's policy
        refuses left out.

        @raise TransientRoutingError: no host is left (enhanced code 4.7.5).
        """
        level = routeLevel(route)
        if not route.mx or domain is None or domain.startswith("["):
            # Smarthosts, and MX routes' address literals: no DNS, no DANE.
            level = TLSLevel.MAY if level is TLSLevel.DANE else level
            names = route.tlsMatch
            return [
                attrs.evolve(
                    d, security=PeerSecurity(level, names or (d.host,), policyDomain=d.host)
                )
                if route.tlsLevel is not None
                else d
                for d in destinations
            ]
        dane = level is TLSLevel.DANE and self.secureResolver is not None and mxSecure
        policy = None
        if route.mtaSts and self.mtasts is not None:
            policy = await self.mtasts.policyFor(domain)
            if policy is not None and policy.mode == "none":
                policy = None
        chosen: list[Destination] = []
        problems: list[str] = []
        for destination in destinations:
            security: PeerSecurity | None = None
            if dane:
                try:
                    found = await lookupTLSA(self.secureResolver, destination.host)
                except Exception as e:
                    problems.append(
                        f"TLSA lookup for {destination.host} failed ({type(e).__name__})"
                    )
                    self._report(domain, "tlsa", "dnssec-invalid")
                    continue
                if found.applies:
                    security = PeerSecurity(
                        TLSLevel.DANE, (destination.host,), found.records, "tlsa", domain
                    )
                elif found.secure and found.unusable:
                    security = PeerSecurity(TLSLevel.ENCRYPT, policy="tlsa", policyDomain=domain)
            if security is None and policy is not None:
                if not policy.allows(destination.host):
                    if policy.mode == "enforce":
                        problems.append(f"{destination.host} does not match the MTA-STS policy")
                        self._report(domain, "sts", "validation-failure")
                        continue
                    log.info(
                        "MTA-STS testing: {host} does not match the policy of {domain}",
                        host=destination.host,
                        domain=domain,
                    )
                    self._report(domain, "sts", "validation-failure")
                if policy.mode == "enforce":
                    security = PeerSecurity(TLSLevel.VERIFY, (destination.host,), (), "sts", domain)
                else:
                    security = self._routeSecurity(route, level, domain, destination)
                    if security is not None and security.level in _UNVERIFIED:
                        names = (destination.host,)
                        security = attrs.evolve(security, names=names, policy="sts", testing=True)
            if security is None:
                security = self._routeSecurity(route, level, domain, destination)
            chosen.append(attrs.evolve(destination, security=security))
        if not chosen:
            raise TransientRoutingError(
                f"TLS policy of {domain} cannot be met: " + "; ".join(problems), POLICY_UNMET
            )
        return chosen

    def _routeSecurity(
        self, route: Route, level: TLSLevel, domain: str, destination: Destination
    ) -> PeerSecurity | None:
        if route.tlsLevel is None:
            return None  # the route's tls mode, as before levels existed
        if level is TLSLevel.DANE:
            level = TLSLevel.MAY  # no usable, validated TLSA records
        if level is TLSLevel.SECURE:
            # Postfix's smtp_tls_secure_cert_match = nexthop, dot-nexthop: the
            # MX host name came from DNS an attacker may forge, so it is not
            # a reference identifier; the recipient domain is.
            names = route.tlsMatch or (domain, "." + domain)
            return PeerSecurity(level, names, policyDomain=domain)
        return PeerSecurity(level, (destination.host,), policyDomain=domain)

    def _report(self, domain: str, policy: str, resultType: str) -> None:
        if self.report is not None:
            self.report(domain, policy, resultType)
