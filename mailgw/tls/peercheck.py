"""
Checks of an upstream's certificate after the TLS handshake: the chain
against a trust store, and the names it carries against the names the
route accepts (RFC 6125 6.4: DNS-IDs in subjectAltName only, a wildcard
only as the whole leftmost label).

A check returns None when the peer passes, or a L{Problem}: its TLS-RPT
result type (RFC 8460 4.3) and a text for the log. DANE's check
(L{mailgw.relay.dane}) is one of these too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from cryptography import x509
from OpenSSL import crypto

__all__ = ["NameCheck", "PeerCheck", "Problem", "certificateNames", "nameMatches", "peerChain"]

# OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED and X509_V_ERR_CERT_NOT_YET_VALID.
_TIME_ERRORS = {9, 10}


@attrs.frozen
class Problem:
    """Why a peer failed a check: an RFC 8460 result type and a text."""

    resultType: str
    text: str


class PeerCheck(Protocol):
    """
    What the relay client runs on the TLS connection once the handshake is
    done. ``enforce``: a failure ends the session (transient for every
    recipient); otherwise (MTA-STS ``testing``) it is logged and reported
    alone. ``report`` is told the result type of each failure (TLS-RPT
    counting), or is None.
    """

    enforce: bool
    report: Callable[[str], None] | None

    def check(self, connection: Any) -> Problem | None: ...


def peerChain(connection: Any) -> list[crypto.X509]:
    """The certificates the peer sent, its own first (empty without any)."""
    chain = connection.get_peer_cert_chain() or []
    if not chain:
        leaf = connection.get_peer_certificate()
        chain = [leaf] if leaf is not None else []
    return list(chain)


def verifyChain(store: crypto.X509Store, chain: Sequence[crypto.X509]) -> Problem | None:
    """Does ``chain[0]`` chain to ``store`` through the rest of ``chain``?"""
    if not chain:
        return Problem("certificate-not-trusted", "the upstream sent no certificate")
    context = crypto.X509StoreContext(store, chain[0], list(chain[1:]))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        code = e.errors[0] if e.errors else 0
        kind = "certificate-expired" if code in _TIME_ERRORS else "certificate-not-trusted"
        return Problem(kind, f"certificate verification failed: {e}")
    return None


def certificateNames(certificate: crypto.X509) -> list[str]:
    """The DNS-IDs (subjectAltName dNSName entries) of ``certificate``, lowercased."""
    try:
        extension = certificate.to_cryptography().extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [name.lower().rstrip(".") for name in extension.value.get_values_for_type(x509.DNSName)]


def nameMatches(reference: str, presented: str) -> bool:
    """
    Does the certificate's ``presented`` name satisfy ``reference``? A
    reference ``.example.org`` accepts any name below example.org (Postfix's
    "dot-nexthop"); otherwise the names are equal, or ``presented`` is
    ``*.rest`` and ``reference`` is one label followed by ``.rest``.
    """
    reference = reference.lower().rstrip(".")
    presented = presented.lower()
    if reference.startswith("."):
        if presented.startswith("*."):
            # Every name *.rest stands for lies below rest.
            return ("." + presented[2:]).endswith(reference)
        return presented.endswith(reference) and len(presented) > len(reference)
    if presented.startswith("*."):
        first, dot, rest = reference.partition(".")
        return bool(first and dot) and rest == presented[2:] and "*" not in first
    return reference == presented


@attrs.frozen
class NameCheck:
    """
    The chain verifies against ``store`` and the certificate names one of
    ``names`` (levels ``secure`` and ``verify`` checked after the
    handshake, and MTA-STS).
    """

    store: crypto.X509Store = attrs.field(eq=False)
    names: tuple[str, ...]
    enforce: bool = True
    report: Callable[[str], None] | None = attrs.field(default=None, eq=False)

    def check(self, connection: Any) -> Problem | None:
        chain = peerChain(connection)
        problem = verifyChain(self.store, chain)
        if problem is not None:
            return problem
        presented = certificateNames(chain[0])
        if any(nameMatches(ref, name) for ref in self.names for name in presented):
            return None
        wanted = ", ".join(self.names)
        return Problem(
            "certificate-host-mismatch",
            f"the certificate names none of {wanted} (it names {', '.join(presented) or 'none'})",
        )
