"""
The milter protocol's packets (Sendmail's libmilter, protocol version 6, as
Postfix speaks it): commands the MTA sends, responses a milter sends back.

Every packet is a 32-bit big-endian length, then that many octets: a
one-octet command or response code and its data. Strings are NUL-terminated.

We write this codec ourselves. The pure-Python library on PyPI,
``miltertest`` (1.0.0, a single release), is licensed under the GPL v3
(mailgw is MIT), and its client reads a blocking socket (``sock.recv``):
it cannot run on a Twisted reactor. The protocol is small; owning the
decoder also lets it treat every byte a milter sends as hostile: a length
of zero or past L{MAX_PACKET}, an unknown response code or a malformed
field is a L{MilterProtocolError}, never a crash nor an unbounded buffer.
"""

from __future__ import annotations

import struct

import attrs

VERSION = 6

# Commands (MTA -> milter).
ABORT, BODY, CONNECT, MACRO, BODYEOB = b"A", b"B", b"C", b"D", b"E"
HELO, QUIT_NC, HEADER, MAIL, EOH = b"H", b"K", b"L", b"M", b"N"
OPTNEG, QUIT, RCPT, DATA = b"O", b"Q", b"R", b"T"

# Responses (milter -> MTA).
ADDRCPT, DELRCPT, ADDRCPT_PAR, SHUTDOWN = b"+", b"-", b"2", b"4"
ACCEPT, REPLBODY, CONTINUE, DISCARD = b"a", b"b", b"c", b"d"
CHGFROM, CONN_FAIL, ADDHEADER, INSHEADER = b"e", b"f", b"h", b"i"
SETSYMLIST, CHGHEADER, PROGRESS, QUARANTINE = b"l", b"m", b"p", b"q"
REJECT, SKIP, TEMPFAIL, REPLYCODE = b"r", b"s", b"t", b"y"

# Actions a milter may ask for (SMFIF_*).
ADDHDRS, CHGBODY, ADDRCPT_ACTION, DELRCPT_ACTION = 0x01, 0x02, 0x04, 0x08
CHGHDRS, QUARANTINE_ACTION = 0x10, 0x20
#: What we offer: headers, body, recipients, quarantine (not CHGFROM,
#: ADDRCPT_PAR nor SETSYMLIST: those responses are then protocol errors).
OFFERED_ACTIONS = ADDHDRS | CHGBODY | ADDRCPT_ACTION | DELRCPT_ACTION | CHGHDRS | QUARANTINE_ACTION

# Protocol steps (SMFIP_*): a milter asks us to leave a step out (NO*) or
# not to wait for its reply to it (NR_*).
NOCONNECT, NOHELO, NOMAIL, NORCPT = 0x01, 0x02, 0x04, 0x08
NOBODY, NOHDRS, NOEOH, NR_HDR = 0x10, 0x20, 0x40, 0x80
NOUNKNOWN, NODATA, SKIP_OK, RCPT_REJ = 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
NR_DATA, NR_UNKN, NR_EOH, NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
HDR_LEADSPC = 0x100000
#: The steps we can leave out or not wait for, and SKIP; never the larger
#: packet sizes (MDS_256K, MDS_1M): body chunks stay at L{CHUNK}.
OFFERED_STEPS = (
    NOCONNECT | NOHELO | NOMAIL | NORCPT | NOBODY | NOHDRS | NOEOH | NR_HDR | NOUNKNOWN
    | NODATA | SKIP_OK | NR_CONN | NR_HELO | NR_MAIL | NR_RCPT | NR_DATA | NR_UNKN
    | NR_EOH | NR_BODY | HDR_LEADSPC
)  # fmt: skip

# Macro places (the command a SMFIC_MACRO belongs to).
MACRO_PLACES = (CONNECT, HELO, MAIL, RCPT, DATA, EOH, BODYEOB)

#: Body octets per SMFIC_BODY (libmilter's MILTER_CHUNK_SIZE).
CHUNK = 65535
#: The longest packet accepted from a milter (code and data); a longer
#: length is a protocol error, so a hostile milter cannot make us buffer.
MAX_PACKET = 1024 * 1024

_U32 = struct.Struct(">I")

_NO_DATA = frozenset(
    {ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, SKIP, PROGRESS, SHUTDOWN, CONN_FAIL}
)


class MilterProtocolError(Exception):
    """A milter sent something the protocol does not allow (the text is for the log)."""


# -- encoding (MTA -> milter) ------------------------------------------------


def packet(code: bytes, data: bytes = b"") -> bytes:
    """One packet: length, code, data."""
    return _U32.pack(len(data) + 1) + code + data


def _nul(text: bytes) -> bytes:
    # A NUL inside a field would end it early and shift the fields after it.
    return text.replace(b"\0", b"") + b"\0"


def optneg(actions: int = OFFERED_ACTIONS, steps: int = OFFERED_STEPS) -> bytes:
    return packet(OPTNEG, struct.pack(">III", VERSION, actions, steps))


def macros(place: bytes, values: dict[str, str]) -> bytes:
    """SMFIC_MACRO: the macros for the command ``place``; empty values are left out."""
    data = b"".join(
        _nul(name.encode("utf-8")) + _nul(value.encode("utf-8", "replace"))
        for name, value in values.items()
        if value
    )
    return packet(MACRO, place + data)


def connect(hostname: str, address: str, port: int | None) -> bytes:
    """SMFIC_CONNECT: family 4, 6, or U (unknown: no port nor address)."""
    host = _nul(hostname.encode("utf-8", "replace"))
    if port is None or not address:
        return packet(CONNECT, host + b"U")
    family = b"6" if ":" in address else b"4"
    return packet(CONNECT, host + family + struct.pack(">H", port) + _nul(address.encode()))


def strings(code: bytes, *values: str) -> bytes:
    """A command whose data is NUL-terminated strings (HELO, MAIL, RCPT)."""
    return packet(code, b"".join(_nul(v.encode("utf-8", "replace")) for v in values))


def header(name: bytes, value: bytes) -> bytes:
    return packet(HEADER, _nul(name) + _nul(value))


# -- decoding (milter -> MTA) --------------------------------------------------


@attrs.frozen
class Response:
    """
    One response. ``code`` is the response code; the other fields are set
    where that code carries them: ``index`` (CHGHEADER, INSHEADER), ``name``
    and ``value`` (header actions), ``text`` (REPLYCODE, ADDRCPT, DELRCPT,
    QUARANTINE), ``data`` (REPLBODY), ``version``/``actions``/``steps``
    (OPTNEG).
    """

    code: bytes
    index: int = 0
    name: bytes = b""
    value: bytes = b""
    text: str = ""
    data: bytes = b""
    version: int = 0
    actions: int = 0
    steps: int = 0


def _fields(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` NUL-terminated fields (trailing octets: an error)."""
    parts = data.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise MilterProtocolError(f"expected {count} NUL-terminated fields")
    return parts[:-1]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MilterProtocolError("a string is not UTF-8") from None


def decodeResponse(code: bytes, data: bytes) -> Response:
    """
    The response of one packet.

    @raise MilterProtocolError: an unknown code or malformed data.
    """
    if code in _NO_DATA:
        # Trailing data after a response that has none is tolerated (libmilter ignores it).
        return Response(code)
    if code == OPTNEG:
        if len(data) < 12:
            raise MilterProtocolError("short option negotiation")
        version, actions, steps = struct.unpack(">III", data[:12])
        return Response(code, version=version, actions=actions, steps=steps)
    if code == REPLBODY:
        return Response(code, data=data)
    if code in (REPLYCODE, ADDRCPT, DELRCPT, QUARANTINE):
        (text,) = _fields(data, 1)
        return Response(code, text=_text(text))
    if code == ADDHEADER:
        name, value = _fields(data, 2)
        return Response(code, name=name, value=value)
    if code in (CHGHEADER, INSHEADER):
        if len(data) < 4:
            raise MilterProtocolError("short header change")
        (index,) = _U32.unpack(data[:4])
        name, value = _fields(data[4:], 2)
        return Response(code, index=index, name=name, value=value)
    raise MilterProtocolError(f"unknown or unnegotiated response {code!r}")


@attrs.define
class Decoder:
    """Splits a milter's byte stream into L{Response}s."""

    _buffer: bytearray = attrs.field(factory=bytearray)

    def feed(self, data: bytes) -> list[Response]:
        """
        The responses complete so far.

        @raise MilterProtocolError: a bad length, code or field; the stream
            is unusable after it.
        """
        self._buffer += data
        out = []
        while len(self._buffer) >= 4:
            (length,) = _U32.unpack_from(self._buffer)
            if length == 0 or length > MAX_PACKET:
                raise MilterProtocolError(f"packet length {length}")
            if len(self._buffer) < 4 + length:
                break
            code = bytes(self._buffer[4:5])
            data = bytes(self._buffer[5 : 4 + length])
            del self._buffer[: 4 + length]
            out.append(decodeResponse(code, data))
        return out
