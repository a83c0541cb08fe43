"""
One message being written into the spool (L{IMessageWriter}).

Every file operation of a writer (creating ``tmp/ID.msg``, each write, the
fsyncs and renames of the commit, the cleanup of an abort) runs in the
spool's thread pool, one after another in call order (the spool serialises
the steps of one queue id): the reactor thread only buffers bytes, so a slow
disk delays the 250 of the message being committed, never other sessions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.envelope import Address, BodyType, Envelope, QueuedMessage, Session
from mailgw.interfaces import IEditableWriter, SpoolError
from mailgw.queue.files import (
    FileSystem,
    encodeMessage,
    removeQuietly,
    spoolErrorFrom,
    writeDurably,
)


class WriterSpool(Protocol):
    """What a writer needs of its spool (L{mailgw.queue.spool.Spool} provides it)."""

    clock: IReactorTime
    fs: FileSystem

    def path(self, where: str, queueId: str, suffix: str) -> str: ...

    def serialized(self, queueId: str, f: Callable[..., Any], *args: Any) -> Deferred[Any]: ...

    def syncQueue(self) -> None: ...

    def remove(self, queueId: str) -> Deferred[None]: ...


#: Bytes buffered in memory before they are handed to the spool's thread.
BUFFER_SIZE = 64 * 1024

_log = Logger()


class _State(enum.Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABORTED = "aborted"


@attrs.frozen
class _Amendment:
    rewrite: Callable[[BinaryIO, BinaryIO], None] | None
    recipients: tuple[Address, ...] | None
    holdReason: str | None


@attrs.define(eq=False)
class _Counting:
    """A binary file for a rewrite: writes through the spool's file layer, counts."""

    fs: FileSystem
    fd: int
    size: int = 0
    eightBit: bool = False

    def write(self, data: bytes) -> int:
        self.fs.write(self.fd, data)
        self.size += len(data)
        if not self.eightBit and not data.isascii():
            self.eightBit = True
        return len(data)


@implementer(IEditableWriter)
@attrs.define(eq=False)
class SpoolWriter:
    """
    See L{IMessageWriter} and the module docstring. ``abort`` during a
    commit lets the commit finish, then removes the message and fails the
    commit. A write failure in the thread is reported by the next ``write``
    or by ``commit``.
    """

    spool: WriterSpool
    queueId: str
    envelope: Envelope
    session: Session
    size: int = 0
    message: QueuedMessage | None = None
    # Touched only by the steps that run in the spool's thread, one at a time.
    _fd: int | None = None
    _buffer: bytearray = attrs.field(factory=bytearray)
    _state: _State = _State.OPEN
    _error: SpoolError | None = None
    _abortRequested: bool = False
    _eightBit: bool = False
    _amendment: _Amendment | None = None

    def _tmp(self, suffix: str) -> str:
        return self.spool.path("tmp", self.queueId, suffix)

    # -- the reactor thread ---------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        @raise SpoolFullError: the disk is full; the message is dropped.
        @raise SpoolError: any other failure; the message is dropped.
        """
        if self._error is not None:
            raise self._error
        if self._state is not _State.OPEN:
            raise RuntimeError(f"write to a {self._state.value} message")
        self.size += len(data)
        if not self._eightBit and not data.isascii():
            # RFC 6152: the upstream must be told BODY=8BITMIME, whatever
            # the client declared.
            self._eightBit = True
        self._buffer += data
        if len(self._buffer) >= BUFFER_SIZE:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            d = self.spool.serialized(self.queueId, self._writeBlocking, chunk)
            d.addErrback(self._ioFailed)

    def _ioFailed(self, failure: Failure) -> None:
        if self._error is None:
            error = failure.value
            if not isinstance(error, SpoolError):
                error = (
                    spoolErrorFrom(error, f"cannot write {self.queueId}")
                    if isinstance(error, OSError)
                    else SpoolError(f"cannot write {self.queueId}: {error!r}")
                )
            self._error = error
            if self._state is _State.OPEN:
                self._state = _State.FAILED
                self._buffer.clear()
            self._discardLater()

    def _discardLater(self) -> None:
        d = self.spool.serialized(self.queueId, self._discardBlocking)
        d.addErrback(lambda f: _log.failure("Cannot discard {queueId}", f, queueId=self.queueId))

    def amend(
        self,
        rewrite: Callable[[BinaryIO, BinaryIO], None] | None,
        recipients: tuple[Address, ...] | None,
        holdReason: str | None,
    ) -> None:
        """See L{IEditableWriter.amend}: the rewrite runs in the spool's thread at the commit."""
        if self._state is not _State.OPEN:
            raise RuntimeError(f"amend of a {self._state.value} message")
        self._amendment = _Amendment(rewrite, recipients, holdReason)

    def commit(self) -> Deferred[str]:
        if self._error is not None:
            return fail(self._error)
        if self._state is not _State.OPEN:
            raise RuntimeError(f"commit of a {self._state.value} message")
        self._state = _State.COMMITTING
        rest, self._buffer = bytes(self._buffer), bytearray()
        amendment = self._amendment
        if amendment is not None and amendment.rewrite is not None:
            d = self.spool.serialized(self.queueId, self._rewriteBlocking, rest, amendment.rewrite)
            return d.addErrback(self._commitFailed).addCallback(self._commitMessage, b"")
        return self._commitMessage((self.size, self._eightBit), rest)

    def _commitMessage(self, written: tuple[int, bool], rest: bytes) -> Deferred[str]:
        self.size, self._eightBit = written
        envelope, amendment = self.envelope, self._amendment
        if self._eightBit and envelope.body is BodyType.SEVENBIT:
            envelope = attrs.evolve(envelope, body=BodyType.EIGHTBITMIME)
        if amendment is not None and amendment.recipients is not None:
            envelope = attrs.evolve(envelope, recipients=amendment.recipients)
        now = self.spool.clock.seconds()
        message = QueuedMessage.arrived(self.queueId, envelope, self.session, now, self.size)
        if amendment is not None and amendment.holdReason is not None:
            message = attrs.evolve(message, held=True, holdReason=amendment.holdReason)
        d = self.spool.serialized(self.queueId, self._commitBlocking, rest, encodeMessage(message))
        return d.addCallbacks(self._committed, self._commitFailed, callbackArgs=(message,))

    def _committed(self, queueId: str, message: QueuedMessage) -> str:
        self._state = _State.COMMITTED
        if self._abortRequested:
            self._state = _State.ABORTED
            _log.info("Removing {queueId}, aborted during its commit", queueId=queueId)
            self.spool.remove(queueId).addErrback(
                lambda f: _log.failure("Cannot remove aborted {queueId}", f, queueId=queueId)
            )
            raise SpoolError(f"{queueId} aborted during its commit")
        self.message = message
        return queueId

    def _commitFailed(self, failure: Failure) -> Failure:
        self._state = _State.ABORTED if self._abortRequested else _State.FAILED
        if isinstance(failure.value, SpoolError):
            self._error = failure.value
        else:
            self._error = SpoolError(f"cannot commit {self.queueId}: {failure.value!r}")
        return failure

    def abort(self) -> None:
        if self._state is _State.COMMITTING:
            self._abortRequested = True
        elif self._state in (_State.OPEN, _State.FAILED):
            self._state = _State.ABORTED
            self._buffer.clear()
            self._discardLater()

    # -- the spool's thread ----------------------------------------------------

    def _open(self) -> int:
        """
        The message file, created on first use.

        @raise OSError: it cannot be created (also when it exists already).
        """
        if self._fd is None:
            self._fd = self.spool.fs.create(self._tmp(".msg"), exclusive=True)
        return self._fd

    def _writeBlocking(self, chunk: bytes) -> None:
        if self._error is not None or self._state is _State.ABORTED:
            return  # dropped already; the discard step follows
        self.spool.fs.write(self._open(), chunk)

    def _discardBlocking(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                self.spool.fs.close(fd)
            except OSError:
                pass  # nothing of it is wanted any more
        for suffix in (".msg", ".json", ".new"):
            removeQuietly(self.spool.fs, self._tmp(suffix))

    def _rewriteBlocking(
        self, rest: bytes, rewrite: Callable[[BinaryIO, BinaryIO], None]
    ) -> tuple[int, bool]:
        """
        The message rewritten by ``rewrite`` into ``tmp/ID.new``, renamed
        over ``tmp/ID.msg`` and left open for the commit's fsync.

        @return: the new size, and whether it has 8-bit octets.
        """
        if self._error is not None:
            raise self._error
        fs, source, target = self.spool.fs, self._tmp(".msg"), self._tmp(".new")
        try:
            fd = self._open()
            self._fd = None
            try:
                if rest:
                    fs.write(fd, rest)
            finally:
                fs.close(fd)
            out = _Counting(fs, fs.create(target))
            try:
                with open(source, "rb") as src:
                    rewrite(src, out)  # type: ignore[arg-type]
                fs.rename(target, source)
            except BaseException:
                fs.close(out.fd)
                raise
            self._fd = out.fd
        except OSError as e:
            removeQuietly(fs, target)
            raise spoolErrorFrom(e, f"cannot rewrite {self.queueId}") from e
        except SpoolError:
            removeQuietly(fs, target)
            raise
        except Exception as e:
            removeQuietly(fs, target)
            raise SpoolError(f"cannot rewrite {self.queueId}: {e!r}") from e
        return out.size, out.eightBit

    def _commitBlocking(self, rest: bytes, data: bytes) -> str:
        if self._error is not None:
            raise self._error
        fs, spool = self.spool.fs, self.spool
        final = spool.path("queue", self.queueId, ".msg")
        state = spool.path("queue", self.queueId, ".json")
        if fs.exists(state):
            # A clock gone back across a restart: never replace a message.
            self._discardBlocking()
            raise SpoolError(f"queue id {self.queueId} is in use")
        try:
            fd = self._open()
            self._fd = None
            try:
                if rest:
                    fs.write(fd, rest)
                fs.fsync(fd)  # the bytes are on disk before anything names them
            finally:
                fs.close(fd)
            writeDurably(fs, self._tmp(".json"), data)
            fs.rename(self._tmp(".msg"), final)  # msg before json: json = committed
            fs.rename(self._tmp(".json"), state)
            spool.syncQueue()  # the renames survive power loss: now 250
        except BaseException as e:
            # The client is told 4xx and sends again: keep nothing, json first.
            for path in (state, final, self._tmp(".json"), self._tmp(".msg")):
                removeQuietly(fs, path)
            if isinstance(e, OSError):
                raise spoolErrorFrom(e, f"cannot commit {self.queueId}") from e
            raise
        return self.queueId
