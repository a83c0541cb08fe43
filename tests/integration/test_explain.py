"""
``mailgw explain`` against a real gateway's JSON log: real submissions with
smtplib over STARTTLS and AUTH PLAIN to a gateway on 127.0.0.1 that logs in
the JSON format (the observer ``twistd mailgw --log-format json`` installs),
relaying to two fake upstreams, the first of which refuses (451) and the
second accepts; then the trace of the message and of the client's session.
"""

from __future__ import annotations

import contextlib
import io
import json
import smtplib
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from mailgw import logs
from mailgw.cli.app import main
from mailgw.webhooks import verify
from tests.integration.support import PASSWORD, USER, GatewayTestCase, clientContext
from tests.test_webhooks import SECRET, Receiver
from tests.upstream import startUpstream

TOKEN = b"an-api-token-for-the-tests"


class ExplainTests(GatewayTestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.refusing = yield startUpstream(reactor, mailReply="451 4.3.0 try later")
        self.addCleanup(self.refusing.stop)
        self.accepting = yield startUpstream(reactor)
        self.addCleanup(self.accepting.stop)
        self.receiver = Receiver()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(self.receiver)
        )
        self.addCleanup(port.stopListening)
        self.hookURL = f"http://127.0.0.1:{port.getHost().port}/hook"
        self.logPath = Path(self.mktemp())
        self.logPath.parent.mkdir(parents=True, exist_ok=True)
        logFile = logs.ReopeningFile(str(self.logPath))
        self.addCleanup(logFile.close)
        observer = logs.makeObserver("json", logFile)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        yield super().setUp()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["relay"] = {
            "smarthosts": [
                f"127.0.0.1:{self.refusing.portNumber}",
                f"127.0.0.1:{self.accepting.portNumber}",
            ],
            "tls": "none",
        }
        secrets = self.base / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        (secrets / "hook").write_bytes(SECRET + b"\n")
        (secrets / "token").write_bytes(TOKEN + b"\n")
        for name in ("hook", "token"):
            (secrets / name).chmod(0o600)
        data["webhooks"] = {"urls": [self.hookURL], "secret_file": str(secrets / "hook")}
        data["metrics"] = {"listen": "tcp:0:interface=127.0.0.1"}
        data["api"] = {"token_file": str(secrets / "token")}
        return data

    def submit(self) -> str:
        with smtplib.SMTP("localhost", self.submissionPort, timeout=30) as smtp:
            smtp.starttls(context=clientContext(self.files["cert"]))
            smtp.ehlo()
            smtp.esmtp_features["auth"] = "PLAIN"
            smtp.login(USER, PASSWORD)
            smtp.mail(USER)
            smtp.rcpt("bob@example.org")
            code, reply = smtp.data(b"Subject: explain me\r\n\r\nbody\r\n")
            assert code == 250, (code, reply)
            return reply.decode().rsplit(" ", 1)[-1]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logPath.read_text().splitlines()]

    @inlineCallbacks
    def waitForLog(self, predicate: Any) -> Any:
        for _ in range(400):
            if any(predicate(e) for e in self.events()):
                return
            d: Deferred[None] = Deferred()
            reactor.callLater(0.05, d.callback, None)
            yield d
        self.fail("the log never had the line looked for")

    def explain(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["explain", *argv, "--log", str(self.logPath)])
        return code, out.getvalue()

    @inlineCallbacks
    def test_messageAndSession(self) -> Any:
        queueId = yield deferToThread(self.submit)
        yield self.accepting.waitForTransactions(1)
        yield self.waitForLog(lambda e: e.get("queueId") == queueId and e.get("status") == "sent")
        yield self.waitForLog(lambda e: str(e.get("text", "")).startswith("disconnect from"))

        code, text = self.explain(queueId, "--json")
        self.assertEqual(code, 0, text)
        trace = json.loads(text)
        received = trace["received"]
        self.assertEqual(received["listener"], "submission")
        self.assertRegex(received["tls"], r"^TLSv1\.[23]/\S+")
        self.assertEqual(received["user"], USER)
        self.assertEqual(received["login"]["mech"], "PLAIN")
        self.assertEqual(received["login"]["backend"], "PasswdChecker")
        self.assertEqual(received["policy"], "SenderLoginPolicy")
        self.assertEqual(received["recipients"], ["bob@example.org"])
        first, second = trace["attempts"]
        self.assertIn(f":{self.refusing.portNumber}", first["relay"])
        self.assertEqual((first["status"], first["reply"][:14]), ("deferred", "451 4.3.0 try "))
        self.assertIn(f":{self.accepting.portNumber}", second["relay"])
        self.assertEqual(second["status"], "sent")
        self.assertTrue(second["reply"].startswith("250"), second["reply"])
        for attempt in (first, second):
            self.assertEqual(attempt["route"], trace["attempts"][0]["route"])
            self.assertIn(f"127.0.0.1:{self.accepting.portNumber}", attempt["route"])
        session = trace["session"]
        self.assertEqual((session["client"], session["outcome"]), ("127.0.0.1", "quit"))

        code, text = self.explain(queueId)
        self.assertEqual(code, 0, text)
        for words in [
            f"Message {queueId}",
            "listener    submission (client 127.0.0.1)",
            f"login       {USER} with PLAIN, backend PasswdChecker",
            f"sender      <{USER}> allowed by SenderLoginPolicy",
            "<bob@example.org> deferred: route smarthosts",
            "reply: 451 4.3.0 try later",
            "<bob@example.org> sent: route smarthosts",
        ]:
            self.assertIn(words, text)

        code, text = self.explain("--session", "127.0.0.1")
        self.assertEqual(code, 0, text)
        self.assertIn(f"Session {session['session']}", text)
        self.assertIn(f"AUTH ok: {USER} with PLAIN", text)
        self.assertIn(f"Message {queueId}", text)

    @inlineCallbacks
    def test_webhookAndApi(self) -> Any:
        """The gateway sends the webhooks and serves the API it is configured for."""
        queueId = yield deferToThread(self.submit)
        yield self.receiver.whenReceived(1)
        body, headers = self.receiver.received[0]
        self.assertTrue(verify(SECRET, body, headers[b"x-mailgw-signature"].decode()))
        event = json.loads(body)
        self.assertEqual((event["event"], event["data"]["queueId"]), ("message.delivered", queueId))
        self.assertEqual(event["data"]["account"], USER)
        assert self.service.metricsService is not None
        port = yield self.service.metricsService.whenListening()
        url = f"http://127.0.0.1:{port.getHost().port}/api/v1/accounts/{USER}"
        agent = Agent(reactor)
        response = yield agent.request(b"GET", url.encode())
        self.assertEqual(response.code, 401)
        yield readBody(response)
        headers = Headers({b"authorization": [b"Bearer " + TOKEN]})
        response = yield agent.request(b"GET", url.encode(), headers)
        account = json.loads((yield readBody(response)))
        self.assertEqual((response.code, account["quota"]["messages"]), (200, 1))

    @inlineCallbacks
    def test_unknown(self) -> Any:
        yield deferToThread(self.submit)
        code, text = self.explain("0000000000000000FFFF")
        self.assertEqual(code, 1)
        self.assertIn("no event of 0000000000000000FFFF", text)
        code, text = self.explain("--session", "192.0.2.1")
        self.assertEqual(code, 1)
        code, text = self.explain("not-a-queue-id")
        self.assertEqual(code, 1)
