"""
The DATA phase: find the end of the message, undo dot-stuffing, and check
every line, in bulk rather than line by line.

Only CRLF "." CRLF ends the data (RFC 5321 4.1.1.4). A message that contains
a bare CR, a bare LF or a NUL is refused whole: relayed on, such bytes are
what a less careful server may read as an end of data (the 2023 "SMTP
smuggling" class), and normalising them would change what the client
signed. Lines longer than 998 octets are kept intact up to
``maxLineLength``; a longer line refuses the message. Either way the data
is read to its real end, so nothing of it is ever taken for a command.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from mailgw import replies
from mailgw.replies import SMTPReply

_END = b"\r\n.\r\n"


@attrs.define
class DataReader:
    """
    Consumes the bytes that follow ``354``.

    ``sink`` receives the message bytes as they come, dot-stuffing removed,
    until the first problem; after that (``error`` is set) the rest is read
    and dropped. ``size`` counts the octets of the message as received.
    ``headers`` collects the header section (up to the first empty line),
    at most ``maxHeaderSize`` octets; more ``Received:`` fields than
    ``maxReceived`` mean a mail loop (RFC 5321 6.3).
    """

    sink: Callable[[bytes], None]
    maxSize: int
    maxLineLength: int
    maxHeaderSize: int = 262144
    maxReceived: int = 50
    size: int = 0
    error: SMTPReply | None = None
    headers: bytearray = attrs.field(factory=bytearray)
    received: int = 0
    _inHeaders: bool = True
    _partial: bytes = b""
    _atLineStart: bool = True

    def feed(self, data: bytes) -> bytes | None:
        """
        Consume ``data``.

        @return: ``None`` while the data goes on; once the end is seen, the
            bytes that followed it (the next commands), possibly empty.
        """
        buf = self._partial + data if self._partial else data
        self._partial = b""
        if not self._atLineStart:
            # The rest of an overlong line: drop it up to its CRLF.
            i = buf.find(b"\r\n")
            if i == -1:
                self._partial = b"\r" if buf.endswith(b"\r") else b""
                return None
            buf = buf[i + 2 :]
            self._atLineStart = True
        if buf.startswith(b".\r\n"):
            return buf[3:]
        end = buf.find(_END)
        if end != -1:
            self._consume(buf[: end + 2])
            return buf[end + 5 :]
        last = buf.rfind(b"\r\n")
        if last != -1:
            self._consume(buf[: last + 2])
            buf = buf[last + 2 :]
        if len(buf) > self.maxLineLength:
            self._fail(
                replies.DATA_LINE_TOO_LONG.withText(
                    replies.DATA_LINE_TOO_LONG.text.format(limit=self.maxLineLength)
                )
            )
            self._atLineStart = False
            self._partial = b"\r" if buf.endswith(b"\r") else b""
        else:
            self._partial = buf
        return None

    def _fail(self, reply: SMTPReply) -> None:
        if self.error is None:
            self.error = reply

    def _consume(self, lines: bytes) -> None:
        """``lines``: complete CRLF-terminated lines, starting at a line start."""
        self.size += len(lines)
        if self.error is not None:
            return
        crlf = lines.count(b"\r\n")
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf or b"\0" in lines:
            self._fail(replies.BAD_LINE_ENDINGS)
            return
        if len(lines) > self.maxLineLength + 2 and (
            max(map(len, lines.split(b"\r\n"))) > self.maxLineLength
        ):
            self._fail(
                replies.DATA_LINE_TOO_LONG.withText(
                    replies.DATA_LINE_TOO_LONG.text.format(limit=self.maxLineLength)
                )
            )
            return
        if self.size > self.maxSize:
            self._fail(replies.TOO_BIG)
            return
        # RFC 5321 4.5.2: a line's leading dot was added by the client.
        if lines.startswith(b"."):
            lines = lines[1:]
        data = lines.replace(b"\r\n.", b"\r\n")
        if self._inHeaders and not self._header(data):
            return
        self.sink(data)

    def _header(self, data: bytes) -> bool:
        """Track the header section; False when it breaks a limit."""
        if data.startswith(b"\r\n"):
            end = 0
        else:
            end = data.find(b"\r\n\r\n")
            end = len(data) if end == -1 else end + 2
        if end < len(data):
            self._inHeaders = False
        section = data[:end]
        if len(self.headers) + len(section) > self.maxHeaderSize:
            self._fail(replies.HEADERS_TOO_BIG)
            return False
        self.headers += section
        self.received += (b"\r\n" + section).lower().count(b"\r\nreceived:")
        if self.received > self.maxReceived:
            self._fail(replies.MAIL_LOOP)
            return False
        return True
