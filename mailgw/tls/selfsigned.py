"""
A self-signed certificate (the demo, tests), written with safe modes.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

import idna
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailgw.tls.files import TLSConfigError


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
