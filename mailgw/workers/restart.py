"""
When a worker that died is started again: at once the first time, then
after a delay that doubles with each death in a row (a worker that cannot
start, say a broken certificate after a reload, does not spin), and from
the first delay again once a worker has run for ``stable`` seconds.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Backoff:
    """The restart delays: ``first`` doubling up to ``longest`` seconds."""

    first: float = 1.0
    longest: float = 60.0
    #: A worker that ran this long before it died starts from ``first`` again.
    stable: float = 30.0


@attrs.define
class RestartPolicy:
    """The delays of one worker index's restarts (pure: times are passed in)."""

    backoff: Backoff = attrs.field(factory=Backoff)
    #: Deaths in a row, each within ``stable`` seconds of its start.
    failures: int = 0
    startedAt: float | None = None

    def started(self, now: float) -> None:
        """The worker was (re)started at ``now``."""
        self.startedAt = now

    def died(self, now: float) -> float:
        """The worker died at ``now``: the seconds to wait before starting it again."""
        ranFor = now - self.startedAt if self.startedAt is not None else 0.0
        if ranFor >= self.backoff.stable:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else self.backoff.first * 2 ** (self.failures - 1)
        self.failures += 1
        return min(delay, self.backoff.longest)
