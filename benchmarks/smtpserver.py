"""
The small asyncio SMTP server shared by the counting sink (plain, no AUTH)
and the reference server (STARTTLS and implicit TLS, AUTH PLAIN/LOGIN).

It is built for speed, not for standing in for a real MTA: one
C{asyncio.Protocol} per connection, every complete command line in a read
answered in one write (so pipelined MAIL/RCPT/DATA cost one send, RFC 2920),
message data scanned for CRLF "." CRLF without copying it unless it is kept.
Nothing here is queued or fsync'd: the 250 after the final dot only says the
bytes arrived.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
from collections.abc import Callable

import attrs

#: The end of message data (RFC 5321 4.1.1.4).
TERMINATOR = b"\r\n.\r\n"

#: Commands longer than this close the connection (RFC 5321 4.5.3.1.4 asks
#: for 512; a generous limit keeps misbehaving clients from growing memory).
MAX_LINE = 4096


@attrs.frozen
class ServerSettings:
    """
    What one listener offers.

    @ivar tlsContext: offered through STARTTLS on a plain connection; None
        offers no STARTTLS.
    @ivar user: with C{password}, the one login AUTH accepts; an empty
        C{user} offers no AUTH and lets MAIL through unauthenticated.
    @ivar onMessage: called for each accepted message with its bytes
        (dot-unstuffed) when C{keepMessages}, else with None.
    """

    hostname: str = "localhost"
    tlsContext: ssl.SSLContext | None = None
    user: bytes = b""
    password: bytes = b""
    maxSize: int = 64 * 1024 * 1024
    keepMessages: bool = False
    onMessage: Callable[[bytes | None], None] | None = None


@attrs.define
class Counters:
    """Totals over every connection of a server."""

    sessions: int = 0
    messages: int = 0
    recipients: int = 0
    octets: int = 0
    authFailures: int = 0

    def asDict(self) -> dict[str, int]:
        return attrs.asdict(self)


def serverContext(certificate: str, key: str) -> ssl.SSLContext:
    """
    A TLS server context like the gateway's: TLS 1.2 or newer, session
    tickets on (two per full TLS 1.3 handshake, OpenSSL's default, as
    mailgw), so a client that offers its previous session resumes it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    return context


class SMTPServerProtocol(asyncio.Protocol):
    """One SMTP connection. Modes: command, data, auth, tls, closed."""

    def __init__(self, settings: ServerSettings, counters: Counters, implicitTLS: bool) -> None:
        self.settings = settings
        self.counters = counters
        self.secure = implicitTLS
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.mode = "command"
        self.authStep: Callable[[bytes], bytes] | None = None
        self.loginUser = b""
        self._resetSession()

    def _resetSession(self) -> None:
        self.authenticated = False
        self._resetTransaction()

    def _resetTransaction(self) -> None:
        self.haveSender = False
        self.recipients = 0
        self.dataTail = b""
        self.dataParts: list[bytes] = []
        self.dataSize = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counters.sessions += 1
        transport.write(f"220 {self.settings.hostname} ESMTP benchmark server\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = "closed"

    def data_received(self, data: bytes) -> None:
        if self.mode == "closed":
            return
        if self.mode == "tls":
            # Only the TLS layer calls us once STARTTLS began (the plain
            # bytes pipelined behind it were dropped, RFC 3207 4.2), and it
            # may hand over the first command before start_tls() returns.
            self.buffer += data
            return
        out: list[bytes] = []
        if self.mode == "data":
            rest = self._dataReceived(data, out)
            if rest:
                self.buffer += rest
        else:
            self.buffer += data
        self._process(out)

    def _process(self, out: list[bytes]) -> None:
        """Answer every complete line in the buffer, in one write."""
        while self.mode in ("command", "auth"):
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    out.append(b"500 5.5.6 Line too long\r\n")
                    self._closeAfter(out)
                break
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            self._lineReceived(line, out)
            if self.mode == "data" and self.buffer:
                pending = bytes(self.buffer)
                self.buffer.clear()
                rest = self._dataReceived(pending, out)
                if rest:
                    self.buffer += rest
        if out and self.transport is not None and self.mode != "closed":
            self.transport.write(b"".join(out))

    # Message data

    def _dataReceived(self, chunk: bytes, out: list[bytes]) -> bytes | None:
        """
        Consume message data; at the terminator, answer and return the bytes
        after it (pipelined commands), else None.
        """
        tail = self.dataTail
        probe = tail + chunk[:4]
        at = probe.find(TERMINATOR)
        if at >= 0:
            end = at + len(TERMINATOR) - len(tail)
        else:
            at = chunk.find(TERMINATOR)
            end = at + len(TERMINATOR) if at >= 0 else -1
        if end < 0:
            self._keep(chunk)
            self.dataTail = (tail + chunk[-4:])[-4:]
            return None
        # Kept up to the end of the terminator, which may have begun in an
        # earlier read; _finishMessage drops its ".\r\n".
        self._keep(chunk[:end])
        self._finishMessage(out)
        return chunk[end:]

    def _keep(self, part: bytes) -> None:
        self.dataSize += len(part)
        if self.settings.keepMessages and self.dataSize <= self.settings.maxSize:
            self.dataParts.append(part)

    def _finishMessage(self, out: list[bytes]) -> None:
        self.mode = "command"
        # dataSize counts the DATA line's CRLF (the start of a terminator
        # that ends an empty message) and the final ".\r\n".
        size = self.dataSize - 5
        if size > self.settings.maxSize:
            out.append(b"552 5.3.4 Message too big\r\n")
        else:
            self.counters.messages += 1
            self.counters.octets += size
            message = None
            if self.settings.keepMessages:
                raw = b"".join(self.dataParts)[2:-3]
                message = raw.replace(b"\r\n..", b"\r\n.")
                if message.startswith(b".."):
                    message = message[1:]
            if self.settings.onMessage is not None:
                self.settings.onMessage(message)
            out.append(b"250 2.0.0 Ok: accepted\r\n")
        self._resetTransaction()

    # Commands

    def _lineReceived(self, line: bytes, out: list[bytes]) -> None:
        if self.mode == "auth":
            assert self.authStep is not None
            out.append(self.authStep(line))
            return
        verb, _, argument = line.partition(b" ")
        handler = getattr(self, "do_" + verb.upper().decode("ascii", "replace"), None)
        if handler is None:
            out.append(b"500 5.5.2 Command not recognized\r\n")
            return
        handler(argument.strip(), out)

    def do_EHLO(self, argument: bytes, out: list[bytes]) -> None:
        self._resetTransaction()
        lines = [
            self.settings.hostname,
            "PIPELINING",
            "8BITMIME",
            f"SIZE {self.settings.maxSize}",
            "ENHANCEDSTATUSCODES",
        ]
        if self.settings.tlsContext is not None and not self.secure:
            lines.append("STARTTLS")
        if self.settings.user and self.secure:
            lines.append("AUTH PLAIN LOGIN")
        text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
        out.append(text.encode())

    def do_HELO(self, argument: bytes, out: list[bytes]) -> None:
        self._resetTransaction()
        out.append(f"250 {self.settings.hostname}\r\n".encode())

    def do_STARTTLS(self, argument: bytes, out: list[bytes]) -> None:
        if self.settings.tlsContext is None or self.secure:
            out.append(b"502 5.5.1 STARTTLS not available\r\n")
            return
        out.append(b"220 2.0.0 Ready to start TLS\r\n")
        assert self.transport is not None
        self.transport.write(b"".join(out))
        out.clear()
        self.mode = "tls"
        self.buffer.clear()
        self.transport.pause_reading()
        asyncio.ensure_future(self._startTLS())

    async def _startTLS(self) -> None:
        assert self.transport is not None and self.settings.tlsContext is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                self.settings.tlsContext,
                server_side=True,
                ssl_handshake_timeout=30,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
            self.transport.abort()
            self.mode = "closed"
            return
        if transport is None:
            self.mode = "closed"
            return
        self.transport = transport
        self.secure = True
        # Forget everything said before TLS (RFC 3207 4.2).
        self._resetSession()
        self.mode = "command"
        self._process([])

    def do_AUTH(self, argument: bytes, out: list[bytes]) -> None:
        if not self.settings.user or not self.secure:
            out.append(b"503 5.5.1 AUTH not available\r\n")
            return
        if self.authenticated:
            out.append(b"503 5.5.1 Already authenticated\r\n")
            return
        mechanism, _, initial = argument.partition(b" ")
        mechanism = mechanism.upper()
        if mechanism == b"PLAIN":
            if initial:
                out.append(self._checkPlain(initial))
            else:
                self._ask(b"", self._checkPlain, out)
        elif mechanism == b"LOGIN":
            if initial:
                self._loginUserReceived(initial, out)
            else:
                self._ask(b"VXNlcm5hbWU6", lambda r: self._loginUserReceived(r, None), out)
        else:
            out.append(b"504 5.5.4 Unrecognized authentication type\r\n")

    def _ask(self, challenge: bytes, step: Callable[[bytes], bytes], out: list[bytes]) -> None:
        self.mode = "auth"
        self.authStep = step
        out.append(b"334 " + challenge + b"\r\n")

    def _loginUserReceived(self, response: bytes, out: list[bytes] | None) -> bytes:
        self.loginUser = _b64(response) or b""
        self.mode = "auth"
        self.authStep = self._checkLoginPassword
        reply = b"334 UGFzc3dvcmQ6\r\n"
        if out is not None:
            out.append(reply)
        return reply

    def _checkLoginPassword(self, response: bytes) -> bytes:
        return self._authDone(self.loginUser, _b64(response))

    def _checkPlain(self, response: bytes) -> bytes:
        decoded = _b64(response)
        parts = decoded.split(b"\0") if decoded is not None else []
        if len(parts) != 3:
            return self._authDone(b"", None)
        return self._authDone(parts[1], parts[2])

    def _authDone(self, user: bytes, password: bytes | None) -> bytes:
        self.mode = "command"
        self.authStep = None
        # A plain comparison on purpose: the reference has no password cost.
        if user == self.settings.user and password == self.settings.password:
            self.authenticated = True
            return b"235 2.7.0 Authentication successful\r\n"
        self.counters.authFailures += 1
        return b"535 5.7.8 Authentication credentials invalid\r\n"

    def do_MAIL(self, argument: bytes, out: list[bytes]) -> None:
        if self.settings.user and not self.authenticated:
            out.append(b"530 5.7.0 Authentication required\r\n")
        elif self.haveSender:
            out.append(b"503 5.5.1 Nested MAIL command\r\n")
        else:
            self.haveSender = True
            out.append(b"250 2.1.0 Ok\r\n")

    def do_RCPT(self, argument: bytes, out: list[bytes]) -> None:
        if not self.haveSender:
            out.append(b"503 5.5.1 Need MAIL first\r\n")
        else:
            self.recipients += 1
            self.counters.recipients += 1
            out.append(b"250 2.1.5 Ok\r\n")

    def do_DATA(self, argument: bytes, out: list[bytes]) -> None:
        if not self.recipients:
            # RFC 2920 3.1: no valid recipient, so no 354.
            out.append(b"554 5.5.1 No valid recipients\r\n")
            return
        self.mode = "data"
        # The DATA line's CRLF lets "\r\n.\r\n" match an empty message.
        self.dataTail = b"\r\n"
        self.dataParts = [b"\r\n"]
        self.dataSize = 2
        out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def do_RSET(self, argument: bytes, out: list[bytes]) -> None:
        self._resetTransaction()
        out.append(b"250 2.0.0 Ok\r\n")

    def do_NOOP(self, argument: bytes, out: list[bytes]) -> None:
        out.append(b"250 2.0.0 Ok\r\n")

    def do_QUIT(self, argument: bytes, out: list[bytes]) -> None:
        out.append(b"221 2.0.0 Bye\r\n")
        self._closeAfter(out)

    def _closeAfter(self, out: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.write(b"".join(out))
            self.transport.close()
        out.clear()
        self.mode = "closed"


def _b64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


async def listen(
    settings: ServerSettings,
    counters: Counters,
    port: int,
    host: str = "127.0.0.1",
    implicitTLS: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """
    Listen on C{host}:C{port} (0 picks a free port); with C{implicitTLS},
    every connection starts with a TLS handshake (RFC 8314).
    """
    loop = asyncio.get_running_loop()
    secure = implicitTLS is not None
    return await loop.create_server(
        lambda: SMTPServerProtocol(settings, counters, secure),
        host,
        port,
        ssl=implicitTLS,
        backlog=4096,
        reuse_address=True,
        ssl_handshake_timeout=30 if secure else None,
    )


def boundPort(server: asyncio.Server) -> int:
    """The port C{server} listens on."""
    return int(server.sockets[0].getsockname()[1])
