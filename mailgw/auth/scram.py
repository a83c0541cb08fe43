"""
SCRAM-SHA-256 (RFC 5802, RFC 7677) on the backend's side: the keys a
backend stores instead of the password, how they are made, and the
credentials a completed exchange hands to the portal.

A backend that serves SCRAM provides L{IScramKeys}: the SASL exchange
(L{mailgw.server.scram}) asks it, in the middle of the exchange, for the
user's salt and iteration count, and then proves the client's proof
against the stored key. The backend never sees the password, and the
stored keys cannot be replayed as a password (but they are as good as a
PBKDF2 hash for an offline guesser: keep the file private).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stringprep
import unicodedata
from typing import Any

import attrs
from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "DEFAULT_ITERATIONS",
    "MIN_ITERATIONS",
    "IScramCredentials",
    "IScramKeys",
    "ScramCredentials",
    "ScramKeys",
    "makeKeys",
    "saslprep",
]

#: RFC 7677 asks for at least 4096 iterations; fewer are refused.
MIN_ITERATIONS = 4096
#: What C{mailgw passwd --scram} uses (and the decoy keys of unknown users).
DEFAULT_ITERATIONS = 10000
_PREFIX = "SCRAM-SHA-256$"


def saslprep(text: str) -> str:
    """
    SASLprep (RFC 4013) of a password: non-ASCII spaces become spaces,
    characters mapped to nothing go, then NFKC.

    @raise ValueError: a prohibited character (control, private use,
        surrogate, non-character, ...), as RFC 4013 2.3 says.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    normal = unicodedata.normalize("NFKC", mapped)
    for c in normal:
        if (
            stringprep.in_table_c12(c)
            or stringprep.in_table_c21_c22(c)
            or stringprep.in_table_c3(c)
            or stringprep.in_table_c4(c)
            or stringprep.in_table_c5(c)
            or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c)
            or stringprep.in_table_c8(c)
            or stringprep.in_table_c9(c)
        ):
            raise ValueError("the password holds a character SASLprep prohibits")
    return normal


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


@attrs.frozen
class ScramKeys:
    """One user's SCRAM-SHA-256 keys (never the password); keys are kept out of C{repr}."""

    salt: bytes = attrs.field(repr=False)
    iterations: int
    storedKey: bytes = attrs.field(repr=False)
    serverKey: bytes = attrs.field(repr=False)

    def toField(self) -> str:
        """``SCRAM-SHA-256$ITERATIONS$SALT$STOREDKEY$SERVERKEY`` (base64 each)."""
        parts = [self.salt, self.storedKey, self.serverKey]
        b64 = [base64.b64encode(p).decode("ascii") for p in parts]
        return f"{_PREFIX}{self.iterations}${b64[0]}${b64[1]}${b64[2]}"

    @classmethod
    def fromField(cls, field: str) -> ScramKeys:
        """
        @raise ValueError: not such a field, bad base64 or lengths, or fewer
            than L{MIN_ITERATIONS} iterations (the message quotes no key).
        """
        if not field.startswith(_PREFIX):
            raise ValueError("SCRAM keys must start with SCRAM-SHA-256$")
        parts = field[len(_PREFIX) :].split("$")
        if len(parts) != 4 or not parts[0].isdigit():
            raise ValueError("SCRAM keys must be SCRAM-SHA-256$ITER$SALT$STOREDKEY$SERVERKEY")
        iterations = int(parts[0])
        if iterations < MIN_ITERATIONS:
            raise ValueError(f"SCRAM iteration count below {MIN_ITERATIONS}")
        try:
            salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
        except (binascii.Error, ValueError):
            raise ValueError("SCRAM keys are not base64") from None
        if not salt or len(stored) != 32 or len(server) != 32:
            raise ValueError("SCRAM keys have the wrong lengths")
        return cls(salt, iterations, stored, server)

    @classmethod
    def isField(cls, field: str) -> bool:
        return field.startswith(_PREFIX)


def makeKeys(
    password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> ScramKeys:
    """
    The keys of C{password} (SASLprep'd), under a new random 16-byte salt
    unless one is given.

    @raise ValueError: empty or prohibited password, or too few iterations.
    """
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"SCRAM needs at least {MIN_ITERATIONS} iterations")
    if not password:
        raise ValueError("password must not be empty")
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    clientKey = _hmac(salted, b"Client Key")
    return ScramKeys(
        salt, iterations, hashlib.sha256(clientKey).digest(), _hmac(salted, b"Server Key")
    )


def decoyKeys(secret: bytes, username: bytes) -> ScramKeys:
    """
    Keys for a user who has none (or does not exist): a salt that is the
    same at every attempt for this name (so it tells nothing), the default
    iterations, and keys no proof matches.
    """
    salt = _hmac(secret, b"salt\0" + username)[:16]
    return ScramKeys(salt, DEFAULT_ITERATIONS, _hmac(secret, b"stored\0" + username),
                     _hmac(secret, b"server\0" + username))  # fmt: skip


class IScramKeys(Interface):
    """A checker that can give the SCRAM-SHA-256 keys of its users."""

    def scramKeys(username: bytes) -> Deferred[ScramKeys | None]:
        """
        The keys of C{username} (UTF-8), or C{None} when the user is
        unknown or has none; fails when the backend cannot tell (454).
        """


class IScramCredentials(ICredentials):
    """A completed SCRAM-SHA-256 exchange, for the checker that gave its keys."""

    username = Attribute("The authentication identity, UTF-8 bytes.")
    source = Attribute("The checker whose keys the exchange used; None for decoys.")
    keys = Attribute("The ScramKeys the exchange used.")

    def checkProof() -> bool:
        """Whether the client's proof matches the keys (constant time)."""

    def serverSignature() -> bytes:
        """The server's proof of knowing the keys, for ``v=`` once the login succeeded."""


@implementer(IScramCredentials)
@attrs.frozen
class ScramCredentials:
    """
    What the client proved: ``source`` is the checker whose ``keys`` the
    exchange used (C{None}: nobody had keys; decoys were used), and
    ``clientProof`` must match ``keys`` over ``authMessage``.
    """

    username: bytes
    keys: ScramKeys = attrs.field(repr=False)
    source: Any = attrs.field(repr=False)
    authMessage: bytes = attrs.field(repr=False)
    clientProof: bytes = attrs.field(repr=False)

    def checkProof(self) -> bool:
        """RFC 5802 3: H(ClientProof XOR HMAC(StoredKey, AuthMessage)) == StoredKey."""
        signature = _hmac(self.keys.storedKey, self.authMessage)
        if len(self.clientProof) != len(signature):
            return False
        clientKey = bytes(a ^ b for a, b in zip(self.clientProof, signature, strict=True))
        return hmac.compare_digest(hashlib.sha256(clientKey).digest(), self.keys.storedKey)

    def serverSignature(self) -> bytes:
        return _hmac(self.keys.serverKey, self.authMessage)
