"""
Message hygiene at submission (RFC 6409 8): the header fields the server
adds in front of the client's message, once its header section is known.

The server writes its ``Received:`` header first, then ``Date:`` (RFC 6409
8.2) and ``Message-ID:`` (8.3) when the client left them out, then the
client's bytes unchanged: no existing header is touched or moved, so a
DKIM signature the client made stays valid.

L{HeaderHold} sits between the DATA reader and the spool writer. It holds
back the client's bytes only until the end of the header section (at most
``limit`` octets, the reader's header limit); the body then streams through
untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime

import attrs

_FIELD = re.compile(rb"(?im)^(date|message-id)[ \t]*:")
#: Bytes 33-126 as themselves, every other byte as "?".
_PRINTABLE_NO_SPACE = bytes(b if 32 < b < 127 else ord("?") for b in range(256))
_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
#: Characters of a Message-ID shown in the log.
MAX_LOGGED_ID = 200


def presentFields(headers: bytes) -> set[str]:
    """Which of ``date`` and ``message-id`` the header section has."""
    return {m.group(1).decode("ascii").lower() for m in _FIELD.finditer(headers)}


def missingFields(headers: bytes, queueId: str, hostname: str, when: float) -> bytes:
    """The ``Date:`` and ``Message-ID:`` fields ``headers`` lacks, CRLF-terminated."""
    present = presentFields(headers)
    added = b""
    if "date" not in present:
        date = format_datetime(datetime.fromtimestamp(when, UTC))
        added += f"Date: {date}\r\n".encode("ascii")
    if "message-id" not in present:
        added += f"Message-ID: <{queueId}@{hostname}>\r\n".encode("ascii", "replace")
    return added


def messageId(headers: bytes) -> str:
    """
    The first ``Message-ID:`` value of ``headers``, unfolded, printable
    ASCII without spaces, at most L{MAX_LOGGED_ID} characters ("" when
    there is none).
    """
    match = _MESSAGE_ID.search(headers)
    if match is None:
        return ""
    value = re.sub(rb"\r\n[ \t]+", b" ", match.group(1)).strip()[:MAX_LOGGED_ID]
    # No spaces either: the value stays one field of the log line.
    return value.translate(_PRINTABLE_NO_SPACE).decode("ascii")


def headerSection(data: bytes | bytearray, start: int = 0) -> int | None:
    """
    Where the header section of ``data`` ends (before its empty line), the
    search for the empty line beginning at ``start``; None: not yet.
    """
    if data.startswith(b"\r\n"):
        return 0
    end = data.find(b"\r\n\r\n", start)
    return None if end == -1 else end + 2


@attrs.define
class HeaderHold:
    """
    Holds the client's header section back until it ends, then lets
    through ``prefix`` (our ``Received:``), what ``extra(headers)`` adds,
    and everything held; after that every byte passes straight on.

    Past ``limit`` held octets (the DATA reader refuses such a message
    anyway) the hold gives up and adds nothing.
    """

    prefix: bytes
    extra: Callable[[bytes], bytes]
    limit: int
    headers: bytes | None = None  # the header section, once known
    added: bytes = b""  # what extra() added
    _held: bytearray = attrs.field(factory=bytearray)
    _done: bool = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to write now for ``data`` (CRLF-terminated lines)."""
        if self._done:
            return data
        start = max(0, len(self._held) - 3)
        self._held += data
        end = headerSection(self._held, start)
        if end is not None:
            return self._release(end)
        if len(self._held) > self.limit:
            return self._release(None)
        return b""

    def finish(self) -> bytes:
        """The data has ended: whatever is still held (a message of headers only)."""
        if self._done:
            return b""
        return self._release(len(self._held))

    def _release(self, end: int | None) -> bytes:
        self._done = True
        held, self._held = bytes(self._held), bytearray()
        if end is not None:
            self.headers = held[:end]
            self.added = self.extra(self.headers)
        return self.prefix + self.added + held
