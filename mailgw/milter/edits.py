"""
The message as milters see it, and the changes they ask for.

L{splitHeaders} turns a header section (CRLF line endings) into fields;
L{MessageEdits} collects the header and body changes of every milter and
L{MessageEdits.rewrite} applies them to the message as it was written
into the spool (in the spool's thread, before the commit: see
L{mailgw.interfaces.IEditableWriter}).

A milter is a program we trust to filter, not to write raw bytes into the
message: names must be field names (RFC 5322 2.2), values lose CR and NUL,
and each continuation line starts with white space, so no change can end
the header section early or smuggle a line; a replaced body gets CRLF line
endings.
"""

from __future__ import annotations

import re
from typing import BinaryIO

import attrs

_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,200}\Z")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_COPY = 64 * 1024


@attrs.frozen
class Field:
    """One header field: ``name`` and ``value`` as stored (after the colon, folds as CRLF)."""

    name: bytes
    value: bytes

    def toBytes(self) -> bytes:
        return self.name + b":" + self.value + b"\r\n"


def splitHeaders(section: bytes) -> list[Field]:
    """
    The fields of a header section (without its empty line). A line that
    is no field and no continuation is kept as a field without a value
    name, so that writing the fields back gives the same bytes.
    """
    fields: list[Field] = []
    for line in section.split(b"\r\n")[:-1] if section.endswith(b"\r\n") else [section]:
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.append(Field(name, value))
        else:
            fields.append(Field(b"", line))  # not a field: kept as it is
    return [f for f in fields if f.name or f.value]


def fieldForMilter(field: Field, leadingSpace: bool) -> tuple[bytes, bytes]:
    """
    ``(name, value)`` as SMFIC_HEADER sends it: folds as LF (as Sendmail
    and Postfix send them); the space after the colon dropped unless the
    milter negotiated SMFIP_HDR_LEADSPC.
    """
    value = field.value.replace(b"\r\n", b"\n")
    if not leadingSpace and value[:1] == b" ":
        value = value[1:]
    return field.name.strip(), value


def safeName(name: bytes) -> bool:
    return _NAME.match(name) is not None


def cleanValue(value: bytes, leadingSpace: bool) -> bytes:
    """A milter's header value as stored: CRLF folds, each continuation starting with a tab."""
    lines = [line.replace(b"\0", b"") for line in _LINE_END.split(value.replace(b"\0", b""))]
    first, rest = lines[0], [line for line in lines[1:] if line.strip(b" \t")]
    rest = [line if line[:1] in (b" ", b"\t") else b"\t" + line for line in rest]
    if not leadingSpace:
        first = b" " + first
    return b"\r\n".join([first, *rest])


def normaliseBody(body: bytes) -> bytes:
    """A replaced body with CRLF line endings and no NUL."""
    return _LINE_END.sub(b"\r\n", body.replace(b"\0", b""))


@attrs.define
class MessageEdits:
    """
    The header and body changes asked for at end of message, in the order
    asked (milter after milter). Indices are those libmilter documents:
    CHGHEADER's is the n-th field of that name (1 the first; an empty
    value deletes it; past the last one adds the field), INSHEADER's the
    position among all fields (0: first).
    """

    operations: list[tuple[str, int, bytes, bytes]] = attrs.field(factory=list)
    body: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.operations) or self.body is not None

    def add(self, name: bytes, value: bytes) -> None:
        self.operations.append(("add", 0, name, value))

    def insert(self, index: int, name: bytes, value: bytes) -> None:
        self.operations.append(("insert", index, name, value))

    def change(self, index: int, name: bytes, value: bytes) -> None:
        self.operations.append(("change", index, name, value))

    def apply(self, fields: list[Field]) -> list[Field]:
        """``fields`` with every header operation applied."""
        fields = list(fields)
        for kind, index, name, value in self.operations:
            if kind == "add":
                fields.append(Field(name, value))
            elif kind == "insert":
                fields.insert(min(index, len(fields)), Field(name, value))
            else:
                self._change(fields, index, name, value)
        return fields

    @staticmethod
    def _change(fields: list[Field], index: int, name: bytes, value: bytes) -> None:
        wanted, seen = name.lower(), 0
        for position, field in enumerate(fields):
            if field.name.strip().lower() == wanted:
                seen += 1
                if seen == max(index, 1):
                    if value.strip(b" \t\r\n"):
                        fields[position] = Field(field.name, value)
                    else:
                        del fields[position]
                    return
        if value.strip(b" \t\r\n"):
            fields.append(Field(name, value))

    def rewrite(self, source: BinaryIO, target: BinaryIO) -> None:
        """
        Copy the message from ``source`` to ``target`` with the changes
        applied. Blocking: runs in the spool's thread.
        """
        head = bytearray()
        while True:
            end = _headerEnd(head)
            if end is not None:
                break
            chunk = source.read(_COPY)
            if not chunk:
                end = len(head)
                break
            head += chunk
        section, rest = bytes(head[:end]), bytes(head[end:])
        fields = self.apply(splitHeaders(section))
        target.write(b"".join(f.toBytes() for f in fields))
        if self.body is not None:
            target.write(b"\r\n" + self.body)
            return
        target.write(rest)
        while chunk := source.read(_COPY):
            target.write(chunk)


def _headerEnd(data: bytearray) -> int | None:
    """Where the header section of ``data`` ends (its CRLF included), or None."""
    if data.startswith(b"\r\n"):
        return 0
    end = data.find(b"\r\n\r\n")
    return None if end == -1 else end + 2
