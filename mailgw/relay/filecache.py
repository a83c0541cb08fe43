"""
Values built from files (client TLS contexts from CA files, relay
passwords), cached until the file changes.

Building a client TLS context from a 215 KB CA bundle costs about 28 ms,
and reading a password file is blocking I/O: neither belongs on the reactor
thread once per delivery attempt. Each L{FileCache.get} stats the file and,
only when its modification time, size, inode or device differ from the
cached value's, builds the value again, both through C{runBlocking} (a
thread pool in production). A file that cannot be stat'ed is never cached:
the value is built every time, so its error is reported every time.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

__all__ = ["FileCache", "FileStamp", "RunBlocking", "runInline", "threadPoolRunner"]

V = TypeVar("V")

#: ``runBlocking(f, *args)`` runs ``f(*args)`` off the reactor thread and
#: returns a Deferred of its result (production: ``deferToThreadPool``).
RunBlocking = Callable[..., "Deferred[Any]"]


def runInline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A C{RunBlocking} that runs C{f} at once, on the calling thread (tests)."""
    return maybeDeferred(f, *args)


def threadPoolRunner(reactor: Any) -> RunBlocking:
    """C{runBlocking} on C{reactor}'s thread pool; inline for a reactor
    without threads (a test's Clock)."""
    if not IReactorThreads.providedBy(reactor):
        return runInline

    def runBlocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return runBlocking


@attrs.frozen
class FileStamp:
    """What tells one version of a file from the next."""

    mtimeNs: int
    size: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str) -> FileStamp:
        """@raise OSError: C{path} cannot be stat'ed."""
        st = os.stat(path)
        return cls(st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


_UNCHANGED = object()


def _refresh(path: str, known: FileStamp | None, build: Callable[[], Any]) -> tuple[Any, Any]:
    """(stamp, value): runs off the reactor thread; value is _UNCHANGED when
    the file still has the stamp C{known}, stamp None when it cannot be
    stat'ed (then C{build} reports the problem, or builds uncached)."""
    try:
        stamp: FileStamp | None = FileStamp.of(path)
    except OSError:
        stamp = None
    if stamp is not None and stamp == known:
        return (stamp, _UNCHANGED)
    # Stat'ed before reading: a change during the read leaves a stamp that
    # the next get sees as outdated, so it is read again.
    return (stamp, build())


@attrs.define
class _Entry(Generic[V]):
    stamp: FileStamp
    value: V


@attrs.define
class FileCache(Generic[V]):
    """
    At most C{size} values, each keyed by the caller and tied to one file;
    the least recently used goes first.
    """

    runBlocking: RunBlocking
    size: int = 128
    builds: int = attrs.field(default=0, init=False)  # for tests and figures
    # Never in a repr: the values may be secrets (relay passwords).
    _entries: OrderedDict[Hashable, _Entry[V]] = attrs.field(
        factory=OrderedDict, init=False, repr=False
    )

    def get(self, key: Hashable, path: str, build: Callable[[], V]) -> Deferred[V]:
        """
        The value for C{key}: the cached one while C{path} is unchanged,
        else C{build()}'s (run with C{runBlocking}, as is the stat).

        @return: a Deferred failing with whatever C{build} raised.
        """
        entry = self._entries.get(key)
        known = entry.stamp if entry is not None else None

        def built(outcome: tuple[FileStamp | None, Any]) -> V:
            stamp, value = outcome
            if value is _UNCHANGED:
                assert entry is not None
                if key in self._entries:
                    self._entries.move_to_end(key)
                return entry.value
            self.builds += 1
            if stamp is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = _Entry(stamp, value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return value  # type: ignore[no-any-return]

        return self.runBlocking(_refresh, path, known, build).addCallback(built)

    def __len__(self) -> int:
        return len(self._entries)
