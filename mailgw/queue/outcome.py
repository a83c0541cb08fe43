"""
What one delivery attempt makes of a queued message: each pending
recipient's new state, which recipients bounce (permanently refused, or
expired), the next attempt with backoff, and the one log line that says so.
Pure functions of the message, the relay's answer and the time.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.config import QueueConfig
from mailgw.dsnparams import Notify
from mailgw.envelope import (
    Address,
    DeliveryResult,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
)

_log = Logger(namespace="mailgw.queue.runner")
_PENDING, _BOUNCED = RecipientStatus.PENDING, RecipientStatus.BOUNCED


def backoff(attempts: int, config: QueueConfig, rng: random.Random) -> float:
    """
    Seconds to wait after the ``attempts``-th attempt: ``retryMin`` doubled
    per attempt after the first, capped at ``retryMax``, times a random
    factor in ``[1 - retryJitter, 1 + retryJitter]`` so that messages failed
    together do not all come back together.
    """
    delay = min(config.retryMin * 2.0 ** min(max(attempts, 1) - 1, 64), config.retryMax)
    return delay * rng.uniform(1 - config.retryJitter, 1 + config.retryJitter)


def when(timestamp: float) -> str:
    """``timestamp`` as an ISO 8601 UTC time, to the second."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def days(seconds: float) -> str:
    """``seconds`` in days, one decimal."""
    return f"{round(seconds / 86400, 1):g}"


def replyText(state: RecipientState) -> str:
    """The last reply for ``state``: one bounded, printable line (upstream text is untrusted)."""
    words = [str(state.code) if state.code else "", state.enhanced, state.diagnostic]
    text = " ".join(w for w in words if w)
    return "".join(c if c.isprintable() else " " for c in text)[:200]


@attrs.frozen
class Outcome:
    """
    ``message`` with the attempt's results applied; ``bounced``: the
    recipients that became bounced now (refused or expired), ``expired``
    those of them that expired; ``relayed``: those delivered now that asked
    for NOTIFY=SUCCESS to an upstream that took no DSN parameters (we owe
    them a "relayed" report, RFC 3461 5.2.2).
    """

    message: QueuedMessage
    bounced: frozenset[Address]
    expired: tuple[Address, ...]
    relayed: frozenset[Address] = frozenset()


def applyResults(
    message: QueuedMessage,
    outcome: object,
    now: float,
    config: QueueConfig,
    rng: random.Random,
) -> Outcome:
    """
    Apply the relay's ``outcome`` for ``message`` (a list of
    L{DeliveryResult}, a Failure, or None) at time ``now``. A pending
    recipient without a result is a transient failure; one still pending
    past its lifetime expires (bounces).
    """
    results: dict[Address, DeliveryResult] = {}
    missing = "no result from the relay"
    if isinstance(outcome, Failure):
        _log.failure("The relay failed delivering {queueId}", outcome, queueId=message.queueId)
        missing = f"relay failure: {outcome.getErrorMessage()}"
    elif isinstance(outcome, list):
        for result in outcome:
            results.setdefault(result.recipient, result)
    states, expired = [], []
    lifetime = config.bounceLifetime if message.isBounce else config.maxLifetime
    for state in message.recipients:
        if state.status is _PENDING:
            result = results.get(state.address, DeliveryResult(state.address, False, text=missing))
            state = state.withResult(result, now)
            if state.status is _PENDING and now - message.arrival >= lifetime:
                expired.append(state.address)
                reason = f"message expired after {days(now - message.arrival)} days in the queue"
                state = attrs.evolve(
                    state,
                    status=_BOUNCED,
                    diagnostic=f"{reason}; last error: {state.diagnostic or 'none'}",
                )
        states.append(state)
    bounced = frozenset(
        new.address
        for new, old in zip(states, message.recipients, strict=True)
        if new.status is _BOUNCED and old.status is _PENDING
    )
    updated = attrs.evolve(message, recipients=tuple(states))
    relayed = _relayed(message, states, results)
    if updated.pendingRecipients:
        attempts = max(r.attempts for r in updated.pendingRecipients)
        updated = attrs.evolve(updated, nextAttempt=now + backoff(attempts, config, rng))
    return Outcome(updated, bounced, tuple(expired), relayed)


def _relayed(
    message: QueuedMessage, states: list[RecipientState], results: dict[Address, DeliveryResult]
) -> frozenset[Address]:
    if not message.envelope.dsn or message.isBounce:
        return frozenset()  # nobody asked for NOTIFY=SUCCESS
    requests = message.envelope.dsnFor()
    return frozenset(
        new.address
        for new, old in zip(states, message.recipients, strict=True)
        if new.status is RecipientStatus.DELIVERED
        and old.status is _PENDING
        and not results[new.address].dsnPassed
        and requests[new.address].wants(Notify.SUCCESS)
    )


def logOutcome(result: Outcome, now: float) -> None:
    """One line for what the attempt at ``now`` did, unless everything was delivered."""
    message, parts = result.message, {}  # type: ignore[var-annotated]
    for state in message.recipients:
        if state.lastAttempt != now:
            continue
        if state.status is RecipientStatus.DELIVERED:
            kind = "delivered"
        elif state.address in result.expired:
            kind = "expired"
        elif state.address in result.bounced:
            kind = "bounced"
        else:
            kind = f"deferred until {when(message.nextAttempt)}"
        text = f"<{state.address}>" + ("" if kind == "delivered" else f" ({replyText(state)})")
        parts.setdefault(kind, []).append(text)
    if list(parts) == ["delivered"]:
        return  # the relay logged each delivery already (status=sent)
    outcome = "; ".join(f"{kind}: {', '.join(texts)}" for kind, texts in parts.items())
    _log.info("Queue {queueId}: {outcome}", queueId=message.queueId, outcome=outcome)
