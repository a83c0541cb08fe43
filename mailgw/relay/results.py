"""
The relay's bookkeeping for one L{Relay.deliverMany} call: one slot per
pending recipient of every message, each filled once, and each message
reported the moment its last slot is filled, exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.logger import Logger

from mailgw.envelope import Address, DeliveryResult, QueuedMessage
from mailgw.relay.deliverylog import logAttempt
from mailgw.relay.routing import DestinationKey

__all__ = ["INTERNAL", "INTERNAL_ERROR", "Part", "Report", "Results", "splitParts"]

log = Logger(namespace="mailgw.relay.relay")

#: C{report(queueId, results)}: one message's results, one per pending
#: recipient in order, as soon as all of them are known.
Report = Callable[[str, list[DeliveryResult]], None]

# RFC 3463 X.3.0 "other mail system status": our own bugs.
INTERNAL = "4.3.0"
INTERNAL_ERROR = "internal error in the relay; will retry"


@attrs.frozen
class Part:
    """
    A message restricted to the pending recipients of one group, and the
    position of each of them among the message's pending recipients.
    """

    message: QueuedMessage
    positions: tuple[int, ...]

    def only(self, indices: Sequence[int]) -> Part:
        """This part with only its recipients at C{indices}."""
        states = self.message.recipients
        return Part(
            attrs.evolve(self.message, recipients=tuple(states[i] for i in indices)),
            tuple(self.positions[i] for i in indices),
        )

    def all(self, **outcome: Any) -> list[DeliveryResult]:
        """The same C{outcome} for every recipient of this part."""
        return [DeliveryResult(s.address, **outcome) for s in self.message.recipients]

    def deferred(self, enhanced: str, text: str, remote: str = "") -> list[DeliveryResult]:
        """A transient result of our own for every recipient of this part."""
        return self.all(success=False, enhanced=enhanced, text=text, remote=remote)


class Results:
    """
    One slot per pending recipient of every message, each filled once; a
    message is reported the moment its last slot is filled, and only then.
    """

    def __init__(
        self, messages: Sequence[QueuedMessage], report: Report | None, now: Callable[[], float]
    ) -> None:
        self.messages = {m.queueId: m for m in messages}
        self.report = report
        self.now = now
        self.slots: dict[str, list[DeliveryResult | None]] = {
            m.queueId: [None] * len(m.pendingRecipients) for m in messages
        }
        self.missing = {queueId: len(slots) for queueId, slots in self.slots.items()}
        self.reported: set[str] = set()

    def start(self) -> None:
        """Report the messages that had no pending recipient at all."""
        for queueId, missing in self.missing.items():
            if not missing:
                self._report(queueId)

    def put(self, part: Part, index: int, result: DeliveryResult) -> None:
        queueId = part.message.queueId
        slots = self.slots[queueId]
        if slots[part.positions[index]] is None:
            slots[part.positions[index]] = result
            self.missing[queueId] -= 1
            if not self.missing[queueId]:
                self._report(queueId)

    def putAll(self, part: Part, results: Sequence[DeliveryResult]) -> None:
        if len(results) != len(part.positions):
            raise RuntimeError(f"{len(results)} results for {len(part.positions)} recipients")
        for index, result in enumerate(results):
            self.put(part, index, result)

    def local(self, part: Part, results: Sequence[DeliveryResult]) -> None:
        """Results of our own (no upstream tried): logged, then put."""
        now = self.now()
        for result in results:
            logAttempt(part.message, result, now)
        self.putAll(part, results)

    def unfilled(self, part: Part) -> list[int]:
        """Indices of C{part}'s recipients that have no result yet."""
        slots = self.slots[part.message.queueId]
        return [i for i, p in enumerate(part.positions) if slots[p] is None]

    def _report(self, queueId: str) -> None:
        if queueId in self.reported:
            return
        self.reported.add(queueId)  # first: a report that raises is still made
        if self.report is None:
            return
        results = [r for r in self.slots[queueId] if r is not None]
        try:
            self.report(queueId, results)
        except Exception:
            log.failure("error in the relay's report callback for {queueId}", queueId=queueId)

    def final(self) -> dict[str, list[DeliveryResult]]:
        """Every slot, those left empty (a bug) filled with a transient
        result and their messages reported."""
        now = self.now()
        for queueId, message in self.messages.items():
            slots = self.slots[queueId]
            for position, state in enumerate(message.pendingRecipients):
                if slots[position] is None:
                    result = DeliveryResult(
                        state.address, False, False, 0, INTERNAL, INTERNAL_ERROR
                    )
                    logAttempt(message, result, now)
                    slots[position] = result
            self._report(queueId)
        return {q: [r for r in slots if r is not None] for q, slots in self.slots.items()}


def splitParts(
    messages: Sequence[QueuedMessage],
    groups: dict[DestinationKey | None, list[tuple[QueuedMessage, tuple[Address, ...]]]],
) -> dict[DestinationKey | None, list[Part]]:
    """Turn L{groupRecipients}' addresses back into recipient positions."""
    free: dict[str, dict[Address, deque[int]]] = {}
    for message in messages:
        table = free[message.queueId] = {}
        for position, state in enumerate(message.pendingRecipients):
            table.setdefault(state.address, deque()).append(position)
    parts: dict[DestinationKey | None, list[Part]] = {}
    for key, items in groups.items():
        for message, addresses in items:
            # A recipient listed twice takes two positions, in order.
            positions = tuple(free[message.queueId][a].popleft() for a in addresses)
            pending = message.pendingRecipients
            restricted = attrs.evolve(message, recipients=tuple(pending[p] for p in positions))
            parts.setdefault(key, []).append(Part(restricted, positions))
    return parts
