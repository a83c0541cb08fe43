"""
The wire side of mailgw's ESMTP client: replies (parsed by
L{mailgw.relay.clientreplies} under hard limits) handed out strictly in
order with a timeout per wait, and the message body streamed through a
L{DotStuffer} with flow control, read off the reactor thread.

A reply to no command, or one during the message data, is a
L{ProtocolError}, which ends the session (transient for everything not yet
finished).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.relay.clientreplies import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ConnectionFailed,
    LocalError,
    ProtocolError,
    RelayError,
    Reply,
    ReplyParser,
    ReplyTimeout,
    describeFailure,
)
from mailgw.relay.stuffing import DotStuffer

__all__ = [
    "BODY_CHUNK",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "ChunkReader",
    "ConnectionFailed",
    "LocalError",
    "ProtocolError",
    "RelayError",
    "Reply",
    "ReplyParser",
    "ReplyTimeout",
    "SMTPClientProtocol",
    "describeFailure",
]

#: Gives the next chunk of a message (b"" at its end), read off the reactor thread.
ChunkReader = Callable[[], "Deferred[bytes]"]

BODY_CHUNK = 64 * 1024


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

    def sendBody(self, read: ChunkReader, blockTimeout: float, replies: int = 1) -> Deferred[None]:
        """
        Stream a message dot-stuffed, then the end-of-data terminator, and
        expect C{replies} replies to it (LMTP: one per accepted recipient).
        C{read()} gives the next chunk (a Deferred, so the file is read off
        the reactor thread; C{b""} at the end); a chunk is asked for only
        when the previous one is written and the
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
        return Deferred.fromCoroutine(self._streamBody(self._body, read, replies))

    async def _streamBody(self, body: _BodySender, read: ChunkReader, replies: int) -> None:
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
        self.send(stuffer.finish(), replies)

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
