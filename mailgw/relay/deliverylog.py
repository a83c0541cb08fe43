"""
The delivery log: one line per delivery attempt and recipient, in the
shape Postfix operators grep for::

    Q1: to=<bob@example.net>, relay=mx.example.net[192.0.2.7]:25,
        tls=TLSv1.3/TLS_AES_256_GCM_SHA384, delay=1.25, dsn=2.0.0,
        status=sent (250 2.0.0 Ok: queued as 4F2A)

(on one line). C{relay} is C{host[ip]:port} when a connection was made,
C{host:port} when none could be, and C{none} when no upstream was tried
(no route, DNS or local configuration problem). C{delay} is seconds since
the message arrived. C{dsn} is the RFC 3463 code, the reply's or, when it
gave none, its class followed by C{.0.0}. The text in parentheses is the
upstream's reply (or our reason), printable and at most L{MAX_DETAIL}
characters. Every field is also in the event, under the same name, for
JSON logs.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mailgw.envelope import DeliveryResult, QueuedMessage

__all__ = ["MAX_DETAIL", "logAttempt"]

log = Logger(namespace="mailgw.relay")

MAX_DETAIL = 300


def relayName(host: str | None, peer: tuple[str, int] | None, port: int | None) -> str:
    """C{host[ip]:port}, C{host:port} or C{none}."""
    if host is None:
        return "none"
    if peer is not None:
        return f"{host}[{peer[0]}]:{peer[1]}"
    return f"{host}:{port}" if port is not None else host


def status(result: DeliveryResult) -> str:
    if result.success:
        return "sent"
    return "bounced" if result.permanent else "deferred"


def dsn(result: DeliveryResult) -> str:
    if result.enhanced:
        return result.enhanced
    return "2.0.0" if result.success else "5.0.0" if result.permanent else "4.0.0"


def detail(result: DeliveryResult) -> str:
    """The reply or reason: one printable line of at most MAX_DETAIL characters."""
    parts = (str(result.code) if result.code else "", result.enhanced, result.text)
    text = " ".join(p for p in parts if p)
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 3] + "..."
    return text


def logAttempt(
    message: QueuedMessage,
    result: DeliveryResult,
    now: float,
    relay: str = "none",
    tls: str = "none",
    route: str = "none",
) -> None:
    """Log one recipient's result of one attempt (``route``: L{routeName}, a field only)."""
    log.info(
        "{queueId}: to=<{to}>, relay={relay}, tls={tls}, delay={delay}, dsn={dsn}, "
        "status={status} ({reply})",
        queueId=message.queueId,
        to=str(result.recipient),
        relay=relay,
        tls=tls,
        delay=_seconds(now - message.arrival),
        dsn=dsn(result),
        status=status(result),
        reply=detail(result),
        code=result.code,
        route=route,
    )


def routeName(route: Any, domain: str | None = None) -> str:
    """A route as the log names it: ``smarthosts h1:587,h2:587`` or ``mx example.org``."""
    if route is None:
        return "none"
    if getattr(route, "mx", False):
        return f"mx {domain}" if domain else "mx"
    return "smarthosts " + ",".join(map(str, route.smarthosts))


def tlsName(version: str | None, cipher: str | None) -> str:
    """C{TLSv1.3/CIPHER}, or C{none} without TLS."""
    if version is None:
        return "none"
    return f"{version}/{cipher}" if cipher else version


def _seconds(delay: float) -> str:
    delay = max(0.0, delay)
    return f"{delay:.2f}" if delay < 100 else f"{delay:.0f}"
