"""
The listeners' server context: TLS 1.2 or newer, ALPN offers ignored
(RFC 7301 3.2), session tickets whose key is replaced every ticket lifetime,
and one log line for every failed handshake.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.logger import Logger

from mailgw.tls.files import TLSConfigError, _minimum, _publicDER, loadCertificates, loadPrivateKey

_log = Logger(namespace="mailgw.tls")

#: Seconds a session ticket key is used, and the longest a ticket resumes.
DEFAULT_TICKET_LIFETIME = 3600


def _ignoreALPN(connection: SSL.Connection, offered: list[bytes]) -> Any:
    # RFC 7301 3.2: a server that supports none of the offered protocols may
    # answer without the extension. Postfix does; refusing (Twisted's
    # callback answers b"", a fatal no_application_protocol/internal_error
    # alert) turns away every phone and browser-engine TLS stack, which
    # offer "h2" or "http/1.1" on every connection. SMTP has no ALPN id.
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _errorReason(error: SSL.Error) -> str:
    """OpenSSL's reason strings for ``error`` (never peer data), or its text."""
    if isinstance(error, SSL.SysCallError):
        return "connection closed during the handshake"
    if error.args and isinstance(error.args[0], list):
        reasons = [str(e[-1]) for e in error.args[0] if isinstance(e, tuple) and e]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


class _ServerConnection(SSL.Connection):
    """
    A server-side OpenSSL connection that logs once why its handshake
    failed: the client's address and OpenSSL's reason (a sent or received
    alert, no shared protocol version or cipher, a non-TLS first record, a
    hang-up in the middle). A client that closes before sending a byte (a
    port probe) is not logged.
    """

    _handshook = False
    _logged = False
    _received = False

    def bio_write(self, buf: bytes | bytearray | memoryview) -> int:
        self._received = True
        return super().bio_write(buf)

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (SSL.WantReadError, SSL.WantWriteError):
            raise
        except SSL.Error as e:
            self._failed(e)
            raise
        self._handshook = True

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        # After the transport closed, Twisted reads once more; during a
        # handshake that read ends it with OpenSSL's error.
        try:
            return super().recv(bufsiz, flags)
        except (SSL.WantReadError, SSL.WantWriteError, SSL.ZeroReturnError):
            raise
        except SSL.Error as e:
            if not self._handshook:
                self._failed(e)
            raise

    def _failed(self, error: SSL.Error) -> None:
        if self._logged or not self._received:
            return
        self._logged = True
        try:
            peer = self.get_app_data().getPeer()
            client = f"{peer.host}:{peer.port}"
        except Exception:
            client = "unknown"
        _log.info(
            "TLS handshake failed client={client}: {reason}",
            client=client,
            reason=_errorReason(error),
        )


class ServerTLSOptions(ssl.CertificateOptions):
    """
    Twisted's L{ssl.CertificateOptions} for the listeners, with three
    differences: ALPN offers are ignored instead of refused; the handshake
    failures are logged; and session tickets (RFC 5077, RFC 8446 4.6.1)
    are issued when C{ticketLifetime} is positive.

    OpenSSL draws a random ticket key (name, HMAC and AES keys) when a
    context is created and never changes it. So the context is replaced by
    a fresh one, with a fresh key, when it is C{ticketLifetime} seconds old;
    connections on the old context finish on it, and tickets of the old key
    no longer resume (the client makes a full handshake and gets a new
    ticket). The session timeout is the same C{ticketLifetime}: OpenSSL
    refuses to resume a ticket older than that and announces it as the
    ticket's lifetime hint. No server-side session cache is kept (its
    memory would grow with clients), so TLS 1.2 clients resume by ticket
    only, as TLS 1.3 clients always do.
    """

    def __init__(
        self,
        *,
        ticketLifetime: int = DEFAULT_TICKET_LIFETIME,
        now: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        if ticketLifetime < 0:
            raise ValueError(f"ticket lifetime must be 0 or more seconds, got {ticketLifetime}")
        super().__init__(enableSessionTickets=ticketLifetime > 0, **options)
        self.ticketLifetime = ticketLifetime
        self._now = now
        self._current: SSL.Context | None = None
        self._replaceAt = 0.0

    def getContext(self) -> SSL.Context:
        """
        The context new connections use; a new one (a new ticket key) once
        the current one is C{ticketLifetime} seconds old.
        """
        now = self._now()
        if self._current is None or (self.ticketLifetime and now >= self._replaceAt):
            # Twisted's own (uncached) builder: options, certificate, chain,
            # ciphers, curves, and its ALPN callback, replaced here before
            # any connection uses the context. The handshake tests run
            # through it, so a change in Twisted shows there.
            context = self._makeContext()
            context.set_alpn_select_callback(_ignoreALPN)
            if self.ticketLifetime:
                context.set_timeout(self.ticketLifetime)
            self._current = context
            self._replaceAt = now + self.ticketLifetime
        return self._current

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return _ServerConnection(self.getContext(), None)


def serverContextFactory(
    certificatePath: str,
    keyPath: str,
    minimumVersion: str = "TLSv1.2",
    ticketLifetime: int = DEFAULT_TICKET_LIFETIME,
    now: Callable[[], float] = time.monotonic,
) -> ServerTLSOptions:
    """
    The server TLS context for every listener: the first certificate of
    ``certificatePath`` as the leaf, the rest sent as its chain, with the key
    from ``keyPath`` (which may be the same file). Both listeners share it,
    so a ticket from one resumes on the other. ``ticketLifetime`` 0 turns
    session tickets off (see L{ServerTLSOptions}).

    @raise TLSConfigError: a file is missing, unreadable or not PEM, or the
        key does not match the certificate.
    @raise ValueError: ``minimumVersion`` is not "TLSv1.2" or "TLSv1.3", or
        ``ticketLifetime`` is negative.
    """
    minimum = _minimum(minimumVersion)
    certificates = loadCertificates(certificatePath)
    key = loadPrivateKey(keyPath)
    if _publicDER(key.public_key()) != _publicDER(certificates[0].public_key()):
        raise TLSConfigError(
            keyPath, f"the private key does not match the certificate in {certificatePath}"
        )
    return ServerTLSOptions(
        ticketLifetime=ticketLifetime,
        now=now,
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certificates[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certificates[1:]],
        raiseMinimumTo=minimum,
    )
