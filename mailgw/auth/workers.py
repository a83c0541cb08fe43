"""
A bounded pool of threads for a backend's blocking client library (a
database driver, an LDAP client), started and stopped with the reactor.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["Workers"]


class _DaemonThreadPool(ThreadPool):
    """
    Its threads never hold up the end of the process: a request stuck on an
    unreachable server is abandoned at exit (it holds nothing to flush).
    """

    def threadFactory(self, *args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        return threading.Thread(*args, daemon=True, **kwargs)


@attrs.define
class Workers:
    """
    At most ``size`` threads named after ``name``, started when ``reactor``
    runs (C{IReactorCore}) and stopped at its shutdown or by L{close}.
    """

    reactor: Any
    size: int
    name: str
    _pool: ThreadPool = attrs.field(init=False)
    _trigger: Any = attrs.field(init=False, default=None)
    _closers: list[Any] = attrs.field(init=False, factory=list)
    closed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._pool = _DaemonThreadPool(0, self.size, name=self.name)
        self.reactor.callWhenRunning(self._pool.start)
        self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.close)

    @property
    def maxThreads(self) -> int:
        return int(self._pool.max)

    def onClose(self, closer: Any) -> None:
        """Call ``closer()`` when the workers are closed (to close connections)."""
        self._closers.append(closer)

    def run(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        """``f(*args)`` in one of the threads."""
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def close(self) -> None:
        """Stop the threads (waiting for those at work), then run the closers."""
        self.closed = True
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # already fired: this is the shutdown
        if self._pool.started:
            self._pool.stop()
        closers, self._closers = self._closers, []
        for closer in closers:
            closer()


class SharedByKey:
    """
    One object per key (a backend's frozen settings and the reactor), made
    on first use: a configuration reload, which makes every checker anew,
    and the sender map reading the same settings file reuse the threads
    and connections already open rather than opening more.
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[int, object], Any] = {}

    def get(self, settings: object, reactor: Any, make: Any) -> Any:
        """The open object for ``(settings, reactor)``, or a new one from ``make()``."""
        key = (id(reactor), settings)
        found = self._objects.get(key)
        if found is None or found.workers.closed:
            found = self._objects[key] = make()
        return found
