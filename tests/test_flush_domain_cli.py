"""
Tests for ``mailgw queue flush --domain`` (as ETRN, RFC 1985), through a
real control socket to a control that records the call, and for the
``Stage`` the queue commands show for a message waiting for the filter.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw import cli
from mailgw.control import ControlService, defaultSocketPath
from mailgw.envelope import Envelope, Session
from mailgw.envelope import splitAddress as address
from mailgw.queue.operator import DomainFlush
from mailgw.queue.spool import Spool
from tests.test_control import FakeQueueControl
from tests.test_queuecli import resultOf, runNow

FILTER = "smtp:127.0.0.1:10024"


@attrs.define
class DomainControl(FakeQueueControl):
    domains: list[tuple[str, bool]] = attrs.field(factory=list)

    def flushDomain(self, domain: str, subdomains: bool = False) -> Deferred[DomainFlush]:
        self.domains.append((domain, subdomains))
        return succeed(DomainFlush(started=2, inFlight=1, held=1))


class FlushDomainTests(TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailgw-")  # a short socket path
        self.control = DomainControl()
        self.service = ControlService(defaultSocketPath(self.directory), self.control, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def mailgw(self, *argv: str) -> Deferred[int]:
        return deferToThread(cli.main, ["queue", *argv, "--spool", self.directory])

    @inlineCallbacks
    def test_domain(self) -> Any:
        self.assertEqual((yield self.mailgw("flush", "--domain", "example.net")), 0)
        self.assertEqual(self.control.domains, [("example.net", False)])
        self.assertEqual(
            self.stdout.getvalue(),
            "scheduled 3 messages for delivery (1 held message left alone)\n",
        )

    @inlineCallbacks
    def test_subdomains(self) -> Any:
        self.assertEqual((yield self.mailgw("flush", "--domain", "@example.net")), 0)
        self.assertEqual(self.control.domains, [("example.net", True)])

    @inlineCallbacks
    def test_notWithIds(self) -> Any:
        code = yield self.mailgw("flush", "0005F1A2B3C4D0000001", "--domain", "example.net")
        self.assertEqual(code, 1)
        self.assertIn("either queue ids or --domain", self.stderr.getvalue())
        self.assertEqual(self.control.domains, [])


class StageShownTests(SynchronousTestCase):
    """``mailgw queue list/show`` say which messages wait for the filter."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        spool = Spool(self.directory, Clock(), runNow)
        envelope = Envelope(address("alice@example.org"), (address("bob@example.com"),))
        marked = spool.begin(attrs.evolve(envelope, contentFilter=FILTER), Session("192.0.2.7"))
        marked.write(b"Subject: a\r\n\r\nx\r\n")
        self.marked = resultOf(marked.commit())
        plain = spool.begin(envelope, Session("127.0.0.1", listener="reinject"))
        plain.write(b"Subject: b\r\n\r\nx\r\n")
        self.plain = resultOf(plain.commit())
        spool.close()
        self.stdout = io.StringIO()
        self.patch(sys, "stdout", self.stdout)

    def mailgw(self, *argv: str) -> str:
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(cli.main(["queue", *argv, "--spool", self.directory]), 0)
        return self.stdout.getvalue()

    def test_list(self) -> None:
        lines = self.mailgw("list").splitlines()
        [marked] = [line for line in lines if line.startswith(self.marked)]
        [plain] = [line for line in lines if line.startswith(self.plain)]
        self.assertTrue(marked.endswith(f"waiting for the filter {FILTER}"), marked)
        self.assertNotIn("filter", plain)
        listed = {m["id"]: m for m in json.loads(self.mailgw("list", "--json"))}
        self.assertEqual(listed[self.marked]["contentFilter"], FILTER)
        self.assertIsNone(listed[self.plain]["contentFilter"])

    def test_show(self) -> None:
        self.assertIn(
            f"\nStage:         waiting for the filter {FILTER}\n", self.mailgw("show", self.marked)
        )
        self.assertNotIn("Stage:", self.mailgw("show", self.plain))
