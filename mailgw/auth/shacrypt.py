"""
SHA-crypt: the C{$5$} (SHA256-CRYPT) and C{$6$} (SHA512-CRYPT) password
hashes of glibc's C{crypt(3)}, which Dovecot, OpenLDAP's C{{CRYPT}} and
most SQL user tables hold.

A small implementation of the published algorithm (Ulrich Drepper, "Unix
crypt using SHA-256 and SHA-512", the specification glibc, OpenSSL's
C{passwd -5/-6} and Dovecot follow), because Python's C{crypt} module is
gone from 3.13 and passlib is unmaintained. The tests check it against
the specification's own vectors and against hashes made by
C{openssl passwd}, C{mkpasswd} and C{doveadm pw}.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable

__all__ = ["ShaCryptError", "shaCrypt", "verifyShaCrypt"]

_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DEFAULT_ROUNDS = 5000
_MIN_ROUNDS = 1000
_MAX_ROUNDS = 999_999_999
# The salt: up to 16 printable ASCII characters other than "$".
_HASH = re.compile(
    r"\$(?P<id>[56])\$(?:rounds=(?P<rounds>[0-9]{1,9})\$)?"
    r"(?P<salt>[!-#%-~]{0,16})\$(?P<hash>[./0-9A-Za-z]+)\Z"
)

# The byte order of the final encoding (the specification's b64_from_24bit
# calls): each triple is one group of four characters.
_ORDER_512 = [
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
    (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
    (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
    (18, 39, 60), (40, 61, 19), (62, 20, 41),
]  # fmt: skip
_ORDER_256 = [
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
    (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29),
]  # fmt: skip


class ShaCryptError(ValueError):
    """The value is not a C{$5$} or C{$6$} hash."""


def _b64(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ALPHABET[w & 0x3F])
        w >>= 6
    return "".join(out)


def _encode(digest: bytes, sha512: bool) -> str:
    if sha512:
        groups = [_b64(digest[a], digest[b], digest[c], 4) for a, b, c in _ORDER_512]
        groups.append(_b64(0, 0, digest[63], 2))
    else:
        groups = [_b64(digest[a], digest[b], digest[c], 4) for a, b, c in _ORDER_256]
        groups.append(_b64(0, digest[31], digest[30], 3))
    return "".join(groups)


def _repeat(block: bytes, length: int) -> bytes:
    return (block * (length // len(block) + 1))[:length]


def _digest(password: bytes, salt: bytes, rounds: int, sha512: bool) -> bytes:
    """The specification's steps 1 to 21."""
    new: Callable[..., hashlib._Hash] = hashlib.sha512 if sha512 else hashlib.sha256
    size = 64 if sha512 else 32
    b = new(password + salt + password).digest()
    a = new(password + salt)
    i = len(password)
    while i > 0:
        a.update(b if i >= size else b[:i])
        i -= size
    i = len(password)
    while i > 0:
        a.update(b if i & 1 else password)
        i >>= 1
    c = a.digest()
    p = _repeat(new(password * len(password)).digest(), len(password))
    s = _repeat(new(salt * (16 + c[0])).digest(), len(salt))
    for r in range(rounds):
        h = new(p if r & 1 else c)
        if r % 3:
            h.update(s)
        if r % 7:
            h.update(p)
        h.update(c if r & 1 else p)
        c = h.digest()
    return c


def shaCrypt(password: bytes, salt: str, rounds: int | None = None, sha512: bool = True) -> str:
    """
    The C{$6$} (or, without C{sha512}, C{$5$}) hash of C{password} with
    C{salt} (at most 16 characters are used) and C{rounds} (C{None}: the
    default 5000, written without a C{rounds=} field; otherwise clamped to
    1000..999999999 as the specification says).
    """
    saltText = salt[:16]
    prefix = "$6$" if sha512 else "$5$"
    if rounds is None:
        count = _DEFAULT_ROUNDS
    else:
        count = min(max(rounds, _MIN_ROUNDS), _MAX_ROUNDS)
        prefix += f"rounds={count}$"
    digest = _digest(password, saltText.encode("utf-8"), count, sha512)
    return f"{prefix}{saltText}${_encode(digest, sha512)}"


def verifyShaCrypt(stored: str, password: bytes) -> bool:
    """
    Whether C{password} matches C{stored}, a C{$5$} or C{$6$} hash; the
    final comparison takes constant time.

    @raise ShaCryptError: C{stored} is not such a hash.
    """
    match = _HASH.match(stored)
    if match is None:
        raise ShaCryptError("not a SHA-crypt ($5$ or $6$) hash")
    sha512 = match["id"] == "6"
    if len(match["hash"]) != (86 if sha512 else 43):
        raise ShaCryptError("SHA-crypt hash of the wrong length")
    rounds = int(match["rounds"]) if match["rounds"] is not None else None
    computed = shaCrypt(password, match["salt"], rounds, sha512)
    return hmac.compare_digest(computed.encode("ascii"), stored.encode("ascii"))
