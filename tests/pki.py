"""
A test certificate authority (a test tool, not a test module): a root CA,
an intermediate, and leaf certificates for given names, written as PEM
files the gateway's own loaders read (the leaf file carries the
intermediate as its chain), with their DER forms for TLSA records.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailgw import tls

_NOW = datetime.datetime.now(datetime.UTC)


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _certificate(
    subject: str,
    key: Any,
    issuer: str,
    issuerKey: Any,
    *,
    ca: bool,
    names: tuple[str, ...] = (),
    expired: bool = False,
) -> x509.Certificate:
    end = _NOW - datetime.timedelta(days=1) if expired else _NOW + datetime.timedelta(days=30)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(days=2))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(issuerKey, hashes.SHA256())


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@attrs.frozen
class Leaf:
    """A server certificate (its file holds the chain) and its key file."""

    certificate: str
    key: str
    der: bytes
    spki: bytes

    def serverOptions(self) -> Any:
        return tls.serverContextFactory(self.certificate, self.key)

    def tlsa(self, usage: int = 3, selector: int = 1, matching: int = 1) -> bytes:
        """The TLSA RDATA that matches this certificate."""
        return _tlsa(usage, selector, matching, self.der, self.spki)


def _tlsa(usage: int, selector: int, matching: int, der: bytes, spki: bytes) -> bytes:
    data = der if selector == 0 else spki
    digest = {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}
    return bytes([usage, selector, matching]) + digest[matching]


class TestCA:
    """A root and an intermediate; C{issue} makes leaves under the intermediate."""

    def __init__(self, directory: str, name: str = "Test Root") -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.rootKey = ec.generate_private_key(ec.SECP256R1())
        self.root = _certificate(name, self.rootKey, name, self.rootKey, ca=True)
        self.intermediateKey = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = _certificate(
            name + " Intermediate", self.intermediateKey, name, self.rootKey, ca=True
        )
        self.rootFile = os.path.join(directory, "root.pem")
        with open(self.rootFile, "wb") as f:
            f.write(_pem(self.root))
        self._count = 0

    def intermediateTLSA(self, selector: int = 1, matching: int = 1) -> bytes:
        """A DANE-TA(2) record for the intermediate."""
        der = self.intermediate.public_bytes(serialization.Encoding.DER)
        spki = self.intermediate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _tlsa(2, selector, matching, der, spki)

    def issue(self, *names: str, expired: bool = False) -> Leaf:
        self._count += 1
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(
            names[0] if names else "nameless",
            key,
            self.intermediate.subject.rfc4514_string()[3:],
            self.intermediateKey,
            ca=False,
            names=names,
            expired=expired,
        )
        base = os.path.join(self.directory, f"leaf{self._count}")
        with open(base + ".pem", "wb") as f:
            f.write(_pem(leaf, self.intermediate))
        with open(base + ".key", "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return Leaf(
            base + ".pem", base + ".key", leaf.public_bytes(serialization.Encoding.DER), spki
        )
