"""
The decision trace of ``mailgw explain`` (docs/operations.md), built from
the gateway's JSON log events (``--log-format json``), not from a record of
its own. Pure functions of the events (dicts as the JSON lines hold them):

- the ``queued`` line names the message's session (``session``), listener,
  TLS, login, the policy that let the sender through and the quota counted;
- the session's lines (``auth ok``/``auth failed``, policy refusals, the
  ``disconnect from`` line) carry the same ``session``;
- the delivery lines carry the ``queueId`` with the route, the upstream, its
  TLS and reply of every attempt; the queue's lines (deferred, bounced,
  held, deleted, a bounce queued as ``newId``) carry the ``queueId`` too;
- any other event carrying the ``queueId`` or the ``session`` (the account
  breaker's rule evaluations, for one) is listed with its text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

Event = dict[str, Any]

QUEUED, AUTH, DISCONNECT, DELIVERY, OTHER = "queued", "auth", "disconnect", "delivery", "other"

_THROTTLE_CLIENT = re.compile(r"\bclient=(\S+)")


def kind(event: Event) -> str:
    """What an event is: one of QUEUED, AUTH, DISCONNECT, DELIVERY, OTHER."""
    text = event.get("text")
    text = text if isinstance(text, str) else ""
    if text.startswith("queued ") and "queueId" in event and "recipients" in event:
        return QUEUED
    if text.startswith(("auth ok ", "auth failed ")):
        return AUTH
    if text.startswith("disconnect from "):
        return DISCONNECT
    if "queueId" in event and "status" in event and "to" in event and "relay" in event:
        return DELIVERY
    return OTHER


def eventClient(event: Event) -> str | None:
    """The client address an event names (also inside an auth-throttle line)."""
    client = event.get("client")
    if isinstance(client, str):
        return client
    line = event.get("logLine")
    if isinstance(line, str) and (m := _THROTTLE_CLIENT.search(line)):
        return m.group(1)
    return None


def queueIdsOf(event: Event) -> set[str]:
    ids = {event.get("queueId"), event.get("newId")}
    return {i for i in ids if isinstance(i, str)}


def wanted(events: Iterable[Event], queueIds: set[str], sessions: set[str]) -> list[Event]:
    """The events that carry one of ``queueIds`` or ``sessions``."""
    return [e for e in events if queueIdsOf(e) & queueIds or e.get("session") in sessions]


def _short(event: Event) -> Event:
    return {"time": event.get("time"), "level": event.get("level"), "text": event.get("text")}


def _auth(event: Event) -> Event:
    return {
        "time": event.get("time"),
        "ok": str(event.get("text", "")).startswith("auth ok"),
        "user": event.get("user"),
        "mech": event.get("mech") or None,
        "backend": event.get("backend"),
    }


def sessionTrace(events: list[Event], sessionId: str) -> Event:
    """What session ``sessionId`` did, from its events (in log order)."""
    own = [e for e in events if e.get("session") == sessionId]
    trace: Event = {
        "session": sessionId,
        "client": None,
        "listener": None,
        "tls": None,
        "logins": [],
        "queued": [],
        "outcome": None,
        "commands": None,
        "events": [],
        "start": own[0].get("time") if own else None,
        "end": None,
    }
    for event in own:
        what = kind(event)
        trace["client"] = trace["client"] or eventClient(event)
        if what == AUTH:
            trace["logins"].append(_auth(event))
        elif what == QUEUED:
            trace["listener"] = trace["listener"] or event.get("listener")
            trace["tls"] = trace["tls"] or event.get("tls")
            trace["queued"].append(event.get("queueId"))
        elif what == DISCONNECT:
            trace["listener"] = event.get("listener") or trace["listener"]
            trace["tls"] = event.get("tls") or trace["tls"]
            trace["outcome"] = event.get("outcome")
            trace["commands"] = event.get("commands")
            trace["end"] = event.get("time")
        else:
            trace["events"].append(_short(event))
    return trace


def _attempt(event: Event) -> Event:
    return {
        "time": event.get("time"),
        "to": event.get("to"),
        "route": event.get("route"),
        "relay": event.get("relay"),
        "tls": event.get("tls"),
        "status": event.get("status"),
        "dsn": event.get("dsn"),
        "reply": event.get("reply"),
        "delay": event.get("delay"),
    }


def messageTrace(events: list[Event], queueId: str) -> Event | None:
    """
    The trace of message ``queueId`` from ``events`` (those of its queue id
    and its session, in log order), or None when no event names it.
    """
    own = [e for e in events if queueId in queueIdsOf(e)]
    if not own:
        return None
    queued = next((e for e in own if kind(e) == QUEUED and e.get("queueId") == queueId), None)
    sessionId = queued.get("session") if queued is not None else None
    trace: Event = {"queueId": queueId, "received": None, "session": None}
    if queued is not None:
        trace["received"] = {
            "time": queued.get("time"),
            "listener": queued.get("listener"),
            "client": queued.get("client"),
            "tls": queued.get("tls"),
            "user": queued.get("user"),
            "policy": queued.get("policy"),
            "quota": queued.get("quota"),
            "sender": queued.get("sender"),
            "recipients": queued.get("recipients"),
            "size": queued.get("size"),
            "messageId": queued.get("messageId"),
        }
    if isinstance(sessionId, str):
        session = sessionTrace(events, sessionId)
        # The login in force when the message was queued: the last good one before it.
        logins = [a for a in session["logins"] if a["ok"]]
        if logins and trace["received"] is not None:
            trace["received"]["login"] = logins[-1]
        trace["session"] = session
    trace["attempts"] = [_attempt(e) for e in own if kind(e) == DELIVERY]
    trace["events"] = [
        _short(e) for e in own if kind(e) == OTHER or (kind(e) == QUEUED and e is not queued)
    ]
    return trace


def sessionsOf(events: Iterable[Event], client: str) -> list[str]:
    """The ids of the sessions of ``client`` (an address), in log order."""
    seen: dict[str, None] = {}
    for event in events:
        session = event.get("session")
        if isinstance(session, str) and eventClient(event) == client:
            seen.setdefault(session, None)
    return list(seen)


def clientTrace(events: list[Event], client: str) -> Event:
    """
    Every session of ``client`` and, for each message it queued, the
    message's trace; plus the events naming the client outside any session
    (the AUTH throttle's lines).
    """
    sessions = []
    for sessionId in sessionsOf(events, client):
        session = sessionTrace(events, sessionId)
        session["messages"] = [
            messageTrace(events, q) for q in session["queued"] if isinstance(q, str)
        ]
        sessions.append(session)
    loose = [_short(e) for e in events if "session" not in e and eventClient(e) == client]
    return {"client": client, "sessions": sessions, "events": loose}
