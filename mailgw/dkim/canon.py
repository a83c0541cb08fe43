"""
The DKIM body hash (RFC 6376 3.4.3, 3.4.4, 3.7), computed as the body is
read, chunk by chunk: a message is never held in memory whole, only the
line being read and the count of empty lines not yet known to be trailing.

The result is the same as dkimpy's C{canonicalize_body} on the whole body
(a property test checks it for any split into chunks): lines end with
CRLF only; relaxed drops the WSP before each CRLF and makes each other run
of WSP one space; both ignore the empty lines at the end, and an empty
body is CRLF (simple) or nothing (relaxed).
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["BodyHasher"]

_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
# Only what changes: a run of two or more, or a tab (a lone space stays).
_WSP = re.compile(rb"[\t ]{2,}|\t")


class BodyHasher:
    """SHA-256 of a body's canonical form, fed in chunks of any size."""

    def __init__(self, relaxed: bool) -> None:
        self.relaxed = relaxed
        self._hash = hashlib.sha256()
        self._line = b""  # the bytes after the last CRLF seen
        self._blanks = 0  # empty lines held back: they may be trailing
        self._written = False  # something other than empty lines was hashed

    def update(self, data: bytes) -> None:
        data = self._line + data
        cut = data.rfind(b"\r\n")
        if cut < 0:
            self._line = data
            return
        self._line = data[cut + 2 :]
        self._lines(data[: cut + 2])

    def _lines(self, lines: bytes) -> None:
        """Complete lines, each ending with CRLF."""
        if self.relaxed:
            # The regular expressions cost ~20 ns an octet; a fast search
            # first spares them the chunks they would not change (base64).
            if b" \r\n" in lines or b"\t\r\n" in lines:
                lines = _TRAILING_WSP.sub(b"\r\n", lines)
            if b"  " in lines or b"\t" in lines:
                lines = _WSP.sub(b" ", lines)
        start = len(lines) - 2  # lines end with CRLF
        while start >= 2 and lines[start - 2 : start] == b"\r\n":
            start -= 2
        empty = (len(lines) - start) // 2
        if start == 0:  # nothing but empty lines
            self._blanks += empty
            return
        self._write(lines[: start + 2])
        self._blanks = empty - 1

    def _write(self, data: bytes) -> None:
        if self._blanks:
            self._hash.update(b"\r\n" * self._blanks)
            self._blanks = 0
        self._hash.update(data)
        self._written = True

    def digest(self) -> bytes:
        """The hash of the canonical body; call once, after the last L{update}."""
        if self._line:
            # A last line without CRLF gets one; dkimpy compresses its WSP
            # but leaves a trailing run (it strips WSP before CRLF only).
            line = _WSP.sub(b" ", self._line) if self.relaxed else self._line
            self._write(line + b"\r\n")
        elif not self._written and not self.relaxed:
            self._hash.update(b"\r\n")  # RFC 6376 3.4.3: an empty body is CRLF
        return self._hash.digest()
