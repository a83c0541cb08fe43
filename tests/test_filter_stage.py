"""
Tests for L{mailgw.filter.stage} and L{mailgw.filter.reinject}: the content
filter as a queue stage, in memory (L{MemorySpool}, two L{FakeRelay}s: the
filter and the routes, L{Clock}), and the reinjection intake's link between
the original and the reinjected message.
"""

from __future__ import annotations

import random
import re

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.config import QueueConfig
from mailgw.envelope import Address, Envelope, QueuedMessage, Session
from mailgw.filter.reinject import ReinjectIntake, originalId
from mailgw.filter.stage import FilterIntake, FilterStage, reinjectedId
from mailgw.interfaces import IQueue, IRelay
from mailgw.queue.runner import QueueRunner
from mailgw.server.received import receivedHeader
from mailgw.testing import FakeRelay, MemorySpool, permanent, success, transient

SENDER = Address("alice", "example.org")
BOB = Address("bob", "example.com")
SESSION = Session("192.0.2.7", user="alice", listener="submission")
BODY = b"Subject: Lunch\r\nFrom: Alice <alice@example.org>\r\n\r\nBODY TEXT\r\n"
START = 1_700_000_000.0
CONFIG = QueueConfig(retryMin=300, retryMax=3600, retryJitter=0, delayWarning=0)
FILTER = "smtp:127.0.0.1:10024"
AMAVIS_OK = (
    "250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as 0005F1A2B3C4D0000009"
)


class FilterStageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = MemorySpool(self.clock)
        self.routes = FakeRelay()
        self.filter = FakeRelay(default=success(AMAVIS_OK, remote="127.0.0.1"))
        self.stage = FilterStage(
            self.routes,
            self.filter,
            FILTER,
            holdReplies=[re.compile("quarantin", re.IGNORECASE)],
            hold=lambda queueId, why: self.runner.hold(queueId, why),
        )
        self.runner = QueueRunner(
            self.spool, self.stage, self.clock, CONFIG, "gw.example.org", rng=random.Random(1)
        )
        self.runner.startService()
        self.intake = FilterIntake(self.runner, FILTER)

    def submit(self, queue: IQueue | None = None, session: Session = SESSION) -> str:
        writer = (queue or self.intake).begin(Envelope(SENDER, (BOB,)), session)
        writer.write(BODY)
        return self.successResultOf(writer.commit())  # type: ignore[no-any-return]

    def stored(self, queueId: str) -> QueuedMessage:
        return self.spool.load(queueId)  # type: ignore[no-any-return]

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IRelay, self.stage))
        self.assertTrue(verifyObject(IQueue, self.intake))
        self.assertTrue(verifyObject(IQueue, ReinjectIntake(self.runner)))

    def test_markedWhenQueued(self) -> None:
        """The mark is in the state committed with the message, and survives a restart."""
        self.filter.holdResults = True
        queueId = self.submit()
        message = self.stored(queueId)
        self.assertEqual(message.envelope.contentFilter, FILTER)
        again = QueuedMessage.fromJSON(message.toJSON())
        self.assertEqual(again.envelope.contentFilter, FILTER)
        self.assertEqual(again.envelope.extra, {})

    def test_unmarkedRecordUnchanged(self) -> None:
        """Without a filter the stored envelope has no new key (older gateways read it)."""
        self.assertNotIn("contentFilter", Envelope(SENDER, (BOB,)).toJSON())

    def test_acceptedByTheFilterIsDone(self) -> None:
        """The filter took it: the original leaves the queue, no route is tried."""
        with capturedLogs() as events:
            queueId = self.submit()
        self.assertEqual(self.filter.attempts, [(queueId, str(BOB))])
        self.assertEqual(self.routes.attempts, [])
        self.assertNotIn(queueId, self.spool.committed)
        lines = [formatEvent(e) for e in events]
        self.assertIn(
            f"Queue {queueId}: accepted by the filter {FILTER}, reinjected as "
            f"0005F1A2B3C4D0000009 ({AMAVIS_OK})",
            lines,
        )

    def test_refusedByTheFilterBounces(self) -> None:
        """5xx from the filter: an RFC 3464 bounce to the sender, naming the reply."""
        self.filter.script[str(BOB)] = [permanent("554 5.7.0 Reject, id=1234 - spam", "127.0.0.1")]
        queueId = self.submit()
        self.assertNotIn(queueId, self.spool.committed)
        bounces = [w for w in self.spool.writers if w.envelope.sender is None]
        self.assertEqual(len(bounces), 1)
        self.assertEqual(bounces[0].envelope.recipients, (SENDER,))
        self.assertIn(b"554 5.7.0 Reject, id=1234 - spam", bytes(bounces[0].data))
        # The bounce itself is not filtered: it goes to the routes.
        self.assertEqual(self.routes.attempts, [(bounces[0].queueId, str(SENDER))])

    def test_deferredByTheFilterWaits(self) -> None:
        """4xx (or no connection): still queued, for the filter, retried after backoff."""
        self.filter.script[str(BOB)] = [transient("451 4.5.0 Error in processing", "127.0.0.1")]
        queueId = self.submit()
        message = self.stored(queueId)
        self.assertEqual(message.envelope.contentFilter, FILTER)
        self.assertEqual(len(message.pendingRecipients), 1)
        self.assertEqual(message.recipients[0].code, 451)
        self.assertEqual(message.nextAttempt, START + 300)
        self.clock.advance(299)
        self.assertEqual(len(self.filter.attempts), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.filter.attempts), 2)
        self.assertNotIn(queueId, self.spool.committed)
        self.assertEqual(self.routes.attempts, [])

    def test_holdReply(self) -> None:
        """A refusal matching hold_replies holds the message until released."""
        self.filter.script[str(BOB)] = [transient("450 4.7.1 quarantined: virus", "127.0.0.1")]
        with capturedLogs() as events:
            queueId = self.submit()
        self.assertTrue(self.stored(queueId).held)
        self.clock.advance(86400)
        self.assertEqual(len(self.filter.attempts), 1)
        self.assertIn(
            f"Queue {queueId}: held by the filter {FILTER} (450 4.7.1 quarantined: virus)",
            [formatEvent(e) for e in events],
        )
        self.successResultOf(self.runner.release(queueId))
        self.assertEqual(len(self.filter.attempts), 2)
        self.assertNotIn(queueId, self.spool.committed)

    def test_permanentHoldReply(self) -> None:
        """A 5xx matching hold_replies holds instead of bouncing."""
        self.filter.script[str(BOB)] = [permanent("550 5.7.1 quarantined", "127.0.0.1")]
        queueId = self.submit()
        self.assertFalse([w for w in self.spool.writers if w.envelope.sender is None])
        # The recipient is refused for good; held, the message stays for the operator.
        self.assertTrue(self.stored(queueId).held)

    def test_unmarkedGoToRoutes(self) -> None:
        """A message from the reinjection listener goes to the routes directly."""
        reinject = Session("127.0.0.1", listener="reinject")
        queueId = self.submit(ReinjectIntake(self.runner), reinject)
        self.assertEqual(self.routes.attempts, [(queueId, str(BOB))])
        self.assertEqual(self.filter.attempts, [])

    def test_reinjectNeverFiltered(self) -> None:
        """A mark given to the reinjection intake is dropped: never filtered twice."""
        queue = ReinjectIntake(FilterIntake(self.runner, FILTER))
        # FilterIntake inside would mark; the reinjection intake is the outer one here,
        # so check the envelope it hands on instead.
        writer = ReinjectIntake(self.runner).begin(
            Envelope(SENDER, (BOB,), contentFilter=FILTER), Session("127.0.0.1")
        )
        writer.write(BODY)
        queueId = self.successResultOf(writer.commit())
        self.assertEqual(self.routes.attempts, [(queueId, str(BOB))])
        self.assertIsNotNone(queue)

    def test_mixedBatch(self) -> None:
        """One runner batch with both kinds: each goes its way, each is reported."""
        self.filter.holdResults = self.routes.holdResults = True
        marked = self.submit()
        plain = self.submit(ReinjectIntake(self.runner), Session("127.0.0.1", listener="reinject"))
        self.filter.releaseAll()
        self.routes.releaseAll()
        self.assertNotIn(marked, self.spool.committed)
        self.assertNotIn(plain, self.spool.committed)
        self.assertEqual([a[0] for a in self.filter.attempts], [marked])
        self.assertEqual([a[0] for a in self.routes.attempts], [plain])


class LinkTests(SynchronousTestCase):
    def test_reinjectedId(self) -> None:
        self.assertEqual(reinjectedId(AMAVIS_OK), "0005F1A2B3C4D0000009")
        self.assertIsNone(reinjectedId("250 2.0.0 Ok, discarded, id=00000-01 - spam"))

    def test_originalId(self) -> None:
        """The first of our Received: headers that is not the message's own."""
        session = Session("127.0.0.1", helo="localhost")
        envelope = Envelope(SENDER, (BOB,))
        own = receivedHeader(session, envelope, "gw.example.org", "0000000000000000000B", START)
        first = receivedHeader(
            Session("192.0.2.7", helo="pc", user="alice", tlsProtocol="TLSv1.3"),
            envelope,
            "gw.example.org",
            "0000000000000000000A",
            START,
        )
        amavis = b"Received: from gw.example.org ([127.0.0.1])\r\n\tby localhost (amavis) id x\r\n"
        head = own + b"X-Virus-Scanned: ok\r\n" + amavis + first + BODY
        self.assertEqual(originalId(head, "0000000000000000000B"), "0000000000000000000A")
        self.assertIsNone(originalId(own + BODY, "0000000000000000000B"))

    def test_reinjectionLogsTheLink(self) -> None:
        clock = Clock()
        spool = MemorySpool(clock)
        runner = QueueRunner(spool, FakeRelay(), clock, CONFIG, "gw.example.org")
        writer = ReinjectIntake(runner).begin(Envelope(SENDER, (BOB,)), Session("127.0.0.1"))
        first = receivedHeader(
            Session("192.0.2.7", user="alice"),
            Envelope(SENDER, (BOB,)),
            "gw.example.org",
            "0005F1A2B3C4D0000001",
            START,
        )
        own = receivedHeader(
            Session("127.0.0.1"), Envelope(SENDER, (BOB,)), "gw", writer.queueId, START
        )
        with capturedLogs() as events:
            writer.write(own)
            writer.write(first + BODY)
            queueId = self.successResultOf(writer.commit())
        self.assertIn(
            f"Queue {queueId}: reinjected by the filter from 127.0.0.1, "
            "original 0005F1A2B3C4D0000001",
            [formatEvent(e) for e in events],
        )
