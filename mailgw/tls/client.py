"""
The relay's client connections, and what a finished handshake negotiated.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl as stdssl

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

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


def trustStore(caFile: str | None = None) -> crypto.X509Store:
    """
    The store certificates are verified against after a handshake (levels
    ``secure``, DANE-TA's chain): the certificates of the PEM file
    ``caFile``, or OpenSSL's default trust store. Blocking: build it in a
    thread and keep it.

    @raise TLSConfigError: ``caFile`` is missing, unreadable or holds no
        certificate.
    """
    store = crypto.X509Store()
    if caFile:
        for certificate in loadCertificates(caFile):
            store.add_cert(crypto.X509.from_cryptography(certificate))
    else:
        paths = stdssl.get_default_verify_paths()
        if paths.cafile or paths.capath:
            store.load_locations(paths.cafile, paths.capath)
    return store


@functools.cache
def _unverifiedContext(minimumVersion: str) -> SSL.Context:
    # Built once per floor: no trust store is loaded, the certificate is
    # looked at after the handshake (mailgw.tls.peercheck) when at all.
    options = ssl.CertificateOptions(raiseMinimumTo=_minimum(minimumVersion))
    context: SSL.Context = options.getContext()
    context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    return context


@implementer(IOpenSSLClientConnectionCreator)
class PeerTLSCreator:
    """
    Client TLS that completes whatever certificate the upstream shows
    (``may``, ``encrypt``, and the levels whose checks run after the
    handshake: ``secure`` and DANE, see L{mailgw.tls.peercheck}); sends
    ``serverName`` as SNI (RFC 6066 3; RFC 7672 8.1 asks for it with DANE).
    """

    def __init__(self, serverName: str, minimumVersion: str = "TLSv1.2") -> None:
        self.serverName = serverName
        self._context = _unverifiedContext(minimumVersion)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        try:
            ipaddress.ip_address(self.serverName)
        except ValueError:  # SNI carries host names only (RFC 6066 3)
            connection.set_tlsext_host_name(self.serverName.encode("idna"))
        return connection
