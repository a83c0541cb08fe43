"""
CHUNKING (RFC 3030): BDAT chunks are the message byte for byte, read to
their declared end whatever the answer, and checked as DATA is.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailgw.envelope import BodyType
from mailgw.server.data import DataReader
from tests.helpers import Harness

MESSAGE = b"Subject: chunks\r\n\r\n.leading dot\r\n.\r\nQUIT\r\nlast line\r\n"


class ChunkingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.login()

    def envelope(self) -> None:
        h = self.h
        self.assertEqual(h.command(b"MAIL FROM:<alice@example.com>")[:3], b"250")
        self.assertEqual(h.command(b"RCPT TO:<bob@example.org>")[:3], b"250")

    def stored(self) -> bytes:
        [(_, data)] = self.h.spool.committed.values()
        return data

    def test_offered(self) -> None:
        self.assertIn(b"250-CHUNKING\r\n", self.h.command(b"EHLO client.test"))

    def test_chunksAreTheMessage(self) -> None:
        """No dot-stuffing, no end marker: ".\\r\\n" and "QUIT" are message text."""
        self.envelope()
        first, second = MESSAGE[:25], MESSAGE[25:]
        self.h.send(b"BDAT %d\r\n" % len(first) + first)
        self.assertEqual(self.h.take(), b"250 2.0.0 %d octets received\r\n" % len(first))
        self.h.send(b"BDAT %d LAST\r\n" % len(second) + second)
        self.assertRegex(self.h.take(), rb"^250 2\.0\.0 Ok: queued as \S+\r\n$")
        self.assertTrue(self.stored().endswith(b"\r\n" + MESSAGE), self.stored())

    def test_pipelinedInOneRead(self) -> None:
        """Replies in order, each after its chunk; the bytes after the last are commands."""
        self.envelope()
        a, b = MESSAGE[:10], MESSAGE[10:]
        self.h.send(b"BDAT 10\r\n" + a + b"BDAT %d LAST\r\n" % len(b) + b + b"NOOP\r\n")
        self.assertRegex(
            self.h.take(),
            rb"^250 2\.0\.0 10 octets received\r\n250 2\.0\.0 Ok: queued as \S+\r\n"
            rb"250 2\.0\.0 Ok\r\n$",
        )

    def test_byteAtATime(self) -> None:
        self.envelope()
        for byte in b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE:
            self.h.send(bytes([byte]))
        self.assertRegex(self.h.take(), rb"^250 2\.0\.0 Ok: queued as \S+\r\n$")
        self.assertTrue(self.stored().endswith(b"\r\n" + MESSAGE))

    def test_lastLineGetsCRLF(self) -> None:
        """Relayed with DATA, the message must end in CRLF."""
        self.envelope()
        body = b"Subject: x\r\n\r\nno end"
        self.h.send(b"BDAT %d LAST\r\n" % len(body) + body)
        self.assertRegex(self.h.take(), rb"^250 ")
        self.assertTrue(self.stored().endswith(b"Subject: x\r\n\r\nno end\r\n"))

    def test_emptyLastChunk(self) -> None:
        self.envelope()
        self.h.send(b"BDAT 14\r\nSubject: x\r\n\r\nBDAT 0 LAST\r\n")
        self.assertRegex(self.h.take(), rb"^250 2\.0\.0 14 octets received\r\n250 2\.0\.0 Ok: q")
        self.assertTrue(self.stored().endswith(b"Subject: x\r\n\r\n"))

    def test_refusedChunkIsDropped(self) -> None:
        """Without MAIL the chunk is read and dropped, never taken for commands."""
        chunk = b"RSET\r\nQUIT\r\n"
        self.h.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
        self.assertEqual(
            self.h.take(), b"503 5.5.1 Send MAIL first\r\n250 2.0.0 Ok\r\n", "RSET/QUIT ran"
        )
        self.assertFalse(self.h.closing)

    def test_beforeAuthentication(self) -> None:
        h = Harness()
        h.command(b"EHLO client.test")
        h.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(h.take(), b"530 5.7.0 Authentication required\r\n250 2.0.0 Ok\r\n")

    def test_noSizeCloses(self) -> None:
        """Nothing says where the chunk ends: the connection is closed."""
        for argument in (b"", b" x", b" 10 NOTLAST", b" -1", b" 1" + b"0" * 18):
            h = Harness()
            h.login()
            reply = h.command(b"BDAT" + argument)
            self.assertTrue(reply.startswith(b"501 5.5.4 "), (argument, reply))
            self.assertTrue(h.closing, argument)

    def test_dataAfterBdatFails(self) -> None:
        self.envelope()
        self.h.send(b"BDAT 3\r\nabc")
        self.h.take()
        self.assertEqual(
            self.h.command(b"DATA"),
            b"503 5.5.1 DATA not allowed after BDAT; transaction failed\r\n",
        )
        self.assertEqual(self.h.command(b"RCPT TO:<c@d.e>"), b"503 5.5.1 Send MAIL first\r\n")
        self.assertEqual(self.h.spool.committed, {})
        self.assertEqual(len(self.h.spool.aborted), 1)

    def test_rcptAfterBdatRefused(self) -> None:
        self.envelope()
        self.h.send(b"BDAT 3\r\nabc")
        self.h.take()
        self.assertEqual(
            self.h.command(b"RCPT TO:<c@d.e>"),
            b"503 5.5.1 Not allowed during a mail transaction\r\n",
        )

    def test_tooBigFailsAndLaterChunksAreDropped(self) -> None:
        h = Harness(maxMessageSize=100)
        h.login()
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org>")
        line = b"x" * 50 + b"\r\n"
        h.send(b"BDAT 104\r\n" + line * 2 + b"BDAT 10 LAST\r\nQUIT\r\nxxxx" + b"NOOP\r\n")
        self.assertEqual(
            h.take(),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
            b"503 5.5.1 Send MAIL first\r\n250 2.0.0 Ok\r\n",
        )
        self.assertEqual(h.spool.committed, {})

    def test_bareLineEndingsRefused(self) -> None:
        """The smuggling guarantee holds for chunks: a bare LF refuses the message."""
        self.envelope()
        body = b"Subject: x\r\n\r\na\n.\nMAIL FROM:<x@y.z>\r\n"
        self.h.send(b"BDAT %d LAST\r\n" % len(body) + body)
        self.assertEqual(
            self.h.take(),
            b"554 5.6.0 Message contains a bare CR or LF or a NUL; send CRLF line endings only\r\n",
        )
        self.assertEqual(self.h.spool.committed, {})

    def test_mailLoopAcrossChunks(self) -> None:
        h = Harness(maxReceivedHeaders=2)
        h.login()
        h.command(b"MAIL FROM:<alice@example.com>")
        h.command(b"RCPT TO:<bob@example.org>")
        h.send(b"BDAT 16\r\nReceived: a\r\nRec")
        self.assertEqual(h.take(), b"250 2.0.0 16 octets received\r\n")
        rest = b"eived: b\r\nReceived: c\r\n\r\nbody\r\n"
        h.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
        self.assertEqual(h.take()[:10], b"554 5.4.6 ")


class ChunkReaderTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.sampled_from([b"a", b".", b"\r\n", b"x" * 7, b"..", b"\r"]), max_size=40),
        st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8),
    )
    def test_chunkBoundariesDoNotMatter(self, parts: list[bytes], cuts: list[int]) -> None:
        """The stored message and the verdict depend on the bytes, not on the chunks."""
        message = b"".join(parts)

        def read(pieces: list[bytes]) -> tuple[bytes, object]:
            out: list[bytes] = []
            reader = DataReader(sink=out.append, maxSize=10**6, maxLineLength=20, stuffed=False)
            for i, piece in enumerate(pieces):
                reader.feedChunk(piece, i == len(pieces) - 1)
            return b"".join(out), reader.error

        pieces, rest = [], message
        for cut in cuts:
            pieces.append(rest[:cut])
            rest = rest[cut:]
        pieces.append(rest)
        whole = read([message])
        chunked = read(pieces)
        # Refused or not alike (which refusal comes first may differ when a
        # message breaks two rules, as with DATA).
        self.assertEqual(chunked[1] is None, whole[1] is None)
        if whole[1] is None:
            self.assertEqual(chunked[0], whole[0])
            expected = message if message.endswith(b"\r\n") or not message else message + b"\r\n"
            self.assertEqual(whole[0], expected)


class BinaryMimeTests(SynchronousTestCase):
    """BODY=BINARYMIME (RFC 3030 3), offered with ``[server] binarymime``."""

    BODY = b"Subject: bin\r\n\r\n\x00\x01\r\x02\n.\n\r\n.\r\n" + bytes(range(256)) * 40

    def start(self, **settings: object) -> Harness:
        h = Harness(**settings)
        h.login()
        return h

    def test_offeredOnlyWhenEnabled(self) -> None:
        self.assertNotIn(b"BINARYMIME", self.start().command(b"EHLO client.test"))
        h = self.start(binaryMime=True)
        self.assertIn(b"250-CHUNKING\r\n250-BINARYMIME\r\n", h.command(b"EHLO client.test"))
        plain = self.start()
        self.assertEqual(
            plain.command(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME"),
            b"501 5.5.4 Bad value for parameter BODY\r\n",
        )

    def test_storedAsReceived(self) -> None:
        """Bare CR, LF, NUL and long lines in the body: kept, byte for byte."""
        h = self.start(binaryMime=True)
        h.command(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME")
        h.command(b"RCPT TO:<bob@example.org>")
        first, rest = self.BODY[:19], self.BODY[19:]
        h.send(b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(rest) + rest)
        self.assertRegex(h.take(), rb"250 2\.0\.0 19 octets received\r\n250 2\.0\.0 Ok: queued as ")
        [(message, data)] = h.spool.committed.values()
        self.assertEqual(message.envelope.body, BodyType.BINARYMIME)
        self.assertTrue(data.endswith(b"\r\nSubject: bin\r\n\r\n" + self.BODY[16:]), data[:200])

    def test_tinyChunks(self) -> None:
        """The header section held over many one-octet chunks: the same message."""
        from mailgw.server.data import BinaryReader

        out: list[bytes] = []
        reader = BinaryReader(sink=out.append, maxSize=10**6)
        for i in range(len(self.BODY)):
            reader.feedChunk(self.BODY[i : i + 1], i == len(self.BODY) - 1)
        self.assertIsNone(reader.error)
        self.assertEqual(b"".join(out), self.BODY)
        self.assertEqual(bytes(reader.headers), b"Subject: bin\r\n")

    def test_dataRefused(self) -> None:
        h = self.start(binaryMime=True)
        h.command(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME")
        h.command(b"RCPT TO:<bob@example.org>")
        self.assertEqual(h.command(b"DATA"), b"503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA\r\n")
        self.assertEqual(h.spool.writers, [])

    def test_headerSectionStaysText(self) -> None:
        """A bare LF in the header section refuses the message: headers are lines."""
        h = self.start(binaryMime=True)
        h.command(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME")
        h.command(b"RCPT TO:<bob@example.org>")
        body = b"Subject: x\nBcc: y\r\n\r\nbody"
        h.send(b"BDAT %d LAST\r\n" % len(body) + body)
        self.assertEqual(h.take()[:10], b"554 5.6.0 ")
        self.assertEqual(h.spool.committed, {})

    def test_sizeLimit(self) -> None:
        h = self.start(binaryMime=True, maxMessageSize=1000)
        h.command(b"MAIL FROM:<alice@example.com> BODY=BINARYMIME")
        h.command(b"RCPT TO:<bob@example.org>")
        body = b"Subject: x\r\n\r\n" + b"\0" * 1000
        h.send(b"BDAT %d LAST\r\n" % len(body) + body)
        self.assertEqual(h.take()[:10], b"552 5.3.4 ")


class BinaryMimeConfigTests(SynchronousTestCase):
    def test_notWithAContentFilter(self) -> None:
        """The filter takes mail with DATA: BINARYMIME with it is a start-up error."""
        from mailgw.config import ConfigError, configFromDict

        data = {
            "server": {"hostname": "gw.example", "binary_mime": True},
            "filter": {"content_filter": "smtp:127.0.0.1:10024"},
        }
        with self.assertRaises(ConfigError) as e:
            configFromDict(data, source="f.toml")
        self.assertEqual(e.exception.key, "server.binary_mime")
        del data["filter"]
        self.assertTrue(configFromDict(data, source="f.toml").server.binaryMime)
