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

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import time
from collections.abc import Callable
from typing import Any

import idna
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import TLSVersion
from twisted.logger import Logger

#: The accepted spellings of a minimum protocol version.
MINIMUM_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"}

#: Seconds a session ticket key is used, and the longest a ticket resumes.
DEFAULT_TICKET_LIFETIME = 3600

_log = Logger()


class TLSConfigError(ValueError):
    """
    A certificate, key or CA file that cannot be used: missing, unreadable,
    not PEM, or a key that does not belong to the certificate. Permanent:
    the operator has to fix the file.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _readFile(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSConfigError(path, "no such file") from None
    except PermissionError:
        raise TLSConfigError(path, "not readable: permission denied") from None
    except IsADirectoryError:
        raise TLSConfigError(path, "is a directory, not a PEM file") from None
    except OSError as e:
        raise TLSConfigError(path, f"cannot read: {e.strerror or e}") from None


def _pemBlocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every PEM block in ``data`` as (label, whole block), in file order."""
    return [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def loadCertificates(path: str) -> list[x509.Certificate]:
    """
    Every certificate in the PEM file ``path``, in file order (for a server
    certificate: the leaf first, then its chain).

    @raise TLSConfigError: missing, unreadable, or holds no certificate.
    """
    blocks = [b for label, b in _pemBlocks(_readFile(path)) if label == b"CERTIFICATE"]
    if not blocks:
        raise TLSConfigError(path, "no PEM certificate found (expected BEGIN CERTIFICATE)")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise TLSConfigError(path, f"certificate #{number} is not valid PEM/DER") from None
    return certificates


def loadPrivateKey(path: str) -> Any:
    """
    The one unencrypted private key in the PEM file ``path`` (which may also
    hold certificates).

    @raise TLSConfigError: missing, unreadable, no key, several keys, or an
        encrypted key (a daemon has nobody to ask for the passphrase).
    """
    blocks = [b for label, b in _pemBlocks(_readFile(path)) if label in _KEY_LABELS]
    if not blocks:
        raise TLSConfigError(path, "no PEM private key found (expected BEGIN PRIVATE KEY)")
    if len(blocks) > 1:
        raise TLSConfigError(path, f"holds {len(blocks)} private keys; expected one")
    try:
        return serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:
        raise TLSConfigError(path, "the private key is encrypted; store it unencrypted") from None
    except (ValueError, crypto.Error) as e:
        raise TLSConfigError(path, f"the private key cannot be loaded: {e}") from None


def _publicDER(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _minimum(version: str) -> Any:
    try:
        return MINIMUM_VERSIONS[version]
    except KeyError:
        allowed = ", ".join(MINIMUM_VERSIONS)
        raise ValueError(f"minimum TLS version must be one of {allowed}, got {version!r}") from None


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


def _subjectAltNames(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in (hostname, "localhost", "127.0.0.1"):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(idna.encode(name, uts46=True).decode("ascii")))
    return names


def _writeNew(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def makeSelfSigned(
    certificatePath: str,
    keyPath: str,
    hostname: str,
    days: int = 825,
    now: datetime.datetime | None = None,
) -> bool:
    """
    Write a self-signed EC P-256 certificate for ``hostname`` (also valid
    for ``localhost`` and ``127.0.0.1``) to ``certificatePath`` and its key
    to ``keyPath`` (mode 0600). Used by the demo mode on first run.

    Existing files are never overwritten: when both exist nothing is done.

    @return: True when the files were created, False when both existed.
    @raise TLSConfigError: only one of the two files exists.
    @raise OSError: the files cannot be written.
    """
    certExists, keyExists = os.path.exists(certificatePath), os.path.exists(keyPath)
    if certExists and keyExists:
        return False
    if certExists or keyExists:
        present, missing = (certificatePath, keyPath) if certExists else (keyPath, certificatePath)
        raise TLSConfigError(missing, f"missing while {present} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    commonName = hostname if 0 < len(hostname) <= 64 else "localhost"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    publicKey = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subjectAltNames(hostname)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(publicKey), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _writeNew(keyPath, keyPEM, 0o600)
    try:
        _writeNew(certificatePath, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        os.unlink(keyPath)
        raise
    return True
