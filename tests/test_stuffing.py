"""
Tests for L{mailgw.relay.stuffing}.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.relay.stuffing import DotStuffer

TERMINATOR = b"\r\n.\r\n"


def unstuff(wire: bytes) -> tuple[bytes, bytes]:
    """
    A reference receiver (RFC 5321 4.1.1.4, 4.5.2): the data ends at the
    first CRLF "." CRLF, counting the CRLF that ended the DATA command as
    the one before the start; a leading "." is dropped from every line.

    @return: (message data, bytes after the terminator).
    """
    raw = b"\r\n" + wire
    end = raw.find(TERMINATOR)
    if end < 0:
        raise AssertionError(f"no terminator in {wire!r}")
    body = raw[2 : end + 2]
    lines = body.split(b"\r\n")
    out = [line[1:] if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(out), raw[end + len(TERMINATOR) :]


def stuffAll(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


def expected(data: bytes) -> bytes:
    """What the receiver must see for input C{data}."""
    if data == b"" or data.endswith(b"\r\n"):
        return data
    return data + b"\r\n"


def splitAt(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    chunks, last = [], 0
    for cut in cuts:
        chunks.append(data[last:cut])
        last = cut
    chunks.append(data[last:])
    return chunks


# Bytes drawn mostly from the ones that matter, so that lines starting with a
# dot, CRLF pairs split across chunks and lone CRs and LFs are common.
interesting = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\x00", b"\xff", b"\r\n."]),
    max_size=60,
).map(b"".join)
anyBytes = st.one_of(interesting, st.binary(max_size=200))


class DotStufferTests(SynchronousTestCase):
    def test_examples(self) -> None:
        """
        A line starting with "." gets another one; other lines pass as they
        are; the terminator completes a last line without CRLF.
        """
        cases = [
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"..x\r\n", b"...x\r\n.\r\n"),
            (b"x.y\r\n", b"x.y\r\n.\r\n"),
            (b"a\n.\r\n", b"a\n.\r\n.\r\n"),  # bare LF ends no line
            (b"a\r.\r\n", b"a\r.\r\n.\r\n"),  # nor does a bare CR
        ]
        for data, wire in cases:
            self.assertEqual(stuffAll([data]), wire, data)

    def test_boundaryBetweenCRAndLF(self) -> None:
        """
        A chunk boundary between the CR and LF of a line ending, right
        before a dot, still stuffs that dot.
        """
        self.assertEqual(stuffAll([b"a\r", b"\n.\r\n"]), b"a\r\n..\r\n.\r\n")
        self.assertEqual(stuffAll([b"a\r", b"\n", b".", b"\r\n"]), b"a\r\n..\r\n.\r\n")
        self.assertEqual(stuffAll([b"a\r\n", b".\r\n"]), b"a\r\n..\r\n.\r\n")
        self.assertEqual(stuffAll([b".", b"."]), b"...\r\n.\r\n")

    def test_loneLFAfterCRChunkOnlyCountsOnce(self) -> None:
        """
        A chunk of just LF ends a line only when the previous chunk ended
        with CR.
        """
        self.assertEqual(stuffAll([b"a", b"\n", b".x"]), b"a\n.x\r\n.\r\n")
        self.assertEqual(stuffAll([b"a\r", b"\n", b".x"]), b"a\r\n..x\r\n.\r\n")

    def test_emptyChunksChangeNothing(self) -> None:
        self.assertEqual(stuffAll([b"a\r", b"", b"\n", b"", b"."]), b"a\r\n..\r\n.\r\n")

    @settings(max_examples=400, deadline=None)
    @given(data=anyBytes, points=st.lists(st.integers(min_value=0), max_size=12))
    def test_roundTrip(self, data: bytes, points: list[int]) -> None:
        """
        Whatever the bytes and wherever they are split, the reference
        receiver gets the input back (plus CRLF when it lacked one) and
        the terminator is the first CRLF "." CRLF of the stream.
        """
        wire = stuffAll(splitAt(data, points))
        body, rest = unstuff(wire)
        self.assertEqual(body, expected(data))
        self.assertEqual(rest, b"")

    @settings(max_examples=400, deadline=None)
    @given(data=anyBytes, points=st.lists(st.integers(min_value=0), max_size=12))
    def test_chunkingDoesNotMatter(self, data: bytes, points: list[int]) -> None:
        """
        The output is the same however the input is chunked.
        """
        self.assertEqual(stuffAll(splitAt(data, points)), stuffAll([data]))

    @settings(max_examples=200, deadline=None)
    @given(data=anyBytes, points=st.lists(st.integers(min_value=0), max_size=12))
    def test_noEarlyTerminator(self, data: bytes, points: list[int]) -> None:
        """
        The stuffed data never holds CRLF "." CRLF, nor starts with
        "." CRLF, before the terminator that L{DotStuffer.finish} adds.
        """
        stuffer = DotStuffer()
        stuffed = b"".join(stuffer.feed(c) for c in splitAt(data, points))
        self.assertNotIn(TERMINATOR, b"\r\n" + stuffed)
        wire = stuffed + stuffer.finish()
        self.assertEqual((b"\r\n" + wire).find(TERMINATOR), len(wire) + 2 - len(TERMINATOR))
