"""
What the API shows (docs/api.md), as JSON-able values: pure functions of
the queue's messages and the query. L{ApiError} is a refusal with its
status and reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mailgw.envelope import QueuedMessage
from mailgw.queue.events import messagePayload

#: A message's state in the listing: held by the operator (or the breaker),
#: deferred (tried at least once), or new (not tried yet).
STATES = ("held", "deferred", "new")
#: Messages in one listing, by default and at most.
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
#: Longest filter value taken.
MAX_FILTER = 512

#: What the API knows of an account beyond the quotas: name -> a function of
#: the account giving a JSON-able value (None: nothing to say). The account
#: breaker adds "breaker" here once merged (L{mailgw.api.resource.ApiResource}).
AccountSection = Callable[[str], Any]


class ApiError(Exception):
    """A refusal: ``status`` and the ``reason`` sent in the JSON error."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status, self.reason = status, reason


def messageState(message: QueuedMessage) -> str:
    if message.held:
        return "held"
    if any(r.attempts for r in message.recipients):
        return "deferred"
    return "new"


def showMessage(message: QueuedMessage) -> dict[str, Any]:
    payload = messagePayload(message)
    payload["state"] = messageState(message)
    return payload


def _one(query: Mapping[bytes, list[bytes]], name: str) -> str | None:
    values = query.get(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"give {name} once")
    try:
        value = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{name} is not UTF-8") from None
    if len(value) > MAX_FILTER:
        raise ApiError(400, f"{name} is too long")
    return value


def listMessages(
    messages: Iterable[QueuedMessage], query: Mapping[bytes, list[bytes]]
) -> dict[str, Any]:
    """
    The listing for ``query`` (``state``, ``sender``, ``account``,
    ``limit``): the matching messages, oldest first, at most ``limit``, and
    how many matched.

    @raise ApiError: 400 for an unknown parameter or a bad value.
    """
    known = {b"state", b"sender", b"account", b"limit"}
    unknown = sorted(k.decode("ascii", "replace") for k in query if k not in known)
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0][:40]!r}")
    state = _one(query, "state")
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    sender = _one(query, "sender")
    account = _one(query, "account")
    limitText = _one(query, "limit")
    limit = DEFAULT_LIMIT
    if limitText is not None:
        if not limitText.isdigit() or not 1 <= int(limitText) <= MAX_LIMIT:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
        limit = int(limitText)
    matching = [
        m
        for m in messages
        if (state is None or messageState(m) == state)
        and (sender is None or str(m.envelope.sender or "").casefold() == sender.casefold())
        and (account is None or (m.session.user or "").casefold() == account.casefold())
    ]
    matching.sort(key=lambda m: (m.arrival, m.queueId))
    return {
        "total": len(matching),
        "messages": [showMessage(m) for m in matching[:limit]],
    }


def showAccount(
    name: str,
    messages: Iterable[QueuedMessage],
    quota: Any,
    sections: Mapping[str, AccountSection],
) -> dict[str, Any]:
    """What the gateway knows of account ``name`` (case-insensitive)."""
    folded = name.casefold()
    own = [m for m in messages if (m.session.user or "").casefold() == folded]
    account: dict[str, Any] = {
        "account": name,
        "queued": len(own),
        "held": sum(1 for m in own if m.held),
        "quota": quota.usage(name) if quota is not None else None,
    }
    for key, section in sections.items():
        account[key] = section(name)
    return account
