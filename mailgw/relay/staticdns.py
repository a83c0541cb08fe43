"""
An in-memory DNS for tests, demos and embedders: MX, TXT and TLSA answers,
and an AD bit the caller controls (L{ISecureResolver}), so that MTA-STS and
DANE can be exercised without any network.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.names import dns, error
from zope.interface import implementer

from mailgw.interfaces import ISecureResolver
from mailgw.relay.dane import TLSA
from mailgw.relay.dnssec import SecureAnswer
from mailgw.relay.routing import StaticResolver

__all__ = ["StaticDNS"]


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


@implementer(ISecureResolver)
class StaticDNS(StaticResolver):
    """
    L{StaticResolver} plus ``txt`` (name -> TXT strings), ``tlsa`` (name,
    e.g. ``_25._tcp.mx.example``, -> TLSA RDATA bytes) and ``secure``: the
    names whose answers carry the AD bit (``"*"``: every name). A name with
    no records of any kind is NXDOMAIN.
    """

    def __init__(
        self,
        mx: dict[str, list[tuple[int, str]]] | None = None,
        *,
        txt: dict[str, list[str]] | None = None,
        tlsa: dict[str, list[bytes]] | None = None,
        secure: set[str] | None = None,
        failures: dict[str, Exception] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        super().__init__(mx, failures, aliases)
        self.txt = {_key(k): v for k, v in (txt or {}).items()}
        self.tlsa = {_key(k): v for k, v in (tlsa or {}).items()}
        self.secure = {_key(k) if k != "*" else k for k in (secure or set())}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        owner = _key(name)
        self.queries.append((owner, type))
        if owner in self.failures:
            return defer.fail(self.failures[owner])
        answers: list[dns.RRHeader] = []
        if type == dns.MX and owner in self.mx:
            for pref, host in self.mx[owner]:
                record: Any = dns.Record_MX(pref, host.encode("utf-8"))
                answers.append(dns.RRHeader(owner, dns.MX, payload=record))
        elif type == dns.TXT and owner in self.txt:
            for text in self.txt[owner]:
                answers.append(
                    dns.RRHeader(owner, dns.TXT, payload=dns.Record_TXT(text.encode("utf-8")))
                )
        elif type == TLSA and owner in self.tlsa:
            for data in self.tlsa[owner]:
                answers.append(dns.RRHeader(owner, TLSA, payload=dns.UnknownRecord(data)))
        elif owner not in self.mx and owner not in self.txt and owner not in self.tlsa:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed((answers, [], []))

    def lookupSecure(self, name: str, type: int) -> defer.Deferred[SecureAnswer]:
        authenticated = "*" in self.secure or _key(name) in self.secure
        d = self._lookup(name.encode("ascii"), dns.IN, type, None)
        return d.addCallback(lambda result: SecureAnswer(tuple(result[0]), authenticated))
