"""
Milter changes applied to a stored message (in memory and in the real
spool's thread before the commit), the reply a milter may give, the
``[milter]`` settings, and the held state a quarantine records.
"""

from __future__ import annotations

import io
import os
import tempfile

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import ConfigError, configFromDict
from mailgw.envelope import Address, Envelope, QueuedMessage, Session
from mailgw.milter.edits import Field, MessageEdits, cleanValue, splitHeaders
from mailgw.milter.settings import MilterServer
from mailgw.milter.stream import HeaderSplitter
from mailgw.milter.verdict import REJECT, TEMPFAIL, milterReply
from mailgw.queue.spool import Spool
from mailgw.replies import SMTPReply

MESSAGE = b"Received: from x\r\n\tby y\r\nSubject: a\r\nSubject: b\r\n\r\nbody\r\n"


def rewrite(edits: MessageEdits, message: bytes = MESSAGE) -> bytes:
    out = io.BytesIO()
    edits.rewrite(io.BytesIO(message), out)
    return out.getvalue()


class HeaderTests(SynchronousTestCase):
    def test_splitKeepsBytes(self) -> None:
        section = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"
        fields = splitHeaders(section)
        self.assertEqual([f.name for f in fields], [b"Received", b"Subject", b"Subject"])
        self.assertEqual(b"".join(f.toBytes() for f in fields), section)

    def test_splitter(self) -> None:
        splitter = HeaderSplitter(limit=1000)
        self.assertEqual(splitter.feed(b"A: 1\r\nB: 2\r"), (None, b""))
        fields, body = splitter.feed(b"\n\r\nbody")
        self.assertEqual(fields, [Field(b"A", b" 1"), Field(b"B", b" 2")])
        self.assertEqual(body, b"body")
        self.assertEqual(splitter.feed(b" more"), (None, b" more"))

    def test_splitterGivesUpPastItsLimit(self) -> None:
        splitter = HeaderSplitter(limit=10)
        self.assertEqual(splitter.feed(b"A: " + b"x" * 20), (None, b""))
        self.assertEqual(splitter.feed(b"\r\n\r\nbody"), (None, b""))
        self.assertEqual(splitter.finish(), (None, b""))

    def test_cleanValue(self) -> None:
        self.assertEqual(cleanValue(b"a\nb", False), b" a\r\n\tb")
        self.assertEqual(cleanValue(b" a\n\tb", True), b" a\r\n\tb")
        self.assertEqual(cleanValue(b"a\r\n\r\nX: y\0\rz", False), b" a\r\n\tX: y\r\n\tz")


class EditTests(SynchronousTestCase):
    def test_noEdits(self) -> None:
        self.assertFalse(MessageEdits())
        self.assertEqual(rewrite(MessageEdits()), MESSAGE)

    def test_addInsertChange(self) -> None:
        edits = MessageEdits()
        edits.add(b"X-End", b" 1")
        edits.insert(1, b"X-Second", b" 2")
        edits.change(2, b"subject", b" B")
        edits.change(1, b"Subject", b"")  # deletes the first
        edits.change(5, b"X-New", b" n")  # past the last: added
        self.assertTrue(edits)
        self.assertEqual(
            rewrite(edits),
            b"Received: from x\r\n\tby y\r\nX-Second: 2\r\nSubject: B\r\nX-End: 1\r\n"
            b"X-New: n\r\n\r\nbody\r\n",
        )

    def test_replaceBody(self) -> None:
        edits = MessageEdits(body=b"new\r\n")
        self.assertEqual(
            rewrite(edits), b"Received: from x\r\n\tby y\r\nSubject: a\r\nSubject: b\r\n\r\nnew\r\n"
        )

    def test_headersOnlyMessageGetsABody(self) -> None:
        edits = MessageEdits(body=b"b\r\n")
        self.assertEqual(rewrite(edits, b"A: 1\r\n"), b"A: 1\r\n\r\nb\r\n")

    def test_largeBodyCopied(self) -> None:
        body = b"x" * 998 + b"\r\n"
        message = b"A: 1\r\n\r\n" + body * 300
        edits = MessageEdits()
        edits.add(b"B", b" 2")
        self.assertEqual(rewrite(edits, message), b"A: 1\r\nB: 2\r\n\r\n" + body * 300)


class ReplyTests(SynchronousTestCase):
    def test_sane(self) -> None:
        self.assertEqual(
            milterReply("554 5.7.1 Spam detected", REJECT), SMTPReply(554, "5.7.1", "Spam detected")
        )
        self.assertEqual(milterReply("421 4.7.0 later", TEMPFAIL), SMTPReply(421, "4.7.0", "later"))
        self.assertEqual(milterReply("550", REJECT), SMTPReply(550, "5.7.1", "Command rejected"))
        self.assertEqual(milterReply("550 no\x07bell", REJECT), SMTPReply(550, "5.7.1", "no?bell"))

    def test_refused(self) -> None:
        for text in ["250 ok", "450 x", "550 4.7.1 x", "5500 x", "", "550-5.7.1 a\r\n550 b\x00"]:
            reply = milterReply(text, REJECT)
            self.assertIn(reply, (REJECT, SMTPReply(550, "5.7.1", "a")), text)
        self.assertEqual(milterReply("x" * 10000, REJECT), REJECT)
        self.assertEqual(len(milterReply("550 " + "y" * 10000, REJECT).text), 400)


class SettingsTests(SynchronousTestCase):
    def test_defaultsAndOverrides(self) -> None:
        config = configFromDict(
            {
                "milter": {
                    "servers": [
                        "inet:127.0.0.1:8891",
                        "unix:/run/opendkim/opendkim.sock",
                        "inet:8892@localhost",
                        "inet6:[::1]:11332",
                        {"address": "inet:127.0.0.1:11332", "default_action": "accept",
                         "command_timeout": 5},
                    ],
                    "default_action": "reject",
                    "connect_timeout": 7,
                }
            }
        )  # fmt: skip
        s = config.milter.servers
        self.assertEqual(
            [x.endpoint for x in s],
            [
                "tcp:host=127.0.0.1:port=8891",
                "unix:path=/run/opendkim/opendkim.sock",
                "tcp:host=localhost:port=8892",
                "tcp6:host=\\:\\:1:port=11332",
                "tcp:host=127.0.0.1:port=11332",
            ],
        )
        self.assertEqual(s[0], MilterServer("inet:127.0.0.1:8891", s[0].endpoint, 7.0, 30.0,
                                            120.0, "reject"))  # fmt: skip
        self.assertEqual((s[4].defaultAction, s[4].commandTimeout, s[4].connectTimeout),
                         ("accept", 5, 7.0))  # fmt: skip
        self.assertEqual(configFromDict({}).milter.servers, ())

    def test_errorsNameTheKey(self) -> None:
        for milter, key in [
            ({"servers": ["tcp:1.2.3.4:5"]}, "milter.servers[0]"),
            ({"servers": ["inet:127.0.0.1:99999"]}, "milter.servers[0]"),
            ({"servers": ["unix:relative"]}, "milter.servers[0]"),
            ({"servers": "inet:127.0.0.1:1"}, "milter.servers"),
            ({"servers": [{"default_action": "accept"}]}, "milter.servers[0].address"),
            ({"servers": [{"address": "inet:h:1", "bogus": 1}]}, "milter.servers[0].bogus"),
            ({"default_action": "discard"}, "milter.default_action"),
            ({"command_timeout": 0}, "milter.command_timeout"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                configFromDict({"milter": milter}, source="f.toml")
            self.assertEqual((caught.exception.source, caught.exception.key), ("f.toml", key))


class SpoolAmendTests(SynchronousTestCase):
    """The real spool applies the changes in its thread before the commit, fsync and all."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, self.directory)
        self.spool = Spool(self.directory, Clock(), maybeDeferred)

    def write(self) -> object:
        envelope = Envelope(Address("a", "b.c"), (Address("d", "e.f"),))
        writer = self.spool.begin(envelope, Session("192.0.2.1"))
        writer.write(MESSAGE)
        return writer

    def test_rewriteRecipientsHold(self) -> None:
        writer = self.write()
        edits = MessageEdits(body="é\r\n".encode())
        edits.add(b"X-Milter", b" yes")
        writer.amend(edits.rewrite, (Address("x", "y.z"),), "spam")  # type: ignore[attr-defined]
        ids: list[str] = []
        writer.commit().addCallback(ids.append)  # type: ignore[attr-defined]
        [queueId] = ids
        message = self.spool.load(queueId)
        expected = b"Received: from x\r\n\tby y\r\nSubject: a\r\nSubject: b\r\nX-Milter: yes\r\n"
        expected += "\r\né\r\n".encode()
        with self.spool.openMessage(queueId) as f:
            self.assertEqual(f.read(), expected)
        self.assertEqual(message.size, len(expected))
        self.assertEqual(message.envelope.body.value, "8BITMIME")
        self.assertEqual([str(r) for r in message.envelope.recipients], ["x@y.z"])
        self.assertEqual((message.held, message.holdReason), (True, "spam"))
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])

    def test_rewriteFailureLeavesNothing(self) -> None:
        writer = self.write()

        def broken(source: object, target: object) -> None:
            raise ValueError("boom")

        writer.amend(broken, None, None)  # type: ignore[attr-defined]
        failures: list[object] = []
        writer.commit().addErrback(failures.append)  # type: ignore[attr-defined]
        self.assertEqual(len(failures), 1)
        writer.abort()  # type: ignore[attr-defined]
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual(self.spool.pending(), [])

    def test_holdReasonRoundTrip(self) -> None:
        writer = self.write()
        writer.commit()  # type: ignore[attr-defined]
        [message] = self.spool.pending()
        self.assertNotIn("holdReason", message.toJSON())
        held = QueuedMessage.fromJSON({**message.toJSON(), "held": True, "holdReason": "why"})
        self.assertEqual(held.toJSON()["holdReason"], "why")
