"""
DSN parameters through the gateway to a real Postfix (Debian's) as the
upstream: a client submits with RET, ENVID, NOTIFY and ORCPT; the gateway
relays to Postfix, which offers DSN, so the parameters travel on; Postfix
relays on to a recording upstream that offers DSN too, and the parameters
arrive there as the client gave them. The gateway sends no success report
of its own, Postfix having taken the request.
"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.integration.postfixserver import PostfixServer, unavailable
from tests.integration.support import PASSWORD, USER, GatewayTestCase, clientContext, freePort
from tests.upstream import startUpstream


class PostfixUpstreamDSNTests(GatewayTestCase):
    timeout = 120

    def setUp(self) -> Any:
        reason = unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.postfixPort = freePort()
        return super().setUp()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["relay"] = {"smarthosts": [f"127.0.0.1:{self.postfixPort}"], "tls": "none"}
        data["queue"] = {"retry_min": 1, "retry_max": 2, "retry_jitter": 0}
        return data

    @inlineCallbacks
    def test_parametersPassThrough(self) -> Any:
        upstream = yield startUpstream(reactor, dsn=True)
        self.addCleanup(upstream.stop)
        postfix = PostfixServer(self.postfixPort, upstream.portNumber)
        self.addCleanup(postfix.stop)
        postfix.start()
        ready = yield deferToThread(postfix.waitFor, postfix.listening, 30)
        self.assertTrue(ready, postfix.log())

        def submit() -> None:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                smtp.ehlo()
                assert smtp.has_extn("dsn")
                code, _ = smtp.mail(USER, ["RET=HDRS", "ENVID=QQ314159+2Bpf"])
                assert code == 250, code
                code, _ = smtp.rcpt(
                    "bob@example.org",
                    ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+2Btag@example.org"],
                )
                assert code == 250, code
                code, _ = smtp.rcpt("carol@example.org", ["NOTIFY=NEVER"])
                assert code == 250, code
                code, _ = smtp.data(b"Subject: dsn through postfix\r\n\r\nhello\r\n")
                assert code == 250, code

        yield deferToThread(submit)
        arrived = yield deferToThread(postfix.waitFor, lambda: bool(upstream.transactions), 60)
        self.assertTrue(arrived, postfix.log()[-3000:])
        [received] = upstream.transactions
        self.assertEqual(set(received.rcpts), {"bob@example.org", "carol@example.org"})
        # Postfix may add parameters of its own (SIZE, BODY); ours are there as given.
        self.assertIn("RET=HDRS", received.mailParams)
        self.assertIn("ENVID=QQ314159+2Bpf", received.mailParams)
        rcpts = {
            line.split(b">", 1)[0][len(b"RCPT TO:<") :]: line.split(b">", 1)[1].split()
            for line in upstream.commandLines()
            if line.startswith(b"RCPT TO:")
        }
        self.assertIn(b"NOTIFY=SUCCESS,FAILURE", rcpts[b"bob@example.org"])
        self.assertIn(b"ORCPT=rfc822;bob+2Btag@example.org", rcpts[b"bob@example.org"])
        self.assertIn(b"NOTIFY=NEVER", rcpts[b"carol@example.org"])
        # Postfix took the requests: the gateway owes no "relayed" report, and
        # the message leaves the spool once the relay's result is recorded.
        for _ in range(100):
            if not self.spooled():
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.spooled(), [])
        # One message reached Postfix from the gateway: no report followed it.
        self.assertEqual(postfix.log().count(": client=localhost[127.0.0.1]"), 1, postfix.log())
