"""
The durable spool: accepted messages and the state of their recipients, kept
in plain files so that nothing acknowledged is ever lost to a crash.

Layout (docs/spool.md tells why)::

    DIR/lock            flock'd by the one process that writes the spool
    DIR/tmp/            files being written; after a crash, garbage
    DIR/queue/ID.msg    the message bytes, immutable once committed
    DIR/queue/ID.json   the QueuedMessage; its presence in queue/ IS the commit
    DIR/corrupt/        files that could not be read, kept for the operator

Only the gateway process writes; other processes (the ``mailgw queue``
commands) may read at any time, which atomic renames make safe.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import json
import os
import re
import secrets
from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.envelope import Envelope, QueuedMessage, Session
from mailgw.interfaces import IMessageWriter, ISpool

#: ``runBlocking(f, *args)`` runs ``f(*args)`` off the reactor thread and
#: returns a Deferred of its result (production: ``deferToThreadPool``).
RunBlocking = Callable[..., "Deferred[Any]"]

_log = Logger()

# 13 hex digits of microseconds since the epoch (enough until 2112), then 7
# hex digits (28 bits) from the OS's CSPRNG so ids cannot be guessed.
_QUEUE_ID = re.compile(r"[0-9A-F]{20}\Z")
_RANDOM_BITS = 28
_BUFFER_SIZE = 64 * 1024
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What QueuedMessage.fromJSON raises on data that is not a queued message.
_BAD_DATA = (ValueError, KeyError, TypeError, AttributeError)


class SpoolError(Exception):
    """
    A transient local failure of the spool: the message is not queued and
    the client should try again (451 4.3.0). The text is for the log only.
    """


class SpoolFullError(SpoolError):
    """The disk or the quota is full (ENOSPC, EDQUOT): transient, 452 4.3.1."""


def spoolErrorFrom(error: OSError, what: str) -> SpoolError:
    """The L{SpoolError} (or L{SpoolFullError}) that stands for ``error``."""
    cls = SpoolFullError if error.errno in _FULL_ERRNOS else SpoolError
    result = cls(f"{what}: {error}")
    result.__cause__ = error
    return result


def isQueueId(text: object) -> bool:
    """Is ``text`` of the form of a queue id (and so safe in a file name)?"""
    return isinstance(text, str) and _QUEUE_ID.match(text) is not None


@attrs.define
class QueueIdFactory:
    """
    Makes queue ids: unique and increasing within a process (the time part
    never repeats nor goes back), sortable by time across processes, and not
    guessable from one another.
    """

    clock: IReactorTime
    _last: int = -1

    def __call__(self) -> str:
        micros = max(int(self.clock.seconds() * 1_000_000), self._last + 1)
        self._last = micros
        return f"{micros:013X}{secrets.randbits(_RANDOM_BITS):07X}"


class FileSystem:
    """
    The os calls whose order makes the spool durable, in one place so that
    tests can record them or make them fail. Every method raises OSError.
    """

    def create(self, path: str, exclusive: bool = False) -> int:
        """Open ``path`` for writing (mode 0600), truncated or new-only."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_EXCL if exclusive else os.O_TRUNC
        return os.open(path, flags, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, source: str, destination: str) -> None:
        os.replace(source, destination)

    def remove(self, path: str) -> None:
        os.unlink(path)

    def syncDirectory(self, path: str) -> None:
        """Make the entries (creations, renames, removals) of ``path`` durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _removeQuietly(fs: FileSystem, path: str) -> None:
    # Cleanup after a failure: the first error is the one worth reporting.
    try:
        fs.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("Cannot remove {path}: {error}", path=path, error=e)


def _writeDurably(fs: FileSystem, path: str, data: bytes) -> None:
    fd = fs.create(path)
    try:
        fs.write(fd, data)
        fs.fsync(fd)
    finally:
        fs.close(fd)


#: How many queued messages' state a Spool keeps in memory at most.
MAX_REMEMBERED = 20_000


def encodeMessage(message: QueuedMessage) -> bytes:
    """The bytes of ``queue/ID.json`` for ``message``."""
    # Compact: the C encoder (indent would force the pure-Python one).
    data = json.dumps(message.toJSON(), sort_keys=True, separators=(",", ":"))
    return data.encode("ascii") + b"\n"


def decodeMessage(data: bytes) -> QueuedMessage:
    """
    The L{QueuedMessage} stored as ``data``.

    @raise ValueError: ``data`` is not a stored message.
    """
    try:
        return QueuedMessage.fromJSON(json.loads(data))
    except _BAD_DATA as e:
        raise ValueError(f"not a queued message: {e!r}") from e


@attrs.define(eq=False)
class SpoolReader:
    """
    A read-only view of the spool in ``directory``: for other processes (the
    ``mailgw queue`` commands) and tests, safe while the gateway runs. It
    takes no lock, recovers nothing and changes no file; unreadable entries
    are logged and skipped.
    """

    directory: str = attrs.field(converter=os.fspath)

    def _dir(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _path(self, where: str, queueId: str, suffix: str) -> str:
        return os.path.join(self.directory, where, queueId + suffix)

    def _unreadable(self, queueId: str, reason: object) -> None:
        _log.warn("Queue entry {queueId} is unreadable: {reason}", queueId=queueId, reason=reason)

    def pending(self) -> list[QueuedMessage]:
        try:
            names = os.listdir(self._dir("queue"))
        except OSError as e:
            raise spoolErrorFrom(e, "cannot list the queue") from e
        messages = []
        for name in names:
            queueId, _, suffix = name.partition(".")
            if suffix != "json" or not isQueueId(queueId):
                continue
            try:
                messages.append(self._read(queueId))
            except KeyError:
                continue  # removed meanwhile, or unreadable
            except SpoolError as e:
                _log.error("Cannot read queue entry {queueId}: {error}", queueId=queueId, error=e)
        messages.sort(key=lambda m: (m.arrival, m.queueId))
        return messages

    def _read(self, queueId: str) -> QueuedMessage:
        try:
            with open(self._path("queue", queueId, ".json"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise KeyError(queueId) from None
        except OSError as e:
            raise spoolErrorFrom(e, f"cannot read {queueId}") from e
        try:
            message = decodeMessage(data)
            if message.queueId != queueId:
                raise ValueError(f"it names itself {message.queueId!r}")
        except ValueError as e:
            self._unreadable(queueId, e)
            raise KeyError(queueId) from None
        return message

    def load(self, queueId: str) -> QueuedMessage:
        """
        @raise KeyError: no such message, a malformed id, or an unreadable
            entry.
        @raise SpoolError: the file cannot be read (transient).
        """
        if not isQueueId(queueId):
            raise KeyError(queueId)
        return self._read(queueId)

    def openMessage(self, queueId: str) -> BinaryIO:
        """
        @raise KeyError: no such committed message, or a malformed id.
        @raise SpoolError: the file cannot be opened (transient).
        """
        if not isQueueId(queueId) or not os.path.exists(self._path("queue", queueId, ".json")):
            raise KeyError(queueId)
        try:
            return open(self._path("queue", queueId, ".msg"), "rb")
        except FileNotFoundError:
            raise KeyError(queueId) from None
        except OSError as e:
            raise spoolErrorFrom(e, f"cannot open {queueId}") from e


@implementer(ISpool)
@attrs.define(eq=False)
class Spool(SpoolReader):
    """
    L{ISpool} over plain files in ``directory``.

    Creating a Spool creates the directory tree if missing, takes the spool's
    lock (L{SpoolError} if another process holds it) and recovers from a
    crash: files of uncommitted writes are deleted. L{close} releases the lock.
    Unreadable entries met by L{pending} or L{load} are moved to corrupt/.

    @ivar clock: gives the arrival time of messages and the time in queue ids.
    @ivar runBlocking: runs the fsync'ing steps off the reactor thread.
    """

    clock: IReactorTime
    runBlocking: RunBlocking
    _fs: FileSystem = attrs.field(factory=FileSystem, kw_only=True)
    _newId: QueueIdFactory = attrs.field(init=False)
    _locks: dict[str, DeferredLock] = attrs.field(init=False, factory=dict)
    _lockFD: int | None = attrs.field(init=False, default=None)
    # The state of messages this process wrote (see _remember).
    _known: dict[str, QueuedMessage] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._newId = QueueIdFactory(self.clock)
        try:
            self._createTree()
            self._lock()
            self._recover()
        except OSError as e:
            self.close()
            raise spoolErrorFrom(e, f"cannot open spool {self.directory}") from e

    def _createTree(self) -> None:
        created = not os.path.isdir(self.directory)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for name in ("tmp", "queue", "corrupt"):
            if not os.path.isdir(self._dir(name)):
                os.mkdir(self._dir(name), 0o700)
                created = True
        if created:
            # New directories are entries of their parents: make them stay.
            self._fs.syncDirectory(self.directory)
            self._fs.syncDirectory(os.path.dirname(os.path.abspath(self.directory)))

    def _lock(self) -> None:
        fd = os.open(self._dir("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool {self.directory} is in use by another process") from None
        self._lockFD = fd

    def close(self) -> None:
        """Release the spool's lock. Idempotent."""
        fd, self._lockFD = self._lockFD, None
        if fd is not None:
            os.close(fd)

    def _recover(self) -> None:
        for name in os.listdir(self._dir("tmp")):
            _log.info("Removing unfinished spool file tmp/{name}", name=name)
            _removeQuietly(self._fs, os.path.join(self._dir("tmp"), name))
        names = set(os.listdir(self._dir("queue")))
        for name in sorted(names):
            queueId, _, suffix = name.partition(".")
            if not isQueueId(queueId) or suffix not in ("msg", "json"):
                _log.warn("Unexpected file queue/{name} left alone", name=name)
            elif suffix == "msg" and queueId + ".json" not in names:
                # Renamed in, but the commit never finished: never acknowledged.
                _log.info("Removing uncommitted message {queueId}", queueId=queueId)
                _removeQuietly(self._fs, os.path.join(self._dir("queue"), name))
            elif suffix == "json" and queueId + ".msg" not in names:
                self._quarantine(queueId, "its message file is missing")

    def _unreadable(self, queueId: str, reason: object) -> None:
        self._known.pop(queueId, None)
        self._quarantine(queueId, reason)

    def _quarantine(self, queueId: str, reason: object) -> None:
        # The msg first: a json without msg is quarantined again at the next
        # start, whereas a msg without json would be deleted.
        for suffix in (".msg", ".json"):
            try:
                self._fs.rename(
                    self._path("queue", queueId, suffix), self._path("corrupt", queueId, suffix)
                )
            except FileNotFoundError:
                pass
            except OSError as e:
                _log.error("Cannot move {queueId} to corrupt/: {error}", queueId=queueId, error=e)
                return
        _log.error(
            "Queue entry {queueId} is unreadable ({reason}); moved to corrupt/",
            queueId=queueId,
            reason=reason,
        )

    def begin(self, envelope: Envelope, session: Session) -> SpoolWriter:
        for _ in range(8):
            queueId = self._newId()
            if os.path.exists(self._path("queue", queueId, ".json")):
                continue
            # The file is created later, by the first write past the buffer
            # or by the commit in its thread: creating a file waits for the
            # file system journal, which the reactor thread must not do.
            return SpoolWriter(self, queueId, envelope, session, None)
        raise SpoolError("cannot find a free queue id")

    def update(self, message: QueuedMessage) -> Deferred[QueuedMessage]:
        """
        Fails with KeyError if the message is not in the queue, with
        L{SpoolError} or L{SpoolFullError} (transient) if it cannot be
        written; then the stored state is either the old or the new one.
        """
        if not isQueueId(message.queueId):
            return fail(KeyError(message.queueId))
        d = self._serialized(message.queueId, self._updateBlocking, message.queueId,
                             encodeMessage(message))  # fmt: skip
        return d.addCallback(lambda _: self._remember(message))

    def _remember(self, message: QueuedMessage) -> QueuedMessage:
        """
        Keep the state just made durable, so that L{load} need not read it
        back (this process is the queue's only writer). Bounded: past
        ``MAX_REMEMBERED`` messages, load reads the disk.
        """
        if message.queueId in self._known or len(self._known) < MAX_REMEMBERED:
            self._known[message.queueId] = message
        return message

    def load(self, queueId: str) -> QueuedMessage:
        known = self._known.get(queueId)
        return known if known is not None else super().load(queueId)

    def _updateBlocking(self, queueId: str, data: bytes) -> None:
        final = self._path("queue", queueId, ".json")
        if not os.path.exists(final):
            raise KeyError(queueId)
        temporary = self._path("tmp", queueId, ".json")
        try:
            _writeDurably(self._fs, temporary, data)
            self._fs.rename(temporary, final)
            self._fs.syncDirectory(self._dir("queue"))
        except OSError as e:
            _removeQuietly(self._fs, temporary)
            raise spoolErrorFrom(e, f"cannot update {queueId}") from e

    def remove(self, queueId: str) -> Deferred[None]:
        """
        Idempotent: removing a message that is not there succeeds. Fails
        with KeyError for a malformed id, L{SpoolError} if the files cannot
        be removed (transient).
        """
        if not isQueueId(queueId):
            return fail(KeyError(queueId))
        self._known.pop(queueId, None)
        return self._serialized(queueId, self._removeBlocking, queueId)

    def _removeBlocking(self, queueId: str) -> None:
        try:
            # The json first: it is the commit; a msg alone is garbage.
            for suffix in (".json", ".msg"):
                try:
                    self._fs.remove(self._path("queue", queueId, suffix))
                except FileNotFoundError:
                    pass
            self._fs.syncDirectory(self._dir("queue"))
        except OSError as e:
            raise spoolErrorFrom(e, f"cannot remove {queueId}") from e

    def _serialized(self, queueId: str, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        # One change at a time per message, in call order: an update must not
        # land after a remove (it would leave a json without its msg).
        lock = self._locks.get(queueId)
        if lock is None:
            lock = self._locks[queueId] = DeferredLock()

        def forget(result: object) -> object:
            if not lock.locked and self._locks.get(queueId) is lock:
                del self._locks[queueId]
            return result

        return lock.run(self.runBlocking, f, *args).addBoth(forget)


class _State(enum.Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABORTED = "aborted"


@implementer(IMessageWriter)
@attrs.define(eq=False)
class SpoolWriter:
    """
    One message being written into a L{Spool}: see L{IMessageWriter}.

    ``write`` buffers up to 64 KiB and then writes to ``tmp/ID.msg`` in the
    reactor thread (the page cache takes it); ``commit`` runs the fsyncs and
    renames through the spool's ``runBlocking``. ``abort`` during a commit
    lets the commit finish, then removes the message and fails the commit.
    """

    spool: Spool
    queueId: str
    envelope: Envelope
    session: Session
    _fd: int | None
    size: int = 0
    _buffer: bytearray = attrs.field(factory=bytearray)
    _state: _State = _State.OPEN
    _error: SpoolError | None = None
    _abortRequested: bool = False
    _message: QueuedMessage | None = None

    def _tmp(self, suffix: str) -> str:
        return self.spool._path("tmp", self.queueId, suffix)

    def _open(self) -> int:
        """
        The message file, created on first use.

        @raise OSError: it cannot be created (also when it exists already).
        """
        if self._fd is None:
            self._fd = self.spool._fs.create(self._tmp(".msg"), exclusive=True)
        return self._fd

    def _fail(self, error: SpoolError) -> SpoolError:
        self._state = _State.FAILED
        self._error = error
        self._discard()
        return error

    def _discard(self) -> None:
        self._buffer.clear()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                self.spool._fs.close(fd)
            except OSError:
                pass  # nothing of it is wanted any more
        for suffix in (".msg", ".json"):
            _removeQuietly(self.spool._fs, self._tmp(suffix))

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
        self._buffer += data
        if len(self._buffer) >= _BUFFER_SIZE:
            try:
                self.spool._fs.write(self._open(), bytes(self._buffer))
            except OSError as e:
                raise self._fail(spoolErrorFrom(e, f"cannot write {self.queueId}")) from e
            self._buffer.clear()

    def commit(self) -> Deferred[str]:
        if self._error is not None:
            return fail(self._error)
        if self._state is not _State.OPEN:
            raise RuntimeError(f"commit of a {self._state.value} message")
        self._state = _State.COMMITTING
        now = self.spool.clock.seconds()
        message = QueuedMessage.arrived(self.queueId, self.envelope, self.session, now, self.size)
        self._message = message
        rest, self._buffer = bytes(self._buffer), bytearray()
        d = self.spool._serialized(self.queueId, self._commitBlocking, rest,
                                   encodeMessage(message))  # fmt: skip
        return d.addCallbacks(self._committed, self._commitFailed)

    def _commitBlocking(self, rest: bytes, data: bytes) -> str:
        fs, queueDir = self.spool._fs, self.spool._dir("queue")
        final = self.spool._path("queue", self.queueId, ".msg")
        state = self.spool._path("queue", self.queueId, ".json")
        try:
            fd = self._open()
            self._fd = None
            try:
                if rest:
                    fs.write(fd, rest)
                fs.fsync(fd)  # the bytes are on disk before anything names them
            finally:
                fs.close(fd)
            _writeDurably(fs, self._tmp(".json"), data)
            fs.rename(self._tmp(".msg"), final)  # msg before json: json = committed
            fs.rename(self._tmp(".json"), state)
            fs.syncDirectory(queueDir)  # the renames survive power loss: now 250
        except BaseException as e:
            # The client is told 4xx and sends again: keep nothing, json first.
            for path in (state, final, self._tmp(".json"), self._tmp(".msg")):
                _removeQuietly(fs, path)
            if isinstance(e, OSError):
                raise spoolErrorFrom(e, f"cannot commit {self.queueId}") from e
            raise
        return self.queueId

    def _committed(self, queueId: str) -> str:
        self._state = _State.COMMITTED
        if self._message is not None and not self._abortRequested:
            self.spool._remember(self._message)
        if self._abortRequested:
            self._state = _State.ABORTED
            _log.info("Removing {queueId}, aborted during its commit", queueId=queueId)
            self.spool.remove(queueId).addErrback(
                lambda f: _log.failure("Cannot remove aborted {queueId}", f, queueId=queueId)
            )
            raise SpoolError(f"{queueId} aborted during its commit")
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
            self._discard()
