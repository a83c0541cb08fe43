"""
Stored password hashes in the formats user databases hold, verified with
maintained libraries: argon2id and argon2i (argon2-cffi), bcrypt
(C{bcrypt}), SHA512-CRYPT and SHA256-CRYPT (L{mailgw.auth.shacrypt}), and
Dovecot's C{{SCHEME}}-prefixed values (C{{ARGON2ID}}, C{{ARGON2I}},
C{{BLF-CRYPT}}, C{{SHA512-CRYPT}}, C{{SHA256-CRYPT}}, C{{CRYPT}},
C{{SSHA512}}, C{{SSHA256}}, C{{SCRAM-SHA-256}}, and C{{PLAIN}} only when
allowed).

Some values serve more than a password check: a plain one (L{cleartext})
serves CRAM-MD5 and SCRAM-SHA-256, a C{{SCRAM-SHA-256}} one
(L{scramKeysOf}) serves SCRAM-SHA-256.

Every comparison of secret-derived bytes takes constant time. Verifying
costs CPU (argon2 also memory): call L{verifyStored} off the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from mailgw.auth.scram import MIN_ITERATIONS, ScramKeys, makeKeys
from mailgw.auth.shacrypt import ShaCryptError, verifyShaCrypt

__all__ = ["HashFormatError", "cleartext", "hashScheme", "scramKeysOf", "verifyStored"]

_PREFIX = re.compile(r"\{([A-Za-z0-9.-]+)\}")
# $2y$ (or $2a$, $2b$), a two-digit cost, 22 characters of salt and 31 of hash.
# Checked before the library sees it: some bcrypt releases panic on less.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
# bcrypt keeps only the first 72 bytes of a password (the C library
# Dovecot and PHP use truncates them silently; bcrypt 5 raises instead).
_BCRYPT_MAX = 72
_ARGON2 = PasswordHasher()
_SSHA = {"SSHA512": (hashlib.sha512, 64), "SSHA256": (hashlib.sha256, 32)}
_PLAIN = {"PLAIN", "CLEAR", "CLEARTEXT"}


class HashFormatError(ValueError):
    """
    The stored value is in no format this module verifies (or is a plain
    password that is not allowed): a problem of the user database, not a
    wrong password. The message names the scheme, never the value.
    """


def hashScheme(stored: str) -> str:
    """
    The scheme of ``stored``, as Dovecot names it (``ARGON2ID``,
    ``BLF-CRYPT``, ``SHA512-CRYPT``, ``SSHA512``, ``PLAIN`` ...), from its
    ``{SCHEME}`` prefix or the ``$id$`` of a crypt-style value; ``""`` when
    neither tells.
    """
    match = _PREFIX.match(stored)
    if match is not None:
        return match.group(1).upper()
    return _cryptScheme(stored)


def _cryptScheme(value: str) -> str:
    if value.startswith("$argon2id$"):
        return "ARGON2ID"
    if value.startswith("$argon2i$"):
        return "ARGON2I"
    if value[:4] in ("$2a$", "$2b$", "$2y$"):
        return "BLF-CRYPT"
    if value.startswith("$6$"):
        return "SHA512-CRYPT"
    if value.startswith("$5$"):
        return "SHA256-CRYPT"
    return ""


def verifyStored(stored: str, password: bytes, allowPlain: bool = False) -> bool:
    """
    Whether ``password`` matches ``stored``: a crypt-style hash
    (``$argon2id$``, ``$2y$``/``$2b$``/``$2a$``, ``$6$``, ``$5$``) or a
    Dovecot ``{SCHEME}`` value. ``{PLAIN}`` (and its aliases ``{CLEAR}``,
    ``{CLEARTEXT}``) is verified only with ``allowPlain``.

    @raise HashFormatError: ``stored`` is in no supported format, is
        malformed, or is a plain password that is not allowed.
    """
    match = _PREFIX.match(stored)
    if match is None:
        scheme, value = _cryptScheme(stored), stored
    else:
        scheme, value = match.group(1).upper(), stored[match.end() :]
        if scheme == "CRYPT":
            scheme = _cryptScheme(value)
            if not scheme:
                raise HashFormatError("{CRYPT} value of an unsupported kind (DES or MD5 crypt?)")
    if scheme in ("ARGON2ID", "ARGON2I"):
        return _argon2(value, password, scheme)
    if scheme == "BLF-CRYPT":
        return _bcrypt(value, password)
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        if not value.startswith("$6$" if scheme == "SHA512-CRYPT" else "$5$"):
            raise HashFormatError(f"{{{scheme}}} value is not a {scheme} hash")
        try:
            return verifyShaCrypt(value, password)
        except ShaCryptError:
            raise HashFormatError(f"malformed {scheme} hash") from None
    if scheme in _SSHA:
        return _ssha(value, password, scheme)
    if scheme == "SCRAM-SHA-256":
        return _scram(value, password)
    if scheme in _PLAIN:
        if not allowPlain:
            raise HashFormatError("plain-text password stored, and plain-text is not allowed")
        return hmac.compare_digest(value.encode("utf-8"), password)
    if not scheme:
        raise HashFormatError("stored value of no known format")
    raise HashFormatError(f"unsupported scheme {{{scheme}}}")


def _argon2(value: str, password: bytes, scheme: str) -> bool:
    if not value.startswith("$argon2id$" if scheme == "ARGON2ID" else "$argon2i$"):
        raise HashFormatError(f"{{{scheme}}} value is not an {scheme.lower()} hash")
    try:
        return _ARGON2.verify(value, password)
    except VerifyMismatchError:
        return False
    except (InvalidHashError, VerificationError):
        raise HashFormatError(f"malformed {scheme} hash") from None


def _bcrypt(value: str, password: bytes) -> bool:
    import bcrypt  # an optional dependency: only sites with bcrypt hashes need it

    if value[:4] not in ("$2a$", "$2b$", "$2y$"):
        raise HashFormatError("{BLF-CRYPT} value is not a bcrypt hash")
    if not _BCRYPT.match(value):
        raise HashFormatError("malformed BLF-CRYPT hash")
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX], value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise HashFormatError("malformed BLF-CRYPT hash") from None


def _ssha(value: str, password: bytes, scheme: str) -> bool:
    """``base64(H(password + salt) + salt)`` (Dovecot, OpenLDAP)."""
    new, size = _SSHA[scheme]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HashFormatError(f"malformed {scheme} value (not base64)") from None
    if len(raw) <= size:
        raise HashFormatError(f"malformed {scheme} value (no salt)")
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(new(password + salt).digest(), digest)


def cleartext(stored: str, allowPlain: bool) -> bytes | None:
    """
    The password itself when ``stored`` holds it in clear (C{{PLAIN}},
    C{{CLEAR}}, C{{CLEARTEXT}}) and ``allowPlain``; else None.
    """
    match = _PREFIX.match(stored)
    if not allowPlain or match is None or match.group(1).upper() not in _PLAIN:
        return None
    return stored[match.end() :].encode("utf-8")


def scramKeysOf(stored: str) -> ScramKeys | None:
    """
    The SCRAM-SHA-256 keys a Dovecot C{{SCRAM-SHA-256}} value holds
    (C{ITERATIONS,SALT,STOREDKEY,SERVERKEY}, base64 each, as C{doveadm pw}
    writes them); None for any other value.

    @raise HashFormatError: a malformed C{{SCRAM-SHA-256}} value, or fewer
        iterations than RFC 7677 asks for.
    """
    match = _PREFIX.match(stored)
    if match is None or match.group(1).upper() != "SCRAM-SHA-256":
        return None
    parts = stored[match.end() :].split(",")
    if len(parts) != 4 or not parts[0].isdigit():
        raise HashFormatError("malformed SCRAM-SHA-256 value (ITERATIONS,SALT,STORED,SERVER)")
    iterations = int(parts[0])
    if iterations < MIN_ITERATIONS:
        raise HashFormatError(f"SCRAM-SHA-256 value with fewer than {MIN_ITERATIONS} iterations")
    try:
        salt, storedKey, serverKey = (base64.b64decode(p, validate=True) for p in parts[1:])
    except (binascii.Error, ValueError):
        raise HashFormatError("malformed SCRAM-SHA-256 value (not base64)") from None
    if not salt or len(storedKey) != 32 or len(serverKey) != 32:
        raise HashFormatError("malformed SCRAM-SHA-256 value (lengths)")
    return ScramKeys(salt, iterations, storedKey, serverKey)


def _scram(value: str, password: bytes) -> bool:
    """A plain password against SCRAM keys: derive them again under the same salt."""
    keys = scramKeysOf("{SCRAM-SHA-256}" + value)
    assert keys is not None
    try:
        derived = makeKeys(password.decode("utf-8"), keys.iterations, keys.salt)
    except (UnicodeDecodeError, ValueError):
        return False  # not UTF-8, or a character SASLprep prohibits: no such password
    return hmac.compare_digest(derived.storedKey, keys.storedKey) and hmac.compare_digest(
        derived.serverKey, keys.serverKey
    )
