"""
The queue API (mailgw.api) over real HTTP on 127.0.0.1, on the metrics
site, in front of a queue runner over the memory spool and the fake relay:
the token, read-only refusal, listing and filters, hold/release/flush/
delete, accounts, JSON errors; and the [api] configuration.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from mailgw.api import MIN_TOKEN, ApiResource, makeApi
from mailgw.config import ConfigError, LimitsConfig, QueueConfig, configFromDict
from mailgw.envelope import Address, Envelope, Session
from mailgw.health import makeSite
from mailgw.interfaces import IQueueControl, IQueueView
from mailgw.limits import SubmissionQuota
from mailgw.queue.runner import QueueRunner
from mailgw.testing import FakeRelay, MemorySpool, transient

TOKEN = b"0123456789abcdef-api-token"
ALICE, MALLORY = Session("192.0.2.7", user="alice"), Session("192.0.2.9", user="mallory")
BOB = Address("bob", "example.com")


class ApiTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.spool = MemorySpool(reactor)
        self.relay = FakeRelay()
        self.relay.holdResults = True  # messages stay queued, "new"
        config = QueueConfig(retryMin=3600, retryMax=3600, retryJitter=0)
        self.runner = QueueRunner(self.spool, self.relay, reactor, config, "mail.example.org")
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        self.addCleanup(self.relay.releaseAll)
        self.quota = SubmissionQuota(reactor, LimitsConfig(messagesPerUser=50))
        self.api = ApiResource(TOKEN, self.runner, quota=self.quota)
        site = makeSite(CollectorRegistry(), [], self.api)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.agent = Agent(reactor)

    def submit(self, session: Session, sender: str = "alice@example.org") -> str:
        local, domain = sender.split("@")
        writer = self.runner.begin(Envelope(Address(local, domain), (BOB,)), session)
        writer.write(b"Subject: hi\r\n\r\nbody\r\n")
        return self.successResultOf(writer.commit())

    @inlineCallbacks
    def call(
        self, method: str, path: str, token: bytes | None = TOKEN, scheme: bytes = b"Bearer"
    ) -> Any:
        headers = Headers()
        if token is not None:
            headers.addRawHeader(b"authorization", scheme + b" " + token)
        response = yield self.agent.request(method.encode(), (self.base + path).encode(), headers)
        body = yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(body)

    def test_queueView(self) -> None:
        self.assertTrue(verifyObject(IQueueView, self.runner))
        self.assertTrue(verifyObject(IQueueControl, self.runner))

    @inlineCallbacks
    def test_token(self) -> Any:
        for token, scheme in [(None, b"Bearer"), (b"wrong", b"Bearer"), (TOKEN, b"Basic"),
                              (TOKEN[:-1], b"Bearer"), (TOKEN + b"x", b"Bearer")]:  # fmt: skip
            code, body = yield self.call("GET", "/api/v1/messages", token, scheme)
            self.assertEqual((code, body), (401, {"error": "a valid bearer token is needed"}))
        code, body = yield self.call("GET", "/api/v1/messages")
        self.assertEqual((code, body), (200, {"total": 0, "messages": []}))
        # The metrics and health pages are as before, without a token.
        response = yield self.agent.request(b"GET", (self.base + "/healthz").encode())
        self.assertEqual(response.code, 200)
        yield readBody(response)

    @inlineCallbacks
    def test_bodyBounded(self) -> Any:
        """
        A body past MAX_BODY, announced or chunked, gets 413 and a closed
        connection before the token is even looked at; nothing is stored.
        """
        import socket

        from twisted.internet.threads import deferToThread

        from mailgw.health import MAX_BODY

        port = int(self.base.rsplit(":", 1)[1])
        announced = (
            b"POST /api/v1/messages/X/hold HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        chunked = (
            b"POST /api/v1/messages/X/hold HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
            * (MAX_BODY // 0x4000 + 1)
        )

        def send(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                try:
                    s.sendall(request)
                    s.sendall(b"y" * MAX_BODY)  # more than it may read: never stored
                except OSError:
                    pass  # the server closed first
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
                return answer

        for request in (announced, chunked):
            answer = yield deferToThread(send, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:80])
        # A request without a body is served as before.
        code, body = yield self.call("GET", "/api/v1/messages")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_listAndShow(self) -> Any:
        first = self.submit(ALICE)
        second = self.submit(MALLORY, "mallory@example.org")
        code, body = yield self.call("GET", "/api/v1/messages")
        self.assertEqual(code, 200)
        self.assertEqual(body["total"], 2)
        self.assertEqual([m["queueId"] for m in body["messages"]], [first, second])
        shown = body["messages"][0]
        self.assertEqual(shown["sender"], "alice@example.org")
        self.assertEqual(shown["account"], "alice")
        self.assertEqual(shown["state"], "new")
        self.assertEqual(shown["recipients"][0]["address"], "bob@example.com")
        code, body = yield self.call("GET", "/api/v1/messages?account=MALLORY")
        self.assertEqual([m["queueId"] for m in body["messages"]], [second])
        code, body = yield self.call("GET", "/api/v1/messages?sender=alice@example.org")
        self.assertEqual([m["queueId"] for m in body["messages"]], [first])
        code, body = yield self.call("GET", "/api/v1/messages?limit=1")
        self.assertEqual((body["total"], len(body["messages"])), (2, 1))
        code, body = yield self.call("GET", f"/api/v1/messages/{second}")
        self.assertEqual((code, body["queueId"], body["account"]), (200, second, "mallory"))
        for path, status in [
            ("/api/v1/messages?state=lost", 400),
            ("/api/v1/messages?limit=0", 400),
            ("/api/v1/messages?colour=red", 400),
            ("/api/v1/messages/0000000000000000FFFF", 404),
            ("/api/v1/messages/..%2F..%2Fetc", 404),
            ("/api/v1/nothing", 404),
            ("/api/v2/messages", 404),
        ]:
            code, body = yield self.call("GET", path)
            self.assertEqual(code, status, path)
            self.assertEqual(list(body), ["error"])
            self.assertNotIn("Traceback", body["error"])

    @inlineCallbacks
    def test_readOnlyByDefault(self) -> Any:
        queueId = self.submit(ALICE)
        for method, path in [
            ("POST", f"/api/v1/messages/{queueId}/hold"),
            ("POST", f"/api/v1/messages/{queueId}/release"),
            ("POST", f"/api/v1/messages/{queueId}/flush"),
            ("DELETE", f"/api/v1/messages/{queueId}"),
        ]:
            code, body = yield self.call(method, path)
            self.assertEqual(code, 403, path)
            self.assertIn("read-only", body["error"])
        self.assertFalse(self.runner.lookup(queueId).held)
        self.assertEqual([m.queueId for m in self.runner.messages()], [queueId])

    @inlineCallbacks
    def test_holdReleaseFlushDelete(self) -> Any:
        self.api.allowChanges = True
        self.relay.script[str(BOB)] = [transient()] * 3  # results are fixed when called
        queueId = self.submit(ALICE)
        code, body = yield self.call("POST", f"/api/v1/messages/{queueId}/hold")
        self.assertEqual((code, body), (200, {"ok": True, "action": "hold", "queueId": queueId}))
        self.assertTrue(self.runner.lookup(queueId).held)
        self.assertTrue(self.spool.load(queueId).held)  # on disk (in the spool) too
        code, body = yield self.call("GET", "/api/v1/messages?state=held")
        self.assertEqual([m["queueId"] for m in body["messages"]], [queueId])
        code, body = yield self.call("POST", f"/api/v1/messages/{queueId}/release")
        self.assertEqual(code, 200)
        self.assertFalse(self.runner.lookup(queueId).held)
        code, body = yield self.call("POST", f"/api/v1/messages/{queueId}/flush")
        self.assertEqual((code, body["count"]), (200, 1))
        code, body = yield self.call("GET", f"/api/v1/messages/{queueId}/hold")
        self.assertEqual(code, 405)
        code, body = yield self.call("POST", "/api/v1/messages/0000000000000000FFFF/hold")
        self.assertEqual(code, 404)
        # In flight (the flush): deleted once its attempt ends.
        code, body = yield self.call("DELETE", f"/api/v1/messages/{queueId}")
        self.assertEqual((code, body["action"]), (200, "delete"))
        self.relay.releaseAll()
        self.assertEqual(self.runner.messages(), [])
        code, body = yield self.call("GET", f"/api/v1/messages/{queueId}")
        self.assertEqual(code, 404)

    @inlineCallbacks
    def test_account(self) -> Any:
        self.relay.script[str(BOB)] = [transient()]
        self.submit(ALICE)
        self.quota.record("alice", 1)
        self.api.accountSections["breaker"] = lambda name: {"state": "armed", "for": name}
        code, body = yield self.call("GET", "/api/v1/accounts/Alice")
        self.assertEqual(code, 200)
        self.assertEqual(body["account"], "Alice")
        self.assertEqual((body["queued"], body["held"]), (1, 0))
        self.assertEqual(body["quota"]["messages"], 1)
        self.assertEqual(body["quota"]["messagesLimit"], 50)
        self.assertEqual(body["breaker"], {"state": "armed", "for": "Alice"})
        code, body = yield self.call("GET", "/api/v1/accounts/nobody%40example.org")
        self.assertEqual((code, body["queued"], body["account"]), (200, 0, "nobody@example.org"))


class ApiConfigTests(unittest.TestCase):
    def test_needsMetricsListener(self) -> None:
        with self.assertRaises(ConfigError) as e:
            configFromDict({"api": {"token_file": "/x"}})
        self.assertEqual(e.exception.key, "api.token_file")

    def test_makeApi(self) -> None:
        path = self.mktemp()
        metrics = {"listen": "tcp:0:interface=127.0.0.1"}
        self.assertIsNone(makeApi(configFromDict({"metrics": metrics}), None))
        config = configFromDict({"metrics": metrics, "api": {"token_file": path}})
        with self.assertRaises(ConfigError):
            makeApi(config, None)  # no such file
        with open(path, "w") as f:
            f.write("short\n")
        os.chmod(path, 0o600)
        with self.assertRaises(ConfigError) as e:
            makeApi(config, None)
        self.assertIn(str(MIN_TOKEN), str(e.exception))
        self.assertNotIn("short", str(e.exception).replace(path, ""))
        with open(path, "w") as f:
            f.write(TOKEN.decode() + "\n")
        api = makeApi(config, None)
        assert api is not None
        self.assertEqual((api.token, api.allowChanges), (TOKEN, False))


class ApiCheckConfigTests(unittest.SynchronousTestCase):
    """``mailgw check-config`` reads the token and the webhook secret as a start would."""

    from tests.test_checkcli import CheckConfigTests as _Check

    setUp = _Check.setUp
    run_ = _Check.run_
    extraArgs: list[str] = []
    EXTRA = """
[metrics]
listen = "tcp:0:interface=127.0.0.1"
[api]
token_file = "{base}/token"
[webhooks]
urls = ["http://127.0.0.1:9/hook"]
secret_file = "{base}/hook"
"""

    def write(self, name: str, text: str, mode: int) -> None:
        path = self.base / name  # type: ignore[attr-defined]
        path.write_text(text)
        path.chmod(mode)

    def test_secrets(self) -> None:
        self.write("token", TOKEN.decode() + "\n", 0o640)
        self.write("hook", "hook-secret\n", 0o640)
        code, out, err = self.run_(self._Check.GOOD + self.EXTRA)
        self.assertEqual((code, err), (0, ""))
        self.write("token", "short\n", 0o600)
        self.write("hook", "hook-secret\n", 0o644)
        code, out, err = self.run_(self._Check.GOOD + self.EXTRA)
        self.assertEqual(code, 1)
        self.assertIn("api.token_file: ", err)
        self.assertNotIn("hook-secret", err)
        self.write("token", TOKEN.decode() + "\n", 0o600)
        code, out, err = self.run_(self._Check.GOOD + self.EXTRA)
        self.assertEqual(code, 1)
        self.assertIn("webhooks.secret_file: ", err)
        self.assertIn("must not be readable by others", err)
