"""
DANE for SMTP (RFC 7672): the TLSA records of an MX host, looked up where
DNSSEC vouches for them, and the check of the upstream's certificate chain
against them once the handshake is done.

Usable records (RFC 7672 3.1) are DANE-TA(2) and DANE-EE(3), selector
Cert(0) or SPKI(1), matching Full(0), SHA2-256(1) or SHA2-512(2).
DANE-EE matches the upstream's own certificate, with no name or date check
(RFC 7672 3.1.1); DANE-TA matches a certificate the upstream sent above its
own, to which the chain must verify, and the upstream's certificate must
name the MX host (RFC 7672 3.2.2, the TLSA base domain).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.defer import Deferred
from twisted.names import error

from mailgw.relay.dnssec import SecureAnswer
from mailgw.tls.peercheck import Problem, certificateNames, nameMatches, peerChain, verifyChain

__all__ = ["TLSA", "DaneCheck", "TLSALookup", "TLSARecord", "lookupTLSA"]

#: The TLSA RR type (RFC 6698 7.1); twisted.names keeps its data raw.
TLSA = 52

DANE_TA, DANE_EE = 2, 3
_DIGESTS: dict[int, Callable[[bytes], bytes]] = {
    0: lambda data: data,
    1: lambda data: hashlib.sha256(data).digest(),
    2: lambda data: hashlib.sha512(data).digest(),
}
_LENGTHS = {1: 32, 2: 64}


@attrs.frozen
class TLSARecord:
    """One TLSA record: certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def fromWire(cls, rdata: bytes) -> TLSARecord | None:
        """The record in ``rdata`` (RFC 6698 2.1), None when malformed."""
        if len(rdata) < 4:
            return None
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: DANE-TA or DANE-EE, a known selector and matching type."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.matching not in _DIGESTS:
            return False
        return len(self.data) == _LENGTHS.get(self.matching, len(self.data))

    def matches(self, certificate: crypto.X509) -> bool:
        """Does ``certificate`` (its DER or its key's SPKI) match this record?"""
        cert = certificate.to_cryptography()
        if self.selector == 0:
            selected = cert.public_bytes(serialization.Encoding.DER)
        else:
            selected = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return _DIGESTS[self.matching](selected) == self.data


@attrs.frozen
class TLSALookup:
    """
    What DNS says of an MX host: ``secure`` when the TLSA answer was
    validated (else its records are ignored: RFC 7672 2.2), ``records``
    the usable ones, ``unusable`` when records exist but none is usable
    (then TLS is required but not authenticated: RFC 7672 2.2).
    """

    secure: bool
    records: tuple[TLSARecord, ...] = ()
    unusable: bool = False

    @property
    def applies(self) -> bool:
        return self.secure and bool(self.records)


def lookupTLSA(resolver: Any, host: str, port: int = 25) -> Deferred[TLSALookup]:
    """
    The TLSA records at ``_PORT._tcp.HOST`` through ``resolver`` (an
    L{ISecureResolver}). NXDOMAIN is no records; any other failure fails the
    Deferred (the caller defers the host: RFC 7672 2.2.1 forbids going on
    without the answer).
    """
    d: Deferred[SecureAnswer] = resolver.lookupSecure(f"_{port}._tcp.{host}", TLSA)

    def answered(answer: SecureAnswer) -> TLSALookup:
        if not answer.authenticated:
            return TLSALookup(False)
        records = [
            TLSARecord.fromWire(rr.payload.data)  # type: ignore[union-attr]
            for rr in answer.records
            if rr.type == TLSA and hasattr(rr.payload, "data")
        ]
        found = [r for r in records if r is not None]
        usable = tuple(r for r in found if r.usable)
        return TLSALookup(True, usable, unusable=bool(found) and not usable)

    def failed(failure: Any) -> TLSALookup:
        failure.trap(error.DNSNameError)
        return TLSALookup(False)

    return d.addCallbacks(answered, failed)


@attrs.frozen
class DaneCheck:
    """The peer's chain against usable TLSA ``records`` (L{PeerCheck})."""

    records: tuple[TLSARecord, ...]
    names: tuple[str, ...]
    enforce: bool = True
    report: Callable[[str], None] | None = attrs.field(default=None, eq=False)

    def check(self, connection: Any) -> Problem | None:
        chain = peerChain(connection)
        if not chain:
            return Problem("validation-failure", "DANE: the upstream sent no certificate")
        leaf = chain[0]
        if any(r.usage == DANE_EE and r.matches(leaf) for r in self.records):
            return None
        anchors = [r for r in self.records if r.usage == DANE_TA]
        for depth in range(1, len(chain)):
            if any(r.matches(chain[depth]) for r in anchors):
                problem = self._fromAnchor(chain, depth)
                if problem is None or problem.resultType != "validation-failure":
                    return problem
        return Problem("validation-failure", "DANE: no TLSA record matches the certificate chain")

    def _fromAnchor(self, chain: Sequence[crypto.X509], depth: int) -> Problem | None:
        store = crypto.X509Store()
        store.add_cert(chain[depth])
        # The anchor need not be self-signed (RFC 7671 5.2.2).
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        problem = verifyChain(store, chain[: depth + 1])
        if problem is not None:
            return Problem("validation-failure", f"DANE-TA: {problem.text}")
        presented = certificateNames(chain[0])
        if any(nameMatches(ref, name) for ref in self.names for name in presented):
            return None
        return Problem(
            "certificate-host-mismatch",
            f"DANE-TA: the certificate names none of {', '.join(self.names)}",
        )
