"""
The way into the queue: a writer whose commit schedules the message, and
how the runner asks a relay to report each message as soon as it is done.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.envelope import QueuedMessage
from mailgw.interfaces import IEditableWriter, IMessageWriter

_log = Logger(namespace="mailgw.queue.runner")


def reportAs(outcome: object, report: Callable[[str, object], None], queueId: str) -> None:
    """``report(queueId, outcome)``: a callback for one message's Deferred."""
    report(queueId, outcome)


def takesReport(deliverMany: Callable[..., Any]) -> bool:
    """Does this ``deliverMany`` take a ``report`` callback?"""
    try:
        return "report" in inspect.signature(deliverMany).parameters
    except (TypeError, ValueError):
        return False


@implementer(IMessageWriter)
class ForwardingWriter:
    """
    A message writer that hands every step to the spool's writer: the base
    of the writers that add to its commit (L{SchedulingWriter}, the
    reinjection listener's). A subclass changes L{write} or L{_committed}.
    """

    def __init__(self, writer: IMessageWriter) -> None:
        self._writer = writer

    @property
    def queueId(self) -> str:
        return self._writer.queueId  # type: ignore[no-any-return]

    @property
    def message(self) -> QueuedMessage | None:
        return self._writer.message  # type: ignore[no-any-return]

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def abort(self) -> None:
        self._writer.abort()

    def commit(self) -> Deferred[str]:
        return self._writer.commit().addCallback(self._committed)

    def _committed(self, queueId: str) -> str | Deferred[str]:
        return queueId


@implementer(IEditableWriter)
class SchedulingWriter(ForwardingWriter):
    """
    A spool writer whose commit also schedules the message: once the spool
    says the message is durable, it is handed to the runner, and only then
    does the commit's Deferred fire. Whatever becomes of the session that
    wrote it (a client gone at the final dot), a committed message is
    scheduled.
    """

    def __init__(
        self, writer: IMessageWriter, accept: Callable[[QueuedMessage], Deferred[None] | None]
    ) -> None:
        super().__init__(writer)
        self._accept = accept

    def amend(self, rewrite: Any, recipients: Any, holdReason: str | None) -> None:
        """L{IEditableWriter.amend} of the spool's writer (TypeError: it has none)."""
        IEditableWriter(self._writer).amend(rewrite, recipients, holdReason)

    def _committed(self, queueId: str) -> str | Deferred[str]:
        message = self._writer.message
        if message is not None:
            waiting = self._accept(message)
            if waiting is not None:  # held at intake: once that is on disk
                return waiting.addCallback(lambda _: queueId)
        else:  # pragma: no cover - every ISpool of ours sets it
            _log.error("Committed {queueId} has no state to schedule", queueId=queueId)
        return queueId
