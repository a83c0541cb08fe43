"""
Tests for mailgw.server.data: end of data, unstuffing and line checks,
whatever the chunking.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.server.data import DataReader


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def read(wire: bytes, cuts: list[int], **limits: int) -> tuple[DataReader, bytes, bytes | None]:
    out: list[bytes] = []
    reader = DataReader(out.append, limits.get("maxSize", 10**9), limits.get("maxLine", 10**6))
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
