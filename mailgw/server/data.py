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

With ``acceptBareLF`` (``[server] accept_bare_lf``, for authenticated
clients only) a line that ends in a bare LF is kept and its LF written as
CRLF. The end of data is still only CRLF "." CRLF as received: "LF . LF",
"LF . CRLF" and "CRLF . LF" are lines of the message (converted, they are
stuffed again on relay). A bare LF is not a line boundary for
dot-stuffing either: only a "." after CRLF (or at the very start) is
taken as one the client added. A bare CR or a NUL still refuses the
message.

BDAT chunks (RFC 3030) go through the same checks with L{DataReader.feedChunk}:
their bytes are the message as it is, with no end marker and no
dot-stuffing, so only the line splitting differs; a message whose last
chunk does not end in CRLF gets one (it is relayed with DATA, where the
end of data needs it).
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
    ``maxReceived`` mean a mail loop (RFC 5321 6.3). ``acceptBareLF``: lines
    ending in a bare LF are converted to CRLF (see the module docstring);
    ``size`` then counts each added CR too, so ``maxSize`` bounds what is
    stored. ``stuffed``: the bytes come from DATA and carry dot-stuffing;
    False for BDAT chunks.
    """

    sink: Callable[[bytes], None]
    maxSize: int
    maxLineLength: int
    maxHeaderSize: int = 262144
    maxReceived: int = 50
    acceptBareLF: bool = False
    stuffed: bool = True
    size: int = 0
    error: SMTPReply | None = None
    headers: bytearray = attrs.field(factory=bytearray)
    received: int = 0
    _inHeaders: bool = True
    _partial: bytes = b""
    _atLineStart: bool = True
    # The bytes consumed so far end with CRLF (or none were): a "." here
    # starts a line in the SMTP sense (end of data, dot-stuffing). False
    # only after a bare LF, with acceptBareLF.
    _afterCRLF: bool = True

    def feed(self, data: bytes) -> bytes | None:
        """
        Consume ``data``.

        @return: ``None`` while the data goes on; once the end is seen, the
            bytes that followed it (the next commands), possibly empty.
        """
        buf = self._take(data)
        if buf is None:
            return None
        if self._afterCRLF and buf.startswith(b".\r\n"):
            return buf[3:]
        end = buf.find(_END)
        if end != -1:
            self._consume(buf[: end + 2])
            return buf[end + 5 :]
        self._lines(buf)
        return None

    def feedChunk(self, data: bytes, last: bool) -> None:
        """
        Consume the bytes of a BDAT chunk; ``last``: the chunk ends the
        message (its last line, if it lacks one, is given a CRLF).
        """
        buf = self._take(data)
        if buf is not None:
            self._lines(buf)
        if last:
            rest, self._partial = self._partial, b""
            if self._atLineStart and rest:
                self._consume(rest + b"\r\n")

    def _take(self, data: bytes) -> bytes | None:
        """
        ``data`` after what is held over from the last read, less the rest
        of an overlong line; None when nothing of it is left.
        """
        buf = self._partial + data if self._partial else data
        self._partial = b""
        if not self._atLineStart:
            # The rest of an overlong line: drop it up to its end.
            i = buf.find(self._eol)
            if i == -1:
                self._partial = b"\r" if buf.endswith(b"\r") else b""
                return None
            # A CR before it is in buf: a trailing CR is kept in _partial.
            cut = buf.index(b"\n", i) + 1
            self._afterCRLF = cut >= 2 and buf[cut - 2 : cut] == b"\r\n"
            buf = buf[cut:]
            self._atLineStart = True
        return buf

    @property
    def _eol(self) -> bytes:
        return b"\n" if self.acceptBareLF else b"\r\n"

    def _lines(self, buf: bytes) -> None:
        """Consume the complete lines of ``buf``; keep its last, partial line."""
        eol = self._eol
        last = buf.rfind(eol)
        if last != -1:
            cut = last + len(eol)
            self._consume(buf[:cut])
            buf = buf[cut:]
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

    def _fail(self, reply: SMTPReply) -> None:
        if self.error is None:
            self.error = reply

    def _consume(self, lines: bytes) -> None:
        """
        ``lines``: complete lines, starting at a line start; each ends with
        CRLF (or, with acceptBareLF, with a bare LF).
        """
        afterCRLF, self._afterCRLF = self._afterCRLF, lines.endswith(b"\r\n")
        self.size += len(lines)
        if self.error is not None:
            return
        crlf = lines.count(b"\r\n")
        lf = lines.count(b"\n")
        if lines.count(b"\r") != crlf or b"\0" in lines:
            self._fail(replies.BAD_LINE_ENDINGS)
            return
        if lf != crlf:
            if not self.acceptBareLF:
                self._fail(replies.BAD_LINE_ENDINGS)
                return
            # Every CR is followed by LF (checked above): this adds a CR
            # before each bare LF and nothing else.
            self.size += lf - crlf
            stuffed = lines.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        else:
            stuffed = lines
        if len(stuffed) > self.maxLineLength + 2 and (
            max(map(len, stuffed.split(b"\r\n"))) > self.maxLineLength
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
        # RFC 5321 4.5.2: a line's leading dot was added by the client. Only
        # a line that follows CRLF counts: the dots are removed before the
        # conversion, so a "." after a bare LF stays.
        if not self.stuffed:
            data = lines
        else:
            if afterCRLF and lines.startswith(b"."):
                lines = lines[1:]
            data = lines.replace(b"\r\n.", b"\r\n")
        if lf != crlf:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
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


@attrs.define
class BinaryReader:
    """
    Consumes a BODY=BINARYMIME message (RFC 3030 3): BDAT chunks only, the
    body stored exactly as received, whatever its bytes (bare CR, LF, NUL,
    lines of any length). The header section is still text: it is checked
    as L{DataReader} checks it (CRLF lines only, ``maxHeaderSize``,
    ``maxReceived``), and ``size`` is bounded by ``maxSize`` as the chunks
    come. Such a message is relayed only in BDAT chunks, to an upstream
    that offers BINARYMIME, so nothing in it can end a transaction early.
    """

    sink: Callable[[bytes], None]
    maxSize: int
    maxHeaderSize: int = 262144
    maxReceived: int = 50
    stuffed: bool = False  # BDAT carries no dot-stuffing (L{DataReader}'s field)
    size: int = 0
    error: SMTPReply | None = None
    headers: bytearray = attrs.field(factory=bytearray)
    received: int = 0
    _inHeaders: bool = True
    _pending: bytearray = attrs.field(factory=bytearray)

    def feedChunk(self, data: bytes, last: bool) -> None:
        """Consume the bytes of a BDAT chunk; ``last``: the chunk ends the message."""
        self.size += len(data)
        if self.error is not None:
            return
        if self.size > self.maxSize:
            self.error = replies.TOO_BIG
            return
        if self._inHeaders:
            # Held in a bytearray and searched from where the held part could
            # end it: many tiny chunks cost linear time, not quadratic.
            pending = self._pending
            start = max(0, len(pending) - 3)
            pending += data
            end = 0 if pending.startswith(b"\r\n") else pending.find(b"\r\n\r\n", start)
            if end == -1 and not last:
                if len(pending) > self.maxHeaderSize:
                    self.error = replies.HEADERS_TOO_BIG
                return
            buf = bytes(pending)
            cut = len(buf) if end == -1 else (end + 2 if end else 0)
            header, data = buf[:cut], buf[cut:]
            self._pending, self._inHeaders = bytearray(), False
            if not self._header(header):
                return
            if header:
                self.sink(header)
        if data:
            self.sink(data)

    def _header(self, section: bytes) -> bool:
        """Check the header section (complete lines, each ending in CRLF)."""
        if len(section) > self.maxHeaderSize:
            self.error = replies.HEADERS_TOO_BIG
            return False
        if section and not section.endswith(b"\r\n"):
            section += b"\r\n"  # a message of one unfinished header line
        crlf = section.count(b"\r\n")
        if section.count(b"\r") != crlf or section.count(b"\n") != crlf or b"\0" in section:
            self.error = replies.BAD_LINE_ENDINGS
            return False
        self.headers += section
        self.received = (b"\r\n" + section).lower().count(b"\r\nreceived:")
        if self.received > self.maxReceived:
            self.error = replies.MAIL_LOOP
            return False
        return True
