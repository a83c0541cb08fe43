"""
Reading certificates and keys (errors name the file), and the protocol
version floor.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.ssl import TLSVersion

#: The accepted spellings of a minimum protocol version.
MINIMUM_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"}


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
