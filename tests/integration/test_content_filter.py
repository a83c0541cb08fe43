"""
The content filter loop end to end, on real sockets: a client submits to
a real gateway, which hands the message to an amavis-like filter running
as its own process (tests/integration/amavislike.py); the filter adds a
header and reinjects on the reinjection listener; the gateway relays the
filtered copy to an in-process upstream. Also the refusals (a reinjection
client from a network not listed; a filter that answers 5xx, 4xx or
hangs) and ETRN (RFC 1985) over a real connection.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from mailgw.envelope import RecipientStatus
from tests.integration.support import (
    PASSWORD,
    USER,
    GatewayTestCase,
    clientContext,
    freePort,
    stopProcess,
)
from tests.upstream import startUpstream

FILTER_SCRIPT = Path(__file__).with_name("amavislike.py")
BODY = b"From: Alice <alice@example.com>\r\nSubject: filtered\r\n\r\nHello through the filter.\r\n"


class FilterLoopCase(GatewayTestCase):
    """A gateway with [filter] and [reinject], an upstream, and the filter process."""

    timeout = 90
    filterMode = "pass"
    protocol = "smtp"
    reinjectNetworks: list[str] | None = None
    replyTimeout: float = 5
    startAtOnce = True

    @inlineCallbacks
    def setUp(self) -> Any:
        self.lines: list[str] = []
        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.upstream = yield startUpstream(reactor)
        self.addCleanup(self.upstream.stop)
        self.filterPort = freePort()
        yield super().setUp()
        self.reinjectPort = self.service.ports[2].getHost().port
        if self.startAtOnce:
            yield self.startFilter()

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["relay"] = {"smarthosts": [f"localhost:{self.upstream.portNumber}"], "tls": "none"}
        data["queue"] = {"retry_min": 1, "retry_max": 2, "retry_jitter": 0}
        data["filter"] = {
            "content_filter": f"{self.protocol}:127.0.0.1:{self.filterPort}",
            "reply_timeout": self.replyTimeout,
        }
        data["reinject"] = {"listen": ["tcp:0:interface=127.0.0.1"]}
        if self.reinjectNetworks is not None:
            data["reinject"]["networks"] = self.reinjectNetworks
        return data

    @inlineCallbacks
    def startFilter(self) -> Any:
        ready = Path(self.mktemp())
        self.filterLog = Path(str(ready) + ".log")
        argv = [sys.executable, str(FILTER_SCRIPT), str(self.filterPort)]
        argv += [str(self.reinjectPort), self.filterMode, str(ready)]
        process = subprocess.Popen(argv)
        self.addCleanup(stopProcess, process)
        yield self.waitFor(ready.exists, "the filter to listen")

    @inlineCallbacks
    def waitFor(self, condition: Any, what: str, seconds: float = 30) -> Any:
        for _ in range(int(seconds * 10)):
            if condition():
                return
            yield deferLater(reactor, 0.1, lambda: None)
        self.fail(f"timed out waiting for {what}")

    def submit(self, recipients: list[str], body: bytes = BODY) -> Any:
        def send() -> Any:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                return smtp.sendmail(USER, recipients, body)

        return deferToThread(send)

    def logged(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


class LoopTests(FilterLoopCase):
    @inlineCallbacks
    def test_loop(self) -> Any:
        """
        submission -> filter -> reinjection -> upstream: the filtered copy
        arrives once, with the filter's header and both trace headers; the
        original and the copy are linked in the log both ways.
        """
        yield self.submit(["bob@example.net", "carol@example.org"])
        [received] = yield self.upstream.factory.waitForTransactions(1)
        yield self.waitFor(lambda: not self.spooled(), "an empty queue")
        # Everything is delivered and the queue is empty: nothing more can come.
        self.assertEqual(len(self.upstream.factory.transactions), 1)
        self.assertEqual(received.mailFrom, USER)
        self.assertEqual(sorted(received.rcpts), ["bob@example.net", "carol@example.org"])
        data = received.data
        self.assertTrue(data.startswith(b"Received: from localhost ([127.0.0.1])"), data[:200])
        self.assertIn(b"\r\nX-Virus-Scanned: amavislike at example.org\r\n", data)
        self.assertTrue(data.endswith(BODY), data)
        self.assertEqual(data.count(b"(mailgw) with"), 2)
        [accepted] = self.logged("accepted by the filter")
        original = accepted.split()[1].rstrip(":")
        reinjected = accepted.split("reinjected as ")[1].split()[0]
        self.assertIn(f"{self.protocol}:127.0.0.1:{self.filterPort}", accepted)
        self.assertEqual(
            self.logged(f"Queue {reinjected}: reinjected by the filter from 127.0.0.1"),
            [f"Queue {reinjected}: reinjected by the filter from 127.0.0.1, original {original}"],
        )
        self.assertIn(f"id {original}".encode(), data)
        self.assertIn(f"id {reinjected}".encode(), data)


class LMTPLoopTests(LoopTests):
    """The same loop with the filter spoken to in LMTP (RFC 2033)."""

    protocol = "lmtp"

    @inlineCallbacks
    def test_loop(self) -> Any:
        yield LoopTests.test_loop(self)
        [record] = [json.loads(line) for line in self.filterLog.read_text().splitlines()]
        self.assertTrue(record["lmtp"])


class NotListedNetworkTests(FilterLoopCase):
    reinjectNetworks = ["127.0.0.1/32"]

    @inlineCallbacks
    def test_otherNetworkRefused(self) -> Any:
        """A client bound to 127.0.0.2 gets 554 at the greeting; 127.0.0.1 is served."""

        def connect(source: str) -> Any:
            smtp = smtplib.SMTP(timeout=30, source_address=(source, 0))
            try:
                return smtp.connect("127.0.0.1", self.reinjectPort)
            except smtplib.SMTPConnectError as e:
                return (e.smtp_code, e.smtp_error)
            finally:
                smtp.close()

        code, text = yield deferToThread(connect, "127.0.0.2")
        self.assertEqual(
            (code, text), (554, b"5.7.1 Not allowed to reinject mail from this address")
        )
        code, _ = yield deferToThread(connect, "127.0.0.1")
        self.assertEqual(code, 220)


class RejectTests(FilterLoopCase):
    filterMode = "reject"

    @inlineCallbacks
    def test_bounced(self) -> Any:
        """5xx from the filter: the sender gets an RFC 3464 bounce quoting it."""
        yield self.submit(["bob@example.net"])
        [bounce] = yield self.upstream.factory.waitForTransactions(1)
        self.assertEqual((bounce.mailFrom, bounce.rcpts), ("", (USER,)))
        self.assertIn(b"554 5.7.0 Reject, id=00001-01 - SPAM", bounce.data)
        self.assertIn(b"message/delivery-status", bounce.data)
        yield self.waitFor(lambda: not self.spooled(), "an empty queue")


class FilterDownTests(FilterLoopCase):
    """No filter process at first: mail waits for it, then flows once it runs."""

    startAtOnce = False

    @inlineCallbacks
    def test_waitsThenFlows(self) -> Any:
        yield self.submit(["bob@example.net"])

        def triedTwice() -> bool:
            messages = self.spooled()
            return bool(messages) and messages[0].recipients[0].attempts >= 2

        yield self.waitFor(triedTwice, "two tries at a filter that is down")
        [message] = self.spooled()
        self.assertEqual(message.recipients[0].status, RecipientStatus.PENDING)
        self.assertEqual(message.envelope.contentFilter, f"smtp:127.0.0.1:{self.filterPort}")
        self.assertEqual(self.upstream.factory.transactions, [])
        yield self.startFilter()
        [received] = yield self.upstream.factory.waitForTransactions(1)
        self.assertIn(b"X-Virus-Scanned: amavislike", received.data)
        yield self.waitFor(lambda: not self.spooled(), "an empty queue")
        self.assertEqual(len(self.upstream.factory.transactions), 1)


class DeferTests(FilterLoopCase):
    filterMode = "defer"

    @inlineCallbacks
    def test_retried(self) -> Any:
        """4xx from the filter: the message waits, for the filter, and is retried."""
        yield self.submit(["bob@example.net"])

        def triedTwice() -> bool:
            messages = self.spooled()
            return bool(messages) and messages[0].recipients[0].attempts >= 2

        yield self.waitFor(triedTwice, "a second try at the filter")
        [message] = self.spooled()
        self.assertEqual(message.envelope.contentFilter, f"smtp:127.0.0.1:{self.filterPort}")
        state = message.recipients[0]
        self.assertEqual((state.status, state.code), (RecipientStatus.PENDING, 451))
        self.assertIn("virus_scan FAILED", state.diagnostic)
        self.assertEqual(self.upstream.factory.transactions, [])


class HangTests(FilterLoopCase):
    filterMode = "hang"
    replyTimeout = 2

    @inlineCallbacks
    def test_timeout(self) -> Any:
        """A filter that never answers the final dot: a timeout, transient, retried."""
        yield self.submit(["bob@example.net"])

        def tried() -> bool:
            messages = self.spooled()
            return bool(messages) and messages[0].recipients[0].attempts >= 1

        yield self.waitFor(tried, "the filter's timeout")
        [message] = self.spooled()
        state = message.recipients[0]
        self.assertEqual(state.status, RecipientStatus.PENDING)
        self.assertIn("timeout", state.diagnostic.lower())
        self.assertEqual(self.upstream.factory.transactions, [])


class EtrnTests(GatewayTestCase):
    """ETRN over a real connection: mail deferred by a down upstream goes out on demand."""

    timeout = 60
    extraConfig = {"etrn": {"enabled": True}}

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        self.upstreamPort = freePort()  # nothing listens there yet: the upstream is down
        data["relay"] = {"smarthosts": [f"localhost:{self.upstreamPort}"], "tls": "none"}
        # Retries far away: only ETRN can make the message go out during the test.
        data["queue"] = {"retry_min": 3600, "retry_max": 7200, "retry_jitter": 0}
        return data

    def session(self, *commands: str) -> Any:
        def talk() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.ehlo()
                assert smtp.has_extn("etrn"), smtp.esmtp_features
                answers = [smtp.docmd("ETRN", "example.net")]  # not logged in yet
                smtp.login(USER, PASSWORD)
                answers += [smtp.docmd(*command.split(" ", 1)) for command in commands]
                return answers

        return deferToThread(talk)

    @inlineCallbacks
    def test_flushDomain(self) -> Any:
        def send() -> Any:
            with smtplib.SMTP("localhost", self.submissionPort, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                return smtp.sendmail(USER, ["bob@example.net"], BODY)

        yield deferToThread(send)
        for _ in range(300):
            messages = self.spooled()
            if messages and messages[0].recipients[0].attempts >= 1:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        [message] = self.spooled()
        self.assertEqual(message.recipients[0].status, RecipientStatus.PENDING)
        upstream = yield startUpstream(reactor, port=self.upstreamPort)  # the upstream is back
        self.addCleanup(upstream.stop)
        answers = yield self.session("ETRN example.org", "ETRN example.net")
        self.assertEqual([code for code, _ in answers], [459, 251, 250])
        [received] = yield upstream.factory.waitForTransactions(1)
        self.assertEqual(received.rcpts, ("bob@example.net",))
