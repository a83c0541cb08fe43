"""
A bounded pool of threads for a backend's blocking client library (a
database driver, an LDAP client), started and stopped with the reactor;
the open pools shared by the checkers of one settings file; and how a
checker replaced by a reload lets go of its pool (L{IRetirable}).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface

__all__ = ["IRetirable", "SharedByKey", "Workers", "WorkersClosed", "retireReplaced"]


class IRetirable(Interface):
    """A credentials checker that holds something open (threads, connections)."""

    def retire() -> None:
        """
        The checker has been replaced (a reload) and gets no new requests:
        release what it holds once the requests under way have finished.
        """


def retireReplaced(old: Iterable[object], new: Iterable[object]) -> None:
    """Retire each checker of ``old`` that is not also in ``new`` (and can be retired)."""
    kept = {id(checker) for checker in new}
    for checker in old:
        if id(checker) not in kept and IRetirable.providedBy(checker):
            checker.retire()  # type: ignore[attr-defined]


class WorkersClosed(Exception):
    """The pool was closed (its checker retired): transient, 454; never a hang."""


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
    #: Calls under way (run() until its Deferred fired).
    busy: int = attrs.field(init=False, default=0)
    _closeWhenIdle: bool = attrs.field(init=False, default=False)

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
        """``f(*args)`` in one of the threads; L{WorkersClosed} once closed."""
        if self.closed:
            return defer.fail(WorkersClosed(f"{self.name} is closed"))
        self.busy += 1
        return deferToThreadPool(self.reactor, self._pool, f, *args).addBoth(self._done)

    def _done(self, result: Any) -> Any:
        self.busy -= 1
        if self.busy == 0 and self._closeWhenIdle:
            self.close()
        return result

    def closeWhenIdle(self) -> None:
        """L{close} now if no call is under way, else as soon as the last one is done."""
        if self.busy == 0:
            self.close()
        else:
            self._closeWhenIdle = True

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
        self._leases: dict[int, int] = {}

    def get(self, settings: object, reactor: Any, make: Any) -> Any:
        """The open object for ``(settings, reactor)``, or a new one from ``make()``."""
        key = (id(reactor), settings)
        found = self._objects.get(key)
        if found is None or found.workers.closed:
            found = self._objects[key] = make()
        return found

    def acquire(self, settings: object, reactor: Any, make: Any) -> Any:
        """L{get}, held by a checker until it calls L{release}."""
        found = self.get(settings, reactor, make)
        self._leases[id(found)] = self._leases.get(id(found), 0) + 1
        return found

    def release(self, settings: object, reactor: Any, found: Any) -> None:
        """
        A checker lets go of ``found``: when no checker holds it any more,
        it is forgotten (a later L{get} makes a new one) and its workers
        close once their calls under way are done.
        """
        left = self._leases.get(id(found), 0) - 1
        if left > 0:
            self._leases[id(found)] = left
            return
        self._leases.pop(id(found), None)
        key = (id(reactor), settings)
        if self._objects.get(key) is found:
            del self._objects[key]
        found.workers.closeWhenIdle()


@attrs.define
class Outages:
    """
    A backend's reachability in the log: one line when it becomes
    unreachable (``unavailable``, the backend's error for that) and one
    when it answers again, not one per login.
    """

    source: str
    what: str  # "database", "directory"
    unavailable: type[Exception]
    log: Any
    down: bool = False

    def watch(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """``d``, its outcome noted."""
        return d.addCallbacks(self._answered, self._failed)

    def _answered(self, result: Any) -> Any:
        if self.down:
            self.down = False
            self.log.info("{source}: {what} reachable again", source=self.source, what=self.what)
        return result

    def _failed(self, failure: Any) -> Any:
        if failure.check(self.unavailable) and not self.down:
            self.down = True
            self.log.error(
                "{source}: {what} unavailable: {problem}",
                source=self.source,
                what=self.what,
                problem=failure.getErrorMessage(),
            )
        return failure
