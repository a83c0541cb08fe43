"""
Message hygiene at submission (RFC 6409 8): Date: and Message-ID: added
after our Received: header when the client left them out, never touching
the client's bytes; and the option that leaves the client's address out of
the Received: header.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import configFromDict
from mailgw.server.headers import HeaderHold, messageId, presentFields
from tests.helpers import Harness

HEADERS = b"From: alice@example.com\r\nSubject: hi\r\n"
BODY = b"\r\nbody line\r\nMessage-ID: <not-a-header@body>\r\n"


def submit(harness: Harness, message: bytes, chunk: int | None = None) -> bytes:
    """Send ``message`` (un-stuffed, CRLF lines); the bytes the spool committed."""
    harness.login()
    assert harness.command(b"MAIL FROM:<alice@example.com>").startswith(b"250")
    assert harness.command(b"RCPT TO:<bob@example.org>").startswith(b"250")
    assert harness.command(b"DATA").startswith(b"354")
    data = message + b".\r\n"
    if chunk is None:
        harness.send(data)
    else:
        for i in range(0, len(data), chunk):
            harness.send(data[i : i + chunk])
    reply = harness.take()
    assert reply.startswith(b"250 "), reply
    queueId = reply.split()[-1].decode()
    [(_, stored)] = harness.spool.committed.values()
    assert queueId in harness.spool.committed
    return stored


def split(stored: bytes) -> tuple[bytes, bytes]:
    """Our Received: header, and what follows it."""
    lines = stored.split(b"\r\n")
    i = 1
    while lines[i][:1] == b"\t":
        i += 1
    return b"\r\n".join(lines[:i]) + b"\r\n", b"\r\n".join(lines[i:])


class AddedFieldsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = Harness()
        self.harness.clock.advance(10)  # the Date: is read from the clock

    def queueId(self) -> str:
        [queueId] = self.harness.spool.committed
        return queueId

    def test_bothAdded(self) -> None:
        stored = submit(self.harness, HEADERS + BODY)
        received, rest = split(stored)
        self.assertTrue(received.startswith(b"Received: from client.test"))
        date, msgid, client = rest.split(b"\r\n", 2)
        self.assertEqual(msgid, f"Message-ID: <{self.queueId()}@mx.test>".encode())
        self.assertTrue(date.startswith(b"Date: "))
        when = parsedate_to_datetime(date[6:].decode())
        self.assertEqual(when.timestamp(), 10)
        self.assertEqual(client, HEADERS + BODY)  # the client's bytes, unchanged

    def test_nothingAddedWhenPresent(self) -> None:
        headers = b"DATE: Tue, 14 Nov 2023 22:13:20 +0000\r\nmessage-id :<a@b>\r\n" + HEADERS
        stored = submit(self.harness, headers + BODY)
        _, rest = split(stored)
        self.assertEqual(rest, headers + BODY)

    def test_onlyMissingOneAdded(self) -> None:
        headers = b"Message-ID: <x@client>\r\n" + HEADERS
        _, rest = split(submit(self.harness, headers + BODY))
        date, client = rest.split(b"\r\n", 1)
        self.assertTrue(date.startswith(b"Date: "))
        self.assertEqual(client, headers + BODY)

    def test_foldedValueIsNotAField(self) -> None:
        """A continuation line that reads like a field does not count."""
        headers = b"Subject: about\r\n Date: not a field\r\n\tMessage-ID: <nor@this>\r\n"
        _, rest = split(submit(self.harness, headers + BODY))
        self.assertEqual(presentFields(headers), set())
        self.assertTrue(rest.startswith(b"Date: "))
        self.assertTrue(rest.endswith(headers + BODY))

    def test_headersOnly(self) -> None:
        """A message without an empty line is all header section."""
        _, rest = split(submit(self.harness, HEADERS))
        self.assertEqual(rest.count(b"Message-ID: <"), 1)
        self.assertTrue(rest.endswith(HEADERS))

    def test_emptyHeaderSection(self) -> None:
        _, rest = split(submit(self.harness, BODY))
        self.assertTrue(rest.startswith(b"Date: "))
        self.assertTrue(rest.endswith(BODY))

    def test_byteByByte(self) -> None:
        """The header section's end is found however the bytes arrive."""
        stored = submit(self.harness, HEADERS + BODY, chunk=1)
        _, rest = split(stored)
        self.assertEqual(rest.split(b"\r\n", 2)[2], HEADERS + BODY)

    def test_dotStuffedBody(self) -> None:
        body = b"\r\n..leading dot\r\n"
        _, rest = split(submit(self.harness, HEADERS + body))
        self.assertTrue(rest.endswith(HEADERS + b"\r\n.leading dot\r\n"))


class HeaderHoldTests(SynchronousTestCase):
    def test_givesUpPastTheLimit(self) -> None:
        """Past the limit nothing is held or added (the reader refuses such a message)."""
        hold = HeaderHold(prefix=b"P", extra=lambda h: b"X", limit=10)
        self.assertEqual(hold.feed(b"A: 1\r\n"), b"")
        self.assertEqual(hold.feed(b"B: 22222\r\n"), b"PA: 1\r\nB: 22222\r\n")
        self.assertEqual(hold.feed(b"\r\nbody\r\n"), b"\r\nbody\r\n")
        self.assertEqual(hold.finish(), b"")

    def test_releasesOnce(self) -> None:
        hold = HeaderHold(prefix=b"", extra=lambda h: b"[" + h + b"]", limit=100)
        self.assertEqual(hold.feed(b"A: 1\r\n\r\nb\r\n"), b"[A: 1\r\n]A: 1\r\n\r\nb\r\n")
        self.assertEqual(hold.feed(b"\r\n\r\n"), b"\r\n\r\n")

    def test_messageIdForTheLog(self) -> None:
        folded = b"Subject: x\r\nMessage-ID:\r\n <a\x01b@c>\r\nX: y\r\n"
        self.assertEqual(messageId(folded), "<a?b@c>")
        self.assertEqual(messageId(b"Message-ID: " + b"<" * 500 + b"\r\n"), "<" * 200)
        self.assertEqual(messageId(b"Subject: x\r\n"), "")
        forged = b"Message-ID: <a> user='root' client=10.0.0.1\r\n"
        self.assertEqual(messageId(forged), "<a>?user='root'?client=10.0.0.1")


class ReceivedClientAddressTests(SynchronousTestCase):
    def test_default(self) -> None:
        received, _ = split(submit(Harness(), HEADERS + BODY))
        self.assertIn(b"([192.0.2.7])", received)

    def test_leftOut(self) -> None:
        received, _ = split(submit(Harness(receivedClientAddress=False), HEADERS + BODY))
        self.assertNotIn(b"192.0.2.7", received)
        self.assertTrue(received.startswith(b"Received: from client.test\r\n\tby mx.test"))

    def test_configKey(self) -> None:
        config = configFromDict({"server": {"received_client_address": False}})
        self.assertFalse(config.server.receivedClientAddress)
        self.assertTrue(configFromDict({}).server.receivedClientAddress)
