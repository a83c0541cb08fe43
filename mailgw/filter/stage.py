"""
The content filter as a queue stage (docs/content-filter.md), after the
queue as Postfix's ``content_filter``: a message accepted on a submission
listener is marked for the filter when it is queued (L{FilterIntake}: the
mark is part of its durable state), and the queue hands it to the filter
before any route (L{FilterStage}), with the same retries, backoff, bounces
and log lines as any delivery.

What the filter answers, per recipient:

  - 2xx: the filter took the message and reinjects its own (filtered) copy
    on the reinjection listener; the original is done and leaves the queue.
    The filter's reply is logged: amavis's names the reinjected queue id.
  - 5xx: the recipient bounces (RFC 3464, as any permanent failure).
  - 4xx, no connection, a timeout: transient; the message waits in the
    queue and is retried with backoff.
  - a refusal matching ``[filter] hold_replies``: the message is put on
    hold (quarantined in our queue) until an operator releases it (it goes
    to the filter again) or deletes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.envelope import DeliveryResult, Envelope, QueuedMessage, Session
from mailgw.interfaces import IMessageWriter, IQueue, IRelay

__all__ = ["FILTERED_LISTENERS", "FilterIntake", "FilterStage", "reinjectedId"]

log = Logger(namespace="mailgw.filter")

#: The listeners whose messages go to the filter: the submission ones. The
#: reinjection listener's ("reinject") and our own bounces ("bounce") never do.
FILTERED_LISTENERS = frozenset({"submission", "submissions"})

Report = Callable[[str, list[DeliveryResult]], object]
#: ``hold(queueId, reason)``: put a message on hold (the queue's own hold).
Hold = Callable[[str, str], object]

# "queued as ID" in the filter's reply: amavis quotes the reply of the
# reinjection ("250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok:
# queued as 0005F...").
_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9]{1,64})")


@implementer(IQueue)
@attrs.frozen
class FilterIntake:
    """
    The submission listeners' way into ``queue``: every message begun here
    is marked for the filter ``filterName`` in its envelope, which the
    spool stores with it at the commit (no extra write).
    """

    queue: IQueue
    filterName: str

    def begin(self, envelope: Envelope, session: Session) -> IMessageWriter:
        marked = attrs.evolve(envelope, contentFilter=self.filterName)
        return self.queue.begin(marked, session)  # type: ignore[no-any-return]


def reinjectedId(text: str) -> str | None:
    """The queue id a filter's reply says its copy was queued as, if any."""
    m = _QUEUED_AS.search(text)
    return m.group(1) if m else None


def _replyLine(result: DeliveryResult) -> str:
    words = (str(result.code) if result.code else "", result.enhanced, result.text)
    text = " ".join(w for w in words if w)
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


@implementer(IRelay)
class FilterStage:
    """
    An L{IRelay} in front of the routes: messages marked for the filter
    (and not bounces) go to ``filterRelay`` (one L{mailgw.relay.relay.Relay}
    whose one route is the filter), every other message to ``routes``.

    @param filterName: the filter as configured, for the log.
    @param holdReplies: a refusal whose ``"CODE ENHANCED TEXT"`` matches
        one of these puts the message on hold through ``hold``.
    """

    def __init__(
        self,
        routes: IRelay,
        filterRelay: IRelay,
        filterName: str,
        *,
        holdReplies: Sequence[re.Pattern[str]] = (),
        hold: Hold | None = None,
    ) -> None:
        self.routes = routes
        self.filterRelay = filterRelay
        self.filterName = filterName
        self.holdReplies = tuple(holdReplies)
        self.hold = hold

    def needsFilter(self, message: QueuedMessage) -> bool:
        """Is ``message`` waiting for the filter?"""
        return bool(message.envelope.contentFilter) and not message.isBounce

    def deliver(self, message: QueuedMessage) -> Deferred[list[DeliveryResult]]:
        d = self.deliverMany([message])
        return d.addCallback(lambda results: results.get(message.queueId, []))

    def deliverMany(
        self, messages: Sequence[QueuedMessage], report: Report | None = None
    ) -> Deferred[dict[str, list[DeliveryResult]]]:
        """
        As L{mailgw.relay.relay.Relay.deliverMany}: the filter's messages
        and the others travel at once, each reported as soon as it is done.
        """
        toFilter = [m for m in messages if self.needsFilter(m)]
        toRoutes = [m for m in messages if not self.needsFilter(m)]
        calls = []
        if toRoutes:
            calls.append(_many(self.routes, toRoutes, report))
        if toFilter:
            byId = {m.queueId: m for m in toFilter}

            def filtered(queueId: str, results: list[DeliveryResult]) -> None:
                message = byId.pop(queueId, None)
                if message is not None:
                    results = self._filtered(message, results)
                if report is not None:
                    report(queueId, results)

            calls.append(_many(self.filterRelay, toFilter, filtered))

        def merge(parts: list[dict[str, list[DeliveryResult]]]) -> dict[str, Any]:
            merged: dict[str, list[DeliveryResult]] = {}
            for part in parts:
                merged.update(part)
            return merged

        return gatherResults(calls, consumeErrors=True).addCallback(merge)

    def _filtered(
        self, message: QueuedMessage, results: list[DeliveryResult]
    ) -> list[DeliveryResult]:
        """
        One line for what the filter said of ``message``; hold it if asked
        (then a refusal is not final: the recipients wait, held, for the
        operator).
        """
        queueId = message.queueId
        taken = [r for r in results if r.success]
        refused = [r for r in results if not r.success]
        if taken:
            reply = _replyLine(taken[0])
            newId = reinjectedId(taken[0].text)
            log.info(
                "Queue {queueId}: accepted by the filter {filter}"
                + (", reinjected as {newId}" if newId else "")
                + " ({reply})",
                queueId=queueId,
                filter=self.filterName,
                newId=newId,
                reply=reply,
            )
        for result in refused:
            reply = _replyLine(result)
            if self.hold is not None and any(p.search(reply) for p in self.holdReplies):
                # The queue logs "Queue ID: held by the filter NAME (REPLY)".
                self.hold(queueId, f"by the filter {self.filterName} ({reply})")
                return [attrs.evolve(r, permanent=False) for r in results]
        return results


def _many(
    relay: IRelay, messages: list[QueuedMessage], report: Report | None
) -> Deferred[dict[str, list[DeliveryResult]]]:
    """``relay.deliverMany``, or ``deliver`` per message for a relay without it."""
    deliverMany = getattr(relay, "deliverMany", None)
    if callable(deliverMany):
        return maybeDeferred(deliverMany, messages, report)

    async def each() -> dict[str, list[DeliveryResult]]:
        results = {}
        for message in messages:
            results[message.queueId] = await maybeDeferred(relay.deliver, message)
            if report is not None:
                report(message.queueId, results[message.queueId])
        return results

    return Deferred.fromCoroutine(each())
