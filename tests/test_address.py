"""
Tests for mailgw.address: SMTP paths and MAIL/RCPT parameters.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.address import (
    AddressError,
    ParameterError,
    parseMailbox,
    parsePath,
    splitPathAndParameters,
)
from mailgw.envelope import Address


class PathTests(SynchronousTestCase):
    def test_simple(self) -> None:
        self.assertEqual(parsePath("<a.b+c@example.com>"), Address("a.b+c", "example.com"))

    def test_null(self) -> None:
        self.assertIsNone(parsePath("<>", allowNull=True))
        self.assertRaises(AddressError, parsePath, "<>")

    def test_sourceRouteIgnored(self) -> None:
        self.assertEqual(
            parsePath("<@a.example,@b.example:u@c.example>"), Address("u", "c.example")
        )

    def test_quoted(self) -> None:
        self.assertEqual(parsePath('<"a b@c"@d.example>'), Address('"a b@c"', "d.example"))
        self.assertRaises(AddressError, parsePath, '<"a\r"@d.example>')

    def test_literals(self) -> None:
        self.assertEqual(parsePath("<u@[192.0.2.1]>").domain, "[192.0.2.1]")
        self.assertEqual(parsePath("<u@[IPv6:2001:db8::1]>").domain, "[IPv6:2001:db8::1]")
        for bad in ("<u@[192.0.2.256]>", "<u@[IPv6:zz]>", "<u@[tag:foo]>", "<u@[1.2.3.4>"):
            self.assertRaises(AddressError, parsePath, bad)

    def test_invalid(self) -> None:
        for bad in (
            "a@b.c",
            "<a@b.c",
            "<a>",
            "<@b.c>",
            "<a@>",
            "<a@-b.c>",
            "<a..b@c.d>",
            "<.a@c.d>",
            "<a@b..c>",
            "<a b@c.d>",
            "<a@b_c.d>",
            "<a%b@c.d@>",
            "<" + "a" * 65 + "@b.c>",
            "<a@" + "b" * 64 + ".c>",
            "<a@b.c>>",
            "<@x:a@b.c",
        ):
            self.assertRaises(AddressError, parsePath, bad)

    def test_percentAndBangAreJustLocalParts(self) -> None:
        """
        ``a%b@c`` and ``b!a@c`` are mailboxes at c; we never route by them.
        """
        self.assertEqual(parsePath("<a%b@c.d>"), Address("a%b", "c.d"))
        self.assertEqual(parsePath("<b!a@c.d>"), Address("b!a", "c.d"))

    def test_utf8(self) -> None:
        self.assertRaises(AddressError, parsePath, "<j\u00f6rg@example.com>")
        self.assertEqual(
            parsePath("<j\u00f6rg@b\u00fccher.example>", utf8=True),
            Address("j\u00f6rg", "b\u00fccher.example"),
        )
        # C1 controls are not letters, even with SMTPUTF8.
        self.assertRaises(AddressError, parsePath, "<a\u0085b@c.d>", utf8=True)

    def test_mailbox(self) -> None:
        self.assertEqual(parseMailbox("x@y.z"), Address("x", "y.z"))


class ParameterTests(SynchronousTestCase):
    def test_split(self) -> None:
        path, params = splitPathAndParameters("<a@b.c> size=10 BODY=8BITMIME SMTPUTF8")
        self.assertEqual(path, "<a@b.c>")
        self.assertEqual(params, {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None})

    def test_quotedGreaterThan(self) -> None:
        path, params = splitPathAndParameters('<"a>b"@c.d> X=1')
        self.assertEqual(path, '<"a>b"@c.d>')

    def test_errors(self) -> None:
        self.assertRaises(ParameterError, splitPathAndParameters, "<a@b.c> SIZE=1 SIZE=2")
        self.assertRaises(ParameterError, splitPathAndParameters, "<a@b.c> =1")
        self.assertRaises(ParameterError, splitPathAndParameters, "<a@b.c> A=")
        self.assertRaises(AddressError, splitPathAndParameters, "<a@b.c>X")
        self.assertRaises(AddressError, splitPathAndParameters, "a@b.c")
        self.assertRaises(AddressError, splitPathAndParameters, '<"a@b.c>')


class PropertyTests(SynchronousTestCase):
    """No input makes the parsers raise anything but their own errors."""

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=300), st.booleans())
    def test_parsePathTotal(self, text: str, utf8: bool) -> None:
        try:
            result = parsePath(text, utf8=utf8, allowNull=True)
        except AddressError:
            return
        if result is not None:
            # Whatever is accepted survives a round trip.
            self.assertEqual(parsePath(f"<{result}>", utf8=utf8), result)

    @settings(max_examples=500, deadline=None)
    @given(st.from_regex(r"<[a-z.\"@\[\]:,0-9 \\]{0,40}>( [A-Za-z0-9=<>-]{0,12}){0,3}"))
    def test_splitTotal(self, text: str) -> None:
        try:
            splitPathAndParameters(text)
        except (AddressError, ParameterError):
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
    def test_mailboxTotal(self, text: str) -> None:
        try:
            parseMailbox(text, utf8=True)
        except AddressError:
            pass


class InvisibleCharacterTests(SynchronousTestCase):
    def test_formatAndSeparatorCharactersRefused(self) -> None:
        for char in ("\u2028", "\u2029", "\u202e", "\ufeff", "\u200b", "\u0085"):
            self.assertRaises(AddressError, parsePath, f"<a{char}b@c.d>", utf8=True)
            self.assertRaises(AddressError, parsePath, f'<"a{char}b"@c.d>', utf8=True)

    def test_lettersStillAccepted(self) -> None:
        self.assertEqual(
            parsePath("<\u00e9l\u00e8ve@\u00e9cole.example>", utf8=True).local, "\u00e9l\u00e8ve"
        )
