"""
TLS contexts: the one server context shared by the STARTTLS (587) and
implicit-TLS (465) listeners, the client contexts the relay uses towards its
upstreams, a self-signed certificate for the demo mode, and a way to read
what a finished handshake negotiated.

TLS 1.0 and 1.1 are never offered nor accepted (RFC 8996); the floor is
TLS 1.2 and may be raised to 1.3.

The server context ignores a client's ALPN offer (RFC 7301 3.2 lets a server
that shares no protocol answer without the extension), resumes sessions from
tickets whose key is replaced every ticket lifetime, and logs every failed
handshake with the client's address and OpenSSL's reason.
"""

from mailgw.tls.client import PeerTLSCreator, clientCreator, describeTLS, trustStore
from mailgw.tls.files import (
    MINIMUM_VERSIONS,
    TLSConfigError,
    loadCertificates,
    loadPrivateKey,
)
from mailgw.tls.selfsigned import makeSelfSigned
from mailgw.tls.server import DEFAULT_TICKET_LIFETIME, ServerTLSOptions, serverContextFactory

__all__ = [
    "DEFAULT_TICKET_LIFETIME",
    "MINIMUM_VERSIONS",
    "PeerTLSCreator",
    "ServerTLSOptions",
    "TLSConfigError",
    "clientCreator",
    "describeTLS",
    "loadCertificates",
    "loadPrivateKey",
    "makeSelfSigned",
    "serverContextFactory",
    "trustStore",
]
