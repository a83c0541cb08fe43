"""
Reports and the DSN requests (RFC 3461, RFC 3464): which reports the
queue sends for NOTIFY, what RET returns, ENVID and ORCPT in the report,
the "relayed" success report, and REQUIRETLS messages' bounces. Reports
are read back with the standard library's email parser.
"""

from __future__ import annotations

import email
import email.policy
import io
from email.message import EmailMessage
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import QueueConfig
from mailgw.dsnparams import NO_DSN, Notify, RecipientDSN, Ret
from mailgw.envelope import (
    Address,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
)
from mailgw.queue import dsn
from mailgw.queue.runner import RECORD_RETRY, QueueRunner
from mailgw.testing import FakeRelay, MemorySpool, permanent, success, transient

SENDER = Address("alice", "example.org")
BOB = Address("bob", "example.com")
CAROL = Address("carol", "example.net")
DAVE = Address("dave", "example.net")
SESSION = Session("192.0.2.7", user="alice")
BODY = b"Subject: Lunch\r\nFrom: Alice <alice@example.org>\r\n\r\nSECRET BODY TEXT\r\n"
START = 1_700_000_000.0
HOUR = 3600.0
CONFIG = QueueConfig(
    retryMin=300, retryMax=3600, retryJitter=0, maxLifetime=5 * 86400, delayWarning=4 * HOUR
)
S, F, D, N = Notify.SUCCESS, Notify.FAILURE, Notify.DELAY, Notify.NEVER


def notify(*events: Notify, orcpt: tuple[str, str] | None = None) -> RecipientDSN:
    return RecipientDSN(frozenset(events) if events else None, orcpt)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def checkReport(case: SynchronousTestCase, data: bytes) -> tuple[EmailMessage, list[Any]]:
    """
    The report is an RFC 3464 multipart/report: three parts, the second a
    message/delivery-status of a per-message block and per-recipient blocks;
    no parser defects. Returns the message and the status blocks.
    """
    message = parse(data)
    case.assertEqual(message.get_content_type(), "multipart/report")
    case.assertEqual(message.get_param("report-type"), "delivery-status")
    parts = list(message.iter_parts())
    case.assertEqual(len(parts), 3)
    case.assertEqual(parts[0].get_content_type(), "text/plain")
    case.assertEqual(parts[1].get_content_type(), "message/delivery-status")
    for part in message.walk():
        case.assertEqual(part.defects, [])
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    case.assertIsNotNone(blocks[0]["Reporting-MTA"])
    for block in blocks[1:]:
        # RFC 3464 2.3: every per-recipient block has these three.
        for name in ("Final-Recipient", "Action", "Status"):
            case.assertIsNotNone(block[name], name)
    return message, blocks


def queued(*states: RecipientState, **envelope: Any) -> QueuedMessage:
    return QueuedMessage(
        queueId="4Fq9sX",
        envelope=Envelope(SENDER, tuple(s.address for s in states), **envelope),
        session=SESSION,
        arrival=START,
        size=len(BODY),
        recipients=states,
    )


BOUNCED = RecipientState(
    BOB, RecipientStatus.BOUNCED, 1, START + 60, 550, "5.1.1", "no such user", "mx.example.com"
)
DELIVERED = RecipientState(
    CAROL, RecipientStatus.DELIVERED, 1, START + 60, 250, "2.0.0", "Ok: queued", "mx.example.net"
)


class BuildTests(SynchronousTestCase):
    def bounce(self, message: QueuedMessage, original: bytes = BODY) -> tuple[EmailMessage, Any]:
        _, data = dsn.buildBounce(message, io.BytesIO(original), "mail.example.org", START)
        return checkReport(self, data)

    def test_fullMessageByDefault(self) -> None:
        """No RET, or RET=FULL: the whole message comes back, as message/rfc822."""
        for ret in (None, Ret.FULL):
            message, _ = self.bounce(queued(BOUNCED, ret=ret))
            returned = list(message.iter_parts())[2]
            self.assertEqual(returned.get_content_type(), "message/rfc822")
            [inner] = returned.get_payload()  # type: ignore[misc]
            self.assertEqual(inner["Subject"], "Lunch")
            self.assertEqual(inner.get_content().rstrip(), "SECRET BODY TEXT")
            text = list(message.iter_parts())[0].get_content()
            self.assertIn("your message is attached", text)

    def test_headersOnlyWithHDRS(self) -> None:
        message, _ = self.bounce(queued(BOUNCED, ret=Ret.HDRS))
        returned = list(message.iter_parts())[2]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertNotIn("SECRET BODY", message.as_string())
        self.assertIn("Subject: Lunch", returned.get_content())

    def test_tooBigForTheCapHeadersOnly(self) -> None:
        """A message over the cap comes back as its headers, whatever RET says."""
        big = BODY + b"x" * 100 + b"\r\n"
        _, data = dsn.buildBounce(
            queued(BOUNCED, ret=Ret.FULL),
            io.BytesIO(big),
            "m.example",
            START,
            headersLimit=len(BODY),
        )
        message, _ = checkReport(self, data)
        self.assertEqual(list(message.iter_parts())[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"SECRET BODY", data)
        # Exactly at the cap: whole.
        _, data = dsn.buildBounce(
            queued(BOUNCED), io.BytesIO(BODY), "m.example", START, headersLimit=len(BODY)
        )
        self.assertIn(b"SECRET BODY", data)

    def test_requireTLSHeadersOnly(self) -> None:
        """The report travels without REQUIRETLS (RFC 8689 5): no body in it."""
        message, _ = self.bounce(queued(BOUNCED, requireTLS=True))
        self.assertEqual(list(message.iter_parts())[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn("SECRET BODY", message.as_string())

    def test_envidAndOrcpt(self) -> None:
        """RFC 3464 2.2.1 and 2.3.1: Original-Envelope-Id first, Original-Recipient per block."""
        message = queued(
            BOUNCED,
            attrs.evolve(BOUNCED, address=DAVE),
            envid="QQ314159 x+y",
            dsn=(notify(F, orcpt=("rfc822", "bob+tag@example.org")), NO_DSN),
        )
        _, blocks = self.bounce(message)
        perMessage, bob, dave = blocks
        self.assertEqual(list(perMessage.keys())[0], "Original-Envelope-Id")
        self.assertEqual(perMessage["Original-Envelope-Id"], "QQ314159 x+y")
        self.assertEqual(list(bob.keys())[:2], ["Original-Recipient", "Final-Recipient"])
        self.assertEqual(bob["Original-Recipient"], "rfc822;bob+tag@example.org")
        self.assertIsNone(dave["Original-Recipient"])
        self.assertEqual(dave["Final-Recipient"], "rfc822; dave@example.net")

    def test_noEnvidNoField(self) -> None:
        _, [perMessage, _] = self.bounce(queued(BOUNCED))
        self.assertIsNone(perMessage["Original-Envelope-Id"])

    def test_relayed(self) -> None:
        """The success report: Action relayed (RFC 3464 2.3.3), a 2.x.x status, headers only."""
        message = queued(BOUNCED, DELIVERED, envid="E1", dsn=(NO_DSN, notify(S, F)))
        envelope, data = dsn.buildRelayed(message, io.BytesIO(BODY), "mail.example.org", START)
        self.assertIsNone(envelope.sender)
        self.assertEqual(envelope.recipients, (SENDER,))
        report, [perMessage, carol] = checkReport(self, data)
        self.assertEqual(report["Subject"], "Successful Mail Delivery Report")
        self.assertEqual(perMessage["Original-Envelope-Id"], "E1")
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.net")
        self.assertEqual(carol["Action"], "relayed")
        self.assertEqual(carol["Status"], "2.0.0")
        self.assertEqual(carol["Remote-MTA"], "dns; mx.example.net")
        returned = list(report.iter_parts())[2]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"SECRET BODY", data)
        self.assertIn("relayed to mx.example.net", list(report.iter_parts())[0].get_content())

    def test_relayedNeedsDelivered(self) -> None:
        self.assertRaises(
            ValueError, dsn.buildRelayed, queued(BOUNCED), io.BytesIO(BODY), "m.example", START
        )

    def test_wanted(self) -> None:
        message = queued(
            BOUNCED,
            attrs.evolve(BOUNCED, address=CAROL),
            attrs.evolve(BOUNCED, address=DAVE),
            dsn=(notify(N), notify(S), notify(F, D)),
        )
        everyone = [BOB, CAROL, DAVE]
        self.assertEqual(dsn.wanted(message, everyone, F), {DAVE})
        self.assertEqual(dsn.wanted(message, everyone, D), {DAVE})
        self.assertEqual(dsn.wanted(message, everyone, S), {CAROL})
        plain = queued(BOUNCED, attrs.evolve(BOUNCED, address=CAROL))
        self.assertEqual(dsn.wanted(plain, [BOB, CAROL], F), {BOB, CAROL})
        self.assertEqual(dsn.wanted(plain, [BOB, CAROL], S), set())


class RunnerTests(SynchronousTestCase):
    """Each rule through the queue runner (MemorySpool, FakeRelay, Clock)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = MemorySpool(self.clock)
        self.relay = FakeRelay()

    def start(self, config: QueueConfig = CONFIG) -> QueueRunner:
        runner = QueueRunner(self.spool, self.relay, self.clock, config, "mail.example.org")
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner

    def submit(self, requests: dict[Address, RecipientDSN], **envelope: Any) -> str:
        recipients = tuple(requests)
        env = Envelope(SENDER, recipients, dsn=tuple(requests.values()), **envelope)
        writer = self.spool.begin(env, SESSION)
        writer.write(BODY)
        return self.successResultOf(writer.commit())

    def reports(self) -> list[tuple[EmailMessage, list[Any]]]:
        """Every report the runner committed, parsed (and checked)."""
        return [
            checkReport(self, bytes(w.data))
            for w in self.spool.writers
            if w.envelope.sender is None and w.state == "committed"
        ]

    def finalRecipients(self, blocks: list[Any]) -> list[str]:
        return [b["Final-Recipient"].split("; ")[1] for b in blocks[1:]]

    def test_neverSuppressesBounce(self) -> None:
        queueId = self.submit({BOB: notify(N), CAROL: NO_DSN})
        self.relay.default = permanent("550 5.1.1 no such user")
        self.start()
        [(report, blocks)] = self.reports()
        self.assertEqual(self.finalRecipients(blocks), ["carol@example.net"])
        self.assertNotIn(queueId, self.spool.committed)  # finished: both bounced

    def test_neverOnlyNoReportAtAll(self) -> None:
        queueId = self.submit({BOB: notify(N)})
        self.relay.default = permanent("550 5.1.1 no such user")
        self.start()
        self.assertEqual(self.reports(), [])
        self.assertNotIn(queueId, self.spool.committed)

    def test_notifyWithoutFailureNoBounce(self) -> None:
        self.submit({BOB: notify(S, D), CAROL: notify(F)})
        self.relay.default = permanent("550 5.1.1 no such user")
        self.start()
        [(_, blocks)] = self.reports()
        self.assertEqual(self.finalRecipients(blocks), ["carol@example.net"])

    def test_delayWarningFollowsNotify(self) -> None:
        """Default and DELAY get warned; NOTIFY without DELAY (or NEVER) does not."""
        self.submit({BOB: NO_DSN, CAROL: notify(F), DAVE: notify(D)})
        self.relay.default = transient("451 4.4.1 no answer")
        self.start()
        self.clock.pump([HOUR] * 5)
        [(report, blocks)] = self.reports()
        self.assertEqual(report["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(self.finalRecipients(blocks), ["bob@example.com", "dave@example.net"])
        self.assertEqual({b["Action"] for b in blocks[1:]}, {"delayed"})

    def test_noDelayWarningWhenNobodyWantsOne(self) -> None:
        queueId = self.submit({BOB: notify(F), CAROL: notify(N)})
        self.relay.default = transient("451 4.4.1 no answer")
        self.start()
        self.clock.pump([HOUR] * 12)
        self.assertEqual(self.reports(), [])
        self.assertIn(queueId, self.spool.committed)

    def test_successReportWhenUpstreamLacksDSN(self) -> None:
        queueId = self.submit({BOB: notify(S), CAROL: notify(S, F), DAVE: NO_DSN}, envid="E-1")
        self.relay.default = success("250 2.0.0 Ok: queued as X", remote="mx.example.net")
        self.start()
        [(report, blocks)] = self.reports()
        self.assertEqual(report["Subject"], "Successful Mail Delivery Report")
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "E-1")
        self.assertEqual(self.finalRecipients(blocks), ["bob@example.com", "carol@example.net"])
        self.assertEqual({b["Action"] for b in blocks[1:]}, {"relayed"})
        self.assertNotIn(queueId, self.spool.committed)

    def test_noSuccessReportWhenUpstreamTookDSN(self) -> None:
        """The upstream took NOTIFY=SUCCESS on: it reports, we do not."""
        queueId = self.submit({BOB: notify(S)})
        self.relay.default = success(dsnPassed=True)
        self.start()
        self.assertEqual(self.reports(), [])
        self.assertNotIn(queueId, self.spool.committed)

    def test_noSuccessReportByDefault(self) -> None:
        self.submit({BOB: NO_DSN, CAROL: notify(F, D)})
        self.start()
        self.assertEqual(self.reports(), [])

    def test_successReportRetriedAfterSpoolFailure(self) -> None:
        """A report the spool cannot take now is owed, and sent on the next try."""
        queueId = self.submit({BOB: notify(S)})
        self.spool.failNextCommit()
        self.start()
        self.assertEqual(self.reports(), [])
        self.assertIn(queueId, self.spool.committed)
        self.clock.advance(RECORD_RETRY)
        [(_, blocks)] = self.reports()
        self.assertEqual(blocks[1]["Action"], "relayed")
        self.assertNotIn(queueId, self.spool.committed)

    def test_bounceOfMixedRequests(self) -> None:
        """One failure bounce, RET=HDRS: headers only; ORCPT where given."""
        self.submit(
            {BOB: notify(F, orcpt=("rfc822", "b@example.org")), CAROL: notify(S)}, ret=Ret.HDRS
        )
        self.relay.script[str(BOB)] = [permanent("550 5.1.1 no such user")]
        self.start()
        reports = self.reports()
        subjects = sorted(r["Subject"] for r, _ in reports)
        self.assertEqual(
            subjects, ["Successful Mail Delivery Report", "Undelivered Mail Returned to Sender"]
        )
        [(bounce, blocks)] = [r for r in reports if r[0]["Subject"].startswith("Undelivered")]
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822;b@example.org")
        self.assertEqual(list(bounce.iter_parts())[2].get_content_type(), "text/rfc822-headers")

    def test_requireTLSBounceSaysWhyAndCarriesNoRequireTLS(self) -> None:
        """RFC 8689 5: the bounce is sent without REQUIRETLS, with headers only."""
        self.submit({BOB: NO_DSN}, requireTLS=True)
        self.relay.default = permanent(
            "550 5.7.30 REQUIRETLS support required: the upstream does not offer REQUIRETLS"
        )
        self.start()
        [writer] = [w for w in self.spool.writers if w.envelope.sender is None]
        self.assertFalse(writer.envelope.requireTLS)
        [(bounce, blocks)] = self.reports()
        self.assertEqual(blocks[1]["Status"], "5.7.30")
        self.assertIn("REQUIRETLS support required", blocks[1]["Diagnostic-Code"])
        self.assertIn("does not offer REQUIRETLS", list(bounce.iter_parts())[0].get_content())
        self.assertNotIn("SECRET BODY", bounce.as_string())
