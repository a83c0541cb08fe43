"""
The way in: a message accepted by the server is scheduled by its commit,
whatever the client does after the final dot (issue: mail stuck until a
restart when the client hung up at once).
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import QueueConfig
from mailgw.queue.runner import QueueRunner
from mailgw.testing import FakeRelay
from tests.helpers import USER, Harness


class IntakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = Harness()
        self.spool = self.harness.spool
        self.relay = FakeRelay()
        self.runner = QueueRunner(
            self.spool, self.relay, self.harness.clock, QueueConfig(), "mx.test"
        )
        self.runner.startService()
        self.harness.factory.spool = self.runner
        self.harness.login()

    def transaction(self) -> None:
        h = self.harness
        self.assertTrue(h.command(b"MAIL FROM:<" + USER + b">").startswith(b"250 "))
        self.assertTrue(h.command(b"RCPT TO:<bob@example.org>").startswith(b"250 "))
        self.assertTrue(h.command(b"DATA").startswith(b"354 "))

    def test_hangUpAtFinalDot(self) -> None:
        """
        A client that sends the final dot and QUIT and closes before the
        commit is done: the message, once committed, is relayed anyway.
        """
        self.spool.holdCommits = True
        self.transaction()
        self.harness.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.harness.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.relay.calls, [])
        [queueId] = self.spool.releaseCommits()
        self.assertEqual([c.queueIds for c in self.relay.calls], [[queueId]])
        self.assertEqual(self.spool.committed, {})  # delivered and removed

    def test_queuedAndRelayed(self) -> None:
        """The usual case: 250 with the id the relay is then given."""
        self.transaction()
        reply = self.harness.command(b"Subject: x\r\n\r\nbody\r\n.")
        self.assertTrue(reply.startswith(b"250 2.0.0 "), reply)
        [call] = self.relay.calls
        self.assertIn(call.queueIds[0].encode(), reply)
