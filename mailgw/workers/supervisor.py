"""
The supervising process of ``[server] workers = N`` (N > 1): it opens the
listeners once, starts N worker processes that adopt them, each on its own
spool shard, starts a worker that died again (same index, same shard),
passes SIGHUP and SIGTERM on, answers the control socket for every shard
and relays the workers' log lines into its own log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from mailgw.config import Config, ConfigError
from mailgw.control import ControlService, defaultSocketPath
from mailgw.interfaces import SpoolError
from mailgw.limits.shared import MemoryCounters
from mailgw.workers.counters import CounterService, socketPath
from mailgw.workers.fanout import FanOutControl
from mailgw.workers.listeners import childFDs, inherited, metricsEndpoint, openListeners
from mailgw.workers.restart import Backoff, RestartPolicy
from mailgw.workers.shards import lockSpool, migrateLegacy, shardDirectory

#: Seconds the workers have to finish (as a single gateway does) after SIGTERM.
STOP_TIMEOUT = 120.0
#: The longest log line relayed from a worker; a longer one is cut.
MAX_LOG_LINE = 64 * 1024


def listenerDescriptions(config: Config) -> list[str]:
    """Every listener of the gateway, in the order L{GatewayService} listens."""
    server = config.server
    return [*server.submission, *server.submissions, *config.reinject.listen]


@attrs.define
class _Worker:
    index: int
    policy: RestartPolicy
    process: Any = None
    restart: Any = None
    ended: Deferred[None] | None = None


class WorkerProtocol(ProcessProtocol):
    """One worker process: its log lines relayed, its end reported."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor, self.index = supervisor, index
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LOG_LINE:
            lines.append(rest[:MAX_LOG_LINE])
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.supervisor.relay(self.index, line)

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self.supervisor.relay(self.index, rest)
            self._buffers[fd] = b""
        self.supervisor.ended(self.index, reason.value)


class WorkerSupervisor(MultiService):
    """
    The supervisor service. ``command(index, sockets)`` is the argv of
    worker ``index``'s process; ``logFile`` (twistd's, set by the plugin)
    receives the workers' log lines as they are, else they are logged.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        command: Callable[[int, list[Any]], list[str]],
        backoff: Backoff | None = None,
        stopTimeout: float = STOP_TIMEOUT,
        counters: str | None = None,
    ) -> None:
        super().__init__()
        self.config, self.reactor, self.command = config, reactor, command
        self.count = config.server.workers
        self.spool = config.spool.directory
        self.stopTimeout = stopTimeout
        self.logFile: Any = None
        self.reloader: Callable[[], Any] | None = None
        self.workers = [_Worker(i, RestartPolicy(backoff or Backoff())) for i in range(self.count)]
        self.descriptions = listenerDescriptions(config)
        self.ports: list[Any] = []
        self._opened: Deferred[Any] | None = None
        self._lockFD: int | None = None
        self._stopping = False
        self.fanout = FanOutControl(reactor, self.shards)
        self.control = ControlService(
            defaultSocketPath(self.spool), self.fanout, reactor, reload=self.fanout.reload
        )
        self.control.setServiceParent(self)
        #: The limits' counts of every worker (docs/operations.md), or None:
        #: ``[limits] backend`` is the workers' engine.
        self.counters: MemoryCounters | None = None
        if counters is not None:
            self.counters = MemoryCounters(reactor)
            CounterService(counters, self.counters, reactor).setServiceParent(self)

    def shards(self) -> list[str]:
        """The spool directories of the workers, by index."""
        return [shardDirectory(self.spool, i) for i in range(self.count)]

    def prepareSpool(self) -> None:
        """
        Lock the spool, move a single-process spool's messages into shard 0,
        create every shard's directory (before twistd gives the tree to the
        service user). Called when the service is made.

        @raise ConfigError: the spool is in use or cannot be prepared.
        """
        try:
            self._lockFD = lockSpool(self.spool)
            migrateLegacy(self.spool)
            for shard in self.shards():
                os.makedirs(shard, mode=0o700, exist_ok=True)
        except SpoolError as e:
            raise ConfigError(self.config.source, "spool.directory", str(e)) from None
        except OSError as e:
            raise ConfigError(
                self.config.source, "spool.directory", f"cannot prepare the shards: {e}"
            ) from None

    def privilegedStartService(self) -> None:
        # Bind (ports below 1024 included) before twistd drops privileges.
        self._open()
        super().privilegedStartService()

    def _open(self) -> Deferred[Any]:
        if self._opened is None:
            self._opened = openListeners(self.reactor, self.descriptions)
            self._opened.addCallback(self._listening)
            self._opened.addErrback(self._cannotListen)
        return self._opened

    def _listening(self, ports: list[Any]) -> list[Any]:
        self.ports = ports
        for description, port in zip(self.descriptions, ports, strict=True):
            self.log.info(
                "listening on {description}: {address} (for {count} workers)",
                description=description,
                address=port.getHost(),
                count=self.count,
            )
        return ports

    def _cannotListen(self, failure: Any) -> None:
        self.log.error("Cannot listen: {error}", error=failure.value)
        sys.stderr.write(f"mailgw: cannot listen: {failure.value}\n")
        sys.stderr.flush()
        os._exit(1)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._open().addCallback(self._spawnAll)

    def _spawnAll(self, ports: object) -> object:
        for worker in self.workers:
            self.spawn(worker.index)
        return ports

    def spawn(self, index: int) -> None:
        """Start worker ``index``."""
        worker = self.workers[index]
        worker.restart = None
        if self._stopping:
            return
        argv = self.command(index, inherited(self.ports, self.descriptions))
        worker.ended = Deferred()
        worker.process = self.reactor.spawnProcess(
            WorkerProtocol(self, index),
            argv[0],
            argv,
            env=dict(os.environ),
            childFDs=childFDs(self.ports),
        )
        worker.policy.started(self.reactor.seconds())
        self.log.info(
            "worker {index} started (pid {pid}, spool {shard})",
            index=index,
            pid=worker.process.pid,
            shard=shardDirectory(self.spool, index),
        )

    def ended(self, index: int, reason: Any) -> None:
        """Worker ``index`` exited: log it, and start it again unless stopping."""
        worker = self.workers[index]
        worker.process = None
        code, sig = getattr(reason, "exitCode", None), getattr(reason, "signal", None)
        how = f"signal {sig}" if sig else f"status {code}"
        ended, worker.ended = worker.ended, None
        if self._stopping:
            self.log.info("worker {index} stopped ({how})", index=index, how=how)
        else:
            delay = worker.policy.died(self.reactor.seconds())
            self.log.error(
                "worker {index} exited ({how}); restarting it in {delay:g} s",
                index=index,
                how=how,
                delay=delay,
            )
            worker.restart = self.reactor.callLater(delay, self.spawn, index)
        if ended is not None:
            ended.callback(None)

    def relay(self, index: int, line: bytes) -> None:
        """One log line of worker ``index``, into the supervisor's log."""
        text = line.decode("utf-8", "backslashreplace").rstrip("\r")
        if self.logFile is not None:
            self.logFile.write(text + "\n")
            self.logFile.flush()
        else:
            self.log.info("worker {index}: {line}", index=index, line=text)

    def signalWorkers(self, signum: int) -> int:
        """Send ``signum`` to every running worker; how many were sent it."""
        sent = 0
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.signalProcess(signum)
                    sent += 1
                except ProcessExitedAlready:
                    pass
        return sent

    def reload(self, config: Config | None = None) -> bool:
        """SIGHUP (the configuration checked by the caller): every worker reloads."""
        if config is not None and config.server.workers != self.count:
            self.log.warn("Reload: server.workers changed; it takes effect at the next restart")
        count = self.signalWorkers(signal.SIGHUP)
        self.log.info("SIGHUP passed on to {count} workers", count=count)
        return True

    def stopService(self) -> Deferred[Any]:
        """SIGTERM to every worker; once all have finished, close the listeners."""
        self._stopping = True
        waits = []
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
            if worker.ended is not None:
                waits.append(worker.ended)
        self.signalWorkers(signal.SIGTERM)
        deadline = self.reactor.callLater(self.stopTimeout, self.signalWorkers, signal.SIGKILL)
        d: Deferred[Any] = DeferredList(waits)

        def closed(result: object) -> Deferred[Any]:
            if deadline.active():
                deadline.cancel()
            ports, self.ports, self._opened = self.ports, [], None
            stopping = [maybeDeferred(port.stopListening) for port in ports]
            stopping.append(maybeDeferred(super(WorkerSupervisor, self).stopService))
            return DeferredList(stopping)

        d.addCallback(closed)
        d.addCallback(lambda _: self._unlock())
        return d

    def _unlock(self) -> None:
        fd, self._lockFD = self._lockFD, None
        if fd is not None:
            os.close(fd)


def optionsArgv(options: Any) -> list[str]:
    """The command line that gives ``options`` (a parsed ``twistd mailgw``'s) again."""
    argv: list[str] = []
    for name, _, default, *_ in options.optParameters:
        value = options[name]
        if value is not None and value != default:
            argv += [f"--{name}", str(value)]
    for name in ("submission", "submissions", "auth", "relay"):
        for value in options[name]:
            argv += [f"--{name}", value]
    for name, *_ in options.optFlags:
        if options.get(name):
            argv.append(f"--{name}")
    return argv


def workerCommand(
    argv: Sequence[str], config: Config, logFormat: str, counters: str | None = None
) -> Callable[[int, list[Any]], list[str]]:
    """
    The argv of worker K: this Python, ``mailgw.workers.child``, and a JSON
    spec: the ``twistd mailgw`` options ``argv`` with the shard as spool,
    one worker, and worker K's metrics listener.

    @raise ConfigError: the metrics listener cannot be shared out.
    """
    try:
        metrics = [metricsEndpoint(config.metrics.listen, i) for i in range(config.server.workers)]
    except ValueError as e:
        raise ConfigError(config.source, "metrics.listen", str(e)) from None

    def command(index: int, sockets: list[Any]) -> list[str]:
        options = [*argv, "--spool", shardDirectory(config.spool.directory, index)]
        options += ["--workers", "1", "--log-format", logFormat]
        if metrics[index]:
            options += ["--metrics", metrics[index]]
        spec = {
            "index": index,
            "options": options,
            "sockets": [[s.description, s.fd, s.family] for s in sockets],
            "counters": counters,
        }
        return [sys.executable, "-m", "mailgw.workers.child", json.dumps(spec)]

    return command


def makeSupervisor(options: Any, config: Config, reactor: Any) -> WorkerSupervisor:
    """
    The supervisor ``twistd mailgw`` runs for ``workers`` > 1: the
    configuration checked as a worker will check it (a problem is one
    line at start, not N dying workers), the spool locked and sharded.

    @raise ConfigError: what is wrong.
    """
    from mailgw.service import makeCheckers

    config.check(requireAuth=True)
    if not makeCheckers(config):
        raise ConfigError(config.source, "auth.backends", "no auth backend: nobody could log in")
    # With a [limits] backend (Redis) the workers count there, as nodes do.
    counters = None if getattr(config.limits, "backend", "") else socketPath(config.spool.directory)
    command = workerCommand(optionsArgv(options), config, options["log-format"], counters)
    supervisor = WorkerSupervisor(config, reactor, command, counters=counters)
    supervisor.prepareSpool()
    return supervisor
