"""
mailgw.webhooks: delivery to a real twisted.web receiver on 127.0.0.1
(body, signature, retry after a 500, timeout against a silent receiver,
the backlog bound), and the config section.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from mailgw.apiconfig import WebhooksConfig, readSecret
from mailgw.config import ConfigError, configFromDict
from mailgw.interfaces import IWebhookSender
from mailgw.testing import RecordingWebhooks
from mailgw.webhooks import WebhookSender, sign, verify

SECRET = b"s3cret-for-tests"


class Receiver(Resource):
    """Records each POST; answers with the next status of ``statuses`` (then 200)."""

    isLeaf = True

    def __init__(self, statuses: list[int] | None = None) -> None:
        super().__init__()
        self.statuses = list(statuses or [])
        self.received: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.waiters: list[tuple[int, Deferred[None]]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((request.content.read(), headers))
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        for count, d in list(self.waiters):
            if len(self.received) >= count:
                self.waiters.remove((count, d))
                reactor.callLater(0, d.callback, None)
        return b"ok"

    def whenReceived(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.received) >= count:
            d.callback(None)
        else:
            self.waiters.append((count, d))
        return d


class Silent(Protocol):
    """Accepts the connection and never answers."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.seen.append(data)  # type: ignore[attr-defined]


class WebhookDeliveryTests(unittest.TestCase):
    @inlineCallbacks
    def listen(self, factory: Any) -> Any:
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/hook"

    def sender(self, urls: list[str], **kwargs: Any) -> WebhookSender:
        sender = WebhookSender(reactor, urls, SECRET, **kwargs)
        sender.startService()
        self.addCleanup(sender.stopService)
        return sender

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IWebhookSender, WebhookSender(Clock(), [], SECRET)))
        self.assertTrue(verifyObject(IWebhookSender, RecordingWebhooks()))

    @inlineCallbacks
    def test_bodyAndSignature(self) -> Any:
        receiver = Receiver()
        url = yield self.listen(Site(receiver))
        sender = self.sender([url])
        sender.send("message.delivered", {"queueId": "Q1", "recipients": ["a@example.org"]})
        yield receiver.whenReceived(1)
        body, headers = receiver.received[0]
        record = json.loads(body)
        self.assertEqual(record["event"], "message.delivered")
        self.assertEqual(record["data"], {"queueId": "Q1", "recipients": ["a@example.org"]})
        self.assertIn("time", record)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"x-mailgw-event"], b"message.delivered")
        signature = headers[b"x-mailgw-signature"].decode()
        self.assertTrue(verify(SECRET, body, signature))
        self.assertFalse(verify(b"another secret", body, signature))
        self.assertFalse(verify(SECRET, body + b" ", signature))
        yield self.sent(sender, 1)

    @inlineCallbacks
    def sent(self, sender: WebhookSender, count: int) -> Any:
        # The receiver has the body before the sender reads the answer.
        for _ in range(200):
            if sender.counts["sent"] >= count:
                return
            yield deferLater(0.01)
        self.fail(f"not sent: {sender.counts}")

    @inlineCallbacks
    def test_retryAfter500(self) -> Any:
        receiver = Receiver(statuses=[500])
        url = yield self.listen(Site(receiver))
        sender = self.sender([url], retryDelay=0.01)
        sender.send("message.bounced", {"queueId": "Q2"})
        yield receiver.whenReceived(2)
        first, second = receiver.received
        self.assertEqual(json.loads(first[0])["id"], json.loads(second[0])["id"])
        yield self.sent(sender, 1)
        self.assertEqual(sender.counts["retried"], 1)
        self.assertEqual(sender.counts["failed"], 0)

    @inlineCallbacks
    def test_givesUpAfterRetries(self) -> Any:
        receiver = Receiver(statuses=[503, 503, 503])
        url = yield self.listen(Site(receiver))
        sender = self.sender([url], retries=2, retryDelay=0.01)
        sender.send("message.held", {"queueId": "Q3"})
        yield receiver.whenReceived(3)
        for _ in range(200):
            if sender.counts["failed"]:
                break
            yield deferLater(0.01)
        self.assertEqual((sender.counts["failed"], sender.counts["retried"]), (1, 2))
        self.assertEqual(sender.counts["sent"], 0)
        self.assertEqual(len(receiver.received), 3)

    @inlineCallbacks
    def test_timeoutAgainstSilentReceiver(self) -> Any:
        factory = Factory.forProtocol(Silent)
        factory.seen = []  # type: ignore[attr-defined]
        url = yield self.listen(factory)
        sender = self.sender([url], timeout=0.2, retries=0)
        sender.send("message.deferred", {"queueId": "Q4"})
        for _ in range(300):
            if sender.counts["failed"]:
                break
            yield deferLater(0.01)
        self.assertEqual(sender.counts["failed"], 1)
        self.assertTrue(factory.seen, "the request reached the silent receiver")
        self.assertEqual(sender._active, 0)

    def test_backlogBound(self) -> None:
        # Nothing listens on the agent's side: a fake that never answers
        # keeps the slot busy, so everything else waits in the backlog.
        requests: list[tuple[bytes, Deferred[Any]]] = []

        class Agent:
            def request(self, method: bytes, url: bytes, headers: Any, body: Any) -> Any:
                d: Deferred[Any] = Deferred()
                requests.append((url, d))
                return d

        clock = Clock()
        sender = WebhookSender(clock, ["http://127.0.0.1:9/"], SECRET, backlog=3, slots=1)
        sender.agent = Agent()
        sender.startService()
        self.addCleanup(sender.stopService)
        for n in range(6):
            sender.send("message.delivered", {"n": n})
        self.assertEqual(len(requests), 1)
        self.assertEqual([json.loads(d.body)["data"]["n"] for d in sender._waiting], [3, 4, 5])
        self.assertEqual(sender.counts["dropped"], 2)

    def test_neverRaises(self) -> None:
        sender = WebhookSender(Clock(), ["http://127.0.0.1:9/"], SECRET)

        class Broken:
            def request(self, *args: Any) -> Any:
                raise RuntimeError("boom")

        sender.agent = Broken()
        sender.retries = 0
        sender.send("message.delivered", {"x": object()})  # not JSON: turned into its str
        self.assertEqual(sender.counts["failed"], 1)
        self.flushLoggedErrors()


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class SignatureTests(unittest.TestCase):
    def test_sign(self) -> None:
        # RFC 4231, test case 2.
        expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        self.assertEqual(sign(b"Jefe", b"what do ya want for nothing?"), "sha256=" + expected)


class WebhooksConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        self.assertEqual(configFromDict({}).webhooks, WebhooksConfig())

    def test_urls(self) -> None:
        config = configFromDict(
            {"webhooks": {"urls": ["https://siem.example/hook"], "secret_file": "/x"}}
        )
        self.assertEqual(config.webhooks.urls, ("https://siem.example/hook",))
        for bad in ["ftp://x/", "http:///nohost", "file:///etc/passwd", "http://a b/"]:
            with self.assertRaises(ConfigError) as e:
                configFromDict({"webhooks": {"urls": [bad], "secret_file": "/x"}})
            self.assertEqual(e.exception.key, "webhooks.urls")

    def test_secretRequired(self) -> None:
        with self.assertRaises(ConfigError) as e:
            configFromDict({"webhooks": {"urls": ["http://127.0.0.1/"]}})
        self.assertEqual(e.exception.key, "webhooks.secret_file")

    def test_readSecret(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"abc\nignored\n")
        os.chmod(path, 0o644)
        with self.assertRaises(ConfigError) as e:
            readSecret("c.toml", "webhooks.secret_file", path)
        self.assertIn("readable by others", str(e.exception))
        os.chmod(path, 0o640)
        self.assertEqual(readSecret("c.toml", "webhooks.secret_file", path), b"abc")
        with open(path, "wb") as f:
            f.write(b"\n")
        with self.assertRaises(ConfigError) as e:
            readSecret("c.toml", "webhooks.secret_file", path)
        self.assertIn("empty", str(e.exception))
        with self.assertRaises(ConfigError):
            readSecret("c.toml", "webhooks.secret_file", path + ".missing")


class Trickle(Resource):
    """Answers 200 at once, then sends its body a byte at a time, never finishing."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        request.setHeader(b"content-length", b"1000000")
        request.write(b"x")
        self.requests.append(request)
        return NOT_DONE_YET


class TrickleTests(unittest.TestCase):
    @inlineCallbacks
    def test_slowBodyTimesOut(self) -> Any:
        resource = Trickle()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
        self.addCleanup(port.stopListening)
        sender = WebhookSender(
            reactor, [f"http://127.0.0.1:{port.getHost().port}/"], SECRET, timeout=0.3, retries=0
        )
        sender.startService()
        self.addCleanup(sender.stopService)
        sender.send("message.delivered", {"queueId": "Q5"})
        for _ in range(300):
            if sender.counts["failed"]:
                break
            yield deferLater(0.01)
        self.assertEqual((sender.counts["failed"], sender.counts["sent"]), (1, 0))
        # The connection was dropped by the sender, not left open.
        for _ in range(300):
            if all(r.channel is None or r._disconnected for r in resource.requests):
                break
            yield deferLater(0.01)
        self.assertTrue(resource.requests)
        self.assertTrue(all(r._disconnected for r in resource.requests))
