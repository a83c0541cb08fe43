"""
Tests for L{mailgw.dkim.canon}: the streamed body hash equals the hash of
dkimpy's canonicalization of the whole body, however the body is split.
"""

from __future__ import annotations

import hashlib

from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.dkim.canon import BodyHasher

# Bodies made of the bytes that matter: CR, LF, space, tab, and text.
bodies = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b" ", b"\t", b"a", b"b c", b"\r\n\r\n", b"  \t"]),
    max_size=40,
).map(b"".join)


def streamed(body: bytes, relaxed: bool, cuts: list[int]) -> bytes:
    hasher = BodyHasher(relaxed)
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        hasher.update(body[start:cut])
        start = max(start, cut)
    hasher.update(body[start:])
    return hasher.digest()


def expected(body: bytes, relaxed: bool) -> bytes:
    canonical = (Relaxed if relaxed else Simple).canonicalize_body(body)
    return hashlib.sha256(canonical).digest()


class BodyHasherTests(SynchronousTestCase):
    def test_examples(self) -> None:
        """RFC 6376 3.4.5's example, empty bodies, and trailing empty lines."""
        example = b" C \r\nD \t E\r\n\r\n\r\n"
        self.assertEqual(streamed(example, True, []), hashlib.sha256(b" C\r\nD E\r\n").digest())
        self.assertEqual(
            streamed(example, False, []), hashlib.sha256(b" C \r\nD \t E\r\n").digest()
        )
        self.assertEqual(streamed(b"", False, []), hashlib.sha256(b"\r\n").digest())
        self.assertEqual(streamed(b"", True, []), hashlib.sha256(b"").digest())
        self.assertEqual(streamed(b"\r\n\r\n", True, [1, 3]), hashlib.sha256(b"").digest())
        self.assertEqual(streamed(b"x\r\n\r\n", False, [4]), hashlib.sha256(b"x\r\n").digest())
        self.assertEqual(
            streamed(b"x\r\n\r\ny\r\n", True, [3]), hashlib.sha256(b"x\r\n\r\ny\r\n").digest()
        )

    @settings(max_examples=500, deadline=None)
    @given(bodies, st.booleans(), st.lists(st.integers(min_value=0, max_value=400), max_size=6))
    def test_sameAsDkimpy(self, body: bytes, relaxed: bool, cuts: list[int]) -> None:
        self.assertEqual(streamed(body, relaxed, cuts), expected(body, relaxed))
