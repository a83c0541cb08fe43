"""
One client connection, below the SMTP dialogue: input buffering and line
splitting, back-pressure both ways, the deadlines, waiting on a Deferred
without reading further input, and closing with an abort deadline.

Commands are handled strictly one after another. While an answer depends
on a Deferred (L{Connection.wait}) no further input is processed, so
replies to pipelined commands (RFC 2920) always come back in order; input
keeps buffering up to a bound, after which the transport is paused.

Every close goes through L{Connection.close}: it sends the last reply,
gives back what the session holds (L{Connection.releaseResources}) and
asks the transport to close. A TLS transport then waits for the peer's
close_notify, which a silent peer never sends: after ``closeTimeout``
seconds the connection is aborted, so no peer can keep its connection,
its slot in the connection limits or a stopping service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw import replies
from mailgw.replies import SMTPReply
from mailgw.server.settings import Listener

# RFC 4954 4: an AUTH command line or response may be 12288 octets; no
# other command comes near that.
MAX_COMMAND_LINE = 12288 + 2
# Input buffered while a command waits on a Deferred before reading stops.
MAX_BUFFERED = 64 * 1024

# The deadlines; each closes the connection with its reply when it passes.
IDLE, SESSION, LINE, PREAUTH, ABORT = "idle", "session", "line", "preauth", "abort"


@implementer(IPushProducer)
class Connection(Protocol):
    """
    The connection half of a session. A subclass supplies the dialogue
    through L{connectionOpened}, L{lineReceived}, L{lineTooLong},
    L{releaseResources} and L{connectionEnded}, and reads raw bytes (the
    message data) by setting L{rawSink}.

    @ivar rawSink: while set, every buffered byte goes to it instead of
        being split into lines; it returns C{None} while it wants more, or
        the bytes that follow the end of its data (it clears L{rawSink}
        itself before returning them).
    """

    # TCP, TLS or test transports: startTLS, pause/resumeProducing,
    # abortConnection and setTcpNoDelay are used where the transport has them.
    transport: Any
    _log = Logger()

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        # A bytearray: taking a line off its front is O(1) in CPython, so a
        # read full of pipelined commands costs linear time, not quadratic.
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._busy = False
        # Reading from the transport stops while a command waits with much
        # input buffered, and while the client does not read our replies
        # (the transport pauses us, its producer, when its buffer is full).
        self._reading = True
        self._writeBlocked = False
        self._producing = False
        self._processing = False
        # closing: the close has begun, nothing more is read or answered;
        # lost: connectionLost came, the connection is gone.
        self.closing = False
        self.lost = False
        self._closeWhenIdle: SMTPReply | None = None
        self._skipping = False
        self._timers: dict[str, IDelayedCall] = {}
        self._lostWaiters: list[Deferred[None]] = []
        self.rawSink: Callable[[bytes], bytes | None] | None = None

    # -- hooks -----------------------------------------------------------

    def connectionOpened(self) -> None:
        """The connection is set up (timers, producer): greet or refuse."""

    def lineReceived(self, line: bytes) -> None:
        """One command line, without its line ending."""

    def lineTooLong(self) -> None:
        """A line passed L{MAX_COMMAND_LINE}; it is dropped up to its end."""

    def releaseResources(self) -> None:
        """
        Give back what the session holds (its message writer, its AUTH
        attempt). Called when the close begins and again when the
        connection is lost: it must be idempotent.
        """

    def connectionEnded(self) -> None:
        """The connection is gone (called once, from connectionLost)."""

    # -- life ------------------------------------------------------------

    def connectionMade(self) -> None:
        self.listener.connections.add(self)
        # A client that sends without reading our replies must not make us
        # buffer them without bound: the transport pauses us when it is full.
        self.transport.registerProducer(self, True)
        self._producing = True
        # Replies are small and come in bursts: do not wait for Nagle.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except Exception:
                pass  # not a TCP socket (UNIX socket)
        settings = self.listener.settings
        self.startTimer(IDLE, settings.idleTimeout, replies.TIMEOUT)
        self.startTimer(SESSION, settings.sessionTimeout, replies.SESSION_TIMEOUT)
        self.connectionOpened()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.lost:
            return
        self.lost = True
        self.closing = True
        self._buffer.clear()
        self.rawSink = None
        self._cancelTimers()
        self.listener.connections.discard(self)
        self.releaseResources()
        self.connectionEnded()
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)

    def shutdown(self) -> Deferred[None]:
        """
        Close with 421 4.3.2 now, or once the command in flight (a message
        being checked or committed, an AUTH being verified) is answered.

        @return: a Deferred that fires when the connection is gone.
        """
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lostWaiters.append(d)
        if not self.closing:
            if self._busy:
                self._closeWhenIdle = replies.SHUTDOWN
            else:
                self.close(replies.SHUTDOWN)
        return d

    def close(self, reply: SMTPReply | None = None) -> None:
        """
        Send ``reply``, give back the session's resources and close; abort
        the connection if it is not gone within ``closeTimeout`` seconds.
        """
        if self.closing:
            return
        if reply is not None:
            self._out.append(reply.toBytes())
        self._flush()
        self.closing = True
        self._buffer.clear()
        self.rawSink = None
        self._cancelTimers()
        self.releaseResources()
        if self._producing:
            # A TLS transport closes only once no producer is registered.
            self._producing = False
            self.transport.unregisterProducer()
        if not self._reading:
            # The peer's close_notify must be read for a TLS close to end.
            self._reading = True
            self.transport.resumeProducing()
        # Armed before loseConnection: a transport may report the loss at once.
        self._timers[ABORT] = self.listener.clock.callLater(
            self.listener.settings.closeTimeout, self._abort
        )
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._timers.pop(ABORT, None)
        if not self.lost:
            self._log.info("peer did not finish the close in time: aborting the connection")
            self.transport.abortConnection()

    # -- deadlines ---------------------------------------------------------

    def startTimer(self, name: str, seconds: float, reply: SMTPReply) -> None:
        """Close with ``reply`` in ``seconds`` unless cancelled or reset first."""
        self.cancelTimer(name)
        if not self.closing:
            self._timers[name] = self.listener.clock.callLater(seconds, self._expired, name, reply)

    def resetTimer(self, name: str, seconds: float) -> None:
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.reset(seconds)

    def pauseTimer(self, name: str) -> float | None:
        """Stop the deadline ``name``; the seconds it had left (None: not running)."""
        timer = self._timers.get(name)
        if timer is None or not timer.active():
            return None
        left = max(0.0, timer.getTime() - self.listener.clock.seconds())
        self.cancelTimer(name)
        return left

    def cancelTimer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self, name: str, reply: SMTPReply) -> None:
        self._timers.pop(name, None)
        self.close(reply)

    def _cancelTimers(self) -> None:
        for name in list(self._timers):
            if name != ABORT or self.lost:
                self.cancelTimer(name)

    # -- output ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the client; sent at once unless input is being handled."""
        self._out.append(data)
        if not self._processing:
            self._flush()

    def _flush(self) -> None:
        if self._out and not self.closing:
            self.transport.write(b"".join(self._out))
        self._out = []

    def dropInput(self) -> None:
        """Forget every byte buffered (RFC 3207 4.2: sent before TLS)."""
        self._flush()
        self._buffer.clear()
        self._skipping = False

    # -- waiting -------------------------------------------------------------

    def wait(self, d: Deferred[Any], then: Callable[[Any], None]) -> None:
        """
        Read no further input until ``d`` fires; then call ``then`` with
        its result, unless the connection is closing by then.

        The owner of what ``d`` stands for settles it in ``d``'s own
        callbacks, whether or not the client is still there; ``then`` only
        answers. A close that waits for this command (shutdown) happens
        after ``then`` has answered.
        """
        self._busy = True
        d.addBoth(self._waited, then)

    def _waited(self, result: Any, then: Callable[[Any], None]) -> None:
        self._busy = False
        if self.closing:
            if isinstance(result, Failure):
                self._log.failure("Error after the connection closed", result)
            return
        try:
            then(result)
        except Exception:
            self._log.failure("Error handling a command result")
            self.internalError()
        if self._busy or self.closing:
            return  # another wait began, or the answer closed
        if self._closeWhenIdle is not None:
            self.close(self._closeWhenIdle)
            return
        self._updateReading()
        self._process()

    def internalError(self) -> None:
        """A bug in answering a command: say 451 (subclasses also reset state)."""
        self.write(replies.LOCAL_ERROR.toBytes())

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.resetTimer(IDLE, self.listener.settings.idleTimeout)
        self._buffer += data
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it runs out or a command must wait."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._writeBlocked and not self.closing and self._buffer:
                sink = self.rawSink
                if sink is not None:
                    data, self._buffer = bytes(self._buffer), bytearray()
                    rest = sink(data)
                    if rest is not None and not self.closing:
                        self._buffer = bytearray(rest) + self._buffer
                    continue
                line = self._nextLine()
                if line is None:
                    break
                self.lineReceived(line)
        finally:
            self._processing = False
        self._flush()
        if self.closing:
            return
        self._watchLine()
        self._updateReading()

    def _nextLine(self) -> bytes | None:
        """
        The next complete line, or None. A line longer than the limit is
        answered once (L{lineTooLong}), however many reads it takes, and
        dropped up to its end.
        """
        buffer = self._buffer
        while not self.closing:
            end = buffer.find(b"\n")
            if end == -1:
                if self._skipping:
                    buffer.clear()
                elif len(buffer) > MAX_COMMAND_LINE:
                    buffer.clear()
                    self._skipping = True
                    self.lineTooLong()
                return None
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_COMMAND_LINE:
                self.lineTooLong()
                continue
            return line
        return None

    def _watchLine(self) -> None:
        """
        A started command line must end within ``commandTimeout``, however
        the bytes trickle in: a slow drip cannot hold the connection.
        """
        partial = (bool(self._buffer) or self._skipping) and self.rawSink is None
        partial = partial and not self._busy
        if partial and LINE not in self._timers:
            self.startTimer(LINE, self.listener.settings.commandTimeout, replies.TIMEOUT)
        elif not partial:
            self.cancelTimer(LINE)

    def _updateReading(self) -> None:
        """Read from the transport only while input and output both flow."""
        # Input is only held back, not refused, until it passes the bound:
        # a TLS transport pauses its producer during the handshake, and
        # reading must go on for the handshake to finish.
        backlog = (self._busy or self._writeBlocked) and len(self._buffer) > MAX_BUFFERED
        reading = not self.closing and not backlog
        if reading != self._reading:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    # -- IPushProducer: the transport tells us when the client stops reading

    def pauseProducing(self) -> None:
        self._writeBlocked = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._writeBlocked = False
        if not self.closing:
            self._updateReading()
            self._process()

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost cleans up
