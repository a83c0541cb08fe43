"""
Outgoing webhooks (docs/api.md): each event is POSTed as one JSON object::

    {"event": "message.delivered", "id": "…", "time": "2026-11-29T23:00:00+00:00",
     "data": {...}}

to every configured URL, with ``X-Mailgw-Signature: sha256=HEX``, the
HMAC-SHA256 of the exact body under the shared secret, and
``X-Mailgw-Event``. Fire and forget: L{WebhookSender.send} returns at once
and never raises; deliveries run a few at a time, each with a timeout and
a bounded number of retries with doubling delays; the backlog waiting for a
free slot is bounded and drops its oldest entry when full (counted in
``mailgw_webhook_deliveries_total{outcome="dropped"}`` and logged). A
receiver answering 2xx has it; any other status, a connection failure or
the timeout is a failure.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from mailgw.interfaces import IWebhookSender
from mailgw.logs import jsonable

__all__ = ["SIGNATURE_HEADER", "WebhookSender", "sign", "verify"]

SIGNATURE_HEADER = b"X-Mailgw-Signature"
EVENT_HEADER = b"X-Mailgw-Event"
#: Deliveries in flight at once (each with its retries).
SLOTS = 4
#: A dropped-event warning at most this often, in seconds (with the count).
DROP_LOG_INTERVAL = 60.0

_log = Logger()


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` (in constant time)."""
    return hmac.compare_digest(sign(secret, body).encode(), header.encode("utf-8", "replace"))


def encode(event: str, payload: dict[str, Any], now: float) -> bytes:
    """The body of one event."""
    record = {
        "event": event,
        "id": uuid.uuid4().hex,
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "data": jsonable(payload),
    }
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


@attrs.define
class _Delivery:
    url: str
    event: str
    body: bytes
    attempts: int = 0


class _Discard(Protocol):
    """Reads a response body away (a receiver's answer does not matter)."""

    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.callback(None)


class WebhookError(Exception):
    """A receiver did not take the event (status or reason in the text)."""


@implementer(IWebhookSender)
class WebhookSender(Service):
    """
    Sends events to ``urls`` over ``reactor`` (see the module docstring).

    @param secret: the HMAC key.
    @param timeout: seconds for one request, from connecting to the end of
        the response.
    @param retries: attempts after the first, ``retryDelay`` seconds after
        the first failure and doubling.
    @param backlog: deliveries waiting for a slot at most.
    @param metrics: L{mailgw.metrics.Metrics}, or None.
    """

    def __init__(
        self,
        reactor: Any,
        urls: Iterable[str],
        secret: bytes,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        retryDelay: float = 5.0,
        backlog: int = 1000,
        metrics: Any = None,
        agent: Any = None,
        slots: int = SLOTS,
    ) -> None:
        self.reactor, self.urls, self.secret = reactor, tuple(urls), secret
        self.timeout, self.retries, self.retryDelay = timeout, retries, retryDelay
        self.backlog, self.metrics, self.slots = max(1, backlog), metrics, max(1, slots)
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=False)
            agent = Agent(reactor, connectTimeout=timeout, pool=pool)
        self.agent = agent
        self._waiting: collections.deque[_Delivery] = collections.deque()
        self._active = 0
        self._requests: set[Deferred[Any]] = set()
        self._timers: set[IDelayedCall] = set()
        self._stopped = False
        self._lastDropLog: float | None = None
        #: Counts since the start, by outcome (sent, failed, dropped, retried).
        self.counts: dict[str, int] = collections.Counter()

    # -- IWebhookSender --------------------------------------------------------

    def send(self, event: str, payload: dict[str, Any]) -> None:
        try:
            self._send(event, payload)
        except Exception:
            _log.failure("Webhook bug queueing {event}; the event is dropped", event=event)

    def _send(self, event: str, payload: dict[str, Any]) -> None:
        if self._stopped or not self.urls:
            return
        body = encode(event, payload, self.reactor.seconds())
        for url in self.urls:
            if len(self._waiting) >= self.backlog:
                self._drop(self._waiting.popleft())
            self._waiting.append(_Delivery(url, event, body))
        self._next()

    # -- the slots -----------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.metrics is not None:
            self.metrics.webhook(outcome)

    def _drop(self, delivery: _Delivery) -> None:
        self._count("dropped")
        now = self.reactor.seconds()
        if self._lastDropLog is None or now - self._lastDropLog >= DROP_LOG_INTERVAL:
            self._lastDropLog = now
            _log.warn(
                "Webhook backlog full ({backlog}): dropped the oldest {event} event for {url} "
                "({dropped} dropped since the start)",
                backlog=self.backlog,
                event=delivery.event,
                url=delivery.url,
                dropped=self.counts["dropped"],
            )

    def _next(self) -> None:
        while not self._stopped and self._waiting and self._active < self.slots:
            self._active += 1
            self._attempt(self._waiting.popleft())

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.attempts += 1
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"user-agent": [b"mailgw-webhooks"],
                EVENT_HEADER: [delivery.event.encode("ascii", "replace")],
                SIGNATURE_HEADER: [sign(self.secret, delivery.body).encode("ascii")],
            }
        )
        try:
            d = self.agent.request(
                b"POST",
                delivery.url.encode("utf-8"),
                headers,
                _Body(delivery.body),
            )
        except Exception as e:  # a URL the agent refuses
            self._failed(Failure(e), delivery)
            return
        d.addCallback(self._response)
        d.addTimeout(self.timeout, self.reactor)
        self._requests.add(d)
        d.addBoth(self._settled, d, delivery)

    def _response(self, response: IResponse) -> Deferred[None]:
        def stop(_: Deferred[None]) -> None:
            # The timeout while the body trickles in: drop the connection.
            transport = getattr(reader, "transport", None)
            if transport is not None:
                transport.stopProducing()

        done: Deferred[None] = Deferred(stop)
        reader = _Discard(done)
        response.deliverBody(reader)
        code = response.code

        def check(_: None) -> None:
            if not 200 <= code < 300:
                raise WebhookError(f"HTTP status {code}")

        return done.addCallback(check)

    def _settled(self, result: Any, d: Deferred[Any], delivery: _Delivery) -> None:
        self._requests.discard(d)
        if isinstance(result, Failure):
            self._failed(result, delivery)
            return
        self._count("sent")
        self._free()

    def _failed(self, failure: Failure, delivery: _Delivery) -> None:
        if self._stopped:
            return
        why = "timed out" if failure.check(CancelledError) else failure.getErrorMessage()
        if delivery.attempts <= self.retries:
            delay = self.retryDelay * 2 ** (delivery.attempts - 1)
            self._count("retried")
            _log.info(
                "Webhook {event} to {url} failed ({why}); retrying in {delay:g} s",
                event=delivery.event,
                url=delivery.url,
                why=why,
                delay=delay,
            )
            timer: IDelayedCall = self.reactor.callLater(delay, self._retry, delivery)
            self._timers.add(timer)
            return
        self._count("failed")
        _log.warn(
            "Webhook {event} to {url} failed after {attempts} attempts ({why}); dropped",
            event=delivery.event,
            url=delivery.url,
            attempts=delivery.attempts,
            why=why,
        )
        self._free()

    def _retry(self, delivery: _Delivery) -> None:
        self._timers = {t for t in self._timers if t.active()}
        self._attempt(delivery)

    def _free(self) -> None:
        self._active -= 1
        self._next()

    # -- service ---------------------------------------------------------------

    def stopService(self) -> None:
        """Drop what is waiting and cancel what is under way (logged with its count)."""
        super().stopService()
        self._stopped = True
        left = len(self._waiting) + self._active
        if left:
            _log.info("Stopping with {n} webhook deliveries unsent", n=left)
        self._waiting.clear()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for d in list(self._requests):
            d.cancel()


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory (FileBodyProducer would use the global cooperator)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
