"""
The message as it streams to the spool, split for the milters into its
header fields and its body (after the empty line).
"""

from __future__ import annotations

import attrs

from mailgw.milter.edits import Field, splitHeaders


@attrs.define
class HeaderSplitter:
    """
    Holds the bytes back until the header section ends (at most ``limit``
    octets: past it the DATA reader refuses the message, and the milters
    get nothing more), then gives the fields once and the body as it comes.
    """

    limit: int
    _held: bytearray = attrs.field(factory=bytearray)
    _state: str = "headers"  # then "body", or "gave-up"

    def feed(self, data: bytes) -> tuple[list[Field] | None, bytes]:
        """``(fields, body bytes)``: fields only once, when the section ends."""
        if self._state == "body":
            return None, data
        if self._state == "gave-up":
            return None, b""
        start = max(0, len(self._held) - 3)
        self._held += data
        if self._held.startswith(b"\r\n"):
            end = 0
        else:
            found = self._held.find(b"\r\n\r\n", start)
            end = -1 if found == -1 else found + 2
        if end == -1:
            if len(self._held) > self.limit:
                self._state = "gave-up"
                self._held.clear()
            return None, b""
        self._state = "body"
        held, self._held = bytes(self._held), bytearray()
        return splitHeaders(held[:end]), held[end + 2 :]

    def finish(self) -> tuple[list[Field] | None, bytes]:
        """The data ended: the fields of a message that has no body (no empty line)."""
        if self._state != "headers":
            return None, b""
        self._state = "body"
        held, self._held = bytes(self._held), bytearray()
        return splitHeaders(held), b""
