"""
Tests for L{mailgw.queue.dsn}: the structure of bounces and delay warnings
(RFC 3464, RFC 6522), their envelopes, and that upstream text cannot add
header fields or MIME parts.
"""

from __future__ import annotations

import email
import email.policy
import io
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.dsnparams import Ret
from mailgw.envelope import (
    Address,
    BodyType,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
)
from mailgw.queue.dsn import DIAGNOSTIC_LIMIT, buildBounce, buildDelayWarning, readHeaders

SENDER = Address("alice", "example.org")
BOB = Address("bob", "example.com")
CAROL = Address("carol", "example.net")
DAVE = Address("dave", "example.net")
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0
ORIGINAL = (
    b"Received: from client (client [192.0.2.7])\r\n\tby mail.example.org\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: Lunch\r\n"
    b"Message-ID: <lunch@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY TEXT\r\n"
)


def state(address: Address, status: RecipientStatus, **kw: Any) -> RecipientState:
    kw.setdefault("attempts", 1)
    kw.setdefault("lastAttempt", ARRIVAL + 60)
    return RecipientState(address, status, **kw)


def queued(*states: RecipientState, sender: Address | None = SENDER, **kw: Any) -> QueuedMessage:
    return QueuedMessage(
        queueId="4Fq9sX",
        envelope=Envelope(sender, tuple(s.address for s in states), **kw),
        session=Session("192.0.2.7", user="alice"),
        arrival=ARRIVAL,
        size=len(ORIGINAL),
        recipients=states,
    )


BOUNCED_BOB = state(
    BOB,
    RecipientStatus.BOUNCED,
    code=550,
    enhanced="5.1.1",
    diagnostic="<bob@example.com>: Recipient address rejected: User unknown",
    remote="mx.example.com[192.0.2.25]",
)
DELIVERED_CAROL = state(CAROL, RecipientStatus.DELIVERED, code=250, enhanced="2.0.0")
PENDING_DAVE = state(
    DAVE,
    RecipientStatus.PENDING,
    code=451,
    enhanced="4.7.1",
    diagnostic="Greylisted, try again later",
    remote="mx.example.net",
)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parseDate(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


def statusBlocks(message: EmailMessage) -> list[Any]:
    part = list(message.iter_parts())[1]
    return part.get_payload()  # type: ignore[return-value]


class BounceTestCase(SynchronousTestCase):
    def bounce(self, message: QueuedMessage | None = None, **kw: Any) -> tuple[Envelope, bytes]:
        if message is None:
            message = queued(BOUNCED_BOB, DELIVERED_CAROL, PENDING_DAVE)
        return buildBounce(message, io.BytesIO(ORIGINAL), "mail.example.org", NOW, **kw)

    def test_envelope(self) -> None:
        """From the null sender to the original sender; 7-bit when it can be."""
        envelope, data = self.bounce()
        self.assertIsNone(envelope.sender)
        self.assertEqual(envelope.recipients, (SENDER,))
        self.assertEqual(envelope.body, BodyType.SEVENBIT)
        self.assertFalse(envelope.smtputf8)
        self.assertEqual(envelope.declaredSize, len(data))
        self.assertTrue(data.isascii())

    def test_crlfOnly(self) -> None:
        _, data = self.bounce()
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", data.replace(b"\r\n", b""))

    def test_structure(self) -> None:
        _, data = self.bounce()
        message = parse(data)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(
            [p.get_content_type() for p in message.iter_parts()],
            ["text/plain", "message/delivery-status", "message/rfc822"],
        )
        self.assertEqual(message.defects, [])
        for part in message.walk():
            self.assertEqual(part.defects, [])

    def test_headers(self) -> None:
        _, data = self.bounce()
        message = parse(data)
        self.assertEqual(message["From"].addresses[0].display_name, "Mail Delivery System")
        self.assertEqual(message["From"].addresses[0].addr_spec, "MAILER-DAEMON@mail.example.org")
        self.assertEqual(message["To"].addresses[0].addr_spec, "alice@example.org")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(message["Date"].datetime.timestamp(), NOW)
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertTrue(message["Message-ID"].endswith("@mail.example.org>"))

    def test_messageIdUnique(self) -> None:
        ids = {parse(self.bounce()[1])["Message-ID"] for _ in range(20)}
        self.assertEqual(len(ids), 20)

    def test_deliveryStatus(self) -> None:
        """Per-message fields, then one block per BOUNCED recipient only."""
        _, data = self.bounce()
        blocks = statusBlocks(parse(data))
        self.assertEqual(len(blocks), 2)
        perMessage, bob = blocks
        self.assertEqual(perMessage["Reporting-MTA"], "dns; mail.example.org")
        self.assertEqual(parseDate(perMessage["Arrival-Date"]), ARRIVAL)
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.com")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx.example.com")
        self.assertEqual(
            bob["Diagnostic-Code"],
            "smtp; 550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown",
        )
        self.assertEqual(parseDate(bob["Last-Attempt-Date"]), ARRIVAL + 60)
        self.assertIsNone(bob["Will-Retry-Until"])

    def test_humanReadable(self) -> None:
        _, data = self.bounce()
        text = list(parse(data).iter_parts())[0].get_content()
        self.assertIn("This is the mail system at host mail.example.org.", text)
        self.assertIn("<bob@example.com>: host mx.example.com[192.0.2.25] said: 550 5.1.1", text)
        self.assertIn("User unknown", text)
        self.assertNotIn("carol", text)
        self.assertNotIn("dave", text)

    def test_originalHeadersOnly(self) -> None:
        """RET=HDRS (RFC 3461 4.3): the header section only, never the body."""
        message = queued(BOUNCED_BOB, DELIVERED_CAROL, ret=Ret.HDRS)
        _, data = self.bounce(message)
        part = list(parse(data).iter_parts())[2]
        self.assertEqual(part.get_content_type(), "text/rfc822-headers")
        self.assertEqual(part.get_payload(decode=True), ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2])
        self.assertNotIn(b"SECRET BODY", data)

    def test_derivedStatus(self) -> None:
        """No enhanced code from upstream: 5.0.0 (or 4.0.0 after a 4xx)."""
        cases = [
            (550, "", "5.0.0"),
            (554, "junk", "5.0.0"),
            (0, "", "5.0.0"),
            (421, "", "4.0.0"),
            (450, "4.2.0", "4.2.0"),
        ]
        for code, enhanced, expected in cases:
            s = state(BOB, RecipientStatus.BOUNCED, code=code, enhanced=enhanced, diagnostic="no")
            blocks = statusBlocks(parse(self.bounce(queued(s))[1]))
            self.assertEqual(blocks[1]["Status"], expected, (code, enhanced))

    def test_noUpstreamReply(self) -> None:
        """No reply: no smtp Diagnostic-Code, no Remote-MTA, our reason instead."""
        s = state(BOB, RecipientStatus.BOUNCED, diagnostic="connection refused", lastAttempt=None)
        message = parse(self.bounce(queued(s))[1])
        block = statusBlocks(message)[1]
        self.assertIsNone(block["Remote-MTA"])
        self.assertIsNone(block["Last-Attempt-Date"])
        self.assertEqual(block["Diagnostic-Code"], "X-mailgw; connection refused")
        self.assertIn(
            "<bob@example.com>: connection refused", list(message.iter_parts())[0].get_content()
        )

    def test_codesNotRepeated(self) -> None:
        s = attrs.evolve(BOUNCED_BOB, diagnostic="550 5.1.1 no such user")
        block = statusBlocks(parse(self.bounce(queued(s))[1]))[1]
        self.assertEqual(block["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")

    def test_utf8Recipient(self) -> None:
        """RFC 6533 3: a non-ASCII address is "utf-8;" in xtext form, 7-bit."""
        jorg = Address("jörg", "bücher.example")
        s = state(jorg, RecipientStatus.BOUNCED, code=550, enhanced="5.1.1", diagnostic="nope")
        envelope, data = self.bounce(queued(s))
        block = statusBlocks(parse(data))[1]
        self.assertEqual(block["Final-Recipient"], "utf-8; j\\x{F6}rg@b\\x{FC}cher.example")
        self.assertIn("<jörg@bücher.example>", list(parse(data).iter_parts())[0].get_content())
        self.assertTrue(data.isascii())
        self.assertEqual(envelope.body, BodyType.SEVENBIT)

    def test_utf8Sender(self) -> None:
        """A UTF-8 reverse-path needs SMTPUTF8 and 8BITMIME (RFC 6531)."""
        sender = Address("ålice", "example.org")
        envelope, data = self.bounce(queued(BOUNCED_BOB, sender=sender))
        self.assertEqual(envelope.recipients, (sender,))
        self.assertTrue(envelope.smtputf8)
        self.assertEqual(envelope.body, BodyType.EIGHTBITMIME)
        # RFC 6532: the address stays raw UTF-8 (no encoded-words in an addr-spec).
        self.assertIn("\r\nTo: <ålice@example.org>\r\n".encode(), data)

    def test_eightBitHeaders(self) -> None:
        original = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n"
        envelope, data = buildBounce(
            queued(BOUNCED_BOB, ret=Ret.HDRS), io.BytesIO(original), "mail.example.org", NOW
        )
        self.assertEqual(envelope.body, BodyType.EIGHTBITMIME)
        self.assertFalse(envelope.smtputf8)
        part = list(parse(data).iter_parts())[2]
        self.assertEqual(part["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(part.get_payload(decode=True), b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n")

    def test_selectedRecipients(self) -> None:
        other = state(CAROL, RecipientStatus.BOUNCED, code=550, diagnostic="x")
        _, data = self.bounce(queued(BOUNCED_BOB, other), recipients=[CAROL])
        blocks = statusBlocks(parse(data))
        self.assertEqual([b["Final-Recipient"] for b in blocks[1:]], ["rfc822; carol@example.net"])

    def test_neverBounceABounce(self) -> None:
        message = queued(BOUNCED_BOB, sender=None)
        self.assertTrue(message.isBounce)
        self.assertRaises(ValueError, self.bounce, message)
        self.assertRaises(
            ValueError,
            buildDelayWarning,
            queued(PENDING_DAVE, sender=None),
            io.BytesIO(ORIGINAL),
            "mail.example.org",
            NOW,
            willRetryUntil=NOW,
        )

    def test_nothingToReport(self) -> None:
        self.assertRaises(ValueError, self.bounce, queued(DELIVERED_CAROL, PENDING_DAVE))

    def test_badReportingMTA(self) -> None:
        for name in ("", "mail.example.org\r\nBcc: x@y", "a b"):
            self.assertRaises(
                ValueError, buildBounce, queued(BOUNCED_BOB), io.BytesIO(ORIGINAL), name, NOW
            )


class InjectionTestCase(SynchronousTestCase):
    """Upstream text is attacker-controlled: it must stay one field value."""

    def check(self, diagnostic: str, remote: str = "mx.example.com") -> None:
        s = state(
            BOB,
            RecipientStatus.BOUNCED,
            code=550,
            enhanced="5.1.1",
            diagnostic=diagnostic,
            remote=remote,
        )
        _, data = buildBounce(queued(s), io.BytesIO(ORIGINAL), "mail.example.org", NOW)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertLessEqual(max(len(line) for line in data.split(b"\r\n")), 998)
        message = parse(data)
        self.assertEqual(
            list(message.keys()),
            [
                "From",
                "To",
                "Subject",
                "Date",
                "Message-ID",
                "Auto-Submitted",
                "MIME-Version",
                "Content-Type",
            ],
        )
        self.assertEqual(
            [p.get_content_type() for p in message.iter_parts()],
            ["text/plain", "message/delivery-status", "message/rfc822"],
        )
        blocks = statusBlocks(message)
        self.assertEqual(len(blocks), 2)
        expected = ["Final-Recipient", "Action", "Status", "Diagnostic-Code", "Last-Attempt-Date"]
        if blocks[1]["Remote-MTA"] is not None:
            # Present unless cleaning left nothing of the upstream's name.
            expected.insert(3, "Remote-MTA")
        self.assertEqual(list(blocks[1].keys()), expected)
        value = blocks[1]["Diagnostic-Code"]
        self.assertLessEqual(len(value), len("smtp; 550 5.1.1 ") + DIAGNOSTIC_LIMIT)
        self.assertTrue(value.isascii())

    def test_crlfHeaderInjection(self) -> None:
        self.check(
            "User unknown\r\nX-Injected: yes\r\n\r\n--=_mailgw_x--\r\nContent-Type: text/html"
        )

    def test_bareLineBreaksAndControls(self) -> None:
        self.check("a\nb\rc\x00d\x1be\x7ff\u2028g\u0085h\u202ei")

    def test_hugeDiagnostic(self) -> None:
        self.check("x" * 100_000)

    def test_remoteInjection(self) -> None:
        self.check("no", remote="evil\r\nX-Injected: yes")

    def test_lineBreaksBecomeSpaces(self) -> None:
        s = state(BOB, RecipientStatus.BOUNCED, code=550, diagnostic="line one\r\nline two")
        _, data = buildBounce(queued(s), io.BytesIO(ORIGINAL), "mail.example.org", NOW)
        self.assertEqual(
            statusBlocks(parse(data))[1]["Diagnostic-Code"], "smtp; 550 line one line two"
        )

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=600), st.text(max_size=80))
    def test_anyText(self, diagnostic: str, remote: str) -> None:
        self.check(diagnostic, remote)


class HeadersTestCase(SynchronousTestCase):
    def test_stopsAtEmptyLine(self) -> None:
        self.assertEqual(
            readHeaders(io.BytesIO(ORIGINAL)), ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]
        )

    def test_onlyHeaders(self) -> None:
        self.assertEqual(readHeaders(io.BytesIO(b"A: b\r\nC: d")), b"A: b\r\nC: d\r\n")

    def test_noHeaders(self) -> None:
        self.assertEqual(readHeaders(io.BytesIO(b"\r\nbody\r\n")), b"")

    def test_limit(self) -> None:
        """A long section is cut after its last whole line within the limit."""
        original = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(100)) + b"\r\nbody"
        result = readHeaders(io.BytesIO(original), 1000)
        self.assertLessEqual(len(result), 1000)
        self.assertGreater(len(result), 900)
        self.assertTrue(original.startswith(result))
        self.assertTrue(result.endswith(b"\r\n"))

    def test_exactlyAtLimit(self) -> None:
        headers = b"A: " + b"x" * 95 + b"\r\n"  # 100 bytes
        self.assertEqual(readHeaders(io.BytesIO(headers + b"\r\nbody"), 100), headers)

    def test_bodyNotRead(self) -> None:
        """At most limit + 2 bytes are read, however big the message."""
        original = io.BytesIO(b"A: b\r\n" * 10 + b"\r\n" + b"x" * 1_000_000)
        readHeaders(original, 4096)
        self.assertLessEqual(original.tell(), 4098)

    def test_longLinesCut(self) -> None:
        """RFC 5322 2.1.1: no line of the bounce passes 998 octets."""
        original = b"X-Long: " + b"y" * 5000 + b"\r\nA: b\r\n\r\n"
        self.assertEqual(readHeaders(io.BytesIO(original)), original[:998] + b"\r\nA: b\r\n")

    def test_strayLineEndingsNormalised(self) -> None:
        self.assertEqual(
            readHeaders(io.BytesIO(b"A: b\nC: d\rE: f\r\n\r\n")), b"A: b\r\nC: d\r\nE: f\r\n"
        )

    def test_defaultLimit(self) -> None:
        original = io.BytesIO(b"X: " + b"y" * 200_000 + b"\r\n\r\n")
        self.assertEqual(readHeaders(original), b"")
        self.assertLessEqual(original.tell(), 64 * 1024 + 2)


class DelayWarningTestCase(SynchronousTestCase):
    def warn(self, *states: RecipientState) -> tuple[Envelope, bytes]:
        return buildDelayWarning(
            queued(*states),
            io.BytesIO(ORIGINAL),
            "mail.example.org",
            NOW,
            willRetryUntil=ARRIVAL + 5 * 86400,
        )

    def test_delayWarning(self) -> None:
        envelope, data = self.warn(BOUNCED_BOB, PENDING_DAVE)
        self.assertIsNone(envelope.sender)
        self.assertEqual(envelope.recipients, (SENDER,))
        message = parse(data)
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        blocks = statusBlocks(message)
        self.assertEqual(len(blocks), 2)
        dave = blocks[1]
        self.assertEqual(dave["Final-Recipient"], "rfc822; dave@example.net")
        self.assertEqual(dave["Action"], "delayed")
        self.assertEqual(dave["Status"], "4.7.1")
        self.assertEqual(dave["Diagnostic-Code"], "smtp; 451 4.7.1 Greylisted, try again later")
        self.assertEqual(parseDate(dave["Will-Retry-Until"]), ARRIVAL + 5 * 86400)
        text = list(message.iter_parts())[0].get_content()
        self.assertIn("WARNING ONLY", text)
        self.assertIn("<dave@example.net>", text)
        self.assertNotIn("bob@", text)

    def test_delayStatusNeverPermanent(self) -> None:
        for code, enhanced in [(0, ""), (550, "5.1.1"), (421, "")]:
            s = state(DAVE, RecipientStatus.PENDING, code=code, enhanced=enhanced)
            self.assertEqual(statusBlocks(parse(self.warn(s)[1]))[1]["Status"], "4.0.0")

    def test_noPending(self) -> None:
        self.assertRaises(ValueError, self.warn, BOUNCED_BOB)
