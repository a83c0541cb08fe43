"""
What the queue tells those who follow its messages (the webhooks,
docs/api.md): ``delivered``, ``deferred``, ``bounced`` after each attempt,
one event per kind that the attempt produced, and ``held`` when a message
is held. L{MessageEvents} is the runner's observer list; L{WebhookObserver}
turns the events into ``message.*`` webhooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.logger import Logger

from mailgw.envelope import QueuedMessage, RecipientState, RecipientStatus
from mailgw.interfaces import IWebhookSender
from mailgw.queue.outcome import Outcome, replyText, when

DELIVERED, DEFERRED, BOUNCED, HELD = "delivered", "deferred", "bounced", "held"

#: An observer: (kind, the message as it is now, the recipients concerned, extra fields).
Observer = Callable[[str, QueuedMessage, tuple[RecipientState, ...], dict[str, Any]], None]

_log = Logger(namespace="mailgw.queue.runner")


def attemptKinds(result: Outcome, now: float) -> dict[str, tuple[RecipientState, ...]]:
    """The recipients the attempt at ``now`` delivered, deferred and bounced (expired too)."""
    kinds: dict[str, list[RecipientState]] = {}
    for state in result.message.recipients:
        if state.address in result.bounced:
            kinds.setdefault(BOUNCED, []).append(state)
        elif state.lastAttempt != now:
            continue
        elif state.status is RecipientStatus.DELIVERED:
            kinds.setdefault(DELIVERED, []).append(state)
        elif state.status is RecipientStatus.PENDING:
            kinds.setdefault(DEFERRED, []).append(state)
    return {kind: tuple(states) for kind, states in kinds.items()}


@attrs.define
class MessageEvents:
    """The observers of one queue; an observer that raises is logged and skipped."""

    observers: list[Observer] = attrs.field(factory=list)

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def emit(
        self,
        kind: str,
        message: QueuedMessage,
        recipients: Iterable[RecipientState],
        **extra: Any,
    ) -> None:
        states = tuple(recipients)
        for observer in list(self.observers):
            try:
                observer(kind, message, states, extra)
            except Exception:
                _log.failure("Queue observer failed on {kind} {queueId}", kind=kind,
                             queueId=message.queueId)  # fmt: skip

    def attempted(self, result: Outcome, now: float) -> None:
        """One event per kind of result the attempt at ``now`` produced."""
        if not self.observers:
            return
        for kind, states in attemptKinds(result, now).items():
            self.emit(kind, result.message, states)


def recipientPayload(state: RecipientState) -> dict[str, Any]:
    return {
        "address": str(state.address),
        "status": state.status.value,
        "attempts": state.attempts,
        "code": state.code or None,
        "enhanced": state.enhanced or None,
        "reply": replyText(state) or None,
        "remote": state.remote or None,
    }


def messagePayload(
    message: QueuedMessage, recipients: Iterable[RecipientState] | None = None
) -> dict[str, Any]:
    """A message as the webhooks and the API show it (``recipients``: those concerned)."""
    states = message.recipients if recipients is None else tuple(recipients)
    payload: dict[str, Any] = {
        "queueId": message.queueId,
        "sender": str(message.envelope.sender or ""),
        "account": message.session.user,
        "client": message.session.clientAddress,
        "listener": message.session.listener,
        "arrival": when(message.arrival),
        "size": message.size,
        "held": message.held,
        "attempts": max((r.attempts for r in message.recipients), default=0),
        "recipients": [recipientPayload(r) for r in states],
    }
    if message.pendingRecipients:
        payload["nextAttempt"] = when(message.nextAttempt)
    return payload


@attrs.frozen
class WebhookObserver:
    """Sends each queue event as the webhook ``message.<kind>``."""

    sender: IWebhookSender

    def __call__(
        self,
        kind: str,
        message: QueuedMessage,
        recipients: tuple[RecipientState, ...],
        extra: dict[str, Any],
    ) -> None:
        payload = messagePayload(message, recipients if kind != HELD else None)
        payload.update(extra)
        self.sender.send(f"message.{kind}", payload)
