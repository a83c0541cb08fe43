"""
DSN (RFC 3461) and REQUIRETLS (RFC 8689) parameters: their parsing, how
the server stores them in the envelope, and how the spool keeps them
(including state files written before they existed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw import replies
from mailgw.dsnparams import (
    NO_DSN,
    DSNParameterError,
    Notify,
    RecipientDSN,
    Ret,
    decodeXtext,
    encodeXtext,
    parseEnvid,
    parseNotify,
    parseORCPT,
    parseRet,
)
from mailgw.envelope import Address, BodyType, Envelope, QueuedMessage, Session
from mailgw.queue.spool import Spool
from mailgw.server.extensions import MailOptions, recipientDSN
from tests.helpers import Harness, runDialog

DIALOGS = Path(__file__).parent / "dialogs"
FIXTURES = Path(__file__).parent / "fixtures" / "spool"

N, S, F, D = Notify.NEVER, Notify.SUCCESS, Notify.FAILURE, Notify.DELAY
BOB, CAROL = Address("bob", "example.org"), Address("carol", "example.org")


class XtextTests(SynchronousTestCase):
    def test_decode(self) -> None:
        self.assertEqual(decodeXtext("bob+2Btag@example.org"), "bob+tag@example.org")
        self.assertEqual(decodeXtext("a+20b+3Dc"), "a b=c")
        self.assertEqual(decodeXtext(""), "")

    def test_malformed(self) -> None:
        # "+" needs two upper-case hex digits; "=", space, controls and
        # 8-bit characters are not xchars; decoded controls and 8-bit are
        # refused too (RFC 3461 4.2: printable US-ASCII).
        for bad in ("a+", "a+2", "a+2b", "a+ZZ", "a=b", "a b", "a\x7fb", "jörg", "a+0D+0A", "+FF"):
            with self.subTest(bad=bad):
                self.assertRaises(DSNParameterError, decodeXtext, bad)

    def test_encodeRoundTrips(self) -> None:
        for text in ("bob+tag@example.org", "a b=c", '"q uoted"@x', "\\x{F6}", "~!"):
            encoded = encodeXtext(text)
            self.assertNotIn("=", encoded)
            self.assertNotIn(" ", encoded)
            self.assertEqual(decodeXtext(encoded), text)
        self.assertEqual(encodeXtext("a+b=c d"), "a+2Bb+3Dc+20d")


class ParameterTests(SynchronousTestCase):
    def test_notify(self) -> None:
        self.assertEqual(parseNotify("NEVER"), {N})
        self.assertEqual(parseNotify("never"), {N})
        self.assertEqual(parseNotify("SUCCESS,FAILURE,DELAY"), {S, F, D})
        self.assertEqual(parseNotify("delay,Success"), {S, D})

    def test_notifyMalformed(self) -> None:
        for bad, words in [
            (None, "needs a value"),
            ("", "needs a value"),
            ("NEVER,SUCCESS", "cannot be combined"),
            ("FAILURE,NEVER", "cannot be combined"),
            ("SUCCESS,SUCCESS", "SUCCESS twice"),
            ("NEVER,NEVER", "NEVER twice"),
            ("SUCCESS,", "comma list"),
            (",SUCCESS", "comma list"),
            ("SUCCESS;FAILURE", "comma list"),
            ("SUCCESS FAILURE", "comma list"),
            ("ALWAYS", "comma list"),
        ]:
            with self.subTest(bad=bad):
                error = self.assertRaises(DSNParameterError, parseNotify, bad)
                self.assertIn(words, str(error))

    def test_orcpt(self) -> None:
        self.assertEqual(parseORCPT("rfc822;bob@example.org"), ("rfc822", "bob@example.org"))
        self.assertEqual(parseORCPT("RFC822;b+2Bx@example.org"), ("rfc822", "b+x@example.org"))
        self.assertEqual(
            parseORCPT("utf-8;j\\x{F6}rg@example.org"), ("utf-8", "j\\x{F6}rg@example.org")
        )
        self.assertEqual(parseORCPT("x-other;abc"), ("x-other", "abc"))
        self.assertEqual(len(parseORCPT("rfc822;" + "x" * 493)[1]), 493)

    def test_orcptMalformed(self) -> None:
        for bad, words in [
            (None, "needs a value"),
            ("bob@example.org", "addr-type;address"),
            (";bob@example.org", "addr-type;address"),
            ("rfc 822;bob@example.org", "addr-type;address"),
            ("rfc822;", "empty address"),
            ("rfc822;bob+0D+0A@x", "printable"),
            ("rfc822;bob+2b@x", "not valid xtext"),
            ("rfc822;" + "x" * 494, "longer than 500"),
        ]:
            with self.subTest(bad=bad):
                error = self.assertRaises(DSNParameterError, parseORCPT, bad)
                self.assertIn(words, str(error))

    def test_envid(self) -> None:
        self.assertEqual(parseEnvid("QQ314159"), "QQ314159")
        self.assertEqual(parseEnvid("a+2Bb"), "a+b")
        self.assertEqual(parseEnvid("x" * 100), "x" * 100)
        for bad in (None, "", "x" * 101, "a+", "a+7F", "+e9"):
            with self.subTest(bad=bad):
                self.assertRaises(DSNParameterError, parseEnvid, bad)

    def test_ret(self) -> None:
        self.assertIs(parseRet("FULL"), Ret.FULL)
        self.assertIs(parseRet("hdrs"), Ret.HDRS)
        for bad in (None, "", "BODY", "FULL,HDRS"):
            with self.subTest(bad=bad):
                self.assertRaises(DSNParameterError, parseRet, bad)

    def test_wants(self) -> None:
        """No NOTIFY: failure and delay reports (RFC 3461 4.1), never success."""
        self.assertEqual([NO_DSN.wants(e) for e in (S, F, D)], [False, True, True])
        never = RecipientDSN(frozenset({N}))
        self.assertEqual([never.wants(e) for e in (S, F, D)], [False, False, False])
        success = RecipientDSN(frozenset({S}))
        self.assertEqual([success.wants(e) for e in (S, F, D)], [True, False, False])

    def test_parametersPassedOn(self) -> None:
        dsn = RecipientDSN(frozenset({D, S, F}), ("rfc822", "b+x@example.org"))
        self.assertEqual(
            dsn.parameters(), " NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.org"
        )
        self.assertEqual(RecipientDSN(frozenset({N})).parameters(), " NOTIFY=NEVER")
        self.assertEqual(NO_DSN.parameters(), "")


class ServerTests(SynchronousTestCase):
    def test_recipientDSNUnknownParameter(self) -> None:
        refusal = recipientDSN({"NOTIFY": "FAILURE", "XFOO": None})
        self.assertEqual(refusal, replies.UNKNOWN_PARAMETER.withText("Unsupported parameter: XFOO"))

    def test_requireTLSRefusedWithoutTLS(self) -> None:
        """
        RFC 8689 4.1: REQUIRETLS only over TLS. (Our listeners take MAIL
        only after AUTH, which needs TLS; this holds however that changes.)
        """
        options = MailOptions()
        refusal = options.take("REQUIRETLS", None, tls=False)
        self.assertEqual(refusal, replies.REQUIRETLS_NEEDS_TLS)
        self.assertEqual((refusal.code, refusal.enhanced), (530, "5.7.10"))
        self.assertFalse(options.requireTLS)
        self.assertIsNone(options.take("REQUIRETLS", None, tls=True))
        self.assertTrue(options.requireTLS)

    def test_dialogStoresParameters(self) -> None:
        """The dsn-parameters transcript's message carries its requests, per recipient."""
        harness = Harness(implicitTLS=True)
        runDialog(self, DIALOGS / "dsn-parameters.txt", harness)
        [(message, _)] = harness.spool.committed.values()
        envelope = message.envelope
        self.assertEqual(envelope.ret, Ret.HDRS)
        self.assertEqual(envelope.envid, "QQ314159+x")
        self.assertFalse(envelope.requireTLS)
        self.assertEqual(
            envelope.dsn,
            (
                RecipientDSN(frozenset({S, F}), ("rfc822", "bob+tag@example.org")),
                RecipientDSN(frozenset({N})),
                RecipientDSN(frozenset({D})),
                NO_DSN,
            ),
        )

    def test_dialogStoresRequireTLS(self) -> None:
        harness = Harness(implicitTLS=True)
        runDialog(self, DIALOGS / "requiretls.txt", harness)
        [(message, _)] = harness.spool.committed.values()
        self.assertTrue(message.envelope.requireTLS)
        self.assertEqual(message.envelope.dsn, ())

    def test_duplicateRecipientKeepsFirstRequests(self) -> None:
        h = Harness(implicitTLS=True)
        h.login()
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org> NOTIFY=NEVER")
        h.command(b"RCPT TO:<bob@example.org> NOTIFY=SUCCESS")
        h.command(b"RCPT TO:<carol@example.org>")
        h.command(b"DATA")
        self.assertTrue(h.command(b"hi\r\n.").startswith(b"250 2.0.0"))
        [(message, _)] = h.spool.committed.values()
        self.assertEqual(message.envelope.recipients, (BOB, CAROL))
        self.assertEqual(message.envelope.dsnFor()[BOB], RecipientDSN(frozenset({N})))
        self.assertEqual(message.envelope.dsnFor()[CAROL], NO_DSN)

    def test_transactionResetForgetsParameters(self) -> None:
        h = Harness(implicitTLS=True)
        h.login()
        h.command(b"MAIL FROM:<alice@example.com> RET=HDRS ENVID=x REQUIRETLS")
        h.command(b"RSET")
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org>")
        h.command(b"DATA")
        h.command(b"hi\r\n.")
        [(message, _)] = h.spool.committed.values()
        envelope = message.envelope
        self.assertEqual((envelope.ret, envelope.envid, envelope.requireTLS), (None, None, False))


ENVELOPE = Envelope(
    Address("alice", "example.com"),
    (BOB, CAROL),
    BodyType.EIGHTBITMIME,
    ret=Ret.FULL,
    envid="env 1",
    requireTLS=True,
    dsn=(RecipientDSN(frozenset({S, D}), ("rfc822", "b+x@example.org")), NO_DSN),
)
SESSION = Session("192.0.2.7", 52000, "client.test", "alice@example.com", "TLSv1.3")


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.clock = Clock()
        self.clock.advance(1732780000)

    def openSpool(self) -> Spool:
        spool = Spool(self.directory, self.clock, maybeDeferred)
        self.addCleanup(spool.close)
        return spool

    def test_envelopeJSONRoundTrip(self) -> None:
        data = ENVELOPE.toJSON()
        self.assertEqual(data["ret"], "FULL")
        self.assertEqual(data["envid"], "env 1")
        self.assertIs(data["requireTLS"], True)
        self.assertEqual(
            data["dsn"],
            [{"notify": ["DELAY", "SUCCESS"], "orcpt": ["rfc822", "b+x@example.org"]}, {}],
        )
        self.assertEqual(Envelope.fromJSON(json.loads(json.dumps(data))), ENVELOPE)

    def test_noParametersNoKeys(self) -> None:
        """A message without DSN or REQUIRETLS is stored as before they existed."""
        plain = Envelope(Address("a", "b.c"), (BOB,), dsn=(NO_DSN,))
        self.assertEqual(plain.dsn, ())
        self.assertEqual(
            set(plain.toJSON()), {"sender", "recipients", "body", "smtputf8", "declaredSize"}
        )

    def test_dsnMustMatchRecipients(self) -> None:
        self.assertRaises(
            ValueError, Envelope, None, (BOB, CAROL), dsn=(RecipientDSN(frozenset({N})),)
        )

    def test_spoolRoundTrip(self) -> None:
        spool = self.openSpool()
        writer = spool.begin(ENVELOPE, SESSION)
        writer.write(b"Subject: x\r\n\r\nhi\r\n")
        queueId = self.successResultOf(writer.commit())
        spool.close()
        [message] = self.openSpool().pending()
        self.assertEqual(message.queueId, queueId)
        self.assertEqual(message.envelope, ENVELOPE)
        self.assertEqual(message.envelope.dsnFor()[BOB].notify, {S, D})

    def test_oldFormatFileLoads(self) -> None:
        """
        A state file written before DSN and REQUIRETLS (format 1, the
        fixture) loads with the defaults: reports as before, no REQUIRETLS.
        """
        spool = self.openSpool()
        spool.close()
        queueId = "0193A4F2C1D2E0ABCDEF"
        queue = Path(self.directory) / "queue"
        shutil.copy(FIXTURES / "format-1-before-dsn.json", queue / f"{queueId}.json")
        (queue / f"{queueId}.msg").write_bytes(b"Subject: old\r\n\r\nbody\r\n")
        [message] = self.openSpool().pending()
        self.assertIsInstance(message, QueuedMessage)
        self.assertEqual(message.formatVersion, 1)
        envelope = message.envelope
        self.assertEqual(envelope.recipients, (BOB, CAROL))
        self.assertEqual((envelope.ret, envelope.envid, envelope.requireTLS), (None, None, False))
        self.assertEqual(envelope.dsn, ())
        self.assertEqual(set(envelope.dsnFor().values()), {NO_DSN})
        self.assertEqual([r.status.value for r in message.recipients], ["pending", "delivered"])
        # Written back, it is the same file (no new keys for unused features).
        original = json.loads((FIXTURES / "format-1-before-dsn.json").read_text())
        self.assertEqual(message.toJSON(), original)
