"""
When each queued message is due: a heap of (time, sequence, queue id) with
lazy invalidation. Rescheduling a message makes its older entries stale;
stale entries are dropped as they surface.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Schedule:
    """
    The due times of messages. ``eligible(queueId)`` says whether a message
    may be started now at all (known, not in flight, not held); an entry for
    a message that is not eligible when it surfaces is dropped, and the
    owner schedules the message again when it becomes eligible.
    """

    def __init__(self, eligible: Callable[[str], bool]) -> None:
        self._eligible = eligible
        self._due: dict[str, tuple[float, int]] = {}  # the valid entry of each message
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def __contains__(self, queueId: str) -> bool:
        return queueId in self._due

    def put(self, queueId: str, when: float) -> None:
        """Make ``queueId`` due at ``when`` (replacing any earlier time)."""
        entry = (when, next(self._seq))
        self._due[queueId] = entry
        heapq.heappush(self._heap, (*entry, queueId))

    def discard(self, queueId: str) -> None:
        """Forget ``queueId``'s due time (its entries become stale)."""
        self._due.pop(queueId, None)

    def _valid(self, entry: tuple[float, int, str]) -> bool:
        when, seq, queueId = entry
        return self._due.get(queueId) == (when, seq) and self._eligible(queueId)

    def pop(self, now: float) -> str | None:
        """The next message due at or before ``now``, taken off the schedule."""
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if self._valid(entry):
                del self._due[entry[2]]
                return entry[2]
        return None

    def next(self) -> float | None:
        """When the earliest valid entry is due, or None."""
        while self._heap and not self._valid(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None
