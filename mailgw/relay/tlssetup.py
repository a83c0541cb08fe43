"""
The gateway's MTA-STS and DANE parts, as the service builds them: policies
fetched over HTTPS and kept in the spool's ``mta-sts/`` directory, and a
DNSSEC-aware stub resolver for the servers of ``/etc/resolv.conf`` (which
must be, or reach over a trusted path, a validating resolver: docs/relay.md),
made on first use.
"""

from __future__ import annotations

import os
from typing import Any

from mailgw.relay.filecache import RunBlocking, threadPoolRunner
from mailgw.relay.mtasts import MTASTSPolicies
from mailgw.relay.mtastsfetch import PolicyFetcher
from mailgw.relay.tlspolicy import TLSPolicy

__all__ = ["LazySecureResolver", "makeTLSPolicy"]


class LazySecureResolver:
    """A L{DNSSECResolver} on the system's servers, made when first asked."""

    def __init__(self, reactor: Any, resolvConf: str = "/etc/resolv.conf") -> None:
        self._reactor, self._resolvConf = reactor, resolvConf
        self._resolver: Any = None

    def lookupSecure(self, name: str, type: int) -> Any:
        if self._resolver is None:
            from mailgw.relay.dnssec import DNSSECResolver

            self._resolver = DNSSECResolver(resolv=self._resolvConf, reactor=self._reactor)
        return self._resolver.lookupSecure(name, type)


def makeTLSPolicy(
    reactor: Any,
    resolver: Any,
    spoolDirectory: str | None,
    runBlocking: RunBlocking | None = None,
) -> TLSPolicy:
    """MTA-STS (cached under ``spoolDirectory``/mta-sts when given) and DANE."""
    directory = os.path.join(spoolDirectory, "mta-sts") if spoolDirectory else None
    policies = MTASTSPolicies(
        reactor,
        resolver,
        PolicyFetcher(reactor),
        directory=directory,
        runBlocking=runBlocking or threadPoolRunner(reactor),
    )
    return TLSPolicy(mtasts=policies, secureResolver=LazySecureResolver(reactor))
