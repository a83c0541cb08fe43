"""
Dot-stuffing of message data for the SMTP DATA command (RFC 5321 4.5.2),
done on line boundaries whatever the chunking of the input.

Only CRLF ends a line: a bare CR or a bare LF is an ordinary byte here, as it
is for the receiving server's end-of-data search (RFC 5321 4.1.1.4 says only
CRLF "." CRLF ends the data). Stuffing per chunk without this state is how a
body smuggles a second transaction upstream: a line "." that starts a chunk
after a CRLF that ended the previous chunk would go out unstuffed.
"""

from __future__ import annotations

import enum


class _Position(enum.Enum):
    """Where the last byte fed left us."""

    LINE_START = "line start"  # nothing fed yet, or the last two bytes were CRLF
    AFTER_CR = "after CR"  # the last byte was CR: a LF next would end the line
    MID_LINE = "mid line"


class DotStuffer:
    """
    Dot-stuff a stream of message bytes fed in chunks of any size.

    Feed the message with L{feed}, then send what L{finish} returns to end
    the data. The output of a whole run never contains CRLF "." CRLF before
    the terminator that L{finish} adds, and un-stuffing it (dropping the
    first "." of every line that starts with one) gives back the input, with
    a CRLF added when the input did not end with one.
    """

    def __init__(self) -> None:
        self._position = _Position.LINE_START

    def feed(self, chunk: bytes) -> bytes:
        """
        Return C{chunk} dot-stuffed: every "." that begins a line (the first
        byte of the data, or a byte right after CRLF, even one split across
        chunks) is doubled.
        """
        if not chunk:
            return b""
        prefix = b""
        if self._position is _Position.LINE_START and chunk[:1] == b".":
            prefix = b"."
        elif self._position is _Position.AFTER_CR and chunk[:2] == b"\n.":
            # The CR of this CRLF ended the previous chunk; the replace below
            # cannot see it.
            prefix = b"\n."
            chunk = chunk[1:]
        self._position = self._endPosition(chunk)
        # "\r\n." occurrences cannot overlap (the pattern starts with CR and
        # has no CR after its first byte), so one replace stuffs them all.
        return prefix + chunk.replace(b"\r\n.", b"\r\n..")

    def _endPosition(self, chunk: bytes) -> _Position:
        last = chunk[-1:]
        if last == b"\r":
            return _Position.AFTER_CR
        if last == b"\n":
            if len(chunk) >= 2:
                if chunk[-2:-1] == b"\r":
                    return _Position.LINE_START
            elif self._position is _Position.AFTER_CR:
                return _Position.LINE_START
        return _Position.MID_LINE

    def finish(self) -> bytes:
        """
        Return the bytes that end the data: "." CRLF when the data ended
        with CRLF (or was empty), CRLF "." CRLF otherwise (RFC 5321 4.1.1.4:
        the first CRLF of the terminator ends the last line).
        """
        if self._position is _Position.LINE_START:
            return b".\r\n"
        return b"\r\n.\r\n"
