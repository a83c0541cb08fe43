"""
ClientHello messages shaped like those of TLS stacks we cannot run here
(BoringSSL in Chrome and Android, NSS in Firefox, Apple's stack in Safari,
Go's crypto/tls), built from the cipher suites, extensions, groups and
signature algorithms those stacks send by default. They are not captures
of real traffic: the fields are the published defaults, the random values
are fresh. What matters for a server is that each carries what made
clients fail before (an ALPN offer of h2 and http/1.1) together with the
other things real clients send: GREASE values (RFC 8701), a post-quantum
hybrid key share (X25519MLKEM768) the server does not know, ECH GREASE,
certificate compression, ALPS, delegated credentials, record size limit,
TLS 1.2-only hellos. Key shares are real public keys (the server may
choose the hybrid one: the OpenSSL that pyOpenSSL brings may know it).

Send one with L{clientHello} and check the first record of the answer with
L{serverAnswer}.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

try:  # cryptography >= 46; the oldest declared version has no ML-KEM
    from cryptography.hazmat.primitives.asymmetric import mlkem
except ImportError:  # pragma: no cover - depends on the installed version
    mlkem = None  # type: ignore[assignment]


def _u8(data: bytes) -> bytes:
    return struct.pack("!B", len(data)) + data


def _u16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _list16(values: list[int]) -> bytes:
    return _u16(b"".join(struct.pack("!H", v) for v in values))


def _grease() -> int:
    n = os.urandom(1)[0] & 0x0F
    return (n << 12) | 0x0A00 | (n << 4) | 0x0A


def _p256Share() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )


def _x25519Share() -> bytes:
    return x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()


def _hybridShare() -> bytes:
    # X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem): the ML-KEM-768
    # encapsulation key, then the X25519 share ("" without ML-KEM: see _pq).
    if mlkem is None:
        return b""
    return mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw() + _x25519Share()


def _pq(entries: list[Any]) -> list[Any]:
    """``entries`` without the hybrid group when this cryptography has no ML-KEM."""
    if mlkem is not None:
        return entries
    return [e for e in entries if e != X25519MLKEM768 and not (
        isinstance(e, tuple) and e[0] == X25519MLKEM768)]  # fmt: skip


X25519, SECP256R1, SECP384R1, SECP521R1, X448 = 0x001D, 0x0017, 0x0018, 0x0019, 0x001E
X25519MLKEM768, FFDHE2048, FFDHE3072 = 0x11EC, 0x0100, 0x0101
TLS13 = [0x1301, 0x1302, 0x1303]
MODERN12 = [0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8]
LEGACY12 = [0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
SIGALGS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
ALPN = [b"h2", b"http/1.1"]


def _ids(text: str) -> list[int]:
    """Code points written as hex words: "c02b c02f" -> [0xC02B, 0xC02F]."""
    return [int(word, 16) for word in text.split()]


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + _u16(body)


def _sni(name: str) -> bytes:
    return _ext(0, _u16(b"\x00" + _u16(name.encode("ascii"))))


def _alpn(protocols: list[bytes]) -> bytes:
    return _ext(16, _u16(b"".join(_u8(p) for p in protocols)))


def _keyShare(shares: list[tuple[int, bytes]]) -> bytes:
    return _ext(51, _u16(b"".join(struct.pack("!H", g) + _u16(k) for g, k in shares)))


def _versions(versions: list[int]) -> bytes:
    return _ext(43, _u8(b"".join(struct.pack("!H", v) for v in versions)))


def _common(groups: list[int], sigalgs: list[int]) -> list[bytes]:
    return [
        _sni("localhost"),
        _ext(23, b""),  # extended_master_secret
        _ext(0xFF01, b"\x00"),  # renegotiation_info
        _ext(10, _list16(groups)),  # supported_groups
        _ext(11, b"\x01\x00"),  # ec_point_formats: uncompressed
        _ext(35, b""),  # session_ticket
        _alpn(ALPN),
        _ext(5, b"\x01\x00\x00\x00\x00"),  # status_request (OCSP)
        _ext(13, _list16(sigalgs)),  # signature_algorithms
        _ext(18, b""),  # signed_certificate_timestamp
    ]


def _chrome() -> tuple[list[int], list[bytes]]:
    g1, g2, g3 = _grease(), _grease(), _grease()
    ciphers = [g1, *TLS13, *MODERN12, *LEGACY12]
    extensions = [
        _ext(g2, b""),
        *_common(_pq([g3, X25519MLKEM768, X25519, SECP256R1, SECP384R1]), SIGALGS),
        _keyShare(_pq([(g3, b"\x00"), (X25519MLKEM768, _hybridShare()), (X25519, _x25519Share())])),
        _ext(45, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
        _versions([_grease(), 0x0304, 0x0303]),
        _ext(27, b"\x02\x00\x02"),  # compress_certificate: brotli
        _ext(17613, _u16(_u8(b"h2"))),  # application_settings (ALPS, 0x44cd since Chrome 131)
        # encrypted_client_hello GREASE: outer, HKDF-SHA256/AES-128-GCM, config id,
        # enc (an X25519 share), payload
        _ext(
            0xFE0D,
            b"\x00\x00\x01\x00\x01" + os.urandom(1) + _u16(os.urandom(32)) + _u16(os.urandom(144)),
        ),
        _ext(_grease(), b"\x00"),
    ]
    return ciphers, extensions


def _firefox() -> tuple[list[int], list[bytes]]:
    ciphers = [0x1301, 0x1303, 0x1302, *MODERN12, 0xC00A, 0xC009, *LEGACY12]
    groups = _pq([X25519MLKEM768, X25519, SECP256R1, SECP384R1, SECP521R1, FFDHE2048, FFDHE3072])
    sigalgs = [*SIGALGS, 0x0203, 0x0201]
    extensions = [
        *_common(groups, sigalgs),
        _ext(34, _list16([0x0403, 0x0503, 0x0603, 0x0203])),  # delegated_credentials
        _keyShare(
            _pq(
                [
                    (X25519MLKEM768, _hybridShare()),
                    (X25519, _x25519Share()),
                    (SECP256R1, _p256Share()),
                ]
            )
        ),
        _versions([0x0304, 0x0303]),
        _ext(45, b"\x01\x01"),
        _ext(28, b"\x40\x01"),  # record_size_limit
        _ext(27, b"\x06\x00\x01\x00\x02\x00\x03"),  # compress_certificate: zlib, brotli, zstd
    ]
    return ciphers, extensions


def _safari() -> tuple[list[int], list[bytes]]:
    g1, g2, g3 = _grease(), _grease(), _grease()
    ciphers = [g1, *TLS13, *_ids("c02c c02b cca9 c030 c02f cca8 c00a c009 c014 c013 009d 009c")]
    ciphers += _ids("0035 002f c008 c012 000a")
    extensions = [
        _ext(g2, b""),
        *_common([g3, X25519, SECP256R1, SECP384R1, SECP521R1], [*SIGALGS, 0x0201]),
        _keyShare([(g3, b"\x00"), (X25519, _x25519Share())]),
        _ext(45, b"\x01\x01"),
        _versions([_grease(), 0x0304, 0x0303, 0x0302, 0x0301]),
        _ext(27, b"\x02\x00\x01"),  # compress_certificate: zlib
        _ext(_grease(), b"\x00"),
    ]
    return ciphers, extensions


def _android9() -> tuple[list[int], list[bytes]]:
    # A TLS 1.2 hello (no supported_versions): BoringSSL before TLS 1.3.
    g1, g2, g3 = _grease(), _grease(), _grease()
    ciphers = [g1, *_ids("c02b c02c cca9 c02f c030 cca8 c009 c00a c013 c014 009c 009d 002f 0035")]
    extensions = [
        _ext(g2, b""),
        *_common([g3, X25519, SECP256R1, SECP384R1], SIGALGS),
        _ext(_grease(), b"\x00"),
    ]
    return ciphers, extensions


def _go() -> tuple[list[int], list[bytes]]:
    ciphers = [0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, *LEGACY12[:2], *TLS13]
    extensions = [
        *_common(
            _pq([X25519MLKEM768, X25519, SECP256R1, SECP384R1, SECP521R1]),
            _ids("0804 0403 0807 0805 0806 0401 0501 0601 0503 0603 0201 0203"),
        ),
        _versions([0x0304, 0x0303]),
        _ext(45, b"\x01\x01"),
        _keyShare(_pq([(X25519MLKEM768, _hybridShare()), (X25519, _x25519Share())])),
    ]
    return ciphers, extensions


PROFILES = {
    "chrome": _chrome,
    "firefox": _firefox,
    "safari": _safari,
    "android9": _android9,
    "go": _go,
}


def clientHello(profile: str) -> bytes:
    """A TLS record holding a fresh ClientHello of ``profile`` (a key of PROFILES)."""
    ciphers, extensions = PROFILES[profile]()
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + _u8(os.urandom(32))  # legacy_session_id (middlebox compatibility)
        + _list16(ciphers)
        + b"\x01\x00"  # compression: null
        + _u16(b"".join(extensions))
    )
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + _u16(handshake)


def serverAnswer(record: bytes) -> str:
    """
    What the first record of the server's answer is: "ServerHello", "alert N"
    (N the alert description), or "other".
    """
    if len(record) >= 6 and record[0] == 0x16 and record[5] == 0x02:
        return "ServerHello"
    if len(record) >= 7 and record[0] == 0x15:
        return f"alert {record[6]}"
    return "other"


def serverHelloExtensions(record: bytes) -> dict[int, bytes]:
    """The extensions of the ServerHello that starts C{record}, by type."""
    body = record[9:]  # record header (5), handshake type and length (4)
    offset = 2 + 32  # legacy_version, random
    offset += 1 + body[offset]  # legacy_session_id_echo
    offset += 2 + 1  # cipher_suite, legacy_compression_method
    end = offset + 2 + struct.unpack("!H", body[offset : offset + 2])[0]
    offset += 2
    extensions = {}
    while offset < end:
        kind, length = struct.unpack("!HH", body[offset : offset + 4])
        extensions[kind] = body[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return extensions
