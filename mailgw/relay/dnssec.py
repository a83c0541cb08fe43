"""
DNS answers with their DNSSEC status, for DANE (RFC 7672 2.1.1): a query
with the AD bit set (RFC 6840 5.7 asks a validating resolver to set AD in
its answer only then) and the answer's AD bit read back.

The AD bit proves nothing by itself: it is trusted because the resolver is
(a validating resolver on this host or reached over a trusted network, as
Postfix's smtp_dns_support_level = dnssec requires). docs/relay.md says so.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.names import client, dns
from zope.interface import implementer

from mailgw.interfaces import ISecureResolver

__all__ = ["DNSSECResolver", "SecureAnswer"]


@attrs.frozen
class SecureAnswer:
    """The answer section's records, and whether the resolver validated them."""

    records: tuple[dns.RRHeader, ...]
    authenticated: bool


def _askForAD(protocol: Any) -> None:
    """Set the AD bit in every query ``protocol`` writes (UDP or TCP)."""
    write = protocol.writeMessage

    def writeMessage(message: dns.Message, *args: Any) -> None:
        message.authenticData = 1
        write(message, *args)

    protocol.writeMessage = writeMessage


@implementer(ISecureResolver)
class DNSSECResolver(client.Resolver):  # type: ignore[misc]
    """
    twisted.names' stub resolver (the servers of ``resolv`` or ``servers``)
    whose queries ask for the AD bit, with L{lookupSecure}.
    """

    def _connectedProtocol(self, interface: str = "") -> Any:
        protocol = super()._connectedProtocol(interface)
        _askForAD(protocol)
        return protocol

    def connectionMade(self, protocol: Any) -> None:
        _askForAD(protocol)
        super().connectionMade(protocol)

    def lookupSecure(self, name: str, type: int) -> Deferred[SecureAnswer]:
        query = dns.Query(name.encode("ascii"), type, dns.IN)
        d: Deferred[Any] = self.queryUDP([query], self.timeout)

        def answered(message: dns.Message, tcp: bool = False) -> Any:
            if message.trunc and not tcp:
                return self.queryTCP([query]).addCallback(answered, True)
            if message.rCode != dns.OK:
                raise self.exceptionForCode(message.rCode)(message)
            return SecureAnswer(tuple(message.answers), bool(message.authenticData))

        return d.addCallback(answered)
