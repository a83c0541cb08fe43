"""
DKIM private keys: read and checked once (at start, on reload, by
``mailgw check-config``), turned into what dkimpy signs with, and the DNS
TXT record (RFC 6376 3.6.1, RFC 8463 4) that publishes their public half.
Also the key generation of ``mailgw dkim keygen``.

Key files are PEM (PKCS#1 ``RSA PRIVATE KEY`` or PKCS#8 ``PRIVATE KEY``, as
opendkim-genkey, openssl and ``mailgw dkim keygen`` write them); an
Ed25519 key may also be dknewkey's single line of base64 (the 32-octet
seed). Every problem is a L{ConfigError} naming file, key and problem.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgw._configparse import ConfigError
from mailgw.dkim.config import DKIMConfig, DomainSigning

#: RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024
#: A key file is small; refuse to read a big file given by mistake.
MAX_KEY_FILE = 64 * 1024


class KeyProblem(Exception):
    """A key that cannot be used; the text names the problem, never the key."""


@attrs.frozen
class LoadedKey:
    """One configured signature with its key read."""

    signing: DomainSigning
    #: What dkimpy signs with: its parsed RSA key (a dict) or a PyNaCl SigningKey.
    private: Any = attrs.field(repr=False)
    #: The TXT record's value, e.g. "v=DKIM1; k=rsa; p=MIIB...".
    record: str

    @property
    def recordName(self) -> str:
        return f"{self.signing.selector}._domainkey.{self.signing.domain}"


def _readKeyFile(path: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyProblem(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyProblem(f"{path} is not a regular file")
    if st.st_mode & 0o027:
        # As OpenDKIM's RequireSafeKeys: a signing key is the domain's identity.
        raise KeyProblem(
            f"{path} is open to others or writable by its group (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 (or 640)"
        )
    if st.st_size > MAX_KEY_FILE:
        raise KeyProblem(f"{path} is {st.st_size} octets long: not a DKIM private key")
    try:
        with open(path, "rb") as f:
            return f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyProblem(f"cannot read {path}: {e.strerror or e}") from None


def parsePrivateKey(data: bytes, path: str) -> Any:
    """
    The cryptography private key in C{data} (PEM, or dknewkey's base64 Ed25519 seed).

    @raise KeyProblem: not a private key, or an encrypted one.
    """
    if b"-----BEGIN" in data:
        try:
            return serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise KeyProblem(f"{path} is encrypted; give mailgw an unencrypted key") from None
        except (ValueError, binascii.Error) as e:
            # cryptography's text names the format, never the key's bytes.
            raise KeyProblem(f"{path} is not a PEM private key ({e})") from None
        except Exception as e:  # an unsupported algorithm, among others
            raise KeyProblem(f"{path} is not a usable private key ({type(e).__name__})") from None
    try:
        raw = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:  # dknewkey --ktype ed25519
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    raise KeyProblem(f"{path} is not a private key (neither PEM nor a base64 Ed25519 seed)")


def _kind(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__.removesuffix('PrivateKey').lstrip('_')} key"


def forDkimpy(key: Any, algorithm: str, path: str) -> tuple[Any, str]:
    """
    (what dkimpy signs with, the TXT record) for C{key} used with C{algorithm}.

    @raise KeyProblem: the key does not fit the algorithm.
    """
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyProblem(f"{path} is {_kind(key)}, but algorithm is rsa-sha256")
        if key.key_size < MIN_RSA_BITS:
            raise KeyProblem(
                f"{path} is a {key.key_size}-bit RSA key; DKIM needs {MIN_RSA_BITS} bits at "
                "least (RFC 8301 3.2), 2048 recommended"
            )
        from dkim.crypto import parse_private_key

        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return parse_private_key(der), record("rsa", public)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyProblem(f"{path} is {_kind(key)}, but algorithm is ed25519-sha256")
    import nacl.signing

    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return nacl.signing.SigningKey(seed), record("ed25519", public)


def record(keyType: str, public: bytes) -> str:
    """The TXT record's value for public key C{public} (SPKI DER for RSA, raw for Ed25519)."""
    return f"v=DKIM1; k={keyType}; p={base64.b64encode(public).decode('ascii')}"


def loadKey(signing: DomainSigning) -> LoadedKey:
    """@raise KeyProblem: the key file cannot be used for C{signing}."""
    key = parsePrivateKey(_readKeyFile(signing.keyFile), signing.keyFile)
    private, txt = forDkimpy(key, signing.algorithm, signing.keyFile)
    return LoadedKey(signing, private, txt)


def keyProblems(config: DKIMConfig, source: str) -> tuple[list[LoadedKey], list[ConfigError]]:
    """Every configured key read: those that load, and a ConfigError for each that does not."""
    loaded: list[LoadedKey] = []
    problems: list[ConfigError] = []
    for index, signing in enumerate(config.domains):
        try:
            loaded.append(loadKey(signing))
        except KeyProblem as e:
            problems.append(ConfigError(source, f"dkim.domains[{index}].key_file", str(e)))
    return loaded, problems


def loadKeys(config: DKIMConfig, source: str) -> list[LoadedKey]:
    """
    Every configured key, read now.

    @raise ConfigError: the first key that cannot be used (file, key, problem).
    """
    loaded, problems = keyProblems(config, source)
    if problems:
        raise problems[0]
    return loaded


def generateKey(algorithm: str, bits: int = 2048) -> tuple[bytes, str]:
    """
    A new private key as PEM (PKCS#1 for RSA, as OpenDKIM reads it; PKCS#8
    for Ed25519) and its TXT record.
    """
    key: Any
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    _, txt = forDkimpy(key, algorithm, "<new key>")
    return pem, txt


def zoneLines(name: str, value: str) -> str:
    """
    C{value} as a zone file TXT record for C{name}, split into quoted
    strings of at most 255 octets (RFC 1035 3.3.14); a DKIM verifier joins
    them (RFC 6376 3.6.2.2).
    """
    data = value.encode("ascii")
    parts = [data[i : i + 255].decode("ascii") for i in range(0, len(data), 255)]
    strings = "\n\t".join(f'"{p}"' for p in parts)
    return f"{name}.\tIN\tTXT\t( {strings} )"
