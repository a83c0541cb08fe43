"""
The wire side of mailgw's ESMTP client: replies parsed under hard limits,
handed out strictly in order with a timeout per wait, and the message body
streamed through a L{DotStuffer} with flow control.

Every byte here comes from an upstream we do not control: a reply line
longer than L{MAX_REPLY_LINE} octets, a reply of more than
L{MAX_REPLY_LINES} lines, a malformed code, or a reply to no command is a
L{ProtocolError}, which ends the session (transient for everything not yet
finished).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.relay.stuffing import DotStuffer

#: Gives the next chunk of a message (b"" at its end), read off the reactor thread.
ChunkReader = Callable[[], "Deferred[bytes]"]

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
BODY_CHUNK = 64 * 1024

# RFC 5321 4.2: three digits, the first 2-5 (no 1yz reply exists in SMTP),
# the second 0-5; then SP, "-" or the end of the line.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -]|$)")
# RFC 3463 2: class.subject.detail; the class must match the reply's.
_ENHANCED = re.compile(r"([245])\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})(?: +|$)")


@attrs.frozen
class Reply:
    """
    One upstream reply: its code, its enhanced status code (RFC 2034; empty
    when absent) and its text lines, the enhanced code removed from each
    and every non-printable character replaced by "?".
    """

    code: int
    enhanced: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """All lines joined by a space: safe for one line of a log or DSN."""
        return " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


class RelayError(Exception):
    """
    A failure that ends the session: every recipient not yet finished gets
    a transient result whose text is C{str(self)}.

    @ivar reply: the upstream reply behind it, if any.
    @ivar polite: the connection is still in step, so QUIT may be sent.
    """

    def __init__(self, text: str, reply: Reply | None = None, polite: bool = False) -> None:
        super().__init__(text)
        self.reply = reply
        self.polite = polite


class ProtocolError(RelayError):
    """The upstream broke the protocol (or a limit of ours)."""


class ReplyTimeout(RelayError):
    """The upstream did not answer, or did not take data, in time."""


class ConnectionFailed(RelayError):
    """The connection could not be made, or was lost; TLS failures included."""


class LocalError(RelayError):
    """Our side failed (e.g. the spool file could not be read)."""


def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


class ReplyParser:
    """
    Turn upstream bytes into L{Reply} values, enforcing the limits.

    A bare LF is accepted as a line end (being lenient costs a client
    nothing); a CR before it is dropped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._code = b""
        self._lines: list[bytes] = []

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished reply are held."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """
        @return: the replies completed by C{data}, in order.
        @raise ProtocolError: the upstream broke a rule or a limit.
        """
        self._buffer += data
        replies = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = self._buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)
        self._buffer = self._buffer[start:]
        if len(self._buffer) > MAX_REPLY_LINE + 1:
            raise ProtocolError(f"protocol error: reply line longer than {MAX_REPLY_LINE} octets")
        return replies

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > MAX_REPLY_LINE:
            raise ProtocolError(f"protocol error: reply line longer than {MAX_REPLY_LINE} octets")
        match = _REPLY_LINE.match(line)
        if match is None:
            raise ProtocolError(f"protocol error: malformed reply line {_printable(line[:60])!r}")
        code = match.group(1)
        if self._lines and code != self._code:
            # RFC 5321 4.2.1: every line of a multiline reply has the same code.
            raise ProtocolError("protocol error: multiline reply changes its code")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError(f"protocol error: reply longer than {MAX_REPLY_LINES} lines")
        if match.group(2) == b"-":
            return None
        lines, self._lines = self._lines, []
        return _makeReply(int(code), lines)


def _makeReply(code: int, raw: list[bytes]) -> Reply:
    lines = [_printable(line) for line in raw]
    enhanced = ""
    first = _ENHANCED.match(lines[0])
    if first is not None and first.group(1) == str(code)[0]:
        enhanced = ".".join(first.group(1, 2, 3))
        # RFC 2034 3: the code prefixes the text of every line.
        lines = [_ENHANCED.sub("", line, count=1) for line in lines]
    return Reply(code, enhanced, tuple(lines))


def describeFailure(reason: Failure) -> str:
    """
    A short text for a connection failure or loss, TLS and certificate
    verification failures told apart.
    """
    exc = reason.value
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return "host name lookup failed"
    if isinstance(exc, error.TimeoutError | CancelledError):
        return "timeout connecting to upstream"
    if isinstance(exc, VerificationError):
        return f"certificate verification failed: {_mismatches(exc)}"
    if isinstance(exc, SSL.Error):
        text = "; ".join(
            str(part[-1]) if isinstance(part, tuple) else str(part) for part in _sslErrors(exc)
        )
        if "certificate verify failed" in text:
            return f"certificate verification failed: {text}"
        return f"TLS handshake failed: {text}"
    if isinstance(exc, error.ConnectionDone):
        return "upstream closed the connection"
    if isinstance(exc, error.ConnectionLost):
        return "connection lost"
    return f"connection failed: {exc.__class__.__name__}: {exc}"


def _mismatches(exc: VerificationError) -> str:
    names = []
    for mismatch in getattr(exc, "errors", []):
        wanted = getattr(mismatch, "mismatched_id", None)
        name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name is not None:
            names.append(str(name))
    if not names:
        return str(exc)
    return "certificate does not name " + ", ".join(names)


def _sslErrors(exc: SSL.Error) -> list[object]:
    args = exc.args[0] if exc.args and isinstance(exc.args[0], list) else list(exc.args)
    return args or ["unknown error"]


class SMTPClientProtocol(Protocol):
    """
    One connection to an upstream. The session logic drives it with
    L{send}, L{nextReply}, L{startTLS} and L{sendBody}; every failure
    (timeout, protocol error, connection loss) aborts the connection and
    makes the pending and every later wait fail with a L{RelayError}.
    """

    # TCP or TLS transports: abortConnection and startTLS are used.
    transport: Any

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._expected = 1  # the greeting
        self._waiting: Deferred[Reply] | None = None
        self._waitTimer: IDelayedCall | None = None
        self._waitingFor = ""
        self._body: _BodySender | None = None
        self._failure: RelayError | None = None
        self._lost = False
        self._closeTimer: IDelayedCall | None = None
        self._whenClosed: list[Deferred[None]] = []
        self.tlsStarted = False

    def connectionMade(self) -> None:
        # Commands are small and each waits for a reply (RFC 5321 4.5.3.2
        # timeouts are per reply); Nagle would only add latency.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            for reply in self._parser.feed(data):
                if self._body is not None:
                    raise ProtocolError("protocol error: upstream replied before the end of data")
                if self._expected <= 0:
                    raise ProtocolError("protocol error: upstream sent a reply to no command")
                self._expected -= 1
                self._replies.append(reply)
        except ProtocolError as e:
            self.fail(e)
            return
        self._deliver()

    def _deliver(self) -> None:
        if self._waiting is not None and self._replies:
            waiting, self._waiting = self._waiting, None
            self._cancelWaitTimer()
            waiting.callback(self._replies.popleft())

    def send(self, data: bytes, replies: int) -> None:
        """
        Write C{data} (whole command lines) and expect C{replies} replies
        to it. Does nothing once the session has failed.
        """
        if self._failure is None:
            self._expected += replies
            self.transport.write(data)  # type: ignore[union-attr]

    def nextReply(self, timeout: float, waitingFor: str) -> Deferred[Reply]:
        """
        @return: a Deferred firing with the next reply; it fails with
            L{ReplyTimeout} ("timeout waiting for C{waitingFor}") when none
            comes within C{timeout} seconds, or with the session's failure.
        """
        if self._replies:
            return succeed(self._replies.popleft())
        if self._failure is not None:
            return fail(self._failure)
        if self._waiting is not None:
            raise RuntimeError("already waiting for a reply")
        self._waiting = Deferred()
        self._waitingFor = waitingFor
        self._waitTimer = self._clock.callLater(
            timeout, self.fail, ReplyTimeout(f"timeout waiting for {waitingFor}")
        )
        return self._waiting

    def _cancelWaitTimer(self) -> None:
        if self._waitTimer is not None and self._waitTimer.active():
            self._waitTimer.cancel()
        self._waitTimer = None

    def startTLS(self, creator: object) -> None:
        """
        Start TLS on the connection after the upstream's 220 to STARTTLS.

        @raise ProtocolError: the upstream sent bytes after that reply; they
            would be taken for replies sent under TLS (RFC 3207 5, the
            "STARTTLS response injection" attack), so the session ends.
        """
        if self._parser.pending or self._replies:
            error = ProtocolError("protocol error: upstream sent data after its STARTTLS reply")
            self.fail(error)
            raise error
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        self.tlsStarted = True

    def sendBody(self, read: ChunkReader, blockTimeout: float) -> Deferred[None]:
        """
        Stream a message dot-stuffed, then the end-of-data terminator, and
        expect one reply to it. C{read()} gives the next chunk (a Deferred,
        so the file is read off the reactor thread; C{b""} at the end); a
        chunk is asked for only when the previous one is written and the
        transport is not paused (a streaming producer), so at most one
        chunk and the transport's buffer are in memory, never the message.

        @return: a Deferred that fires once the terminator is written; it
            fails with L{ReplyTimeout} when the transport stays paused for
            C{blockTimeout} seconds (RFC 5321 4.5.3.2.5), with L{LocalError}
            when a chunk cannot be read, or with the session's failure. It
            never fires while a read is still running.
        """
        if self._failure is not None:
            return fail(self._failure)
        self._body = _BodySender(self, blockTimeout)
        self.transport.registerProducer(self._body, True)  # type: ignore[union-attr]
        return Deferred.fromCoroutine(self._streamBody(self._body, read))

    async def _streamBody(self, body: _BodySender, read: ChunkReader) -> None:
        stuffer = DotStuffer()
        try:
            while True:
                await body.whenWritable()
                try:
                    chunk = await read()
                except (OSError, ValueError) as e:
                    self.fail(LocalError(f"cannot read the message from the spool: {e}"))
                    raise self._failed() from None
                if self._body is not body:
                    raise self._failed()  # failed while the chunk was read
                if not chunk:
                    break
                self.transport.write(stuffer.feed(chunk))  # type: ignore[union-attr]
        finally:
            body.stop()
            if self._body is body:
                self._body = None
                self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.send(stuffer.finish(), 1)

    def _failed(self) -> RelayError:
        assert self._failure is not None
        return self._failure

    def fail(self, reason: RelayError) -> None:
        """
        End the session with C{reason}: abort the connection and fail the
        pending wait, the body being sent, and every later wait.
        """
        if self._failure is None:
            self._failure = reason
        self._cancelWaitTimer()
        # Abort first: the waits failed below resume the session at once,
        # and it must find the connection already going, not close it
        # gracefully (which would flush and wait on a hostile peer).
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()
        if self._body is not None:
            body, self._body = self._body, None
            body.stop()
            body.fail(self._failure)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(self._failure)

    def close(self, timeout: float) -> None:
        """
        Close the connection once written data is flushed, aborting it if
        that takes longer than C{timeout} seconds.
        """
        if self._lost or self.transport is None:
            return
        if self._failure is None:
            self._failure = ConnectionFailed("connection closed by us")
        self.transport.loseConnection()
        if self._closeTimer is None and not self._lost:
            self._closeTimer = self._clock.callLater(timeout, self.transport.abortConnection)

    def whenClosed(self) -> Deferred[None]:
        """@return: a Deferred that fires once the connection is closed."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._whenClosed.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        text = describeFailure(reason)
        if self._body is not None:
            text += " while sending message data"
        elif self._waiting is not None:
            text += f" while waiting for {self._waitingFor}"
        self.fail(ConnectionFailed(text))
        waiters, self._whenClosed = self._whenClosed, []
        for d in waiters:
            d.callback(None)


@implementer(IPushProducer)
class _BodySender:
    """
    The streaming producer registered while the body is sent: the transport
    pauses it when its buffer is full and resumes it when drained. Paused
    for longer than the block timeout, the session fails.
    """

    def __init__(self, protocol: SMTPClientProtocol, timeout: float) -> None:
        self._protocol = protocol
        self._timeout = timeout
        self._paused: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._stopped = False

    def whenWritable(self) -> Deferred[None]:
        """Fires at once unless paused; then when resumed (or failed)."""
        if self._paused is not None:
            return self._paused
        return succeed(None)

    def pauseProducing(self) -> None:
        if self._stopped or self._paused is not None:
            return
        self._paused = Deferred()
        self._timer = self._protocol._clock.callLater(
            self._timeout,
            self._protocol.fail,
            ReplyTimeout("timeout sending message data (upstream took no data)"),
        )

    def resumeProducing(self) -> None:
        self._cancelTimer()
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def fail(self, reason: RelayError) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.errback(reason)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def stop(self) -> None:
        self._stopped = True
        self._cancelTimer()

    def stopProducing(self) -> None:
        # The transport is going away; connectionLost fails the session.
        self.stop()
