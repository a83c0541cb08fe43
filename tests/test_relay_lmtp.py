"""
Tests for LMTP (RFC 2033) in L{mailgw.relay.client}, the content filter's
``lmtp:`` protocol: LHLO instead of EHLO, and one reply per accepted
recipient after the data; exact bytes, in memory.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.test_relay_client import Dialog, makeMessage, settingsFor, summary


class LMTPDialogTests(SynchronousTestCase):
    def hello(self, d: Dialog) -> None:
        d.server(b"220 filter.test LMTP\r\n")
        d.expect(b"LHLO gw.example.com\r\n")
        d.server(b"250-filter.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")

    def test_replyPerRecipient(self) -> None:
        """Each accepted recipient gets its own final reply, in RCPT order."""
        message = makeMessage(
            recipients=["bob@example.net", "gone@example.net", "carol@example.org", "dave@x.org"]
        )
        d = Dialog(self, settingsFor(lmtp=True), [message])
        self.hello(d)
        d.client()
        d.server(
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n"
            b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
        )
        d.pumpBody()
        self.assertTrue(d.client().endswith(b"body\r\n.\r\n"))
        d.server(b"250 2.0.0 bob ok\r\n")
        d.server(b"452 4.2.2 carol over quota\r\n")
        d.server(b"554 5.7.1 dave: virus found\r\n")
        [results] = d.quit()
        self.assertEqual(
            summary(results),
            [
                ("bob@example.net", "success", 250),
                ("gone@example.net", "permanent", 550),
                ("carol@example.org", "transient", 452),
                ("dave@x.org", "permanent", 554),
            ],
        )
        self.assertEqual(results[3].text, "dave: virus found")

    def test_sessionEndsBeforeEveryReply(self) -> None:
        """A connection lost after some replies: those stand, the rest are transient."""
        message = makeMessage(recipients=["bob@example.net", "carol@example.org"])
        d = Dialog(self, settingsFor(lmtp=True), [message])
        self.hello(d)
        d.client()
        d.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        d.pumpBody()
        d.client()
        d.server(b"250 2.0.0 bob ok\r\n")
        d.transport.loseConnection()
        self.assertEqual(len(d.results), 1)
        self.assertEqual(
            summary(d.results[0][0]),
            [("bob@example.net", "success", 250), ("carol@example.org", "transient", 0)],
        )

    def test_noHELOFallback(self) -> None:
        """LMTP has no HELO: a refused LHLO ends the session, every recipient transient."""
        d = Dialog(self, settingsFor(lmtp=True), [makeMessage()])
        d.server(b"220 filter.test LMTP\r\n")
        d.expect(b"LHLO gw.example.com\r\n")
        d.server(b"500 5.5.1 what?\r\n")
        [results] = d.quit()
        self.assertEqual(summary(results), [("bob@example.net", "transient", 0)])
        self.assertIn("LHLO", results[0].text)
