"""
Where ``twistd mailgw`` writes its log, and in which format
(docs/operations.md):

- ``--log-format text`` (default): Twisted's usual lines;
  ``--log-format json``: one JSON object per line (for Loki, ELK...), every
  field of the event turned into JSON (strings, numbers, lists, objects;
  anything else as its ``str``), plus ``time``, ``level``, ``namespace``,
  ``system`` and the formatted ``text``.
- To standard output (``--logfile=-``, the journal under systemd), or to a
  file that is never rotated by size and is reopened on SIGUSR1, so that
  logrotate can rename it and signal (``postrotate``), losing no line.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
from collections.abc import Callable
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, formatEvent, textFileLogObserver
from zope.interface import implementer

FORMATS = ("text", "json")


class ReopeningFile:
    """An append-mode log file that L{reopen} opens again by name."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)  # twistd may chdir (--rundir) later
        self._file: IO[str] = self._open()

    def _open(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """
        After logrotate renamed the file: continue in a new one by that
        name (or, when it cannot be opened, in the old one).
        """
        try:
            new = self._open()
        except OSError:
            return
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        self._file.close()


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as something ``json.dumps`` takes, whatever it is."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if depth > 4:
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


#: What twisted.python.log's bridge adds to a new-style event it has seen.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})


def levelName(level: Any) -> str:
    return getattr(level, "name", "-")


@implementer(ILogObserver)
class JSONLinesObserver:
    """One JSON object per event and line on ``out``."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        when = event.get("log_time")
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": (
                datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
                if isinstance(when, int | float)
                else None
            ),
            "level": levelName(level),
            "namespace": event.get("log_namespace"),
            "system": jsonable(
                event.get("log_system") or f"{event.get('log_namespace')}#{levelName(level)}"
            ),
            "text": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        legacy = _LEGACY_KEYS if "log_format" in event else ()
        for key, value in event.items():
            if key.startswith("log_") or key in record or key in legacy:
                continue
            record[key] = jsonable(value)
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


def makeObserver(logFormat: str, out: Any) -> Callable[[dict[str, Any]], None]:
    if logFormat == "json":
        return JSONLinesObserver(out)
    return textFileLogObserver(out)


class LoggingRoot(MultiService):
    """
    The root of ``twistd mailgw``'s service tree: when twistd adds it to its
    application, it hands twistd the log observer (twistd asks the
    application for one before it makes its own), and while running, a
    SIGUSR1 reopens the log file.
    """

    def __init__(
        self,
        reactor: Any,
        observer: Callable[[dict[str, Any]], None] | None = None,
        logFile: Any = None,
    ) -> None:
        super().__init__()
        self.reactor, self.observer, self.logFile = reactor, observer, logFile
        self._previous: Any = None

    def setServiceParent(self, parent: Any) -> None:
        setComponent = getattr(parent, "setComponent", None)
        if setComponent is not None and self.observer is not None:
            setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        if isinstance(self.logFile, ReopeningFile):
            logFile, reactor = self.logFile, self.reactor

            def reopen(signum: int, frame: Any) -> None:
                reactor.callFromThread(logFile.reopen)

            self._previous = signal.signal(signal.SIGUSR1, reopen)
        super().startService()

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
        return super().stopService()
