"""
The load generator's SMTP client pieces: the TLS context, reading replies,
EHLO, and the messages it sends. Hand-rolled on asyncio streams (no
smtplib), so that one process can run many sessions at once.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any


class ProtocolError(Exception):
    """The server answered something a session cannot go on from."""


def messageId(sequence: int) -> bytes:
    """A Message-ID header line of fixed length, unique within a run."""
    return f"Message-ID: <{sequence:010d}.{os.getpid():08d}@loadgen.invalid>\r\n".encode()


def makeMessage(size: int, sender: str, recipient: str) -> tuple[bytes, bytes]:
    """
    A message of C{size} octets (more when C{size} is too small for the
    headers) as (headers before the Message-ID, the rest): CRLF lines of
    at most 78 characters, none starting with ".", so the bytes go on the
    wire as they are (no dot-stuffing, RFC 5321 4.5.2).
    """
    headers = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: benchmark\r\n"
        "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    ).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_abcdefghijkl\r\n"
    # What is left after the headers, the Message-ID and the blank line,
    # filled with whole lines and one last shorter line ("x" + CRLF at least).
    room = max(3, size - len(headers) - len(messageId(0)) - 2)
    whole, rest = divmod(room, len(line))
    if 0 < rest < 3:
        whole, rest = whole - 1, rest + len(line)
    last = (
        b"" if rest == 0 else (line[: rest - 2] if rest - 2 <= 76 else b"x" * (rest - 2)) + b"\r\n"
    )
    return headers, b"\r\n" + line * max(0, whole) + last


class ResumingContext(ssl.SSLContext):
    """
    A client context that offers C{session} (the last one it was given) on
    every new connection: asyncio's TLS layer takes no session argument,
    but builds each connection with C{wrap_bio}. One per worker, so each
    worker resumes its own session, as a client reconnecting would.
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if kwargs.get("session") is None and self.session is not None:
            kwargs["session"] = self.session
        return super().wrap_bio(*args, **kwargs)


def clientContext(cafile: str | None, resuming: bool = False) -> ssl.SSLContext:
    """
    Verification against C{cafile}, or none at all when it is not given; a
    L{ResumingContext} when C{resuming}.
    """
    context = (ResumingContext if resuming else ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        context.load_verify_locations(cafile)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def readReply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    """One (possibly multi-line) reply: its code and its lines."""
    lines = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ProtocolError("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise ProtocolError(f"not a reply: {lines[-1][:40]!r}") from None
    if code == 421:
        raise ProtocolError(lines[-1].decode("ascii", "replace").strip())
    return code, lines


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> list[bytes]:
    got, lines = await readReply(reader)
    if got != code:
        text = lines[-1].decode("ascii", "replace").strip()
        raise ProtocolError(f"{what}: expected {code}, got {text}")
    return lines


async def ehlo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> set[str]:
    """Send EHLO; the extension keywords offered, upper-case."""
    writer.write(b"EHLO loadgen.localhost\r\n")
    lines = await expect(reader, 250, "EHLO")
    return {line[4:].split(None, 1)[0].decode("ascii", "replace").upper() for line in lines[1:]}
