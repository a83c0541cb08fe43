"""
Tests for L{mailgw.cli.queue}: C{mailgw queue ...} driven through
L{mailgw.cli.main} over a real spool, with and without a gateway listening
on the control socket.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgw import cli, control
from mailgw.cli import queue as queuecli
from mailgw.control import ControlService, defaultSocketPath
from mailgw.envelope import BodyType, DeliveryResult, Envelope, QueuedMessage, Session
from mailgw.envelope import splitAddress as address
from mailgw.queue.spool import Spool, SpoolReader
from tests.test_control import FakeQueueControl

NOW = 1_800_000_000.0
HOUR = 3600.0
SESSION = Session(
    clientAddress="192.0.2.7",
    clientPort=50123,
    helo="client.example.org",
    user="alice",
    tlsProtocol="TLSv1.3",
    tlsCipher="TLS_AES_256_GCM_SHA384",
    listener="submissions",
)
MESSAGE = (
    b"Received: from client.example.org\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: Hello \x1b[31mred\r\n"
    b"\r\n"
    b"The body.\r\n"
)


def runNow(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def resultOf(d: Deferred[Any]) -> Any:
    """The result of ``d``, which has fired (the spool runs everything at once)."""
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0]


class SpoolBuilder:
    """Puts messages into a real spool at chosen times."""

    def __init__(self, directory: str) -> None:
        self.clock = Clock()
        self.spool = Spool(directory, self.clock, runNow)

    def add(
        self, arrival: float, sender: str | None, recipients: list[str], **changes: Any
    ) -> QueuedMessage:
        self.clock.advance(arrival - self.clock.seconds())
        envelope = Envelope(
            None if sender is None else address(sender),
            tuple(address(r) for r in recipients),
            body=BodyType.EIGHTBITMIME,
            declaredSize=len(MESSAGE),
        )
        writer = self.spool.begin(envelope, SESSION)
        writer.write(MESSAGE)
        queueId = resultOf(writer.commit())
        message = self.spool.load(queueId)
        if changes:
            message = attrs.evolve(message, **changes)
            resultOf(self.spool.update(message))
        return message

    def results(
        self, message: QueuedMessage, when: float, *results: DeliveryResult
    ) -> QueuedMessage:
        recipients = list(message.recipients)
        for result in results:
            i = next(i for i, r in enumerate(recipients) if r.address == result.recipient)
            recipients[i] = recipients[i].withResult(result, when)
        message = attrs.evolve(message, recipients=tuple(recipients))
        return resultOf(self.spool.update(message))


def transient(recipient: str) -> DeliveryResult:
    return DeliveryResult(
        address(recipient), False, False, 451, "4.4.1", "Try again later", "mx.example.com"
    )


class QueueFixture:
    """
    A stopped gateway's spool with three messages:

      - C{old}: a bounce (``<>``) to alice@example.org, held, 3 days old;
      - C{mid}: alice -> bob@example.com (pending, 2 attempts, last 451)
        and carol@example.net (delivered), 2 hours old, next try in 12 min;
      - C{new}: dave -> eve@Example.COM (bounced 550) and frank@example.com
        (pending, never tried), 30 s old.
    """

    patch: Any
    mktemp: Any

    def setUpQueue(self) -> None:
        self.patch(queuecli, "_now", lambda: NOW)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.directory = self.mktemp()
        builder = SpoolBuilder(self.directory)
        self.old = builder.add(NOW - 72 * HOUR, None, ["alice@example.org"], held=True)
        mid = builder.add(
            NOW - 2 * HOUR, "alice@example.org", ["bob@example.com", "carol@example.net"]
        )
        mid = builder.results(
            mid,
            NOW - HOUR,
            transient("bob@example.com"),
            DeliveryResult(address("carol@example.net"), True, code=250, remote="mx.example.net"),
        )
        mid = builder.results(mid, NOW - 10 * 60, transient("bob@example.com"))
        self.mid = resultOf(builder.spool.update(attrs.evolve(mid, nextAttempt=NOW + 12 * 60)))
        new = builder.add(NOW - 30, "dave@example.org", ["eve@Example.COM", "frank@example.com"])
        bounce = DeliveryResult(
            address("eve@Example.COM"), False, True, 550, "5.1.1", "No such user", "mx.example.com"
        )
        self.new = builder.results(new, NOW - 20, bounce)
        builder.spool.close()

    def mailgw(self, *argv: str) -> int:
        return cli.main(["queue", *argv])

    def clearOutput(self) -> None:
        for stream in (self.stdout, self.stderr):
            stream.truncate(0)
            stream.seek(0)

    def output(self) -> str:
        return self.stdout.getvalue()

    def assertError(self, message: str) -> None:
        """stderr holds exactly one line: mailgw: MESSAGE."""
        if self.stderr.getvalue() != f"mailgw: {message}\n":
            raise AssertionError(f"stderr is {self.stderr.getvalue()!r}, not mailgw: {message}")

    def stored(self) -> dict[str, QueuedMessage]:
        return {m.queueId: m for m in SpoolReader(self.directory).pending()}


class QueueTestCase(QueueFixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.setUpQueue()


def localTime(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(timestamp))


class ListTests(QueueTestCase):
    def test_table(self) -> None:
        """One line per message, then its recipients with their state."""
        self.assertEqual(self.mailgw("list", "--spool", self.directory), 0)
        self.assertEqual(
            self.output(),
            f"""\
QUEUE ID                   SIZE  AGE     SENDER
{self.old.queueId}        106  3d00h   <>  HELD
  pending    alice@example.org  0 attempts, held
{self.mid.queueId}        106  2h00m   alice@example.org
  pending    bob@example.com    2 attempts, next in 12m
             451 4.4.1 Try again later @ mx.example.com
  delivered  carol@example.net  1 attempt
{self.new.queueId}        106  30s     dave@example.org
  bounced    eve@Example.COM    1 attempt
             550 5.1.1 No such user @ mx.example.com
  pending    frank@example.com  0 attempts, next: now
-- 3 messages, 318 bytes, 3 recipients pending
""",
        )
        self.assertEqual(self.stderr.getvalue(), "")

    def test_json(self) -> None:
        """--json gives the same facts as data."""
        self.assertEqual(self.mailgw("list", "--json", "--spool", self.directory), 0)
        listed = json.loads(self.output())
        self.assertEqual(
            [m["id"] for m in listed], [self.old.queueId, self.mid.queueId, self.new.queueId]
        )
        old, mid, new = listed
        self.assertEqual((old["sender"], old["held"], old["age"]), (None, True, 72 * 3600))
        self.assertIsNone(old["recipients"][0]["nextAttempt"])
        self.assertEqual(mid["sender"], "alice@example.org")
        self.assertEqual(mid["size"], 106)
        self.assertEqual(
            mid["recipients"][0],
            {
                "address": "bob@example.com",
                "status": "pending",
                "attempts": 2,
                "lastAttempt": NOW - 600,
                "nextAttempt": NOW + 720,
                "code": 451,
                "enhanced": "4.4.1",
                "diagnostic": "Try again later",
                "remote": "mx.example.com",
            },
        )
        self.assertEqual([r["status"] for r in new["recipients"]], ["bounced", "pending"])
        self.assertEqual([r["nextAttempt"] for r in new["recipients"]], [None, NOW - 30])

    def test_empty(self) -> None:
        for m in (self.old, self.mid, self.new):
            self.assertEqual(self.mailgw("delete", m.queueId, "--spool", self.directory), 0)
        self.clearOutput()
        self.assertEqual(self.mailgw("list", "--spool", self.directory), 0)
        self.assertEqual(self.output(), "queue is empty\n")
        self.assertEqual(self.mailgw("list", "--json", "--spool", self.directory), 0)
        self.assertEqual(self.output(), "queue is empty\n[]\n")

    def test_notASpool(self) -> None:
        """A directory that is no spool is refused, and not created."""
        missing = self.mktemp()
        self.assertEqual(self.mailgw("list", "--spool", missing), 1)
        self.assertError(f"{missing}: not a mailgw spool (no queue/ directory)")
        self.assertFalse(os.path.exists(missing))

    def test_permissionDenied(self) -> None:
        """A spool the user may not read: said so, with what to do."""
        denied = f"{self.directory}: permission denied (run this as the gateway's user or root)"
        realStat, realListdir = os.stat, os.listdir

        def deny(real: Any) -> Any:
            def call(path: Any, *args: Any, **kwargs: Any) -> Any:
                if os.fspath(path).endswith("queue"):
                    raise PermissionError(13, "Permission denied", path)
                return real(path, *args, **kwargs)

            return call

        self.patch(os, "stat", deny(realStat))
        self.assertEqual(self.mailgw("list", "--spool", self.directory), 1)
        self.assertError(denied)
        self.clearOutput()
        self.patch(os, "stat", realStat)
        self.patch(os, "listdir", deny(realListdir))
        self.assertEqual(self.mailgw("stats", "--spool", self.directory), 1)
        self.assertError(denied)

    def test_config(self) -> None:
        """
        Without --spool the config file names the spool; a problem in
        another section does not matter.
        """
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f'[spool]\ndirectory = "{self.directory}"\n[relay]\nbogus = 1\n')
        self.assertEqual(self.mailgw("list", "--config", config), 0)
        self.assertIn(self.mid.queueId, self.output())

    def test_badConfig(self) -> None:
        """A config file that cannot be read: the error names it."""
        config = self.mktemp()
        self.assertEqual(self.mailgw("stats", "--config", config), 1)
        self.assertError(f"{config}: file: cannot read: No such file or directory")
        with open(config, "w") as f:
            f.write("[spool]\ndirectory = 7\n")
        self.clearOutput()
        self.assertEqual(self.mailgw("stats", "--config", config), 1)
        self.assertTrue(self.stderr.getvalue().startswith(f"mailgw: {config}: spool.directory: "))


class ShowTests(QueueTestCase):
    def test_show(self) -> None:
        """Envelope, session, recipients and headers; control characters escaped."""
        self.assertEqual(self.mailgw("show", self.mid.queueId, "--spool", self.directory), 0)
        self.assertEqual(
            self.output(),
            f"""\
Queue ID:      {self.mid.queueId}
Arrival:       {localTime(NOW - 7200)} (2h00m ago)
Size:          106 bytes
Sender:        alice@example.org
Body:          8BITMIME (declared size 106)
Held:          no
Next try:      {localTime(NOW + 720)} (in 12m)
Delay warning: not sent
User:          alice
Client:        192.0.2.7 port 50123, HELO client.example.org
TLS:           TLSv1.3, TLS_AES_256_GCM_SHA384
Listener:      submissions
Recipients:
  pending    bob@example.com    2 attempts, next in 12m
             451 4.4.1 Try again later @ mx.example.com
  delivered  carol@example.net  1 attempt

Received: from client.example.org
From: Alice <alice@example.org>
Subject: Hello \\x1b[31mred
""",
        )

    def test_body(self) -> None:
        """--body shows the whole message."""
        self.assertEqual(
            self.mailgw("show", "--body", self.old.queueId, "--spool", self.directory), 0
        )
        self.assertIn("Held:          yes\nNext try:      held\n", self.output())
        self.assertIn("Sender:        <>\n", self.output())
        self.assertTrue(self.output().endswith("Subject: Hello \\x1b[31mred\n\nThe body.\n"))

    def test_unknown(self) -> None:
        for queueId in ("0005F1A2B3C4DFFFFFFF", "../lock", "\x1b[2J"):
            self.clearOutput()
            self.assertEqual(self.mailgw("show", queueId, "--spool", self.directory), 1)
            self.assertError(f"unknown queue id {queuecli.printable(queueId)}")
        self.assertNotIn("\x1b", self.stderr.getvalue())


class StatsTests(QueueTestCase):
    def test_table(self) -> None:
        self.assertEqual(self.mailgw("stats", "--spool", self.directory), 0)
        self.assertEqual(
            self.output(),
            """\
messages:    3 (1 held), 318 bytes
recipients:  3 pending, 1 delivered, 1 bounced
age:         <1h 1, <1d 1, <5d 1, older 0

DOMAIN         PENDING  DELIVERED    BOUNCED
example.com          2          0          1
example.org          1          0          0
example.net          0          1          0
""",
        )

    def test_json(self) -> None:
        self.patch(queuecli, "_now", lambda: NOW + 3 * 86400)
        self.assertEqual(self.mailgw("stats", "--json", "--spool", self.directory), 0)
        stats = json.loads(self.output())
        self.assertEqual((stats["messages"], stats["held"], stats["size"]), (3, 1, 318))
        self.assertEqual(stats["recipients"], {"pending": 3, "delivered": 1, "bounced": 1})
        self.assertEqual(stats["age"], {"<1h": 0, "<1d": 0, "<5d": 2, "older": 1})
        self.assertEqual(list(stats["domains"]), ["example.com", "example.org", "example.net"])
        self.assertEqual(
            stats["domains"]["example.com"], {"pending": 2, "delivered": 0, "bounced": 1}
        )


class CorruptTests(QueueTestCase):
    def putCorrupt(self, *queueIds: str) -> None:
        for queueId in queueIds:
            for suffix in (".json", ".msg"):
                with open(os.path.join(self.directory, "corrupt", queueId + suffix), "wb") as f:
                    f.write(b"?")

    def test_counted(self) -> None:
        """list and stats say how many entries wait in corrupt/."""
        self.putCorrupt("0" * 20, "1" * 20)
        self.assertEqual(self.mailgw("list", "--spool", self.directory), 0)
        self.assertIn("; 2 entries in corrupt/", self.output().splitlines()[-1])
        self.clearOutput()
        self.assertEqual(self.mailgw("stats", "--json", "--spool", self.directory), 0)
        self.assertEqual(json.loads(self.output())["corrupt"], 2)
        self.clearOutput()
        self.assertEqual(self.mailgw("stats", "--spool", self.directory), 0)
        self.assertIn("corrupt:     2", self.output())

    def test_none(self) -> None:
        self.assertEqual(self.mailgw("stats", "--json", "--spool", self.directory), 0)
        self.assertEqual(json.loads(self.output())["corrupt"], 0)
        self.clearOutput()
        self.assertEqual(self.mailgw("list", "--spool", self.directory), 0)
        self.assertNotIn("corrupt", self.output())


class StoppedGatewayTests(QueueTestCase):
    """hold, release and delete change the spool itself when no gateway runs."""

    def test_hold(self) -> None:
        mid = self.mid.queueId
        self.assertEqual(self.mailgw("hold", mid, mid, "--spool", self.directory), 0)
        self.assertEqual(self.output(), "held 1 message\n")
        self.assertEqual(self.stored()[mid], attrs.evolve(self.mid, held=True))

    def test_release(self) -> None:
        """A released message is due now."""
        old = self.old.queueId
        self.assertEqual(self.mailgw("release", old, "--spool", self.directory), 0)
        self.assertEqual(self.output(), "released 1 message\n")
        self.assertEqual(self.stored()[old], attrs.evolve(self.old, held=False, nextAttempt=NOW))

    def test_delete(self) -> None:
        ids = [self.old.queueId, self.new.queueId]
        self.assertEqual(self.mailgw("delete", *ids, "--spool", self.directory), 0)
        self.assertEqual(self.output(), "deleted 2 messages\n")
        self.assertEqual(list(self.stored()), [self.mid.queueId])
        queue = os.listdir(os.path.join(self.directory, "queue"))
        self.assertEqual(sorted(queue), [self.mid.queueId + ".json", self.mid.queueId + ".msg"])

    def test_unknown(self) -> None:
        """Unknown ids are named; the others are still done."""
        unknown = "0005F1A2B3C4DFFFFFFF"
        self.assertEqual(
            self.mailgw("hold", unknown, self.new.queueId, "nonsense", "--spool", self.directory), 1
        )
        self.assertEqual(self.output(), "held 1 message\n")
        self.assertError(f"unknown queue ids {unknown}, nonsense")
        self.assertTrue(self.stored()[self.new.queueId].held)

    def test_staleSocket(self) -> None:
        """The socket file of a crashed gateway does not stand in the way."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(defaultSocketPath(self.directory))
        self.assertEqual(self.mailgw("hold", self.new.queueId, "--spool", self.directory), 0)
        self.assertTrue(self.stored()[self.new.queueId].held)

    def test_lockedWithoutSocket(self) -> None:
        """
        The spool is locked but nothing answers on the socket: said so, and
        nothing is changed.
        """
        spool = Spool(self.directory, Clock(), runNow)
        self.addCleanup(spool.close)
        before = self.stored()
        self.assertEqual(self.mailgw("delete", self.new.queueId, "--spool", self.directory), 1)
        socketPath = defaultSocketPath(self.directory)
        self.assertError(
            f"{self.directory}: the spool is locked by a running gateway, but nothing answers on "
            f"{socketPath}: it may be starting or stopping; try again, or check its log"
        )
        self.assertEqual(self.output(), "")
        self.assertEqual(self.stored(), before)

    def test_flushNeedsGateway(self) -> None:
        socketPath = defaultSocketPath(self.directory)
        for argv in (["flush"], ["flush", self.mid.queueId]):
            self.clearOutput()
            self.assertEqual(self.mailgw(*argv, "--spool", self.directory), 1)
            self.assertError(
                f"the gateway is not running (nothing listens on {socketPath}); flush needs it: "
                "the gateway tries every due message when it starts"
            )
        self.assertEqual(self.output(), "")

    def test_usage(self) -> None:
        """No id for hold, release, delete, show: a usage error."""
        for action in ("hold", "release", "delete", "show"):
            self.assertEqual(self.mailgw(action, "--spool", self.directory), 2)
        self.assertEqual(cli.main(["queue"]), 2)
        self.assertEqual(self.output(), "")


class RunningGatewayTests(QueueFixture, TestCase):
    """
    With a gateway running (its lock held, a ControlService over a fake
    queue control), the commands go through the socket, in a thread as the
    real command would be in its own process.
    """

    def setUp(self) -> None:
        self.setUpQueue()
        self.gatewaySpool = Spool(self.directory, Clock(), runNow)
        self.addCleanup(self.gatewaySpool.close)
        self.known = {self.old.queueId, self.mid.queueId, self.new.queueId}
        self.control = FakeQueueControl(known=set(self.known), held={self.old.queueId})
        self.service = ControlService(defaultSocketPath(self.directory), self.control, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def inThread(self, *argv: str) -> Deferred[int]:
        return deferToThread(cli.main, ["queue", *argv, "--spool", self.directory])

    @inlineCallbacks
    def test_flushAll(self) -> Any:
        self.assertEqual((yield self.inThread("flush")), 0)
        self.assertEqual(self.output(), "scheduled 2 messages for delivery\n")
        self.assertEqual(self.control.calls, [("flush", None)])

    @inlineCallbacks
    def test_flushSome(self) -> Any:
        self.assertEqual((yield self.inThread("flush", self.mid.queueId)), 0)
        self.assertEqual(self.output(), "scheduled 1 message for delivery\n")
        self.assertEqual(self.control.calls, [("flush", [self.mid.queueId])])

    @inlineCallbacks
    def test_hold(self) -> Any:
        """hold goes to the gateway, which owns the spool: the CLI writes nothing."""
        before = self.stored()
        self.assertEqual((yield self.inThread("hold", self.mid.queueId)), 0)
        self.assertEqual(self.output(), "held 1 message\n")
        self.assertEqual(self.control.calls, [("hold", self.mid.queueId)])
        self.assertEqual(self.stored(), before)

    @inlineCallbacks
    def test_unknown(self) -> Any:
        unknown = "0005F1A2B3C4DFFFFFFF"
        self.assertEqual((yield self.inThread("delete", unknown)), 1)
        self.assertEqual(self.output(), "")
        self.assertError(f"unknown queue id {unknown}")

    @inlineCallbacks
    def test_batches(self) -> Any:
        """Long lists of ids go in several requests."""
        self.patch(queuecli, "MAX_IDS", 2)
        requests = []

        def sendCommand(path: str, command: str, ids: list[str], timeout: float) -> Any:
            requests.append(ids)
            return control.sendCommand(path, command, ids, timeout)

        self.patch(queuecli, "sendCommand", sendCommand)
        ids = sorted(self.known)
        self.assertEqual((yield self.inThread("release", *ids)), 0)
        self.assertEqual(self.output(), "released 3 messages\n")
        self.assertEqual(requests, [ids[:2], ids[2:]])
        self.assertEqual(self.control.calls, [("release", i) for i in ids])
