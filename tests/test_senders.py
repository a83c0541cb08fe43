"""
Tests for mailgw.policy.senders: who may send as whom.
"""

from __future__ import annotations

import os
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.address import AddressError, parsePath
from mailgw.envelope import Address, Envelope, Session, splitAddress
from mailgw.interfaces import ISubmissionPolicy
from mailgw.policy import senders
from mailgw.policy.senders import (
    Grant,
    SenderLoginPolicy,
    canonicalAddress,
    headerFromAddresses,
    parseSenderMap,
)
from mailgw.replies import SMTPReply

ALICE = "alice@example.com"


def path(text: str) -> Address:
    address = parsePath(text, utf8=True)
    assert address is not None
    return address


def session(user: str | None = ALICE) -> Session:
    return Session(clientAddress="192.0.2.7", clientPort=40000, user=user)


class LoggingMixin:
    def captureLog(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        self.patch(SenderLoginPolicy, "log", Logger(observer=observer))  # type: ignore[attr-defined]
        return events


class CanonicalAddressTests(SynchronousTestCase):
    def assertSame(self, a: str, b: str) -> None:
        self.assertEqual(canonicalAddress(path(a)), canonicalAddress(path(b)))

    def assertDifferent(self, a: str, b: str) -> None:
        self.assertNotEqual(canonicalAddress(path(a)), canonicalAddress(path(b)))

    def test_plain(self) -> None:
        self.assertEqual(canonicalAddress(Address("alice", "example.com")), ALICE)

    def test_case(self) -> None:
        self.assertEqual(canonicalAddress(Address("Alice", "Example.COM")), ALICE)
        self.assertSame("<ALICE@EXAMPLE.COM>", "<alice@example.com>")

    def test_quotedDotAtomUnquoted(self) -> None:
        self.assertEqual(canonicalAddress(path('<"alice"@example.com>')), ALICE)
        self.assertEqual(canonicalAddress(path('<"a.b"@example.com>')), "a.b@example.com")
        self.assertEqual(canonicalAddress(path('<"Al\\ice"@example.com>')), ALICE)

    def test_quotedOtherwiseStaysQuoted(self) -> None:
        # A space, a leading dot or a doubled dot make a different mailbox.
        self.assertEqual(canonicalAddress(path('<"a b"@x.example>')), '"a b"@x.example')
        self.assertDifferent('<"alice "@example.com>', "<alice@example.com>")
        self.assertDifferent('<".alice"@example.com>', "<alice@example.com>")
        self.assertDifferent('<"a..b"@example.com>', "<a.b@example.com>")

    def test_escapesCanonical(self) -> None:
        # \" and \\ are the only escapes kept; \a is just a.
        self.assertEqual(canonicalAddress(path('<"a\\"b"@x.example>')), '"a\\"b"@x.example')
        self.assertEqual(canonicalAddress(path('<"a\\\\b"@x.example>')), '"a\\\\b"@x.example')
        self.assertSame('<"a\\ b"@x.example>', '<"a b"@x.example>')

    def test_atSignInQuotes(self) -> None:
        self.assertEqual(canonicalAddress(path('<"a@b"@x.example>')), '"a@b"@x.example')
        self.assertDifferent('<"alice@example.com"@evil.example>', "<alice@example.com>")

    def test_sourceRouteIgnored(self) -> None:
        self.assertEqual(canonicalAddress(path("<@evil.example:alice@example.com>")), ALICE)

    def test_utf8LocalPart(self) -> None:
        self.assertEqual(canonicalAddress(path("<JOSÉ@example.com>")), "josé@example.com")
        # NFD and NFC spellings of the same name are one mailbox (RFC 6532 3.1).
        self.assertSame("<jose\u0301@example.com>", "<jos\u00e9@example.com>")
        self.assertDifferent("<josé@example.com>", "<jose@example.com>")
        self.assertEqual(canonicalAddress(path('<"Ünï"@example.com>')), "ünï@example.com")

    def test_idna(self) -> None:
        self.assertEqual(
            canonicalAddress(path("<user@bücher.example>")), "user@xn--bcher-kva.example"
        )
        self.assertSame("<user@bücher.example>", "<user@xn--bcher-kva.example>")
        self.assertSame("<user@BÜCHER.example>", "<user@XN--BCHER-KVA.EXAMPLE>")
        self.assertDifferent("<user@bücher.example>", "<user@bucher.example>")

    def test_domainIDNACannotEncode(self) -> None:
        # Not a registrable name: kept (ASCII lowercased), so it equals only itself.
        self.assertEqual(canonicalAddress(Address("u", "AB--CD.example")), "u@ab--cd.example")
        self.assertEqual(canonicalAddress(Address("u", "xn--ZZ.example")), "u@xn--zz.example")

    def test_addressLiterals(self) -> None:
        self.assertEqual(canonicalAddress(path("<u@[192.0.2.1]>")), "u@[192.0.2.1]")
        self.assertSame("<u@[IPv6:2001:DB8:0::1]>", "<u@[ipv6:2001:db8::1]>")
        self.assertEqual(canonicalAddress(Address("u", "[junk")), "u@[junk")

    def test_junkNeverRaises(self) -> None:
        for local, domain in [
            ("", ""),
            ('"', "."),
            ('"\\', "[]"),
            ("\udcff", "\udcff"),
            ("a", "-"),
        ]:
            self.assertIsInstance(canonicalAddress(Address(local, domain)), str)


_LOCAL_CHARS = st.sampled_from(list('aAzZ09.!#+-_=?{}~"\\ @ÉéßẞKе\u0301'))
_DOMAIN_PARTS = st.sampled_from(list("aAbB09-.ÜüßﬁＥ[]:") + ["xn--", "IPv6:", "192.0.2.1"])


class CanonicalAddressPropertyTests(SynchronousTestCase):
    @settings(max_examples=400)
    @given(
        st.one_of(
            st.text(max_size=80),
            st.builds(
                lambda route, local, domain: f"<{route}{local}@{domain}>",
                st.sampled_from(["", "@a.example:", "@a,@b.example:"]),
                st.text(_LOCAL_CHARS, min_size=1, max_size=12)
                | st.text(_LOCAL_CHARS, max_size=12).map(lambda s: f'"{s}"'),
                st.lists(_DOMAIN_PARTS, min_size=1, max_size=8).map("".join),
            ),
        )
    )
    def test_parsedNeverRaisesAndIdempotent(self, text: str) -> None:
        try:
            address = parsePath(text, utf8=True)
        except AddressError:
            return
        assert address is not None
        canonical = canonicalAddress(address)
        self.assertEqual(canonicalAddress(splitAddress(canonical)), canonical)

    @given(st.text(), st.text())
    def test_anyAddressNeverRaises(self, local: str, domain: str) -> None:
        self.assertIsInstance(canonicalAddress(Address(local, domain)), str)


class MapParsingTests(SynchronousTestCase):
    def test_format(self) -> None:
        grants = parseSenderMap(
            b"# comment\n"
            b"\n"
            b"  # indented comment\n"
            b"alice@example.com: Alice.Smith@Example.com, @Sales.Example\n"
            b"webapp: *\n"
            b'alice@example.com:  info@example.com  "a b"@example.com\r\n'
            b"nobody:\n",
            "map",
        )
        alice = grants["alice@example.com"]
        self.assertEqual(
            alice.addresses,
            {"alice.smith@example.com", "info@example.com", '"a b"@example.com'},
        )
        self.assertEqual(alice.domains, {"sales.example"})
        self.assertFalse(alice.anything)
        self.assertTrue(grants["webapp"].anything)
        self.assertFalse(grants["nobody"].allows("x", "example.com"))

    def test_idnaDomains(self) -> None:
        grants = parseSenderMap("u: @bücher.example, v@Bücher.example\n".encode(), "map")
        self.assertEqual(grants["u"].domains, {"xn--bcher-kva.example"})
        self.assertEqual(grants["u"].addresses, {"v@xn--bcher-kva.example"})

    def test_errorsNameFileAndLine(self) -> None:
        for text, problem in [
            (b"ok: a@b.example\nno colon here\n", "expected 'login: address, ...'"),
            (b"ok: a@b.example\n: a@b.example\n", "expected"),
            (b"ok: a@b.example\ntwo words: a@b.example\n", "expected"),
            (b"ok: a@b.example\nu: not-an-address\n", "bad entry 'not-an-address'"),
            (b"ok: a@b.example\nu: @\n", "bad entry '@'"),
            (b"ok: a@b.example\nu: a@[192.0.2.1]\n", "address literal"),
            (b"ok: a@b.example\nu: @[192.0.2.1]\n", "address literal"),
            (b"ok: a@b.example\nu: a@ab--cd.example\n", "bad entry"),
            (b"ok: a@b.example\nu: **\n", "bad entry"),
            (b"ok: a@b.example\nu: \xff@b.example\n", "not UTF-8"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parseSenderMap(text, "/etc/mailgw/senders")
            message = str(caught.exception)
            self.assertTrue(message.startswith("/etc/mailgw/senders:2: "), message)
            self.assertIn(problem, message)


class SenderTests(LoggingMixin, SynchronousTestCase):
    def policy(self, mapText: str | None = None, **kwargs: Any) -> SenderLoginPolicy:
        mapPath = None
        if mapText is not None:
            mapPath = self.mktemp()
            with open(mapPath, "w", encoding="utf-8") as f:
                f.write(mapText)
        return SenderLoginPolicy(mapPath, **kwargs)

    def assertAllowed(self, policy: SenderLoginPolicy, sender: str, user: str = ALICE) -> None:
        self.assertIsNone(policy.checkSender(session(user), path(sender)))

    def assertRefused(self, policy: SenderLoginPolicy, sender: str, user: str = ALICE) -> None:
        result = policy.checkSender(session(user), path(sender))
        self.assertIsInstance(result, SMTPReply)
        assert result is not None
        self.assertEqual((result.code, result.enhanced), (553, "5.7.1"))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISubmissionPolicy, SenderLoginPolicy(None)))

    def test_ownLogin(self) -> None:
        self.assertAllowed(self.policy(), "<alice@example.com>")

    def test_otherAddressRefused(self) -> None:
        events = self.captureLog()
        result = self.policy().checkSender(session(), path("<bob@example.com>"))
        self.assertEqual(
            result,
            SMTPReply(
                553,
                "5.7.1",
                "Sender address <bob@example.com> not owned by user <alice@example.com>",
            ),
        )
        [event] = events
        self.assertEqual(
            formatEvent(event),
            "MAIL FROM refused (not owned): user='alice@example.com' "
            "sender='<bob@example.com>' client=192.0.2.7",
        )

    def test_caseVariants(self) -> None:
        policy = self.policy()
        for sender in ["<Alice@Example.COM>", "<ALICE@EXAMPLE.COM>", "<alice@EXAMPLE.com>"]:
            self.assertAllowed(policy, sender)
            self.assertRefused(policy, sender, user="bob@example.com")
        self.assertAllowed(policy, "<alice@example.com>", user="Alice@Example.COM")

    def test_quotedAndEscapedForms(self) -> None:
        policy = self.policy()
        for sender in ['<"alice"@example.com>', '<"al\\ice"@example.com>', '<"ALICE"@example.com>']:
            self.assertAllowed(policy, sender)
            self.assertRefused(policy, sender, user="bob@example.com")
        # Not the same mailbox, so not alice's either.
        self.assertRefused(policy, '<"alice "@example.com>')
        self.assertRefused(policy, '<"alice@example.com"@evil.example>')

    def test_sourceRoute(self) -> None:
        policy = self.policy()
        self.assertAllowed(policy, "<@evil.example:alice@example.com>")
        self.assertRefused(policy, "<@example.com:bob@evil.example>")
        self.assertRefused(policy, "<@evil.example:alice@example.com>", user="bob@example.com")

    def test_domainWildcard(self) -> None:
        policy = self.policy("bob@example.com: @sales.example\n")
        self.assertAllowed(policy, "<anyone@sales.example>", user="bob@example.com")
        self.assertAllowed(policy, "<Anyone@SALES.example>", user="bob@example.com")
        self.assertRefused(policy, "<anyone@sub.sales.example>", user="bob@example.com")
        self.assertRefused(policy, "<anyone@sales.example.evil>", user="bob@example.com")
        self.assertRefused(policy, "<anyone@sales.example>")

    def test_anything(self) -> None:
        policy = self.policy("webapp: *\n")
        for sender in ["<x@example.com>", "<alice@example.com>", "<u@[192.0.2.1]>"]:
            self.assertAllowed(policy, sender, user="webapp")

    def test_addressLiteral(self) -> None:
        policy = self.policy("bob@example.com: @example.com\n")
        self.assertRefused(policy, "<bob@[192.0.2.1]>", user="bob@example.com")
        self.assertRefused(policy, "<u@[192.0.2.1]>", user="u@[192.0.2.1]")
        # Even a grant that somehow held a literal address does not match it.
        self.assertFalse(Grant(addresses=frozenset(["u@[192.0.2.1]"])).allows("u", "[192.0.2.1]"))

    def test_loginNotAnAddress(self) -> None:
        policy = self.policy("carol: carol@example.com\n")
        self.assertRefused(policy, "<webapp@example.com>", user="webapp")
        self.assertRefused(policy, "<carol@example.com>", user="webapp")
        self.assertAllowed(policy, "<Carol@example.com>", user="carol")
        self.assertRefused(policy, "<carol@example.com>", user="Carol")

    def test_mapMergesLines(self) -> None:
        policy = self.policy(f"{ALICE}: a@x.example\n{ALICE}: @y.example\n")
        self.assertAllowed(policy, "<a@x.example>")
        self.assertAllowed(policy, "<b@y.example>")
        self.assertAllowed(policy, "<alice@example.com>")
        self.assertRefused(policy, "<b@x.example>")

    def test_idna(self) -> None:
        policy = self.policy("bob@example.com: @bücher.example\n")
        self.assertAllowed(policy, "<user@xn--bcher-kva.example>", user="user@bücher.example")
        self.assertAllowed(policy, "<user@bücher.example>", user="user@xn--bcher-kva.example")
        self.assertAllowed(policy, "<x@XN--BCHER-KVA.example>", user="bob@example.com")
        self.assertRefused(policy, "<user@bucher.example>", user="user@bücher.example")

    def test_utf8Login(self) -> None:
        policy = self.policy()
        self.assertAllowed(policy, "<JOSÉ@example.com>", user="josé@example.com")
        self.assertRefused(policy, "<jose@example.com>", user="josé@example.com")

    def test_noUser(self) -> None:
        self.assertIsNone(self.policy().checkSender(session(None), path("<x@example.com>")))

    def test_nullSender(self) -> None:
        events = self.captureLog()
        result = self.policy().checkSender(session(), None)
        self.assertEqual(
            result, SMTPReply(553, "5.7.1", "Sender <> not allowed for user <alice@example.com>")
        )
        self.assertEqual(len(events), 1)
        self.assertIsNone(self.policy(allowNullSender=True).checkSender(session(), None))
        # "*" is about addresses; <> stays governed by allowNullSender.
        self.assertIsNotNone(self.policy("webapp: *\n").checkSender(session("webapp"), None))

    def test_replyTextSafe(self) -> None:
        result = self.policy().checkSender(session("bob\r\nx"), path("<josé@example.com>"))
        assert result is not None
        self.assertEqual(
            result.text, "Sender address <jos\\xe9@example.com> not owned by user <bob??x>"
        )

    def test_checkRecipient(self) -> None:
        policy = self.policy()
        self.assertIsNone(policy.checkRecipient(session(), path("<b@x.example>"), path("<c@y>")))


class MapFileTests(LoggingMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.mtime = 1_700_000_000_000_000_000
        self.write("bob: bob@example.com\n")

    def write(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)
        # Explicit, distinct mtimes: a rewrite within one timestamp tick is still seen.
        self.mtime += 1_000_000_000
        os.utime(self.path, ns=(self.mtime, self.mtime))

    def allowed(self, policy: SenderLoginPolicy, sender: str) -> bool:
        return policy.checkSender(session("bob"), path(sender)) is None

    def test_emptyPathMeansNoMap(self) -> None:
        policy = SenderLoginPolicy("")
        self.assertIsNone(policy.checkSender(session(), path("<alice@example.com>")))
        self.assertIsNotNone(policy.checkSender(session("bob"), path("<bob@example.com>")))

    def test_brokenAtStart(self) -> None:
        self.write("bob: bob@example.com\nbob bob@example.com\n")
        with self.assertRaises(ValueError) as caught:
            SenderLoginPolicy(self.path)
        self.assertEqual(str(caught.exception), f"{self.path}:2: expected 'login: address, ...'")

    def test_missingAtStart(self) -> None:
        with self.assertRaises(ValueError) as caught:
            SenderLoginPolicy(self.path + ".missing")
        self.assertIn(self.path + ".missing: cannot read sender login map", str(caught.exception))

    def test_rereadOnEveryCheckWithoutClock(self) -> None:
        policy = SenderLoginPolicy(self.path)
        self.assertTrue(self.allowed(policy, "<bob@example.com>"))
        self.write("bob: robert@example.com\n")
        self.assertFalse(self.allowed(policy, "<bob@example.com>"))
        self.assertTrue(self.allowed(policy, "<robert@example.com>"))

    def test_rereadAtMostOnceASecond(self) -> None:
        clock = Clock()
        policy = SenderLoginPolicy(self.path, clock=clock)
        self.write("bob: robert@example.com\n")
        clock.advance(0.5)
        self.assertTrue(self.allowed(policy, "<bob@example.com>"))
        clock.advance(0.5)
        self.assertFalse(self.allowed(policy, "<bob@example.com>"))
        self.assertTrue(self.allowed(policy, "<robert@example.com>"))

    def test_sameSizeSameMtimeNewInode(self) -> None:
        policy = SenderLoginPolicy(self.path)
        stat = os.stat(self.path)
        replacement = self.path + ".new"
        with open(replacement, "w") as f:
            f.write("bob: xxx@example.com\n")  # same length as the original
        os.utime(replacement, ns=(stat.st_mtime_ns, stat.st_mtime_ns))
        os.rename(replacement, self.path)  # how editors and `mv` replace a file
        self.assertTrue(self.allowed(policy, "<xxx@example.com>"))

    def test_brokenLaterKeepsLastGood(self) -> None:
        events = self.captureLog()
        policy = SenderLoginPolicy(self.path)
        self.write("bob: bob@example.com\nbob: *\nbroken line\n")
        self.assertTrue(self.allowed(policy, "<bob@example.com>"))
        self.assertFalse(self.allowed(policy, "<other@example.com>"))
        [event] = [e for e in events if "problem" in e]
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(event["problem"], f"{self.path}:3: expected 'login: address, ...'")
        self.write("bob: robert@example.com\n")
        self.assertTrue(self.allowed(policy, "<robert@example.com>"))
        self.assertFalse(self.allowed(policy, "<bob@example.com>"))
        self.assertEqual(events[-1]["log_level"].name, "info")

    def test_brokenFileParsedOnce(self) -> None:
        self.captureLog()
        policy = SenderLoginPolicy(self.path)
        calls: list[str] = []

        def counting(text: bytes, source: str) -> dict[str, Grant]:
            calls.append(source)
            return parseSenderMap(text, source)

        self.patch(senders, "parseSenderMap", counting)
        self.write("broken\n")
        for _ in range(3):
            self.assertTrue(self.allowed(policy, "<bob@example.com>"))
        self.assertEqual(calls, [self.path])

    def test_removedKeepsLastGoodLoggedOnce(self) -> None:
        events = self.captureLog()
        policy = SenderLoginPolicy(self.path)
        os.remove(self.path)
        self.assertTrue(self.allowed(policy, "<bob@example.com>"))
        self.assertTrue(self.allowed(policy, "<bob@example.com>"))
        self.assertEqual(len(events), 1)
        self.assertIn(self.path, events[0]["problem"])


def message(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


ENVELOPE = Envelope(sender=Address("alice", "example.com"), recipients=(Address("r", "x.example"),))


class HeaderFromTests(LoggingMixin, SynchronousTestCase):
    def setUp(self) -> None:
        mapPath = self.mktemp()
        with open(mapPath, "w") as f:
            f.write(f"{ALICE}: @team.example\n")
        self.policy = SenderLoginPolicy(mapPath, checkHeaderFrom=True)

    def check(self, *lines: str, user: str | None = ALICE) -> SMTPReply | None:
        return self.policy.checkMessage(session(user), ENVELOPE, message(*lines, "Subject: hi"))

    def assertAllowed(self, *lines: str) -> None:
        self.assertIsNone(self.check(*lines))

    def assertRefused(self, *lines: str, text: str | None = None) -> None:
        result = self.check(*lines)
        self.assertIsInstance(result, SMTPReply)
        assert result is not None
        self.assertEqual((result.code, result.enhanced), (550, "5.7.1"))
        if text is not None:
            self.assertEqual(result.text, text)

    def test_offByDefault(self) -> None:
        policy = SenderLoginPolicy(None)
        self.assertIsNone(policy.checkMessage(session(), ENVELOPE, message("From: x@evil.example")))

    def test_noUser(self) -> None:
        self.assertIsNone(self.check("From: x@evil.example", user=None))

    def test_own(self) -> None:
        self.assertAllowed("From: alice@example.com")
        self.assertAllowed("From: Alice Example <Alice@EXAMPLE.com>")
        self.assertAllowed('From: "Example, Alice" <"alice"@example.com> (work)')
        self.assertAllowed("From: =?utf-8?q?Al=C3=AEce?= <alice@example.com>")
        self.assertAllowed("From: someone@Team.Example")
        self.assertAllowed("from: alice@example.com")
        self.assertAllowed("From: <@route.example:alice@example.com>")

    def test_missingFromAllowed(self) -> None:
        # RFC 6409 8.1: an MSA may add one; we let it through unchanged.
        self.assertAllowed("To: r@x.example")

    def test_other(self) -> None:
        events = self.captureLog()
        self.assertRefused(
            "From: Bob <bob@example.com>",
            text="Header From: address <bob@example.com> not owned by user <alice@example.com>",
        )
        [event] = events
        self.assertEqual(event["user"], ALICE)
        self.assertEqual(event["sender"], "<bob@example.com>")
        self.assertEqual(event["what"], "header From")

    def test_envelopeDoesNotCount(self) -> None:
        self.assertRefused("From: r@x.example")

    def test_severalFromFields(self) -> None:
        self.assertRefused("From: alice@example.com", "From: bob@example.com")
        self.assertRefused("From: bob@example.com", "From: alice@example.com")
        self.assertAllowed("From: alice@example.com", "From: x@team.example")

    def test_severalAddresses(self) -> None:
        self.assertRefused("From: alice@example.com, bob@example.com")
        self.assertAllowed("From: alice@example.com, x@team.example")

    def test_groups(self) -> None:
        self.assertAllowed("From: Us: alice@example.com, x@team.example;")
        self.assertRefused("From: Us: alice@example.com, bob@example.com;")
        self.assertRefused("From: undisclosed-recipients:;", text="Header From: holds no address")

    def test_empty(self) -> None:
        self.assertRefused("From:", text="Header From: holds no address")

    def test_folded(self) -> None:
        self.assertAllowed("From: Alice", " <alice@example.com>")
        self.assertRefused("From: alice@example.com,", "\tbob@example.com")

    def test_obsoleteSpaceBeforeColon(self) -> None:
        # RFC 5322 4.5.2 (obs-optional): readers take "From :" as From.
        self.assertRefused("From : bob@example.com")
        self.assertRefused("FROM\t: bob@example.com")

    def test_junk(self) -> None:
        for value in [
            "From: junk <<<",
            "From: <bob@example.com",
            "From: alice@example.com <bob@example.com>",
            "From: alice@example.com;bob@example.com",
            "From: a@b@c",
            'From: "unterminated@example.com',
            "From: =?utf-8?q?alice?=@example.com",
        ]:
            result = self.check(value)
            self.assertIsNotNone(result, value)
            assert result is not None
            self.assertEqual((result.code, result.enhanced), (550, "5.7.1"))

    def test_encodedWordInAddress(self) -> None:
        self.assertEqual(
            headerFromAddresses(b"From: a=?utf-8?q?x?=b@example.com\r\n"),
            "Header From: has an encoded word in an address",
        )
        # Python decodes this one (to "alice@victim.example"@team.example);
        # a reader may show it otherwise: only plain addresses are checked.
        self.assertRefused(
            "From: =?utf-8?q?alice=40victim.example?= @team.example",
            text="Header From: write each address plainly, as local@domain",
        )
        self.assertRefused("From: alice(comment)@example.com")
        self.assertRefused("From: alice @ example . com")

    def test_noDomain(self) -> None:
        self.assertRefused("From: alice")

    def test_addressLiteral(self) -> None:
        self.assertRefused("From: alice@[192.0.2.1]")

    def test_utf8(self) -> None:
        policy = SenderLoginPolicy(None, checkHeaderFrom=True)
        own = session("josé@bücher.example")
        header = "From: José <JOSÉ@xn--bcher-kva.example>\r\n".encode()
        self.assertIsNone(policy.checkMessage(own, ENVELOPE, header))
        self.assertIsNotNone(policy.checkMessage(session(), ENVELOPE, header))

    def test_notUTF8(self) -> None:
        result = self.policy.checkMessage(session(), ENVELOPE, b"From: al\xffce@example.com\r\n")
        self.assertIsNotNone(result)

    def test_bodyIgnored(self) -> None:
        headers = message("From: alice@example.com", "", "From: bob@example.com")
        self.assertIsNone(self.policy.checkMessage(session(), ENVELOPE, headers))

    def test_unfoldedContinuationWithoutField(self) -> None:
        self.assertAllowed(" From: bob@example.com", "From: alice@example.com")

    @settings(max_examples=300)
    @given(st.binary(max_size=300) | st.text(max_size=200).map(lambda t: f"From: {t}".encode()))
    def test_neverRaises(self, headers: bytes) -> None:
        result = self.policy.checkMessage(session(), ENVELOPE, headers)
        self.assertTrue(result is None or isinstance(result, SMTPReply))
