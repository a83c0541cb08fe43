"""
The supervisor's control socket (``SPOOL/control.sock``): what ``mailgw
queue flush|hold|release|delete`` and ``mailgw reload`` ask of the gateway,
carried out by every worker through its own control socket
(``SPOOL/shard-K/control.sock``) and the answers merged. A per-message
command goes to the shard that holds the message (the one whose queue has
its files, then the others in order), so an id is unknown only when no
shard knows it. ``mailgw queue list|show|stats`` read the shards directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailgw.control import ControlError, defaultSocketPath, sendCommand
from mailgw.interfaces import IQueueControl
from mailgw.queue.operator import DomainFlush

#: Seconds one worker has to answer (deleting many messages fsyncs often).
WORKER_TIMEOUT = 55.0

Ask = Callable[[str, str, Sequence[str], "str | None"], dict[str, Any]]


def _ask(shard: str, command: str, ids: Sequence[str], domain: str | None) -> dict[str, Any]:
    return sendCommand(
        defaultSocketPath(shard), command, ids, timeout=WORKER_TIMEOUT, domain=domain
    )


def _unknown(answer: dict[str, Any]) -> bool:
    return not answer["ok"] and str(answer.get("error", "")).startswith("unknown queue id")


def owners(shards: Sequence[str], queueId: str) -> list[str]:
    """``shards``, the one holding ``queueId`` first (blocking: a stat per shard)."""
    holding = [s for s in shards if os.path.exists(os.path.join(s, "queue", queueId + ".json"))]
    return holding + [s for s in shards if s not in holding]


@implementer(IQueueControl)
class FanOutControl:
    """
    An L{IQueueControl} over the workers' control sockets, for the
    supervisor's L{mailgw.control.ControlService}. ``shards`` gives the
    shard directories of the workers now configured; ``ask`` (blocking,
    run in ``reactor``'s thread pool) sends one request to a shard.
    """

    def __init__(self, reactor: Any, shards: Callable[[], list[str]], ask: Ask = _ask) -> None:
        self.reactor, self.shards, self.ask = reactor, shards, ask

    def _inThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _all(self, command: str, domain: str | None = None) -> list[dict[str, Any]]:
        answers = []
        for shard in self.shards():
            answer = self.ask(shard, command, [], domain)
            if not answer["ok"]:
                raise ControlError(f"{os.path.basename(shard)}: {answer.get('error')}")
            answers.append(answer)
        return answers

    def _one(self, command: str, queueId: str) -> int:
        for shard in owners(self.shards(), queueId):
            answer = self.ask(shard, command, [queueId], None)
            if answer["ok"]:
                return int(answer.get("count", 1))
            if not _unknown(answer):
                raise ControlError(f"{os.path.basename(shard)}: {answer.get('error')}")
        raise KeyError(queueId)

    def flush(self, queueIds: Sequence[str] | None = None) -> Deferred[int]:
        if queueIds is None:
            return self._inThread(lambda: sum(int(a["count"]) for a in self._all("flush")))

        def each() -> int:
            return sum(self._one("flush", queueId) for queueId in queueIds)

        return self._inThread(each)

    def hold(self, queueId: str) -> Deferred[int]:
        return self._inThread(self._one, "hold", queueId)

    def release(self, queueId: str) -> Deferred[int]:
        return self._inThread(self._one, "release", queueId)

    def delete(self, queueId: str) -> Deferred[int]:
        return self._inThread(self._one, "delete", queueId)

    def flushDomain(self, domain: str, subdomains: bool = False) -> Deferred[DomainFlush]:
        asked = ("@" if subdomains else "") + domain

        def each() -> DomainFlush:
            answers = self._all("flush-domain", asked)
            count = sum(int(a.get("count", 0)) for a in answers)
            return DomainFlush(started=count, held=sum(int(a.get("held", 0)) for a in answers))

        return self._inThread(each)

    @inlineCallbacks
    def reload(self) -> Any:
        """Every worker reloads; True when every one applied the configuration."""
        answers = yield self._inThread(
            lambda: [self.ask(shard, "reload", [], None) for shard in self.shards()]
        )
        return all(a["ok"] for a in answers)
