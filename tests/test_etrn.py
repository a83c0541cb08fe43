"""
Tests for ETRN (RFC 1985, L{mailgw.server.etrn}) on a submission listener,
over a real L{QueueRunner} with a L{FakeRelay} (in memory), and for the
queue's L{flushDomain} that it and ``mailgw queue flush --domain`` use.
"""

from __future__ import annotations

import ipaddress
import json
import random

from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import QueueConfig
from mailgw.control import handleRequest
from mailgw.envelope import Address, Envelope, Session
from mailgw.queue.runner import QueueRunner
from mailgw.server.etrn import Etrn
from mailgw.testing import FakeRelay, transient
from tests.helpers import Harness

CONFIG = QueueConfig(retryMin=300, retryMax=3600, retryJitter=0, delayWarning=0)
SENDER = Address("alice", "example.com")
BODY = b"Subject: x\r\n\r\nhi\r\n"


class EtrnTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(implicitTLS=True)
        self.relay = FakeRelay()
        self.runner = QueueRunner(
            self.h.spool, self.relay, self.h.clock, CONFIG, "gw.example.org", rng=random.Random(1)
        )
        self.runner.startService()
        self.h.factory.etrn = Etrn(self.runner.flushDomain, self.runner.flush)

    def queue(self, *recipients: str) -> str:
        """A message the upstream deferred: due again only in 300 s."""
        addresses = tuple(Address(*r.split("@")) for r in recipients)
        for r in recipients:
            self.relay.script[r] = [transient("451 4.4.1 upstream down")]
        writer = self.runner.begin(Envelope(SENDER, addresses), Session("192.0.2.7"))
        writer.write(BODY)
        queueId: str = self.successResultOf(writer.commit())
        self.assertEqual(self.h.spool.load(queueId).nextAttempt, self.h.clock.seconds() + 300)
        return queueId

    def tries(self, queueId: str) -> int:
        return sum(1 for q, _ in self.relay.attempts if q == queueId)

    def test_advertised(self) -> None:
        self.assertIn(b"250-ETRN\r\n", self.h.command(b"EHLO client.test"))
        self.h.factory.etrn = None
        self.assertNotIn(b"ETRN", self.h.command(b"EHLO client.test"))
        self.assertTrue(self.h.command(b"ETRN example.net").startswith(b"502 "))

    def test_notAllowed(self) -> None:
        """Neither logged in nor in [etrn] networks: 459, nothing flushed."""
        queueId = self.queue("bob@example.net")
        self.h.command(b"EHLO client.test")
        reply = self.h.command(b"ETRN example.net")
        self.assertEqual(
            reply, b"459 4.7.1 Node example.net not allowed: authentication required\r\n"
        )
        self.assertEqual(self.tries(queueId), 1)

    def test_listedNetwork(self) -> None:
        """A client in [etrn] networks needs no login (the harness's peer is 192.0.2.7)."""
        self.h.factory.etrn = Etrn(
            self.runner.flushDomain, self.runner.flush, (ipaddress.ip_network("192.0.2.0/24"),)
        )
        queueId = self.queue("bob@example.net")
        self.h.command(b"EHLO client.test")
        reply = self.h.command(b"ETRN example.net")
        self.assertEqual(reply, b"250 2.0.0 Queuing for node example.net started (1 message)\r\n")
        self.assertEqual(self.tries(queueId), 2)

    def test_domainFlushed(self) -> None:
        """ETRN example.net: that domain's waiting mail is tried now, not the others'."""
        net = self.queue("bob@example.net")
        org = self.queue("carol@example.org")
        sub = self.queue("dave@mx.example.net")
        self.h.login()
        reply = self.h.command(b"ETRN example.net")
        self.assertEqual(reply, b"250 2.0.0 Queuing for node example.net started (1 message)\r\n")
        self.assertEqual((self.tries(net), self.tries(org), self.tries(sub)), (2, 1, 1))
        self.assertNotIn(net, self.h.spool.committed)  # delivered this time

    def test_subdomains(self) -> None:
        """ETRN @example.net: the domain and the domains under it."""
        net, sub = self.queue("bob@example.net"), self.queue("dave@mx.EXAMPLE.net")
        other = self.queue("eve@notexample.net")
        self.h.login()
        reply = self.h.command(b"ETRN @example.net")
        self.assertEqual(reply, b"250 2.0.0 Queuing for node @example.net started (2 messages)\r\n")
        self.assertEqual((self.tries(net), self.tries(sub), self.tries(other)), (2, 2, 1))

    def test_nothingWaiting(self) -> None:
        self.queue("bob@example.net")
        self.h.login()
        self.assertEqual(
            self.h.command(b"ETRN example.org"),
            b"251 2.0.0 No messages waiting for node example.org\r\n",
        )

    def test_alreadyBeingTried(self) -> None:
        """252: the domain's messages are being tried already (due again once that ends)."""
        self.relay.holdResults = True
        self.relay.script["bob@example.net"] = [transient()]
        writer = self.runner.begin(Envelope(SENDER, (Address("bob", "example.net"),)), Session("x"))
        writer.write(BODY)
        queueId = self.successResultOf(writer.commit())
        self.h.login()
        reply = self.h.command(b"ETRN example.net")
        self.assertTrue(reply.startswith(b"252 2.0.0 Pending messages for node example.net"), reply)
        self.relay.holdResults = False
        self.relay.releaseAll()
        self.assertEqual(self.tries(queueId), 2)  # tried again at once, not after backoff

    def test_held(self) -> None:
        """458: the domain's only messages are held by the operator."""
        queueId = self.queue("bob@example.net")
        self.successResultOf(self.runner.hold(queueId))
        self.h.login()
        reply = self.h.command(b"ETRN example.net")
        self.assertTrue(reply.startswith(b"458 4.3.0 Unable to queue messages for node"), reply)
        self.assertEqual(self.tries(queueId), 1)

    def test_queueId(self) -> None:
        """ETRN #ID: one message; an unknown queue is not allowed (459)."""
        queueId = self.queue("bob@example.net")
        self.h.login()
        reply = self.h.command(b"ETRN #" + queueId.encode())
        self.assertEqual(reply, f"250 2.0.0 Queuing for node #{queueId} started\r\n".encode())
        self.assertEqual(self.tries(queueId), 2)
        reply = self.h.command(b"ETRN #0000000000000000FFFF")
        self.assertEqual(
            reply, b"459 4.7.1 Node #0000000000000000FFFF not allowed: no such queue\r\n"
        )

    def test_syntax(self) -> None:
        self.h.login()
        for argument in (b"", b"exa mple.org", b"-bad-.org", b"#", b"#a/b", b"@"):
            reply = self.h.command(b"ETRN " + argument)
            self.assertTrue(reply.startswith(b"501 5.5.4 "), (argument, reply))

    def test_sequence(self) -> None:
        """ETRN needs EHLO, and is not allowed inside a mail transaction."""
        self.h.command(b"HELO client.test")
        self.assertTrue(self.h.command(b"ETRN example.net").startswith(b"503 "))
        self.h.login()
        self.h.command(b"MAIL FROM:<alice@example.com>")
        self.assertTrue(self.h.command(b"ETRN example.net").startswith(b"503 "))

    def test_countsAsJunk(self) -> None:
        """ETRN moves no mail of the session: a flood of them ends it as NOOPs do."""
        self.h.login()
        for _ in range(20):
            self.assertTrue(self.h.command(b"ETRN example.net").startswith(b"251 "))
        self.assertTrue(self.h.command(b"ETRN example.net").startswith(b"421 "))

    def test_controlFlushDomain(self) -> None:
        """The control socket's flush-domain (``mailgw queue flush --domain``)."""
        net, org = self.queue("bob@example.net"), self.queue("carol@example.org")
        line = json.dumps({"command": "flush-domain", "domain": "example.net"}).encode()
        answer = self.successResultOf(handleRequest(self.runner, line))
        self.assertEqual(answer, {"ok": True, "count": 1, "held": 0})
        self.assertEqual((self.tries(net), self.tries(org)), (2, 1))
        bad = json.dumps({"command": "flush-domain"}).encode()
        self.assertFalse(self.successResultOf(handleRequest(self.runner, bad))["ok"])
