"""
The third part of a delivery status notification (RFC 6522 3): what it
returns of the original message. The whole message (``message/rfc822``)
when the sender did not ask for headers only (RET=HDRS, RFC 3461 4.3) and
it fits in the limit; else its header section (``text/rfc822-headers``).
"""

from __future__ import annotations

import re
from typing import Protocol

#: At most this many bytes of the original message are read for a report:
#: its header section, or the whole message when it is no larger.
HEADERS_LIMIT = 64 * 1024

_CRLF = b"\r\n"
# RFC 5322 2.1.1: a line is at most 998 octets; longer ones may be refused.
_MAX_LINE = 998


def returnedPart(original: Readable, full: bool, limit: int, label: str) -> tuple[bytes, bool]:
    """
    The returned-content part, headers and body, CRLF line endings: the
    whole of ``original`` when ``full`` and it is at most ``limit`` bytes,
    else its header section. ``label`` ("Undelivered", "Delayed", ...)
    starts its Content-Description.

    @return: the part, and whether it holds the whole message.
    """
    if full:
        data = original.read(limit + 1)
        if len(data) <= limit:
            message = _crlf(data)
            part = _part(
                [
                    f"Content-Description: {label} Message".encode("ascii"),
                    b"Content-Type: message/rfc822",
                    # RFC 2046 5.2.1: message/rfc822 is 7bit or 8bit, never encoded.
                    b"Content-Transfer-Encoding: " + (b"7bit" if message.isascii() else b"8bit"),
                ],
                message,
            )
            return part, True
        headers = readHeaders(_Replay(data, original), limit)
    else:
        headers = readHeaders(original, limit)
    part = _part(
        [
            f"Content-Description: {label} Message Headers".encode("ascii"),
            b"Content-Type: text/rfc822-headers"
            + (b'; charset="utf-8"' if _isUTF8(headers) else b""),
            b"Content-Transfer-Encoding: " + (b"7bit" if headers.isascii() else b"8bit"),
        ],
        headers,
    )
    return part, False


class Readable(Protocol):
    """A binary file, as far as reading goes."""

    def read(self, size: int = -1, /) -> bytes: ...


class _Replay:
    """Gives back bytes already read, then the rest of the file."""

    def __init__(self, data: bytes, rest: Readable) -> None:
        self._data, self._rest = data, rest

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            data, self._data = self._data, b""
            return data + self._rest.read()
        data, self._data = self._data[:size], self._data[size:]
        if len(data) < size:
            data += self._rest.read(size - len(data))
        return data


def _crlf(data: bytes) -> bytes:
    """Every line ending CRLF (the spool holds CRLF; a stray CR or LF too)."""
    data = re.sub(rb"\r\n|\r|\n", _CRLF, data)
    return data if not data or data.endswith(_CRLF) else data + _CRLF


def _part(headers: list[bytes], body: bytes) -> bytes:
    if body and not body.endswith(_CRLF):
        body += _CRLF
    return _CRLF.join(headers) + _CRLF + _CRLF + body


def _isUTF8(data: bytes) -> bool:
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def readHeaders(original: Readable, limit: int = HEADERS_LIMIT) -> bytes:
    """
    The header section of the message in ``original``: the lines before
    the first empty line, CRLF-terminated, never more than ``limit`` bytes
    (a longer section is cut after its last whole line), each line cut to
    998 octets. Nothing past the first ``limit + 2`` bytes is read.
    """
    # Two bytes more than the limit: a section of exactly ``limit`` bytes
    # is then seen to end (its empty line starts within them).
    data = original.read(limit + 2)
    atEnd = len(data) < limit + 2
    # Normalise line endings: the spool holds CRLF, but a stray CR or LF
    # must never end up as a line of its own in our MIME structure.
    lines = re.split(rb"\r\n|\r|\n", data)
    if not atEnd:
        # The last piece was cut by the read: not a whole line.
        del lines[-1]
    kept: list[bytes] = []
    size = 0
    for line in lines:
        if not line or size + len(line) + 2 > limit:
            break
        line = line[:_MAX_LINE]
        kept.append(line)
        size += len(line) + 2
    return b"".join(line + _CRLF for line in kept)
