"""
The metrics listener as an operator uses it: a gateway on real sockets,
``/metrics`` scraped with an HTTP client before and after mail is submitted
with smtplib, and ``/healthz`` answering 200 or 503 with the reason.
"""

from __future__ import annotations

import os
import smtplib
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.integration.support import PASSWORD, USER, GatewayTestCase, clientContext


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsEndpointTests(GatewayTestCase):
    extraConfig = {"metrics": {"listen": "tcp:0:interface=127.0.0.1"}}

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        assert self.service.metricsService is not None
        port = yield self.service.metricsService.whenListening()
        self.base_url = f"http://127.0.0.1:{port.getHost().port}"

    def scrape(self) -> Any:
        d = deferToThread(fetch, self.base_url + "/metrics")
        return d.addCallback(lambda answer: (answer[0], samples(answer[1])))

    def submit(self, port: int, implicit: bool = False) -> None:
        context = clientContext(self.files["cert"])
        if implicit:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL("localhost", port, timeout=30, context=context)
        else:
            smtp = smtplib.SMTP("localhost", port, timeout=30)
        with smtp:
            if not implicit:
                smtp.starttls(context=context)
            smtp.ehlo()
            # One mechanism: smtplib would otherwise try each in turn.
            smtp.esmtp_features["auth"] = "PLAIN"
            try:
                smtp.login(USER, "wrong password")
            except smtplib.SMTPAuthenticationError:
                pass
            smtp.login(USER, PASSWORD)
            smtp.sendmail(USER, ["bob@example.org"], b"Subject: m\r\n\r\nhello\r\n")

    @inlineCallbacks
    def test_countersMove(self) -> Any:
        status, before = yield self.scrape()
        self.assertEqual(status, 200)
        accepted = ("mailgw_messages_accepted_total", ())
        self.assertEqual(before[accepted], 0)
        self.assertEqual(before[("mailgw_queue_messages", ())], 0)

        yield deferToThread(self.submit, self.submissionPort)
        yield deferToThread(self.submit, self.submissionsPort, True)

        status, after = yield self.scrape()
        self.assertEqual(status, 200)
        self.assertEqual(after[accepted], 2)
        self.assertGreater(after[("mailgw_accepted_bytes_total", ())], 2 * len("hello\r\n"))
        self.assertEqual(after[("mailgw_spool_commit_seconds_count", ())], 2)
        for listener in ("submission", "submissions"):
            key = ("mailgw_connections_total", (("listener", listener), ("outcome", "quit")))
            self.assertEqual(after.get(key), 1, listener)
        for result in ("success", "failure"):
            key = ("mailgw_auth_attempts_total", (("mechanism", "PLAIN"), ("result", result)))
            self.assertEqual(after.get(key), 2, result)
        handshakes = sum(
            value for (name, _), value in after.items() if name == "mailgw_tls_handshakes_total"
        )
        self.assertEqual(handshakes, 2)
        # No relay is configured: both messages wait in the queue.
        self.assertEqual(after[("mailgw_queue_messages", ())], 2)

    @inlineCallbacks
    def test_healthy(self) -> Any:
        status, text = yield deferToThread(fetch, self.base_url + "/healthz")
        self.assertEqual((status, text), (200, "ok\n"))

    @inlineCallbacks
    def test_spoolNotWritable(self) -> Any:
        if os.geteuid() == 0:
            # root writes anyway; take the directory away instead.
            tmp = os.path.join(self.files["spool"], "tmp")
            os.rename(tmp, tmp + ".away")
            self.addCleanup(os.rename, tmp + ".away", tmp)
        else:
            queue = os.path.join(self.files["spool"], "queue")
            os.chmod(queue, 0o500)
            self.addCleanup(os.chmod, queue, 0o700)
        status, text = yield deferToThread(fetch, self.base_url + "/healthz")
        self.assertEqual(status, 503)
        self.assertIn("spool:", text)

    @inlineCallbacks
    def test_runnerStopped(self) -> Any:
        yield self.service.runner.stopService()
        status, text = yield deferToThread(fetch, self.base_url + "/healthz")
        self.assertEqual((status, text), (503, "queue runner: not running\n"))

    @inlineCallbacks
    def test_listenerDown(self) -> Any:
        port = self.service.ports.pop()
        yield port.stopListening()
        status, text = yield deferToThread(fetch, self.base_url + "/healthz")
        self.assertEqual((status, text), (503, "listeners: 1 of 2 listening\n"))


class MetricsOffTests(GatewayTestCase):
    def test_offByDefault(self) -> None:
        """No [metrics] listen: no metrics object anywhere, nothing listens."""
        self.assertIsNone(self.service.metrics)
        self.assertIsNone(self.service.metricsService)
        self.assertEqual({f.metrics for f in self.service.factories}, {None})
        self.assertIsNone(self.service.runner.metrics)
