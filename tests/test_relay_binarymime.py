"""
BINARYMIME on the relay (RFC 3030 3): such a message goes only in BDAT
chunks, byte for byte, to an upstream that offers BINARYMIME and CHUNKING;
to any other it fails for good (554 5.6.3: nothing converts it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailgw.config import TLSMode
from mailgw.envelope import BodyType
from mailgw.relay.client import RelaySettings, deliverBatch
from mailgw.relay.clientprotocol import BODY_CHUNK
from tests.test_relay_client import makeMessage, opener
from tests.upstream import startUpstream

#: Binary: NULs, bare CR and LF, "." lines, and more than one read of the spool.
BODY = b"Subject: bin\r\n\r\n" + (bytes(range(256)) + b"\n.\n\r\n.\r\n\r") * 600


class BinaryMimeRelayTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def upstream(self, **knobs: Any) -> Any:
        upstream = yield startUpstream(reactor, **knobs)
        self.addCleanup(upstream.stop)
        return upstream

    def deliver(self, upstream: Any, body: bytes = BODY) -> Any:
        message = makeMessage(body=BodyType.BINARYMIME, size=len(body))
        settings = RelaySettings("localhost", "gw.example.com", TLSMode.NONE)
        relayed = [(message, opener({message.queueId: body}))]
        return deliverBatch(reactor, upstream.endpoint(reactor), settings, relayed)

    @inlineCallbacks
    def test_chunkedByteForByte(self) -> Any:
        self.assertGreater(len(BODY), BODY_CHUNK)
        upstream = yield self.upstream(chunking=True)
        [results] = yield self.deliver(upstream)
        self.assertTrue(all(r.success for r in results), results)
        [received] = upstream.transactions
        self.assertEqual(received.data, BODY)
        self.assertIn("BODY=BINARYMIME", received.mailParams)
        lines = upstream.commandLines()
        self.assertNotIn(b"DATA", lines)
        self.assertEqual(lines.count(b"BDAT 0 LAST"), 1)

    @inlineCallbacks
    def test_upstreamWithoutBinaryMime(self) -> Any:
        upstream = yield self.upstream()
        [results] = yield self.deliver(upstream)
        self.assertEqual(
            [(r.success, r.permanent, r.code, r.enhanced) for r in results],
            [(False, True, 554, "5.6.3")],
        )
        self.assertEqual(upstream.transactions, [])
        self.assertFalse([line for line in upstream.commandLines() if line.startswith(b"MAIL")])

    @inlineCallbacks
    def test_refusedChunkEndsTheTransaction(self) -> Any:
        upstream = yield self.upstream(chunking=True, chunkReplies={0: "552 5.3.4 Too big"})
        [results] = yield self.deliver(upstream)
        self.assertEqual([(r.success, r.permanent, r.code) for r in results], [(False, True, 552)])
        self.assertEqual(upstream.transactions, [])
        lines = upstream.commandLines()
        self.assertEqual(len([line for line in lines if line.startswith(b"BDAT")]), 1)
        self.assertIn(b"RSET", lines)
