"""
Tests for mailgw.server.data: end of data, unstuffing and line checks,
whatever the chunking.
"""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.relay.stuffing import DotStuffer
from mailgw.server.data import DataReader


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def read(
    wire: bytes, cuts: list[int], bareLF: bool = False, **limits: int
) -> tuple[DataReader, bytes, bytes | None]:
    out: list[bytes] = []
    reader = DataReader(
        out.append,
        limits.get("maxSize", 10**9),
        limits.get("maxLine", 10**6),
        acceptBareLF=bareLF,
    )
    rest = None
    points = sorted({c % (len(wire) + 1) for c in cuts}) + [len(wire)]
    start = 0
    for point in points:
        if rest is not None:
            break
        rest = reader.feed(wire[start:point])
        start = point
    if rest is not None:
        rest += wire[start:]
    return reader, b"".join(out), rest


line = st.binary(max_size=30).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)


class DataReaderTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(line, max_size=20), st.lists(st.integers(0, 10**6), max_size=8))
    def test_roundTrip(self, lines: list[bytes], cuts: list[int]) -> None:
        wire = stuff(lines) + b".\r\nQUIT\r\n"
        reader, body, rest = read(wire, cuts)
        self.assertIsNone(reader.error)
        self.assertEqual(body, b"".join(x + b"\r\n" for x in lines))
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertEqual(reader.size, len(stuff(lines)))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(line, min_size=1, max_size=10),
        st.sampled_from([b"\n", b"\r", b"\0"]),
        st.integers(0, 9),
        st.lists(st.integers(0, 10**6), max_size=8),
    )
    def test_badBytesRefused(
        self, lines: list[bytes], bad: bytes, at: int, cuts: list[int]
    ) -> None:
        lines[at % len(lines)] += bad + b"x"
        reader, _, rest = read(stuff(lines) + b".\r\n", cuts)
        self.assertIsNotNone(reader.error)
        self.assertEqual(reader.error.code, 554)  # type: ignore[union-attr]
        self.assertEqual(rest, b"")

    def test_emptyMessage(self) -> None:
        reader, body, rest = read(b".\r\n", [])
        self.assertEqual((body, rest), (b"", b""))

    def test_notEnded(self) -> None:
        for wire in (b"a\r\n.", b"a\r\n.\r", b"a\n.\n", b"a\r\n..\r\n", b"a\r\n. \r\n"):
            _, _, rest = read(wire, [1, 2, 3])
            self.assertIsNone(rest, wire)

    def test_sizeLimit(self) -> None:
        reader, body, rest = read(b"x" * 50 + b"\r\n" + b"y" * 50 + b"\r\n.\r\n", [], maxSize=60)
        self.assertEqual(reader.error.code, 552)  # type: ignore[union-attr]
        self.assertEqual(rest, b"")
        self.assertEqual(reader.size, 104)

    def test_lineLimitAcrossChunks(self) -> None:
        wire = b"a\r\n" + b"L" * 5000 + b"\r\nb\r\n.\r\nNOOP\r\n"
        reader, body, rest = read(wire, list(range(0, len(wire), 100)), maxLine=1000)
        self.assertEqual(reader.error.code, 554)  # type: ignore[union-attr]
        self.assertEqual(rest, b"NOOP\r\n")
        self.assertEqual(body, b"a\r\n")

    def test_longLineWithinLimit(self) -> None:
        wire = b"L" * 5000 + b"\r\n.\r\n"
        reader, body, rest = read(wire, list(range(0, len(wire), 999)), maxLine=5000)
        self.assertIsNone(reader.error)
        self.assertEqual(body, b"L" * 5000 + b"\r\n")


class HeaderTests(SynchronousTestCase):
    def test_headersCollected(self) -> None:
        wire = b"From: a@b.c\r\nSubject: x\r\n\r\nbody\r\nReceived: not a header\r\n.\r\n"
        for step in (1, 3, 7, len(wire)):
            reader, body, rest = read(wire, list(range(0, len(wire), step)))
            self.assertIsNone(reader.error)
            self.assertEqual(bytes(reader.headers), b"From: a@b.c\r\nSubject: x\r\n")
            self.assertEqual(reader.received, 0)
            self.assertEqual(body, wire[:-3])

    def test_noBody(self) -> None:
        reader, _, _ = read(b"Subject: x\r\n.\r\n", [])
        self.assertEqual(bytes(reader.headers), b"Subject: x\r\n")

    def test_headerSizeLimit(self) -> None:
        out: list[bytes] = []
        reader = DataReader(out.append, 10**9, 10**6, maxHeaderSize=100)
        wire = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 20) for i in range(10)) + b"\r\nb\r\n.\r\n"
        self.assertEqual(reader.feed(wire), b"")
        self.assertEqual(reader.error.code, 552)  # type: ignore[union-attr]

    def test_mailLoop(self) -> None:
        out: list[bytes] = []
        reader = DataReader(out.append, 10**9, 10**6, maxReceived=3)
        hops = b"".join(b"received: from hop%d\r\n" % i for i in range(4))
        self.assertEqual(reader.feed(hops + b"\r\nbody\r\n.\r\n"), b"")
        self.assertEqual(reader.error.enhanced, "5.4.6")  # type: ignore[union-attr]
        reader = DataReader(out.append, 10**9, 10**6, maxReceived=3)
        reader.feed(hops[: hops.rfind(b"received")] + b"\r\nReceived: in body\r\n.\r\n")
        self.assertIsNone(reader.error)


def endOf(wire: bytes) -> int | None:
    """Where the data ends by RFC 5321 4.1.1.4: after the first CRLF "." CRLF."""
    if wire.startswith(b".\r\n"):
        return 3
    end = wire.find(b"\r\n.\r\n")
    return None if end == -1 else end + 5


def expectedBody(content: bytes) -> bytes:
    """
    ``content`` (the bytes before the terminator's "." CRLF) as the gateway
    stores it with accept_bare_lf: a "." is removed only at the start of a
    CRLF line, then every bare LF becomes CRLF.
    """
    lines = content.split(b"\r\n")
    unstuffed = b"\r\n".join(x[1:] if x.startswith(b".") else x for x in lines)
    return unstuffed.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


# Pieces from which messages with every mix of line endings and dots are built.
piece = st.sampled_from([b"a", b"x y", b".", b"..", b"\n", b"\r\n", b"\n.\n", b"\r\n.\n"])


class BareLFTests(SynchronousTestCase):
    """
    accept_bare_lf: lines ending in a bare LF are stored with CRLF; only
    CRLF "." CRLF ends the data, with or without the option.
    """

    # wire -> body stored with the option (None: refused with 554 5.6.0).
    # Each ends at its last CRLF.CRLF, followed by NOOP.
    CASES = [
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\n.\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        # After CRLF a "." starts an SMTP line ".<LF>b": the client's stuffing dot.
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n\n.\n\nb\r\n.\r\n", b"a\r\n\r\n.\r\n\r\nb\r\n"),
        (b"a\n..\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n"),  # no unstuffing after a bare LF
        (b"a\r\n..\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),  # unstuffing after CRLF
        (b"..x\n.\r\n.\r\n", b".x\r\n.\r\n"),  # the first line is a CRLF line start
        (b"\n.\r\n.\r\n", b"\r\n.\r\n"),
        (b"a\n\r\n.\r\n", b"a\r\n\r\n"),  # what curl sends for a file ending in LF
        (b"a\rb\r\n.\r\n", None),
        (b"a\r\r\n.\r\n", None),
        (b"a\n\r.\r\n.\r\n", None),
        (b"a\n\x00\r\n.\r\n", None),
    ]

    def test_endVariants(self) -> None:
        for wire, stored in self.CASES:
            for step in (1, 2, 3, len(wire)):
                cuts = list(range(0, len(wire), step))
                reader, body, rest = read(wire + b"NOOP\r\n", cuts, bareLF=True)
                self.assertEqual(rest, b"NOOP\r\n", wire)
                if stored is None:
                    self.assertEqual(reader.error.code, 554, wire)  # type: ignore[union-attr]
                else:
                    self.assertIsNone(reader.error, wire)
                    self.assertEqual(body, stored, (wire, step))
                    self.assertEqual(
                        reader.size, len(wire) - 3 + wire.count(b"\n") - wire.count(b"\r\n")
                    )
                # Without the option the same bytes end at the same place;
                # a bare LF refuses the message.
                reader, body, rest = read(wire + b"NOOP\r\n", cuts)
                self.assertEqual(rest, b"NOOP\r\n", wire)
                if stored is None or wire.count(b"\n") != wire.count(b"\r\n"):
                    self.assertEqual(reader.error.code, 554, wire)  # type: ignore[union-attr]
                else:
                    self.assertIsNone(reader.error, wire)

    def test_variantsNeverEnd(self) -> None:
        for bareLF in (False, True):
            for wire in (b"a\n.\n", b"a\n.\r\n", b"a\r\n.\n", b"a\n.\nb\n.\n", b".\n", b"\n.\r\n"):
                _, _, rest = read(wire, [1, 2, 3], bareLF=bareLF)
                self.assertIsNone(rest, (wire, bareLF))

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(piece, max_size=30),
        st.lists(st.integers(0, 10**6), max_size=8),
        st.booleans(),
    )
    def test_endExactlyAtCRLFDotCRLF(
        self, pieces: list[bytes], cuts: list[int], bareLF: bool
    ) -> None:
        wire = b"".join(pieces) + b"\r\n.\r\nQUIT\r\n"
        end = endOf(wire)
        assert end is not None
        reader, body, rest = read(wire, cuts, bareLF=bareLF)
        self.assertEqual(rest, wire[end:])
        content = wire[: end - 3]
        if bareLF:
            self.assertIsNone(reader.error)
            self.assertEqual(body.count(b"\n"), body.count(b"\r\n"))
            self.assertEqual(body.count(b"\r"), body.count(b"\r\n"))
            self.assertEqual(body, expectedBody(content))
        elif content.count(b"\n") != content.count(b"\r\n"):
            self.assertEqual(reader.error.code, 554)  # type: ignore[union-attr]

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(piece, max_size=20),
        st.lists(piece, max_size=20),
        st.lists(st.integers(0, 10**6), max_size=8),
    )
    def test_lfDotLfNeverEndsEarly(
        self, before: list[bytes], after: list[bytes], cuts: list[int]
    ) -> None:
        head = b"".join(before).replace(b"\r\n", b"\n") + b"\n.\n"
        wire = head + b"".join(after) + b"\r\n.\r\nQUIT\r\n"
        reader, body, rest = read(wire, cuts, bareLF=True)
        self.assertIsNone(reader.error)
        self.assertIsNotNone(rest)
        self.assertGreater(len(wire) - len(rest), len(head))  # type: ignore[arg-type]
        self.assertIn(b"\r\n.\r\n", body)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(piece, max_size=30),
        st.lists(st.integers(0, 10**6), max_size=8),
        st.lists(st.integers(0, 10**6), max_size=8),
    )
    def test_relayStuffsConvertedLines(
        self, pieces: list[bytes], cuts: list[int], relayCuts: list[int]
    ) -> None:
        """
        The relay's stuffer doubles a "." that begins a converted line, so
        the next server (which accepts CRLF only) reads back the stored
        message, ending exactly at the relay's terminator.
        """
        wire = b"".join(pieces) + b"\r\n.\r\n"
        reader, body, rest = read(wire, cuts, bareLF=True)
        self.assertIsNone(reader.error)
        stuffer = DotStuffer()
        points = sorted({c % (len(body) + 1) for c in relayCuts}) + [len(body)]
        relayed = b"".join(stuffer.feed(body[a:b]) for a, b in pairwise([0, *points]))
        relayed += stuffer.finish()
        upstream, again, after = read(relayed + b"RSET\r\n", cuts)
        self.assertIsNone(upstream.error)
        self.assertEqual(after, b"RSET\r\n")
        self.assertEqual(again, body if body.endswith(b"\r\n") or not body else body + b"\r\n")

    def test_relayStuffsLFDotLine(self) -> None:
        _, body, _ = read(b"a\n.\nb\n.\r\n.\r\n", [], bareLF=True)
        self.assertEqual(body, b"a\r\n.\r\nb\r\n.\r\n")
        stuffer = DotStuffer()
        relayed = stuffer.feed(body) + stuffer.finish()
        self.assertEqual(relayed, b"a\r\n..\r\nb\r\n..\r\n.\r\n")

    def test_lineLimitCountsLFLines(self) -> None:
        wire = b"a\n" + b"L" * 5000 + b"\nb\n.\r\n.\r\nNOOP\r\n"
        reader, body, rest = read(wire, list(range(0, len(wire), 100)), bareLF=True, maxLine=1000)
        self.assertEqual(reader.error.code, 554)  # type: ignore[union-attr]
        self.assertEqual(rest, b"NOOP\r\n")
        self.assertEqual(body, b"a\r\n")
        # A file of short LF lines with no CRLF at all is not one long line.
        wire = b"".join(b"line %d\n" % i for i in range(500)) + b"\r\n.\r\n"
        reader, body, rest = read(wire, list(range(0, len(wire), 64)), bareLF=True, maxLine=1000)
        self.assertIsNone(reader.error)
        self.assertEqual(body, wire[:-3].replace(b"\n", b"\r\n").replace(b"\r\r", b"\r"))

    def test_overlongLineEndedByLFThenDot(self) -> None:
        # After an overlong line ended by a bare LF, ".\r\n" is a line, not the end.
        wire = b"L" * 3000 + b"\n.\r\nx\r\n.\r\nNOOP\r\n"
        for step in (1, 7, 1000, len(wire)):
            reader, _, rest = read(wire, list(range(0, len(wire), step)), bareLF=True, maxLine=1000)
            self.assertEqual(rest, b"NOOP\r\n", step)
            self.assertEqual(reader.error.code, 554)  # type: ignore[union-attr]

    def test_sizeCountsAddedCR(self) -> None:
        wire = b"x\n" * 40 + b"\r\n.\r\n"
        reader, _, rest = read(wire, [], bareLF=True, maxSize=100)
        self.assertEqual(reader.error.code, 552)  # type: ignore[union-attr]
        self.assertEqual(rest, b"")
