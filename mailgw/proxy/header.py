"""
The PROXY protocol header (HAProxy, versions 1 and 2): our own parser.
Twisted's C{twisted.protocols.haproxy} is private API, takes any text as a v1
address (it would reach the Received header), lets a v1 line of any length
through when its CRLF arrives in the same read, and raises on a v2 header
split before its 16th octet.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
(cited below as "spec").
"""

from __future__ import annotations

import ipaddress
import re
import struct

import attrs
from twisted.internet.address import IPv4Address, IPv6Address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TCPAddress = IPv4Address | IPv6Address

V1_SIGNATURE = b"PROXY "
# spec 2.1: the longest v1 line, CRLF included, is 107 octets.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# 16 fixed octets plus addresses and TLVs. The spec allows 64 KiB; HAProxy
# sends 28 (IPv4) or 52 (IPv6) plus a few TLVs, so 1 KiB is ample and
# bounds what an unauthenticated connection makes us buffer.
V2_MAX_LENGTH = 1024

_V1_TEXT = re.compile(rb"[\x20-\x7e]*")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_UNSPEC, _V2_TCP4, _V2_TCP6 = 0x00, 0x11, 0x21


class ProxyHeaderError(Exception):
    """A PROXY header is malformed, too long, or of a kind we refuse."""


@attrs.frozen
class ProxyHeader:
    """
    One parsed PROXY header, ``length`` octets long.

    ``source`` and ``destination`` are the client's address and the address
    it connected to, or both L{None} for a v1 ``UNKNOWN`` line or a v2
    ``LOCAL`` command (the proxy's own health check): the real peer stands.
    """

    version: int
    length: int
    source: TCPAddress | None = None
    destination: TCPAddress | None = None


def _address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> TCPAddress:
    # A dual-stack balancer names IPv4 clients as ::ffff:a.b.c.d; report
    # them as the IPv4 clients they are, as a direct connection would.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


def _v1Address(family: bytes, text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # spec 2.1: addresses in canonical form, no leading zeroes; the
    # character check also keeps out IPv6 zone ids ("%eth0"), which
    # ipaddress would accept.
    pattern = _V1_IPV4 if family == b"TCP4" else _V1_IPV6
    if pattern.fullmatch(text) is None:
        raise ProxyHeaderError(f"bad {family.decode()} address")
    try:
        if family == b"TCP4":
            return ipaddress.IPv4Address(text.decode("ascii"))
        return ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"bad {family.decode()} address") from None


def _v1Port(text: bytes) -> int:
    # spec 2.1: decimal 0..65535, no leading zeroes, no sign.
    if _V1_PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyHeaderError("bad port")
    return int(text)


def _parseV1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    head = data[:end] if end != -1 else data[:V1_MAX_LENGTH]
    if not V1_SIGNATURE.startswith(head[:6]):
        raise ProxyHeaderError("no PROXY header")
    if end != -1:
        if not head.endswith(b"\r"):
            raise ProxyHeaderError("v1 line not ended by CRLF")
        head = head[:-1]
    elif head.endswith(b"\r") and len(head) == len(data):
        head = head[:-1]  # the CR of the CRLF still to come
    if _V1_TEXT.fullmatch(head) is None:
        raise ProxyHeaderError("control or non-ASCII octet in v1 line")
    if end == -1:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1 line longer than {V1_MAX_LENGTH} octets")
        return None
    fields = head.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        # spec 2.1: with UNKNOWN the rest of the line is to be ignored.
        return ProxyHeader(version=1, length=end + 1)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("v1 line is not PROXY TCP4|TCP6|UNKNOWN with four fields")
    family = fields[1]
    source = _address(_v1Address(family, fields[2]), _v1Port(fields[4]))
    destination = _address(_v1Address(family, fields[3]), _v1Port(fields[5]))
    return ProxyHeader(version=1, length=end + 1, source=source, destination=destination)


def _parseV2(data: bytes) -> ProxyHeader | None:
    if data[:12] != V2_SIGNATURE[: len(data)]:
        raise ProxyHeaderError("bad v2 signature")
    if len(data) > 12:
        # spec 2.2: version 2 in the high nibble; command LOCAL or PROXY;
        # "receivers must drop connections presenting unexpected values".
        if data[12] >> 4 != 2:
            raise ProxyHeaderError(f"unsupported v2 version {data[12] >> 4}")
        if data[12] & 0x0F not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyHeaderError(f"unknown v2 command {data[12] & 0x0F}")
    if len(data) < 16:
        return None
    command, family = data[12] & 0x0F, data[13]
    (addressLength,) = struct.unpack("!H", data[14:16])
    total = 16 + addressLength
    if total > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"v2 header of {total} octets is longer than {V2_MAX_LENGTH}")
    if command == _V2_PROXY:
        # Only TCP over IPv4/IPv6, and UNSPEC (which spec 2.2 lets a receiver
        # accept with the real addresses, like v1 UNKNOWN). UNIX and datagram
        # families name no client we could use.
        needed = {_V2_UNSPEC: 0, _V2_TCP4: 12, _V2_TCP6: 36}.get(family)
        if needed is None:
            raise ProxyHeaderError(f"unsupported v2 family/protocol 0x{family:02x}")
        if addressLength < needed:
            raise ProxyHeaderError("v2 address block too short")
    if len(data) < total:
        return None
    # spec 2.2: for LOCAL the family and address block are ignored; any TLVs
    # after the addresses are skipped: nothing here relies on them.
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(version=2, length=total)
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == _V2_TCP4:
        source = ipaddress.IPv4Address(data[16:20])
        destination = ipaddress.IPv4Address(data[20:24])
        ports = data[24:28]
    else:
        source = ipaddress.IPv6Address(data[16:32])
        destination = ipaddress.IPv6Address(data[32:48])
        ports = data[48:52]
    sourcePort, destinationPort = struct.unpack("!HH", ports)
    return ProxyHeader(
        version=2,
        length=total,
        source=_address(source, sourcePort),
        destination=_address(destination, destinationPort),
    )


def parseProxyHeader(data: bytes) -> ProxyHeader | None:
    """
    Parse the PROXY header (v1 or v2) at the start of ``data``.

    @return: the header (the octets after its C{length} are the proxied
        stream), or L{None} while ``data`` is a valid but incomplete start
        of one (at most L{V1_MAX_LENGTH} or L{V2_MAX_LENGTH} octets are ever
        needed).
    @raise ProxyHeaderError: ``data`` does not start a PROXY header, or
        starts a malformed, oversized or unsupported one. This is final:
        more data will not make it valid.
    """
    if not data:
        return None
    if data[:1] == V1_SIGNATURE[:1]:
        return _parseV1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parseV2(data)
    raise ProxyHeaderError("no PROXY header")


def startsHeader(data: bytes) -> bool | None:
    """
    Whether ``data``, a connection's first octets, opens a PROXY header:
    True, False, or L{None} while it is a proper prefix of a signature.
    """
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        if data[: len(signature)] == signature[: len(data)]:
            return True if len(data) >= len(signature) else None
    return False
