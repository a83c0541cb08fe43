"""
An in-process recording ESMTP server for relay tests (a test tool, not a
test module).

It listens on 127.0.0.1, port 0, records every transaction (MAIL FROM and
its parameters, accepted recipients, the data un-stuffed: only CRLF "." CRLF
ends it, and one leading "." is dropped from each line), every command line
with whether TLS was on, and lets a test steer it: reply overrides, dropping
or stalling at a stage, which extensions to advertise, AUTH, STARTTLS and
implicit TLS.

Stages for C{dropAt} / C{stallAt}: "greeting", "ehlo", "starttls", "auth",
"mail", "rcpt", "data", "body" (as soon as message data arrives), "dot"
(instead of the reply to the final dot) and "quit".

    upstream = yield startUpstream(reactor, rcptReplies={"bad@x": "550 5.1.1 no"})
    self.addCleanup(upstream.stop)
    results = yield deliverBatch(reactor, upstream.endpoint(reactor), ...)
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailgw import tls

STAGES = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "body", "dot", "quit")

_PATH = re.compile(rb"(MAIL FROM|RCPT TO):<([^>]*)>(.*)\Z", re.IGNORECASE)


@attrs.frozen
class Command:
    """One command line as received, and whether TLS was on."""

    line: bytes
    tls: bool


@attrs.frozen
class Received:
    """One transaction that reached the end of its data."""

    mailFrom: str
    mailParams: tuple[str, ...]
    rcpts: tuple[str, ...]
    data: bytes
    tls: bool
    user: str | None
    reply: str


@attrs.define
class Knobs:
    """How the upstream behaves. Replies are whole lines without CRLF."""

    hostname: str = "upstream.test"
    tlsOptions: Any = None  # server TLS options; STARTTLS is offered when set
    implicitTLS: bool = False  # TLS from the first byte (needs tlsOptions)
    starttls: bool = True  # advertise STARTTLS (when tlsOptions is set)
    pipelining: bool = True
    eightBitMIME: bool = True
    smtputf8: bool = True
    size: int | None = None  # advertise SIZE n (0: SIZE without a limit)
    dsn: bool = False  # advertise DSN (RFC 3461)
    requireTLS: bool = False  # advertise REQUIRETLS (RFC 8689), under TLS only
    authMechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    credentials: tuple[str, str] | None = None  # offer AUTH, require it before MAIL
    authWithoutTLS: bool = False  # offer AUTH without TLS too
    greetingReply: str = "220 upstream.test ESMTP ready"
    ehloReply: str | None = None  # replaces the whole EHLO reply
    mailReply: str | None = None
    rcptReplies: dict[str, str] = attrs.Factory(dict)
    dataReply: str | None = None
    dotReply: str | None = None
    dropAt: str | None = None
    stallAt: str | None = None
    starttlsReply: str | None = None  # replaces the 220 to STARTTLS (TLS not started)
    brokenTLS: bool = False  # answer the ClientHello with plain text and hang up
    chunking: bool = False  # advertise CHUNKING and BINARYMIME (RFC 3030), take BDAT
    chunkReplies: dict[int, str] = attrs.Factory(dict)  # the reply to the Nth BDAT (from 0)


class UpstreamProtocol(Protocol):
    factory: UpstreamFactory

    def connectionMade(self) -> None:
        self.knobs = self.factory.knobs
        self.factory.connectionCount += 1
        self.factory.protocols.add(self)
        self.buffer = b""
        self.mode = "command"
        self.tls = self.knobs.implicitTLS
        self.user: str | None = None
        self.authState: tuple[str, ...] = ()
        self.halted = False  # dropped or stalled: ignore everything
        self.raw = bytearray()  # data mode: the stuffed data so far
        self.searchFrom = 0
        self.chunkCount = 0  # BDAT commands so far (for chunkReplies)
        self.resetTransaction()
        self.stage("greeting", self.knobs.greetingReply)

    def resetTransaction(self) -> None:
        self.mailFrom: bytes | None = None
        self.mailParams: tuple[str, ...] = ()
        self.rcpts: list[str] = []

    def send(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]

    def stage(self, name: str, reply: str) -> bool:
        """Reply at C{name}, unless told to drop or stall there."""
        assert name in STAGES
        if self.knobs.dropAt == name:
            self.halted = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return False
        if self.knobs.stallAt == name:
            self.halted = True
            return False
        self.send(reply)
        return True

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "brokentls":
            self.transport.write(b"this is not TLS\r\n")  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.halted = True
            return
        self.buffer += data
        while not self.halted:
            if self.mode == "data":
                if not self.dataMode():
                    return
                continue
            if self.mode == "chunk":
                if not self.chunkMode():
                    return
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            self.factory.commands.append(Command(line, self.tls))
            if self.authState:
                self.authContinue(line)
            else:
                self.command(line)

    def dataMode(self) -> bool:
        """Take data bytes; True when the data ended and commands follow."""
        if self.buffer and "body" in (self.knobs.dropAt, self.knobs.stallAt):
            self.stage("body", "")
            return False
        # self.raw starts with the CRLF that ended DATA, so that "." CRLF as
        # the very first line is found like any other terminator.
        self.raw += self.buffer
        self.buffer = b""
        end = self.raw.find(b"\r\n.\r\n", self.searchFrom)
        if end < 0:
            self.searchFrom = max(0, len(self.raw) - 4)
            return False
        body = bytes(self.raw[: end + 2])
        self.buffer = bytes(self.raw[end + 5 :])
        self.raw = bytearray()
        self.mode = "command"
        # Un-stuff: drop one "." after every CRLF, then the leading CRLF.
        data = body.replace(b"\r\n.", b"\r\n")[2:]
        reply = self.knobs.dotReply or "250 2.0.0 Ok: queued"
        received = Received(
            (self.mailFrom or b"").decode("utf-8"),
            self.mailParams,
            tuple(self.rcpts),
            data,
            self.tls,
            self.user,
            reply,
        )
        self.resetTransaction()
        self.factory.record(received)
        self.stage("dot", reply)
        return True

    def chunkMode(self) -> bool:
        """Take the bytes of a BDAT chunk; True when it is all read."""
        take = self.buffer[: self.chunkLeft]
        self.buffer = self.buffer[len(take) :]
        self.chunkLeft -= len(take)
        self.raw += take
        if self.chunkLeft:
            return False
        self.mode = "command"
        reply = self.knobs.chunkReplies.get(self.chunkCount, "250 2.0.0 Ok")
        if self.chunkRefused:
            reply = "503 5.5.1 Send MAIL first"
        self.chunkCount += 1
        if not reply.startswith("2"):
            self.raw, self.chunkLast = bytearray(), False
            self.resetTransaction()
            self.send(reply)
        elif self.chunkLast:
            received = Received(
                (self.mailFrom or b"").decode("utf-8"),
                self.mailParams,
                tuple(self.rcpts),
                bytes(self.raw),
                self.tls,
                self.user,
                reply,
            )
            self.raw = bytearray()
            self.resetTransaction()
            self.factory.record(received)
            self.send(reply)
        else:
            self.send(reply)
        return True

    def do_BDAT(self, line: bytes) -> None:
        words = line.split()
        self.chunkLeft = int(words[1])
        self.chunkLast = len(words) > 2 and words[2].upper() == b"LAST"
        self.chunkRefused = self.mailFrom is None  # read, dropped, then answered
        self.mode = "chunk"

    def command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        handler = getattr(self, "do_" + verb.decode("ascii", "replace"), None)
        if handler is None:
            self.send("502 5.5.1 Command not recognised")
        else:
            handler(line)

    def do_EHLO(self, line: bytes) -> None:
        k = self.knobs
        if k.ehloReply is not None:
            self.stage("ehlo", k.ehloReply)
            return
        lines = [k.hostname]
        if k.pipelining:
            lines.append("PIPELINING")
        if k.size is not None:
            lines.append(f"SIZE {k.size}" if k.size else "SIZE")
        if k.eightBitMIME:
            lines.append("8BITMIME")
        if k.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if k.dsn:
            lines.append("DSN")
        if k.chunking:
            lines += ["CHUNKING", "BINARYMIME"]
        if k.requireTLS and self.tls:
            lines.append("REQUIRETLS")
        if k.tlsOptions is not None and k.starttls and not self.tls:
            lines.append("STARTTLS")
        if k.credentials is not None and (self.tls or k.authWithoutTLS):
            lines.append("AUTH " + " ".join(k.authMechanisms))
        reply = "\r\n".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)
        )
        self.stage("ehlo", reply)

    def do_HELO(self, line: bytes) -> None:
        self.send(f"250 {self.knobs.hostname}")

    def do_STARTTLS(self, line: bytes) -> None:
        if self.knobs.tlsOptions is None or self.tls:
            self.send("502 5.5.1 STARTTLS not available")
            return
        if self.knobs.starttlsReply is not None:
            self.send(self.knobs.starttlsReply)
            return
        if self.knobs.brokenTLS:
            self.send("220 2.0.0 Ready to start TLS")
            self.mode = "brokentls"
            return
        if self.stage("starttls", "220 2.0.0 Ready to start TLS"):
            # RFC 3207 4.2: drop what came before the handshake, forget state.
            self.buffer = b""
            self.transport.startTLS(self.knobs.tlsOptions)  # type: ignore[union-attr]
            self.tls = True
            self.user = None
            self.resetTransaction()

    def do_AUTH(self, line: bytes) -> None:
        words = line.split()
        k = self.knobs
        mechanism = words[1].decode("ascii", "replace").upper() if len(words) > 1 else ""
        if k.credentials is None or not (self.tls or k.authWithoutTLS):
            self.send("503 5.5.1 AUTH not available")
        elif mechanism not in k.authMechanisms:
            self.send("504 5.5.4 Unrecognised authentication mechanism")
        elif mechanism == "PLAIN" and len(words) > 2:
            self.authState = ("PLAIN",)
            self.authContinue(words[2])
        elif mechanism == "PLAIN":
            self.authState = ("PLAIN",)
            self.send("334 ")
        else:
            self.authState = ("LOGIN",)
            self.send("334 VXNlcm5hbWU6")

    def authContinue(self, line: bytes) -> None:
        if line == b"*":
            self.authState = ()
            self.send("501 5.7.0 Authentication cancelled")
            return
        try:
            decoded = base64.b64decode(line, validate=True).decode("utf-8")
        except ValueError:
            self.authState = ()
            self.send("501 5.5.2 Cannot decode response")
            return
        if self.authState[0] == "PLAIN":
            _, user, password = (decoded.split("\0") + ["", ""])[:3]
            self.authFinish(user, password)
        elif len(self.authState) == 1:
            self.authState = ("LOGIN", decoded)
            self.send("334 UGFzc3dvcmQ6")
        else:
            self.authFinish(self.authState[1], decoded)

    def authFinish(self, user: str, password: str) -> None:
        self.authState = ()
        if (user, password) == self.knobs.credentials:
            self.user = user
            self.stage("auth", "235 2.7.0 Authentication successful")
        else:
            self.stage("auth", "535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, line: bytes) -> None:
        match = _PATH.match(line)
        if match is None:
            self.send("501 5.5.4 Syntax error")
            return
        if self.knobs.credentials is not None and self.user is None:
            self.send("530 5.7.0 Authentication required")
            return
        params = tuple(p.decode("utf-8") for p in match.group(3).split())
        self.mailFrom, self.mailParams = match.group(2), params
        size = [int(p[5:]) for p in params if p.upper().startswith("SIZE=")]
        if self.knobs.size and size and size[0] > self.knobs.size:
            self.resetTransaction()
            self.send("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        if not self.stage("mail", self.knobs.mailReply or "250 2.1.0 Ok"):
            return
        if self.knobs.mailReply and not self.knobs.mailReply.startswith("2"):
            self.resetTransaction()

    def do_RCPT(self, line: bytes) -> None:
        match = _PATH.match(line)
        if self.mailFrom is None or match is None:
            self.send("503 5.5.1 Send MAIL first")
            return
        address = match.group(2).decode("utf-8")
        reply = self.knobs.rcptReplies.get(address, "250 2.1.5 Ok")
        if self.stage("rcpt", reply) and reply.startswith("2"):
            self.rcpts.append(address)

    def do_DATA(self, line: bytes) -> None:
        if self.mailFrom is None:
            self.send("503 5.5.1 Send MAIL first")
        elif not self.rcpts:
            self.send("554 5.5.1 No valid recipients")
        else:
            reply = self.knobs.dataReply or "354 End data with <CR><LF>.<CR><LF>"
            if self.stage("data", reply) and reply.startswith("354"):
                self.mode = "data"
                self.raw = bytearray(b"\r\n")
                self.searchFrom = 0

    def do_RSET(self, line: bytes) -> None:
        self.resetTransaction()
        self.send("250 2.0.0 Ok")

    def do_NOOP(self, line: bytes) -> None:
        self.send("250 2.0.0 Ok")

    def do_QUIT(self, line: bytes) -> None:
        if self.stage("quit", "221 2.0.0 Bye"):
            self.halted = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.protocols.discard(self)
        self.factory.lost(self)


class UpstreamFactory(Factory):
    protocol = UpstreamProtocol

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.connectionCount = 0
        self.transactions: list[Received] = []
        self.commands: list[Command] = []
        self.protocols: set[UpstreamProtocol] = set()
        self._transactionWaiters: list[tuple[int, Deferred[list[Received]]]] = []
        self._closeWaiters: list[Deferred[None]] = []

    def record(self, received: Received) -> None:
        self.transactions.append(received)
        waiters, self._transactionWaiters = self._transactionWaiters, []
        for count, d in waiters:
            if len(self.transactions) >= count:
                d.callback(list(self.transactions))
            else:
                self._transactionWaiters.append((count, d))

    def lost(self, protocol: UpstreamProtocol) -> None:
        if not self.protocols:
            waiters, self._closeWaiters = self._closeWaiters, []
            for d in waiters:
                d.callback(None)

    def waitForTransactions(self, count: int) -> Deferred[list[Received]]:
        """Fires with every transaction so far once there are C{count}."""
        if len(self.transactions) >= count:
            return succeed(list(self.transactions))
        d: Deferred[list[Received]] = Deferred()
        self._transactionWaiters.append((count, d))
        return d

    def whenAllClosed(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closeWaiters.append(d)
        return d

    def commandLines(self) -> list[bytes]:
        return [c.line for c in self.commands]


@attrs.define
class Upstream:
    """A listening upstream: its factory (the records and knobs) and port."""

    factory: UpstreamFactory
    port: IListeningPort

    @property
    def knobs(self) -> Knobs:
        return self.factory.knobs

    @property
    def transactions(self) -> list[Received]:
        return self.factory.transactions

    @property
    def connectionCount(self) -> int:
        return self.factory.connectionCount

    def waitForTransactions(self, count: int) -> Deferred[list[Received]]:
        return self.factory.waitForTransactions(count)

    def commandLines(self) -> list[bytes]:
        return self.factory.commandLines()

    @property
    def portNumber(self) -> int:
        return int(self.port.getHost().port)

    def endpoint(self, reactor: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.portNumber, timeout=5)

    def stop(self) -> Deferred[Any]:
        """Stop listening and close every connection; wait for both."""
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()  # type: ignore[union-attr]
        return DeferredList(
            [succeed(self.port.stopListening()), self.factory.whenAllClosed()],
            fireOnOneErrback=True,
        )


def startUpstream(reactor: Any, port: int = 0, **knobs: Any) -> Deferred[Upstream]:
    """Listen on 127.0.0.1, ``port`` (0: any free one), with L{Knobs}(**knobs)."""
    factory = UpstreamFactory(Knobs(**knobs))
    listening: Factory = factory
    if factory.knobs.implicitTLS:
        listening = TLSMemoryBIOFactory(factory.knobs.tlsOptions, False, factory)
    d = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(listening)
    return d.addCallback(lambda port: Upstream(factory, port))


@attrs.frozen
class TLSFiles:
    """A self-signed certificate for "localhost" and the TLS options for it."""

    certificate: str
    key: str

    def serverOptions(self) -> Any:
        return tls.serverContextFactory(self.certificate, self.key)

    def clientCreator(self, hostname: str = "localhost") -> Any:
        """Client options that trust only this certificate."""
        return tls.clientCreator(hostname, caFile=self.certificate)


def makeTLSFiles(directory: str) -> TLSFiles:
    os.makedirs(directory, exist_ok=True)
    files = TLSFiles(os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))
    tls.makeSelfSigned(files.certificate, files.key, "localhost")
    return files
