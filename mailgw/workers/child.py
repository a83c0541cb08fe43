"""
A worker process: ``python -m mailgw.workers.child SPEC``, started by the
supervisor (L{mailgw.workers.supervisor}). SPEC is JSON: the worker's
index, its ``twistd mailgw`` options (spool: its shard), the listening
sockets it inherited and, when the limits are shared through the
supervisor, the supervisor's counter socket.

The worker runs the gateway as ``twistd mailgw`` would (SIGHUP reloads,
SIGTERM stops gracefully), listening on the inherited sockets, logging to
its standard output (the supervisor relays each line), and stops when the
supervisor goes away (its standard input closes).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import globalLogBeginner
from zope.interface import implementer

from mailgw import logs
from mailgw.workers.listeners import Adopter, Inherited


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops ``reactor`` when the supervisor closes the worker's standard input."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self.reactor, self.fd = reactor, fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Any:
        if not os.read(self.fd, 4096):
            return CONNECTION_DONE
        return None

    def connectionLost(self, reason: Any) -> None:
        self.reactor.removeReader(self)
        if self.reactor.running:
            self.reactor.stop()


def _gateway(root: Any) -> Any:
    from mailgw.service import GatewayService

    for service in root:
        if isinstance(service, GatewayService):
            return service
    raise RuntimeError("no gateway in the service tree")


def main(argv: Sequence[str]) -> None:
    from twisted.internet import reactor

    from mailgw import tap

    spec = json.loads(argv[0])
    index = int(spec["index"])
    options = tap.Options()
    options.parseOptions(spec["options"])
    observer = logs.makeObserver(options["log-format"], sys.stdout)

    def tagged(event: dict[str, Any]) -> None:
        event.setdefault("worker", index)
        event["log_system"] = f"worker-{index}"
        observer(event)

    globalLogBeginner.beginLoggingTo([tagged], redirectStandardIO=False)  # type: ignore[list-item]
    root = tap.makeService(options)
    gateway = _gateway(root)
    gateway.listenOn = Adopter(
        reactor, {s[0]: Inherited(s[0], int(s[1]), int(s[2])) for s in spec["sockets"]}
    )
    if spec.get("counters"):
        from mailgw.workers.counters import connectGuards

        connectGuards(gateway, reactor, spec["counters"])
    reactor.addReader(ParentWatch(reactor))
    root.privilegedStartService()
    root.startService()
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover - the supervisor's child
    main(sys.argv[1:])
