"""
The reinjection listener's way into the queue (docs/content-filter.md):
messages the content filter hands back go straight to the routes (they
carry no filter mark), and each is logged with the queue id of the
original it was made from, so that one can follow a message through the
filter both ways:

    Queue 0005F1...A8: accepted by the filter smtp:127.0.0.1:10024,
        reinjected as 0005F1...C2 (250 2.0.0 from MTA(...): ... queued as 0005F1...C2)
    Queue 0005F1...C2: reinjected by the filter from 127.0.0.1, original 0005F1...A8

The forward link is the filter's reply (amavis answers the gateway only
once its reinjection was accepted, and quotes that reply with our queue
id). The backward link is our own ``Received:`` header in the message the
filter hands back: "by HOST (mailgw) with ESMTPSA id ORIGINAL", which
amavis and other filters keep, as they keep every header.
"""

from __future__ import annotations

import re

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.envelope import Envelope, Session
from mailgw.interfaces import IMessageWriter, IQueue
from mailgw.queue.intake import ForwardingWriter

__all__ = ["ReinjectIntake", "originalId"]

log = Logger(namespace="mailgw.filter")

#: How much of the start of a reinjected message is searched for our trace.
TRACE_BYTES = 64 * 1024

# Our Received: header (mailgw.server.received): "by HOST (mailgw) with KEYWORD"
# folded before "id QUEUEID".
_TRACE = re.compile(rb"\(mailgw\) with [A-Z0-9]{4,12}\r\n[ \t]+id ([A-Za-z0-9]{1,64})\b")


def originalId(head: bytes, ownId: str) -> str | None:
    """
    The queue id in the first of our ``Received:`` headers in ``head``
    that is not ``ownId`` (the reinjected message's own, written first).
    """
    for m in _TRACE.finditer(head):
        queueId = m.group(1).decode("ascii")
        if queueId != ownId:
            return queueId
    return None


@implementer(IQueue)
@attrs.frozen
class ReinjectIntake:
    """The reinjection listeners' way into ``queue``: no filter mark, one log line each."""

    queue: IQueue

    def begin(self, envelope: Envelope, session: Session) -> IMessageWriter:
        if envelope.contentFilter:  # never filtered twice
            envelope = attrs.evolve(envelope, contentFilter="")
        return _TracingWriter(self.queue.begin(envelope, session), session.clientAddress)


class _TracingWriter(ForwardingWriter):
    """A writer that keeps the start of the message, to log its original's id."""

    def __init__(self, writer: IMessageWriter, client: str) -> None:
        super().__init__(writer)
        self._client = client
        self._head = bytearray()

    def write(self, data: bytes) -> None:
        if len(self._head) < TRACE_BYTES:
            self._head += data[: TRACE_BYTES - len(self._head)]
        self._writer.write(data)

    def _committed(self, queueId: str) -> str:
        original = originalId(bytes(self._head), queueId)
        log.info(
            "Queue {queueId}: reinjected by the filter from {client}, original {original}",
            queueId=queueId,
            client=self._client,
            original=original or "unknown",
        )
        return queueId
