"""
The breaker's state in the spool directory: L{StateFile} reads and writes
``breaker.json`` (written whole, atomically: a temporary file, fsync,
rename, directory fsync), and L{PersistentBreaker} is the breaker that
keeps it: read once at start-up, written in a thread a few seconds after a
change (at once after a trip or a reset) and when the gateway stops.

A state file that cannot be read is moved aside (``breaker.json.corrupt``),
logged, and the breaker starts afresh: never a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.breaker.breaker import AccountBreaker
from mailgw.breaker.config import BreakerConfig
from mailgw.interfaces import IAccountBreaker, IBreakerAlert

#: The state file's name in the spool directory.
STATE_NAME = "breaker.json"
#: The version of the state file this code writes.
STATE_FORMAT = 1

_log = Logger(namespace="mailgw.breaker")


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class CorruptState(ValueError):
    """The state file is not one this code can read."""


class StateFile:
    """``path``: read whole, written whole and durably. Blocking: for a thread."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        """
        @return: the stored accounts (empty when there is no file).
        @raise CorruptState: the file is not a state file of a known version.
        @raise OSError: it cannot be read.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        try:
            state = json.loads(data)
        except ValueError as e:  # UnicodeDecodeError included
            raise CorruptState(f"not JSON ({e})") from None
        if not isinstance(state, dict) or not isinstance(state.get("accounts"), dict):
            raise CorruptState("not a breaker state (no accounts object)")
        version = state.get("version")
        if version != STATE_FORMAT:
            raise CorruptState(f"unknown format version {version!r}")
        return state["accounts"]  # type: ignore[no-any-return]

    def moveAside(self) -> str:
        """Keep a bad file for a post-mortem; @return: its new name."""
        aside = self.path + ".corrupt"
        os.replace(self.path, aside)
        return aside

    def write(self, accounts: dict[str, Any]) -> None:
        """Replace the file with ``accounts``, durably. @raise OSError."""
        self.writeEncoded({name: _encode(value) for name, value in accounts.items()})

    def writeEncoded(self, accounts: dict[str, str]) -> None:
        """As L{write}, each account's value already JSON. @raise OSError."""
        body = ",".join(f"{json.dumps(name)}:{value}" for name, value in accounts.items())
        data = f'{{"version":{STATE_FORMAT},"accounts":{{{body}}}}}'.encode()
        directory = os.path.dirname(self.path) or "."
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


@implementer(IAccountBreaker)
class PersistentBreaker(AccountBreaker, Service):
    """
    L{AccountBreaker} kept in ``directory``/breaker.json. ``runInThread(f,
    *args)`` runs the writes off the reactor thread (a Deferred).
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: BreakerConfig,
        directory: str,
        runInThread: Callable[..., Deferred[Any]],
        alerts: Sequence[IBreakerAlert] = (),
    ) -> None:
        AccountBreaker.__init__(self, clock, config, alerts)
        self.file = StateFile(os.path.join(directory, STATE_NAME))
        self._run = runInThread
        self._timer: IDelayedCall | None = None
        self._saving: Deferred[None] | None = None
        self._dirty: set[str] = set()
        self.changed = self._changed
        # Each account as last written, JSON: touched only by the writes
        # (one at a time, in a thread), so that a write encodes only the
        # accounts changed since the last one.
        self._encoded: dict[str, str] = {}

    def load(self) -> None:
        """Read the state file (at start-up, before any login): bad state is a fresh one."""
        try:
            accounts = self.file.read()
        except (CorruptState, OSError) as e:
            aside = ""
            if isinstance(e, CorruptState):
                try:
                    aside = f"; kept as {self.file.moveAside()}"
                except OSError:
                    pass
            _log.error(
                "breaker: state file {path} unreadable ({error}){aside}; starting with a "
                "fresh state: every account learns its baseline again",
                path=self.file.path,
                error=e,
                aside=aside,
            )
            return
        taken = self.restore(accounts)
        self._dirty.update(self.accounts)
        tripped = sum(1 for s in self.accounts.values() if s.trip is not None)
        _log.info(
            "breaker: {count} accounts read from {path}, {tripped} tripped",
            count=taken,
            path=self.file.path,
            tripped=tripped,
        )

    def startService(self) -> None:
        self.load()
        Service.startService(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._cancelTimer()
        return self.save()

    def _changed(self, account: str, urgent: bool) -> None:
        self._dirty.add(account)
        if urgent:
            self._cancelTimer()
            self.save()
        elif self._timer is None and self.running:
            self._timer = self.clock.callLater(self.config.saveInterval, self._due)

    def _due(self) -> None:
        self._timer = None
        self.save()

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def save(self) -> Deferred[None]:
        """
        Write the state if it changed; one write at a time (a change during
        a write is written after it). Fires once what was changed before
        the call is on disk (or the failure logged).
        """
        if self._saving is not None:
            waiter: Deferred[None] = Deferred()
            self._saving.addBoth(lambda _: self.save().chainDeferred(waiter))
            return waiter
        if not self._dirty:
            return succeed(None)
        dirty, self._dirty = self._dirty, set()
        self.expire()
        # On the reactor thread, only copies of the accounts changed since
        # the last write; encoding and writing them runs in the thread.
        changed = {n: self.accounts[n].toJSON() for n in dirty if n in self.accounts}
        d = self._run(self._writeBlocking, changed, set(self.accounts))
        self._saving = d

        def done(result: Any) -> None:
            self._saving = None
            if isinstance(result, Failure):
                self._dirty |= dirty  # the next change, or the stop, writes them again
                _log.error(
                    "breaker: cannot write {path}: {error}", path=self.file.path,
                    error=result.value,
                )  # fmt: skip

        d.addBoth(done)
        return d

    def _writeBlocking(self, changed: dict[str, Any], names: set[str]) -> None:
        encoded = self._encoded
        for name in [n for n in encoded if n not in names]:
            del encoded[name]
        for name, value in changed.items():
            encoded[name] = _encode(value)
        self.file.writeEncoded(encoded)
