"""
The relay's client connections, and what a finished handshake negotiated.
"""

from __future__ import annotations

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from mailgw.tls.files import _minimum, loadCertificates


def clientCreator(
    hostname: str, caFile: str | None = None, minimumVersion: str = "TLSv1.2"
) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS options for connecting to ``hostname``: the upstream's
    certificate must chain to the system trust store, or to the
    certificates in the PEM file ``caFile`` when one is given, and
    service_identity checks that it names ``hostname`` (a DNS name or an IP
    address).

    @raise TLSConfigError: ``caFile`` is missing, unreadable or holds no
        certificate.
    """
    if caFile:
        trustRoot = ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in loadCertificates(caFile)]
        )
    else:
        trustRoot = ssl.platformTrust()
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=trustRoot,
        extraCertificateOptions={"raiseMinimumTo": _minimum(minimumVersion)},
    )


def describeTLS(transport: object) -> tuple[str | None, str | None]:
    """
    The protocol version name (e.g. ``"TLSv1.3"``) and cipher name the
    handshake on ``transport`` negotiated, or ``(None, None)`` when the
    transport has no TLS or the handshake has not finished.
    """
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return (None, None)
    try:
        handle = getHandle()
    except Exception:
        return (None, None)
    # Duck-typed: anything with OpenSSL.SSL.Connection's two methods.
    if not hasattr(handle, "get_cipher_name") or not hasattr(handle, "get_protocol_version_name"):
        return (None, None)
    cipher = handle.get_cipher_name()
    version = handle.get_protocol_version_name()
    if cipher is None or not version or version == "Unknown":
        return (None, None)
    return (version, cipher)
