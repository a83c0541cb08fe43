"""
Where a trip is announced (L{IBreakerAlert}): the log line (always), a
message to an admin address injected into the gateway's own queue, and a
webhook event ``account.tripped`` through any object with ``send(event,
payload)`` (L{mailgw.webhooks.WebhookSender}). The payload is the trip
event of L{mailgw.breaker.breaker.AccountBreaker} (docs/breaker.md).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.envelope import Envelope, Session, splitAddress
from mailgw.interfaces import IBreakerAlert, IQueue

_log = Logger(namespace="mailgw.breaker")

#: The webhook event of a trip.
TRIPPED_EVENT = "account.tripped"


def _printable(text: object, limit: int = 200) -> str:
    """A header- and terminal-safe rendering of ``text`` (an account name is untrusted)."""
    escaped = str(text).encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else "?" for c in escaped)[:limit]


@implementer(IBreakerAlert)
class LogAlert:
    """The one log line of a trip: the rule, its figures, the session and queue ids."""

    def tripped(self, event: dict[str, Any]) -> None:
        _log.warn(
            "breaker tripped user={user!r} rule={rule} value={value:g} threshold={threshold:g} "
            "client={client} queueId={queueId} action={action}: {text}",
            user=event["account"],
            rule=event["rule"],
            value=event["value"],
            threshold=event["threshold"],
            client=event["client"] or "-",
            queueId=event["queueId"] or "-",
            action=event["action"],
            text=event["text"],
            figures=event["figures"],
        )


class Sender(Protocol):
    """What the webhook alert needs: L{mailgw.webhooks.WebhookSender} (fire-and-forget)."""

    def send(self, event: str, payload: dict[str, Any]) -> None: ...


@implementer(IBreakerAlert)
class WebhookAlert:
    """Sends ``account.tripped`` with the trip event as its payload."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    def tripped(self, event: dict[str, Any]) -> None:
        try:
            self.sender.send(TRIPPED_EVENT, json.loads(json.dumps(event)))
        except Exception:
            _log.failure("breaker: the webhook for {user!r} failed", user=event.get("account"))


def alertMessage(event: dict[str, Any], to: str, hostname: str, now: float) -> bytes:
    """The admin's message for ``event`` (ASCII, CRLF line endings)."""
    account = _printable(event["account"], 120)
    figures = "\r\n".join(f"  {k}: {v}" for k, v in event["figures"].items())
    lines = [
        f"From: mailgw breaker <postmaster@{hostname}>",
        f"To: <{to}>",
        f"Subject: mailgw: account {account} stopped by the breaker ({event['rule']})",
        f"Date: {format_datetime(datetime.fromtimestamp(now, UTC))}",
        f"Message-ID: {make_msgid('breaker', hostname)}",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"The account {account} tripped the breaker at {event['time']}.",
        "",
        f"Rule: {_printable(event['text'], 400)}",
        f"Client: {_printable(event['client'] or '-')}  Queue id: {event['queueId'] or '-'}",
        f"Action: {event['action']} (new messages are held in the queue"
        + ("; logins are refused)" if event["action"] == "hold-and-refuse" else ")"),
        "",
        "The last hour and the baseline:",
        figures,
        "",
        "Review the held mail (mailgw queue list), then:",
        f"  mailgw queue release --account {account}    relay it",
        f"  mailgw account reset {account}              re-arm the account",
        "",
    ]
    return "\r\n".join(lines).encode("ascii", "replace")


@implementer(IBreakerAlert)
class AdminMessageAlert:
    """Queues a message to ``address`` through ``queue`` (the gateway's own)."""

    def __init__(self, queue: IQueue, address: str, hostname: str, clock: IReactorTime) -> None:
        self.queue, self.address = queue, address
        self.hostname, self.clock = hostname, clock

    def tripped(self, event: dict[str, Any]) -> None:
        data = alertMessage(event, self.address, self.hostname, self.clock.seconds())
        # The null sender: an alert that cannot be delivered bounces nowhere.
        envelope = Envelope(sender=None, recipients=(splitAddress(self.address),))
        session = Session(clientAddress="127.0.0.1", helo=self.hostname, listener="breaker")
        writer: Any = None
        try:
            writer = self.queue.begin(envelope, session)
            writer.write(data)
            d: Deferred[str] = writer.commit()
        except Exception as e:
            if writer is not None:
                writer.abort()
            _log.error("breaker: cannot queue the alert to {to}: {error}", to=self.address, error=e)
            return

        def done(result: Any) -> None:
            if isinstance(result, str):
                _log.info("breaker: alert to {to} queued as {queueId}", to=self.address,
                          queueId=result)  # fmt: skip
            else:
                writer.abort()
                _log.error("breaker: cannot queue the alert to {to}: {error}", to=self.address,
                           error=result.value)  # fmt: skip

        d.addBoth(done)
