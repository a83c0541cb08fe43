"""
The milter codec and client: packets both ways, negotiation, deadlines,
and bytes from a hostile milter (never a crash, never an unbounded buffer).
"""

from __future__ import annotations

import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailgw.milter import codec
from mailgw.milter.client import MilterClient, MilterUnavailable, Negotiated
from mailgw.milter.codec import Decoder, MilterProtocolError, Response


def packets(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split MTA packets back into (code, data)."""
    out = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        out.append((data[4:5], data[5 : 4 + length]))
        data = data[4 + length :]
    return out


class EncodeTests(SynchronousTestCase):
    def test_optneg(self) -> None:
        [(code, data)] = packets(codec.optneg())
        self.assertEqual(code, codec.OPTNEG)
        version, actions, steps = struct.unpack(">III", data)
        self.assertEqual((version, actions, steps), (6, codec.OFFERED_ACTIONS, codec.OFFERED_STEPS))
        # Never CHGFROM, ADDRCPT_PAR, SETSYMLIST; never the larger packet sizes.
        self.assertEqual(actions & (0x40 | 0x80 | 0x100), 0)
        self.assertEqual(steps & 0x30000000, 0)

    def test_connect(self) -> None:
        self.assertEqual(
            packets(codec.connect("unknown", "192.0.2.1", 25)),
            [(codec.CONNECT, b"unknown\x004\x00\x19192.0.2.1\0")],
        )
        self.assertEqual(
            packets(codec.connect("h", "2001:db8::1", 587)),
            [(codec.CONNECT, b"h\x006\x02\x4b2001:db8::1\0")],
        )
        self.assertEqual(packets(codec.connect("h", "local", None)), [(codec.CONNECT, b"h\0U")])

    def test_macrosLeaveOutEmptyValues(self) -> None:
        self.assertEqual(
            packets(codec.macros(codec.MAIL, {"{auth_authen}": "", "{mail_addr}": "a@b"})),
            [(codec.MACRO, b"M{mail_addr}\0a@b\0")],
        )

    def test_nulInAFieldCannotShiftTheOthers(self) -> None:
        self.assertEqual(
            packets(codec.header(b"X-A\0evil", b"v\0x")), [(codec.HEADER, b"X-Aevil\0vx\0")]
        )
        self.assertEqual(packets(codec.strings(codec.HELO, "a\0b")), [(codec.HELO, b"ab\0")])


class DecodeTests(SynchronousTestCase):
    def test_roundTrips(self) -> None:
        R, P = Response, codec.packet
        cases = [
            (P(codec.CONTINUE), R(codec.CONTINUE)),
            (P(codec.REPLYCODE, b"550 5.7.1 no\0"), R(codec.REPLYCODE, text="550 5.7.1 no")),
            (P(codec.ADDHEADER, b"X-A\0b c\0"), R(codec.ADDHEADER, name=b"X-A", value=b"b c")),
            (
                P(codec.CHGHEADER, b"\0\0\0\x02Subject\0\0"),
                R(codec.CHGHEADER, index=2, name=b"Subject", value=b""),
            ),
            (P(codec.INSHEADER, b"\0\0\0\0D\0v\0"), R(codec.INSHEADER, name=b"D", value=b"v")),
            (P(codec.REPLBODY, b"\0any\r\nbytes"), R(codec.REPLBODY, data=b"\0any\r\nbytes")),
            (P(codec.ADDRCPT, b"<a@b>\0"), R(codec.ADDRCPT, text="<a@b>")),
            (P(codec.QUARANTINE, b"why\0"), R(codec.QUARANTINE, text="why")),
            (
                P(codec.OPTNEG, struct.pack(">III", 6, 1, 2) + b"extra"),
                R(codec.OPTNEG, version=6, actions=1, steps=2),
            ),
        ]
        for raw, expected in cases:
            self.assertEqual(Decoder().feed(raw), [expected])

    def test_byteByByte(self) -> None:
        raw = codec.packet(codec.ADDHEADER, b"X\0y\0") + codec.packet(codec.ACCEPT)
        decoder, out = Decoder(), []
        for i in range(len(raw)):
            out.extend(decoder.feed(raw[i : i + 1]))
        self.assertEqual([r.code for r in out], [codec.ADDHEADER, codec.ACCEPT])

    def test_malformed(self) -> None:
        for raw in [
            b"\0\0\0\0",  # length 0
            struct.pack(">I", codec.MAX_PACKET + 1),  # refused before it is read
            codec.packet(b"Z"),  # unknown
            codec.packet(codec.CHGFROM, b"<a@b>\0"),  # not offered
            codec.packet(codec.SETSYMLIST, b""),
            codec.packet(codec.ADDHEADER, b"X\0"),  # one field short
            codec.packet(codec.ADDHEADER, b"X\0y\0z"),  # trailing octets
            codec.packet(codec.CHGHEADER, b"\0\0"),  # short index
            codec.packet(codec.OPTNEG, b"\0\0\0\x06"),
            codec.packet(codec.REPLYCODE, b"550 \xff\0"),  # not UTF-8
        ]:
            self.assertRaises(MilterProtocolError, Decoder().feed, raw)

    def test_everyShortPrefixWaits(self) -> None:
        raw = codec.packet(codec.CHGHEADER, b"\0\0\0\x01Subject\0x\0")
        for cut in range(len(raw)):
            self.assertEqual(Decoder().feed(raw[:cut]), [])


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = MilterClient(self.clock, commandTimeout=10)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.options: list[Negotiated] = []
        self.errors: list[str] = []
        self.client.ready.addCallbacks(self.options.append, lambda f: self.errors.append(
            f.getErrorMessage()))  # fmt: skip

    def negotiate(self, actions: int = 0x3F, steps: int = 0) -> None:
        self.assertEqual(self.transport.value(), codec.optneg())
        self.transport.clear()
        self.client.dataReceived(codec.packet(codec.OPTNEG, struct.pack(">III", 6, actions, steps)))

    def test_negotiationKeepsOnlyWhatWeOffered(self) -> None:
        self.negotiate(actions=0x1FF, steps=0x1FFFFFFF)
        self.assertEqual(self.options, [Negotiated(codec.OFFERED_ACTIONS, codec.OFFERED_STEPS)])

    def test_negotiationTimeout(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.errors, ["timed out"])
        self.assertTrue(self.transport.disconnecting)

    def test_oldVersionRefused(self) -> None:
        self.client.dataReceived(codec.packet(codec.OPTNEG, struct.pack(">III", 1, 0, 0)))
        self.assertIn("protocol error", self.errors[0])

    def test_askCollectsUntilFinal(self) -> None:
        self.negotiate()
        results: list[list[Response]] = []
        self.client.ask(codec.packet(codec.BODYEOB)).addCallback(results.append)
        self.client.dataReceived(codec.packet(codec.ADDHEADER, b"X\0y\0"))
        self.clock.advance(9)
        self.client.dataReceived(codec.packet(codec.PROGRESS))
        self.clock.advance(9)  # PROGRESS restarted the deadline
        self.assertEqual(results, [])
        self.client.dataReceived(codec.packet(codec.CONTINUE))
        self.assertEqual(
            [[r.code for r in rs] for rs in results], [[codec.ADDHEADER, codec.CONTINUE]]
        )
        self.clock.advance(100)  # no stale deadline
        self.assertFalse(self.transport.disconnecting)

    def test_commandTimeout(self) -> None:
        self.negotiate()
        failures: list[object] = []
        self.client.ask(codec.packet(codec.MAIL), timeout=5).addErrback(failures.append)
        self.clock.advance(5)
        [failure] = failures
        self.assertTrue(failure.check(MilterUnavailable))  # type: ignore[attr-defined]
        self.assertTrue(self.transport.disconnecting)
        # Later commands fail at once rather than wait.
        later: list[object] = []
        self.client.ask(codec.packet(codec.RCPT)).addErrback(later.append)
        self.assertEqual(len(later), 1)

    def test_unaskedResponse(self) -> None:
        self.negotiate()
        self.client.dataReceived(codec.packet(codec.CONTINUE))
        self.assertTrue(self.transport.disconnecting)

    def test_modificationFlood(self) -> None:
        self.negotiate()
        failures: list[object] = []
        self.client.ask(codec.packet(codec.BODYEOB)).addErrback(failures.append)
        self.client.dataReceived(codec.packet(codec.ADDHEADER, b"X\0y\0") * 10001)
        self.assertEqual(len(failures), 1)

    def test_octetFlood(self) -> None:
        self.negotiate()
        self.client.maxCollected = 1000
        failures: list[object] = []
        self.client.ask(codec.packet(codec.BODYEOB)).addErrback(failures.append)
        self.client.dataReceived(codec.packet(codec.REPLBODY, b"x" * 600))
        self.assertEqual(failures, [])
        self.client.dataReceived(codec.packet(codec.REPLBODY, b"x" * 600))
        self.assertEqual(len(failures), 1)
        self.assertTrue(self.transport.disconnecting)

    def test_connectionLostFailsTheCommand(self) -> None:
        self.negotiate()
        failures: list[object] = []
        self.client.ask(codec.packet(codec.MAIL)).addErrback(failures.append)
        self.client.connectionLost(None)
        self.assertEqual(len(failures), 1)

    def test_quit(self) -> None:
        self.negotiate()
        self.client.quit()
        self.assertEqual(packets(self.transport.value()), [(codec.QUIT, b"")])
        self.assertTrue(self.transport.disconnecting)
