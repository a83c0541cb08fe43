"""
The bytes an attacker would send, on both listeners, and what they get:
nothing relayed without AUTH, nothing smuggled, no crash, no stall.

(More attack classes live next to the code they target: test_protocol for
AUTH details, test_data for end-of-data property tests, test_address for the
path parser, test_limits for the throttles, test_proxy for PROXY headers.)
"""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import PASSWORD, USER, Harness
from tests.test_protocol import SmugglingTests

LISTENERS = (False, True)  # submission (STARTTLS), submissions (implicit TLS)


def loggedIn(implicitTLS: bool, **settings: object) -> Harness:
    h = Harness(implicitTLS=implicitTLS, **settings)  # type: ignore[arg-type]
    h.login()
    return h


class OpenRelayTests(SynchronousTestCase):
    """Without AUTH nothing is accepted, whatever the address tricks."""

    ADDRESSES = [
        b"<victim@example.org>",
        b"<victim%example.org@mx.test>",
        b"<example.org!victim@mx.test>",
        b"<@mx.test:victim@example.org>",
        b"<@mx.test,@relay.example:victim@example.org>",
        b'<"victim@example.org"@mx.test>',
        b"<victim@[192.0.2.1]>",
        b"<victim@[IPv6:2001:db8::1]>",
        b"<postmaster>",
        b"<>",
    ]

    def test_noTransactionWithoutAuth(self) -> None:
        for implicitTLS in LISTENERS:
            h = Harness(implicitTLS=implicitTLS, maxErrors=1000)
            h.command(b"EHLO attacker.example")
            for address in self.ADDRESSES:
                self.assertTrue(h.command(b"MAIL FROM:" + address).startswith(b"530 5.7.0"))
                self.assertTrue(h.command(b"RCPT TO:" + address).startswith(b"503 5.5.1"))
            self.assertTrue(h.command(b"DATA").startswith(b"503"))
            self.assertEqual(h.spool.writers, [])

    def test_sourceRouteNeverRoutes(self) -> None:
        h = loggedIn(False)
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<@relay.example:victim@example.org>")
        h.command(b"DATA")
        h.send(b"x\r\n.\r\n")
        [(message, _)] = h.spool.committed.values()
        self.assertEqual([str(r) for r in message.envelope.recipients], ["victim@example.org"])


class SmugglingOnBothListenersTests(SynchronousTestCase):
    """
    Every end-of-data variant with bare LF, bare CR and NUL, whole or in
    pieces, at a long-line boundary and after an oversize message: only
    CRLF.CRLF ends the data, and the message carrying the variant is refused
    whole, so nothing reaches the queue that a later server could split.
    """

    ENDINGS = [*SmugglingTests.VARIANTS, b"\n.\r", b"\r\n.\n\r\n"]

    def smuggle(self, implicitTLS: bool, ending: bytes, prefix: bytes, split: int) -> Harness:
        h = loggedIn(implicitTLS, maxMessageSize=4000, maxLineLength=2000)
        h.command(b"MAIL FROM:<a@b.c>")
        h.command(b"RCPT TO:<d@e.f>")
        h.command(b"DATA")
        payload = (
            prefix + b"Subject: one" + ending + b"MAIL FROM:<evil@b.c>\r\nRCPT TO:<x@y.z>\r\n"
            b"DATA\r\nSubject: smuggled\r\n"
        )
        for i in range(0, len(payload), split):
            h.send(payload[i : i + split])
        return h

    def test_variants(self) -> None:
        prefixes = [
            b"",
            b"L" * 1999 + b"\r\n",  # the variant right after a line at the limit
            b"O" * 990 + b"\r\n" + b"O" * 990 + b"\r\n" + b"O" * 990 + b"\r\n" * 2 + b"O" * 990,
        ]
        for implicitTLS in LISTENERS:
            for ending in self.ENDINGS:
                for prefix in prefixes:
                    for split in (1, 5, 4096):
                        h = self.smuggle(implicitTLS, ending, prefix, split)
                        where = (implicitTLS, ending, len(prefix), split)
                        self.assertEqual(h.take(), b"", where)
                        h.send(b"\r\n.\r\n")
                        reply = h.take()
                        self.assertRegex(reply, rb"^55[24] 5\.", where)
                        self.assertEqual(h.spool.committed, {}, where)
                        # The session goes on in step: the next command is a command.
                        self.assertEqual(h.command(b"NOOP"), b"250 2.0.0 Ok\r\n", where)


class CommandAbuseTests(SynchronousTestCase):
    def test_thousandRecipients(self) -> None:
        h = loggedIn(True, maxRecipients=100, maxErrors=10_000)
        h.command(b"MAIL FROM:<a@b.c>")
        replies = [h.command(b"RCPT TO:<r%d@example.org>" % i) for i in range(1200)]
        self.assertEqual(sum(r.startswith(b"250") for r in replies), 100)
        self.assertTrue(all(r.startswith(b"452 4.5.3") for r in replies[100:]))

    def test_sizeTooLarge(self) -> None:
        h = loggedIn(False)
        reply = h.command(b"MAIL FROM:<a@b.c> SIZE=99999999999999999999")
        self.assertTrue(reply.startswith(b"552 5.3.4"))
        reply = h.command(b"MAIL FROM:<a@b.c> SIZE=999999999999999999999999")
        self.assertTrue(reply.startswith(b"501 5.5.4"))

    def test_wholeTransactionInOneWrite(self) -> None:
        for implicitTLS in LISTENERS:
            h = Harness(implicitTLS=implicitTLS)
            if not implicitTLS:
                h.starttls()
            token = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
            h.send(
                b"EHLO c\r\nAUTH PLAIN " + token + b"\r\nMAIL FROM:<a@b.c>\r\n"
                b"RCPT TO:<d@e.f>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
            )
            out = h.take()
            self.assertIn(b"235 2.7.0", out)
            self.assertIn(b"250 2.0.0 Ok: queued as", out)
            self.assertTrue(out.endswith(b"221 2.0.0 Bye\r\n"))
            self.assertEqual(len(h.spool.committed), 1)

    def test_authBeforeTLSPipelinedWithSTARTTLS(self) -> None:
        """Credentials sent before TLS are never checked, even pipelined."""
        h = Harness()
        token = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
        h.send(b"EHLO c\r\nAUTH PLAIN " + token + b"\r\nSTARTTLS\r\nMAIL FROM:<a@b.c>\r\n")
        out = h.take()
        self.assertIn(b"538 5.7.11", out)
        self.assertIn(b"220 2.0.0", out)
        self.assertNotIn(b"235", out)
        self.assertTrue(h.command(b"MAIL FROM:<a@b.c>").startswith(b"503"))

    def test_authTwiceAndLongResponses(self) -> None:
        h = loggedIn(True)
        self.assertTrue(h.command(b"AUTH PLAIN").startswith(b"503 5.5.1"))
        h = Harness(implicitTLS=True)
        h.command(b"EHLO c")
        self.assertTrue(h.command(b"AUTH PLAIN " + b"A" * 70000).startswith(b"500 5.5.6"))
        self.assertEqual(h.command(b"NOOP"), b"250 2.0.0 Ok\r\n")

    def test_nonASCIIAndControlBytes(self) -> None:
        h = Harness(maxErrors=100)
        for line in (b"EHLO \xff", b"EH\x00LO x", b"NOOP\rRSET", "V\u00e9RFY".encode(), b"\x1b[2J"):
            self.assertRegex(h.command(line), rb"^50[02] 5\.5\.[12] ", line)


class ParserPropertyTests(SynchronousTestCase):
    """No command line, however strange, raises or goes unanswered."""

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.binary(max_size=80), min_size=1, max_size=8))
    def test_anyLinesAnswered(self, lines: list[bytes]) -> None:
        h = Harness(implicitTLS=True, maxErrors=1000)
        h.command(b"EHLO fuzz")
        for line in lines:
            line = line.replace(b"\n", b"")
            if h.closing:
                break
            out = h.command(line)
            self.assertTrue(out, line)
            self.assertRegex(out, rb"^\d{3}[ -]")
        self.assertEqual(self.flushLoggedErrors(), [])

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"mail from:", b"RCPT TO: "]),
        st.binary(max_size=120),
    )
    def test_anyPathAnswered(self, verb: bytes, argument: bytes) -> None:
        h = loggedIn(True, maxErrors=1000)
        h.command(b"MAIL FROM:<a@b.c>") if verb.upper().startswith(b"RCPT") else None
        out = h.command(verb + argument.replace(b"\n", b""))
        self.assertRegex(out, rb"^\d{3} ")
        self.assertEqual(self.flushLoggedErrors(), [])
