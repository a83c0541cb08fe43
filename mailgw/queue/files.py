"""
The spool's file layer: queue ids, the os calls whose order makes the spool
durable, and the encoding of a message's state file. No Twisted here: every
function is plain blocking code that the spool runs off the reactor thread.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailgw.envelope import QueuedMessage
from mailgw.interfaces import SpoolError, SpoolFullError

#: ``runBlocking(f, *args)`` runs ``f(*args)`` off the reactor thread and
#: returns a Deferred of its result (production: ``deferToThreadPool`` on the
#: spool's own thread pool).
RunBlocking = Callable[..., "Deferred[Any]"]

_log = Logger()

# 13 hex digits of microseconds since the epoch (enough until 2112), then 7
# hex digits (28 bits) from the OS's CSPRNG so ids cannot be guessed.
_QUEUE_ID = re.compile(r"[0-9A-F]{20}\Z")
_RANDOM_BITS = 28
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What QueuedMessage.fromJSON raises on data that is not a queued message.
_BAD_DATA = (ValueError, KeyError, TypeError, AttributeError)


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

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def syncDirectory(self, path: str) -> None:
        """Make the entries (creations, renames, removals) of ``path`` durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GroupSync:
    """
    Directory fsyncs shared between the spool's threads (group commit). A
    caller's changes to the directory (renames, removals) are durable once
    an fsync of the directory that *started* after them has succeeded. A
    thread that finds an fsync running waits for it to end, then shares the
    next one with every thread that arrived meanwhile: with N threads
    committing at once, one fsync serves up to N commits instead of N
    fsyncs one after another. A failed fsync fails the thread that ran it;
    the others it was to cover try again with their own.
    """

    def __init__(self, fs: FileSystem, path: str) -> None:
        self._fs, self._path = fs, path
        self._condition = threading.Condition()
        self._requested = 0  # tickets handed out
        self._covered = 0  # the highest ticket a successful fsync covered
        self._running = False

    def sync(self) -> None:
        """
        Return once an fsync of the directory that started after this call
        has succeeded.

        @raise OSError: the fsync this thread ran failed.
        """
        with self._condition:
            self._requested += 1
            ticket = self._requested
            while self._covered < ticket:
                if self._running:
                    self._condition.wait()
                    continue
                target, self._running = self._requested, True
                self._condition.release()
                try:
                    self._fs.syncDirectory(self._path)
                    succeeded = True
                finally:
                    self._condition.acquire()
                    self._running = False
                    self._condition.notify_all()
                if succeeded:
                    self._covered = max(self._covered, target)


def removeQuietly(fs: FileSystem, path: str) -> None:
    """Remove ``path`` after a failure; the first error is the one worth reporting."""
    try:
        fs.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("Cannot remove {path}: {error}", path=path, error=e)


def writeDurably(fs: FileSystem, path: str, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (its name is not yet durable)."""
    fd = fs.create(path)
    try:
        fs.write(fd, data)
        fs.fsync(fd)
    finally:
        fs.close(fd)


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
