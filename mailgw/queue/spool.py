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

import fcntl
import os
from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.envelope import Envelope, QueuedMessage, Session
from mailgw.interfaces import ISpool, SpoolError, SpoolFullError
from mailgw.queue.files import (
    FileSystem,
    GroupSync,
    QueueIdFactory,
    RunBlocking,
    decodeMessage,
    encodeMessage,
    isQueueId,
    removeQuietly,
    spoolErrorFrom,
    writeDurably,
)
from mailgw.queue.writer import SpoolWriter

__all__ = [
    "FileSystem",
    "QueueIdFactory",
    "RunBlocking",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolReader",
    "SpoolWriter",
    "decodeMessage",
    "encodeMessage",
    "isQueueId",
    "spoolErrorFrom",
]

_log = Logger()


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

    def corrupt(self) -> int:
        """How many entries were moved to corrupt/ (for the operator to look at)."""
        try:
            names = os.listdir(self._dir("corrupt"))
        except OSError:
            return 0
        return len({name.partition(".")[0] for name in names})

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
    fs: FileSystem = attrs.field(factory=FileSystem, kw_only=True)
    _newId: QueueIdFactory = attrs.field(init=False)
    _locks: dict[str, DeferredLock] = attrs.field(init=False, factory=dict)
    _lockFD: int | None = attrs.field(init=False, default=None)
    _queueSync: GroupSync = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._newId = QueueIdFactory(self.clock)
        self._queueSync = GroupSync(self.fs, self._dir("queue"))
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
            self.fs.syncDirectory(self.directory)
            self.fs.syncDirectory(os.path.dirname(os.path.abspath(self.directory)))

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
            removeQuietly(self.fs, os.path.join(self._dir("tmp"), name))
        names = set(os.listdir(self._dir("queue")))
        for name in sorted(names):
            queueId, _, suffix = name.partition(".")
            if not isQueueId(queueId) or suffix not in ("msg", "json"):
                _log.warn("Unexpected file queue/{name} left alone", name=name)
            elif suffix == "msg" and queueId + ".json" not in names:
                # Renamed in, but the commit never finished: never acknowledged.
                _log.info("Removing uncommitted message {queueId}", queueId=queueId)
                removeQuietly(self.fs, os.path.join(self._dir("queue"), name))
            elif suffix == "json" and queueId + ".msg" not in names:
                self._quarantine(queueId, "its message file is missing")

    def _unreadable(self, queueId: str, reason: object) -> None:
        self._quarantine(queueId, reason)

    def _quarantine(self, queueId: str, reason: object) -> None:
        # The msg first: a json without msg is quarantined again at the next
        # start, whereas a msg without json would be deleted.
        for suffix in (".msg", ".json"):
            try:
                self.fs.rename(
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

    def path(self, where: str, queueId: str, suffix: str) -> str:
        """The path of ``where/queueId+suffix`` (for the writer)."""
        return self._path(where, queueId, suffix)

    def syncQueue(self) -> None:
        """
        Make the changes made so far to ``queue/`` durable (in the spool's
        thread): one directory fsync shared by the threads that ask at once.

        @raise OSError: the fsync failed.
        """
        self._queueSync.sync()

    def directoryOf(self, name: str) -> str:
        """The path of the spool's subdirectory ``name``."""
        return self._dir(name)

    def begin(self, envelope: Envelope, session: Session) -> SpoolWriter:
        # No file yet: the message file is created by the first write past
        # the buffer, in the spool's thread (creating a file waits for the
        # file system journal, which the reactor thread must not do).
        return SpoolWriter(self, self._newId(), envelope, session)

    def update(self, message: QueuedMessage) -> Deferred[QueuedMessage]:
        """
        Fails with KeyError if the message is not in the queue, with
        L{SpoolError} or L{SpoolFullError} (transient) if it cannot be
        written; then the stored state is either the old or the new one.
        """
        if not isQueueId(message.queueId):
            return fail(KeyError(message.queueId))
        d = self.serialized(message.queueId, self._updateBlocking, message.queueId,
                            encodeMessage(message))  # fmt: skip
        return d.addCallback(lambda _: message)

    def _updateBlocking(self, queueId: str, data: bytes) -> None:
        final = self._path("queue", queueId, ".json")
        if not os.path.exists(final):
            raise KeyError(queueId)
        temporary = self._path("tmp", queueId, ".json")
        try:
            writeDurably(self.fs, temporary, data)
            self.fs.rename(temporary, final)
            self.syncQueue()
        except OSError as e:
            removeQuietly(self.fs, temporary)
            raise spoolErrorFrom(e, f"cannot update {queueId}") from e

    def remove(self, queueId: str) -> Deferred[None]:
        """
        Idempotent: removing a message that is not there succeeds. Fails
        with KeyError for a malformed id, L{SpoolError} if the files cannot
        be removed (transient).
        """
        if not isQueueId(queueId):
            return fail(KeyError(queueId))
        return self.serialized(queueId, self._removeBlocking, queueId)

    def _removeBlocking(self, queueId: str) -> None:
        try:
            # The json first: it is the commit; a msg alone is garbage.
            for suffix in (".json", ".msg"):
                try:
                    self.fs.remove(self._path("queue", queueId, suffix))
                except FileNotFoundError:
                    pass
            self.syncQueue()
        except OSError as e:
            raise spoolErrorFrom(e, f"cannot remove {queueId}") from e

    def serialized(self, queueId: str, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run ``f(*args)`` through L{runBlocking} once every earlier step for
        ``queueId`` is done: one change at a time per message, in call order
        (a write must not land after the commit, an update not after a
        remove: it would leave a json without its msg).
        """
        lock = self._locks.get(queueId)
        if lock is None:
            lock = self._locks[queueId] = DeferredLock()

        def forget(result: object) -> object:
            if not lock.locked and self._locks.get(queueId) is lock:
                del self._locks[queueId]
            return result

        return lock.run(self.runBlocking, f, *args).addBoth(forget)
