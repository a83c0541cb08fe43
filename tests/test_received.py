"""
Tests for mailgw.server.received.
"""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default

from twisted.trial.unittest import SynchronousTestCase

from mailgw.envelope import Address, Envelope, Session
from mailgw.server.received import receivedHeader


class ReceivedTests(SynchronousTestCase):
    def test_esmtpsa(self) -> None:
        session = Session("192.0.2.1", 5, "laptop", "alice", "TLSv1.3", "TLS_AES_128_GCM_SHA256")
        envelope = Envelope(Address("a", "b.c"), (Address("d", "e.f"),))
        header = receivedHeader(session, envelope, "mx.test", "QID", 0.0)
        self.assertEqual(
            header,
            b"Received: from laptop ([192.0.2.1])\r\n"
            b"\tby mx.test (mailgw) with ESMTPSA\r\n"
            b"\tid QID\r\n"
            b"\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)\r\n"
            b"\tfor <d@e.f>; Thu, 01 Jan 1970 00:00:00 +0000\r\n",
        )
        parsed = message_from_bytes(header + b"\r\n", policy=default)
        self.assertEqual(len(parsed.get_all("Received")), 1)

    def test_manyRecipientsNotListed(self) -> None:
        session = Session("2001:db8::1", helo="x(y)\r\nBcc: z", user="u", tlsProtocol="TLSv1.2")
        envelope = Envelope(None, (Address("d", "e.f"), Address("g", "h.i")), smtputf8=True)
        header = receivedHeader(session, envelope, "mx.test", "Q", 0.0)
        self.assertNotIn(b"d@e.f", header)
        self.assertIn(b"[IPv6:2001:db8::1]", header)
        self.assertIn(b"with UTF8SMTPSA", header)
        self.assertEqual(header.count(b"\r\n"), 5)
        self.assertNotIn(b"(y)", header)
