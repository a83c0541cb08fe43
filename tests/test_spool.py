"""
Tests for L{mailgw.queue.spool}: the durable spool.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgw.envelope import (
    Address,
    BodyType,
    DeliveryResult,
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Session,
)
from mailgw.interfaces import IMessageWriter, ISpool
from mailgw.queue.spool import (
    FileSystem,
    QueueIdFactory,
    Spool,
    SpoolError,
    SpoolFullError,
    SpoolReader,
    SpoolWriter,
    isQueueId,
)

ENVELOPE = Envelope(
    sender=Address("alice", "example.org"),
    recipients=(Address("bob", "example.com"), Address('"odd@local"', "example.net")),
    body=BodyType.EIGHTBITMIME,
    declaredSize=1234,
)
SESSION = Session(
    clientAddress="192.0.2.7",
    clientPort=50123,
    helo="client.example.org",
    user="alice",
    tlsProtocol="TLSv1.3",
    tlsCipher="TLS_AES_256_GCM_SHA384",
    listener="submissions",
)
NOW = 1_700_000_000.25


def shortName(path: str) -> str:
    """``tmp/ID.msg`` for ``.../spool/tmp/ID.msg``: what the calls are recorded as."""
    return "/".join(path.split(os.sep)[-2:])


class RecordingFileSystem(FileSystem):
    """
    A L{FileSystem} that records every call, as ``(operation, names...)``,
    and raises the OSError of the first matching entry of ``failures``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.failures: list[tuple[str, str, OSError]] = []
        self.names: dict[int, str] = {}

    def failOn(self, operation: str, name: str, code: int) -> None:
        """Make ``operation`` on a file whose name contains ``name`` fail."""
        self.failures.append((operation, name, OSError(code, os.strerror(code))))

    def _record(self, operation: str, *names: str) -> None:
        for failing, name, error in self.failures:
            if failing == operation and name in names[0]:
                raise error
        self.calls.append((operation, *names))

    def create(self, path: str, exclusive: bool = False) -> int:
        self._record("create", shortName(path))
        fd = super().create(path, exclusive)
        self.names[fd] = shortName(path)
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self._record("write", self.names[fd])
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._record("fsync", self.names[fd])
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._record("close", self.names.pop(fd))
        super().close(fd)

    def rename(self, source: str, destination: str) -> None:
        self._record("rename", shortName(source), shortName(destination))
        super().rename(source, destination)

    def remove(self, path: str) -> None:
        self._record("remove", shortName(path))
        super().remove(path)

    def syncDirectory(self, path: str) -> None:
        self._record("syncDirectory", os.path.basename(path))
        super().syncDirectory(path)


@attrs.define
class DeferredRunner:
    """A runBlocking that runs nothing until the test says so."""

    calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = attrs.field(
        factory=list
    )

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def runAll(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


class SpoolTestMixin:
    """Makes a spool in a fresh directory, with a recording file system."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        self.clock = Clock()
        self.clock.advance(NOW)
        self.fs = RecordingFileSystem()
        self.spool = self.openSpool()

    def openSpool(self, runBlocking: Any = maybeDeferred, directory: str | None = None) -> Spool:
        spool = Spool(directory or self.directory, self.clock, runBlocking, fs=self.fs)
        self.addCleanup(spool.close)  # type: ignore[attr-defined]
        return spool

    def reopen(self) -> Spool:
        self.spool.close()
        self.spool = self.openSpool()
        return self.spool

    def commit(self, data: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> str:
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(data)
        return self.successResultOf(writer.commit())  # type: ignore[attr-defined]

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.directory, name)))


class SpoolTests(SpoolTestMixin, SynchronousTestCase):
    def test_interfaces(self) -> None:
        """Spool provides ISpool and its writers IMessageWriter."""
        self.assertTrue(verifyObject(ISpool, self.spool))
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.assertIsInstance(writer, SpoolWriter)
        self.assertTrue(verifyObject(IMessageWriter, writer))
        writer.abort()

    def test_createsTree(self) -> None:
        """The directory tree is created, private to the owner."""
        for name in ("", "tmp", "queue", "corrupt"):
            mode = os.stat(os.path.join(self.directory, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o700, name)

    def test_roundTrip(self) -> None:
        """Bytes, envelope and session survive a commit and a restart."""
        data = b"Received: x\r\n\r\n" + b"0123456789abcde\r\n" * 10_000
        writer = self.spool.begin(ENVELOPE, SESSION)
        queueId = writer.queueId
        self.assertTrue(isQueueId(queueId))
        for i in range(0, len(data), 1000):
            writer.write(data[i : i + 1000])
        self.assertEqual(self.successResultOf(writer.commit()), queueId)
        expected = QueuedMessage(
            queueId=queueId,
            envelope=ENVELOPE,
            session=SESSION,
            arrival=NOW,
            size=len(data),
            recipients=(
                RecipientState(ENVELOPE.recipients[0]),
                RecipientState(ENVELOPE.recipients[1]),
            ),  # fmt: skip
            nextAttempt=NOW,
        )
        for spool in (self.spool, self.reopen()):
            self.assertEqual(spool.load(queueId), expected)
            self.assertEqual(spool.pending(), [expected])
            with spool.openMessage(queueId) as f:
                self.assertEqual(f.read(), data)
        self.assertEqual(self.listing("queue"), [queueId + ".json", queueId + ".msg"])
        self.assertEqual(self.listing("tmp"), [])

    def test_commitOrder(self) -> None:
        """
        The msg and the json are fsync'd, renamed msg first, and the queue
        directory fsync'd, in that order.
        """
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(b"x\r\n")
        del self.fs.calls[:]
        queueId = self.successResultOf(writer.commit())
        durable = [c for c in self.fs.calls if c[0] in ("fsync", "rename", "syncDirectory")]
        self.assertEqual(
            durable,
            [
                ("fsync", f"tmp/{queueId}.msg"),
                ("fsync", f"tmp/{queueId}.json"),
                ("rename", f"tmp/{queueId}.msg", f"queue/{queueId}.msg"),
                ("rename", f"tmp/{queueId}.json", f"queue/{queueId}.json"),
                ("syncDirectory", "queue"),
            ],
        )

    def test_commitFiresOnlyWhenDurable(self) -> None:
        """
        The commit Deferred fires only after the blocking steps ran: then
        the files are in queue/ and every fsync was made.
        """
        runner = DeferredRunner()
        self.spool.runBlocking = runner
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(b"x\r\n")
        del self.fs.calls[:]
        seen: list[tuple[list[str], list[tuple[str, ...]]]] = []
        d = writer.commit()
        d.addCallback(lambda queueId: seen.append((self.listing("queue"), list(self.fs.calls))))
        self.assertNoResult(d)
        self.assertEqual(self.listing("queue"), [])
        self.assertNotIn("fsync", [c[0] for c in self.fs.calls])
        self.assertEqual(len(runner.calls), 1)
        runner.runAll()
        [(files, calls)] = seen
        queueId = writer.queueId
        self.assertEqual(files, [queueId + ".json", queueId + ".msg"])
        self.assertIn(("fsync", f"tmp/{queueId}.msg"), calls)
        self.assertIn(("fsync", f"tmp/{queueId}.json"), calls)
        self.assertEqual(calls[-1], ("syncDirectory", "queue"))

    def test_pendingOldestFirst(self) -> None:
        """pending() lists messages by arrival (commit time), not by id."""
        first = self.spool.begin(ENVELOPE, SESSION)
        second = self.spool.begin(ENVELOPE, SESSION)
        self.assertLess(first.queueId, second.queueId)
        second.write(b"2")
        self.successResultOf(second.commit())
        self.clock.advance(1)
        first.write(b"1")
        self.successResultOf(first.commit())
        self.assertEqual([m.queueId for m in self.spool.pending()],
                         [second.queueId, first.queueId])  # fmt: skip

    def test_lock(self) -> None:
        """A second spool on the same directory is refused until close()."""
        self.assertRaises(SpoolError, Spool, self.directory, self.clock, maybeDeferred)
        self.spool.close()
        self.spool.close()
        self.openSpool()

    def test_writeAfterCommit(self) -> None:
        """Writing to or committing a committed message is a programming error."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.successResultOf(writer.commit())
        self.assertRaises(RuntimeError, writer.write, b"x")
        self.assertRaises(RuntimeError, writer.commit)


class ThreadTests(SpoolTestMixin, SynchronousTestCase):
    """Every file operation of a writer runs through runBlocking, in order."""

    def openSpool(self, runBlocking: Any = None, directory: str | None = None) -> Spool:
        if runBlocking is None:
            self.runner = DeferredRunner()
            runBlocking = self.runner
        return super().openSpool(runBlocking, directory)

    def test_noFileOperationOnTheCallingThread(self) -> None:
        runner = self.runner
        self.fs.calls.clear()
        writer = self.spool.begin(ENVELOPE, SESSION)
        for _ in range(3):
            writer.write(b"x" * 70_000)
        d = writer.commit()
        self.assertEqual(self.fs.calls, [])  # creation and writes are queued, not done
        self.assertNoResult(d)
        runner.runAll()
        self.assertEqual(self.successResultOf(d), writer.queueId)
        with self.spool.openMessage(writer.queueId) as f:
            self.assertEqual(f.read(), b"x" * 210_000)

    def test_writeFailureInTheThread(self) -> None:
        """A write that fails in the thread fails the commit; nothing is left."""
        runner = self.runner
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.fs.failOn("write", ".msg", errno.ENOSPC)
        writer.write(b"x" * 70_000)
        d = writer.commit()
        runner.runAll()
        self.failureResultOf(d, SpoolFullError)
        runner.runAll()
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("queue"), [])

    def test_abortAfterQueuedWrites(self) -> None:
        """An abort waits for the queued writes, then removes the file."""
        runner = self.runner
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(b"x" * 70_000)
        writer.abort()
        runner.runAll()
        self.assertEqual(self.listing("tmp"), [])


class WriterTests(SpoolTestMixin, SynchronousTestCase):
    def test_eightBitUpgradesBody(self) -> None:
        """
        8-bit bytes make the stored body type 8BITMIME (RFC 6152), whatever
        the client declared, so that the relay announces it upstream.
        """
        seven = attrs.evolve(ENVELOPE, body=BodyType.SEVENBIT)
        writer = self.spool.begin(seven, SESSION)
        writer.write(b"Subject: caf\xc3\xa9\r\n\r\n")
        queueId = self.successResultOf(writer.commit())
        self.assertIs(self.spool.load(queueId).envelope.body, BodyType.EIGHTBITMIME)
        self.assertEqual(writer.message, self.spool.load(queueId))
        writer = self.spool.begin(seven, SESSION)
        writer.write(b"Subject: plain\r\n\r\n")
        queueId = self.successResultOf(writer.commit())
        self.assertIs(self.spool.load(queueId).envelope.body, BodyType.SEVENBIT)

    def test_queueIdInUse(self) -> None:
        """A commit never replaces a stored message with the same id."""
        first = self.commit(b"first\r\n")
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.queueId = first
        writer.write(b"second\r\n")
        self.failureResultOf(writer.commit(), SpoolError)
        with self.spool.openMessage(first) as f:
            self.assertEqual(f.read(), b"first\r\n")
        self.assertEqual(self.listing("tmp"), [])


class AbortTests(SpoolTestMixin, SynchronousTestCase):
    def test_abort(self) -> None:
        """abort leaves no file behind, and may be called again."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(b"x" * 100_000)
        self.assertEqual(self.listing("tmp"), [writer.queueId + ".msg"])
        writer.abort()
        writer.abort()
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("queue"), [])
        self.assertRaises(RuntimeError, writer.write, b"x")

    def test_abortAfterCommit(self) -> None:
        """abort after a successful commit keeps the message."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        queueId = self.successResultOf(writer.commit())
        writer.abort()
        self.assertEqual(self.spool.load(queueId).queueId, queueId)

    def test_abortDuringCommit(self) -> None:
        """
        abort while the commit runs lets it finish, then removes the message
        and fails the commit.
        """
        runner = DeferredRunner()
        self.spool.runBlocking = runner
        writer = self.spool.begin(ENVELOPE, SESSION)
        d = writer.commit()
        writer.abort()
        runner.runAll()
        self.failureResultOf(d, SpoolError)
        self.assertEqual(self.listing("queue"), [])
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.spool.pending(), [])


class FailureTests(SpoolTestMixin, SynchronousTestCase):
    def assertNothingLeft(self) -> None:
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("queue"), [])

    def failCommit(self, operation: str, name: str, code: int, data: bytes = b"x") -> Any:
        self.fs.failures = []
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(data)
        self.fs.failOn(operation, name, code)
        failure = self.failureResultOf(writer.commit(), SpoolError)
        writer.abort()
        writer.abort()
        self.assertNothingLeft()
        self.assertEqual(self.spool.pending(), [])
        self.failureResultOf(writer.commit(), SpoolError)
        return failure.value

    def test_writeENOSPC(self) -> None:
        """
        ENOSPC while writing (in the spool's thread): SpoolFullError at the
        next write and at commit.
        """
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.fs.failOn("write", ".msg", errno.ENOSPC)
        writer.write(b"x" * 70_000)
        self.assertNothingLeft()
        self.assertRaises(SpoolFullError, writer.write, b"more")
        self.failureResultOf(writer.commit(), SpoolFullError)
        writer.abort()
        self.assertNothingLeft()

    def test_writeEIO(self) -> None:
        """Another write error is a SpoolError, not SpoolFullError."""
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.fs.failOn("write", ".msg", errno.EIO)
        writer.write(b"x" * 70_000)
        error = self.assertRaises(SpoolError, writer.write, b"more")
        self.assertNotIsInstance(error, SpoolFullError)
        self.assertNothingLeft()

    def test_lastWriteENOSPC(self) -> None:
        """The buffered rest written at commit fails with SpoolFullError."""
        self.assertIsInstance(self.failCommit("write", ".msg", errno.ENOSPC), SpoolFullError)

    def test_fsyncENOSPC(self) -> None:
        """ENOSPC or EDQUOT on fsync: SpoolFullError, nothing queued."""
        self.assertIsInstance(self.failCommit("fsync", ".msg", errno.ENOSPC), SpoolFullError)
        self.assertIsInstance(self.failCommit("fsync", ".json", errno.EDQUOT), SpoolFullError)

    def test_fsyncEIO(self) -> None:
        """EIO on fsync: SpoolError, nothing queued."""
        error = self.failCommit("fsync", ".msg", errno.EIO)
        self.assertNotIsInstance(error, SpoolFullError)

    def test_jsonCreateFails(self) -> None:
        self.assertIsInstance(self.failCommit("create", ".json", errno.ENOSPC), SpoolFullError)

    def test_renameFails(self) -> None:
        """A failed rename of the json removes the msg already renamed."""
        self.failCommit("rename", ".json", errno.EIO)

    def test_syncDirectoryFails(self) -> None:
        """A failed directory fsync takes both files out of queue/ again."""
        self.failCommit("syncDirectory", "queue", errno.EIO)

    def test_createFails(self) -> None:
        """
        The message file is created in the commit's thread (or by the first
        write past the buffer); a failure there is SpoolError, SpoolFullError
        for ENOSPC.
        """
        self.fs.failOn("create", ".msg", errno.EMFILE)
        writer = self.spool.begin(ENVELOPE, SESSION)
        self.assertNotIn("create", [call[0] for call in self.fs.calls])
        writer.write(b"small")
        error = self.failureResultOf(writer.commit(), SpoolError).value
        self.assertNotIsInstance(error, SpoolFullError)
        self.fs.failures = []
        self.fs.failOn("create", ".msg", errno.ENOSPC)
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.write(b"x" * 70000)
        self.assertRaises(SpoolFullError, writer.write, b"more")
        self.assertNothingLeft()


class RecoveryTests(SpoolTestMixin, SynchronousTestCase):
    def put(self, where: str, name: str, data: bytes = b"junk") -> None:
        with open(os.path.join(self.directory, where, name), "wb") as f:
            f.write(data)

    def test_recovery(self) -> None:
        """
        Opening a spool removes unfinished writes and messages without
        state, quarantines state without message, keeps the rest.
        """
        kept = self.commit(b"kept")
        writer = self.spool.begin(ENVELOPE, SESSION)
        orphan = writer.queueId
        writer.write(b"x" * 70000)  # past the buffer: the file exists now
        os.close(writer._fd)  # type: ignore[arg-type]
        lonely = self.commit(b"lonely")
        os.unlink(os.path.join(self.directory, "queue", lonely + ".msg"))
        self.put("tmp", "leftover")
        self.put("tmp", orphan + ".json")
        self.put("queue", orphan + ".msg")
        self.put("queue", "README")
        spool = self.reopen()
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("queue"), [kept + ".json", kept + ".msg", "README"])
        self.assertEqual(self.listing("corrupt"), [lonely + ".json"])
        self.assertEqual([m.queueId for m in spool.pending()], [kept])
        with spool.openMessage(kept) as f:
            self.assertEqual(f.read(), b"kept")

    def test_crashAtEveryStep(self) -> None:
        """
        A copy of the spool taken before and after every file system call
        of a commit (a crash there) opens to nothing or to the whole message.
        """
        snapshots: list[str] = []
        base = os.path.abspath(self.mktemp())
        os.mkdir(base)

        def snapshot() -> None:
            copy = os.path.join(base, str(len(snapshots)))
            shutil.copytree(self.directory, copy)
            snapshots.append(copy)

        record = self.fs._record

        def recordAndSnapshot(operation: str, *names: str) -> None:
            snapshot()
            record(operation, *names)

        self.fs._record = recordAndSnapshot  # type: ignore[method-assign]
        data = b"Subject: crash\r\n\r\n" + b"y" * 100_000
        queueId = self.commit(data)
        self.fs._record = record  # type: ignore[method-assign]
        snapshot()
        found = []
        for copy in snapshots:
            spool = self.openSpool(directory=copy)
            messages = spool.pending()
            found.append(len(messages))
            for message in messages:
                self.assertEqual(message.queueId, queueId)
                with spool.openMessage(queueId) as f:
                    self.assertEqual(f.read(), data)
            self.assertEqual(os.listdir(os.path.join(copy, "tmp")), [])
            self.assertEqual(os.listdir(os.path.join(copy, "corrupt")), [])
            self.assertEqual(len(os.listdir(os.path.join(copy, "queue"))), 2 * len(messages))
        self.assertEqual(found[0], 0)
        self.assertEqual(found[-1], 1)

    def test_corruptJSON(self) -> None:
        """
        Unreadable state is logged and moved, with its message, to corrupt/;
        pending() and load() go on.
        """
        good = self.commit(b"good")
        bad = [self.commit(b"bad") for _ in range(3)]
        self.put("queue", bad[0] + ".json", b"{not json")
        self.put("queue", bad[1] + ".json", b'{"queueId": 1}')
        with open(os.path.join(self.directory, "queue", good + ".json"), "rb") as f:
            self.put("queue", bad[2] + ".json", f.read())  # names another id
        with capturedLogs() as events:
            self.assertEqual([m.queueId for m in self.spool.pending()], [good])
        self.assertEqual(len([e for e in events if e["log_level"].name == "error"]), 3)
        self.assertEqual(self.listing("corrupt"),
                         sorted(i + s for i in bad for s in (".json", ".msg")))  # fmt: skip
        self.assertEqual(self.listing("queue"), [good + ".json", good + ".msg"])
        self.assertRaises(KeyError, self.spool.load, bad[0])

    def test_corruptOnLoad(self) -> None:
        queueId = self.commit()
        self.put("queue", queueId + ".json", b"[]")
        with capturedLogs():
            self.assertRaises(KeyError, self.spool.load, queueId)
        self.assertEqual(self.listing("queue"), [])


class ReaderTests(SpoolTestMixin, SynchronousTestCase):
    def test_readWhileOpen(self) -> None:
        """
        A SpoolReader reads the queue while the Spool holds it, and sees
        committed messages only.
        """
        queueId = self.commit(b"data")
        writing = self.spool.begin(ENVELOPE, SESSION)
        reader = SpoolReader(self.directory)
        self.assertEqual(reader.pending(), [self.spool.load(queueId)])
        self.assertEqual(reader.load(queueId), self.spool.load(queueId))
        with reader.openMessage(queueId) as f:
            self.assertEqual(f.read(), b"data")
        self.assertRaises(KeyError, reader.load, writing.queueId)
        self.assertRaises(KeyError, reader.openMessage, writing.queueId)
        self.assertRaises(KeyError, reader.load, "../lock")
        # Nothing of an open message is on disk before its buffer fills.
        self.assertEqual(self.listing("tmp"), [])
        writing.abort()

    def test_corruptLeftAlone(self) -> None:
        """A SpoolReader logs and skips an unreadable entry, moving nothing."""
        good = self.commit()
        bad = self.commit()
        with open(os.path.join(self.directory, "queue", bad + ".json"), "wb") as f:
            f.write(b"{")
        reader = SpoolReader(self.directory)
        with capturedLogs() as events:
            self.assertEqual([m.queueId for m in reader.pending()], [good])
            self.assertRaises(KeyError, reader.load, bad)
        self.assertEqual([e["queueId"] for e in events], [bad, bad])
        self.assertEqual(len(self.listing("queue")), 4)
        self.assertEqual(self.listing("corrupt"), [])


KILLED_CHILD = r"""
import sys
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from mailgw.envelope import Address, Envelope, Session
from mailgw.queue.spool import Spool

spool = Spool(sys.argv[1], Clock(), maybeDeferred)
envelope = Envelope(Address("a", "example.org"), (Address("b", "example.com"),))
for i in range(2000):
    writer = spool.begin(envelope, Session("192.0.2.1"))
    line = b"%d " % i + b"z" * 990 + b"\r\n"
    for _ in range(100):
        writer.write(line)
    queueId = writer.commit().result
    sys.stdout.write(queueId + " %d\n" % i)
    sys.stdout.flush()
"""


class KillTests(SpoolTestMixin, SynchronousTestCase):
    def test_sigkill(self) -> None:
        """
        A process killed with SIGKILL while committing in a loop leaves a
        spool holding every acknowledged message, complete, and nothing else.
        """
        self.spool.close()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mailgw as installed
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_CHILD, self.directory],
            stdout=subprocess.PIPE,
            env=env,
        )
        self.addCleanup(child.wait)
        acknowledged: dict[str, int] = {}
        deadline = time.monotonic() + 5
        assert child.stdout is not None
        while len(acknowledged) < 25 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            queueId, text = line.decode("ascii").split()
            acknowledged[queueId] = int(text)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # Lines still in the pipe were acknowledged too.
        for line in child.stdout.read().splitlines():
            queueId, text = line.decode("ascii").split()
            acknowledged[queueId] = int(text)
        child.stdout.close()
        self.assertEqual(child.returncode, -signal.SIGKILL)
        self.assertGreaterEqual(len(acknowledged), 25)

        spool = self.openSpool()
        messages = {m.queueId: m for m in spool.pending()}
        self.assertLessEqual(set(acknowledged), set(messages))
        self.assertLessEqual(len(messages), len(acknowledged) + 1)
        numbers = acknowledged.copy()
        for queueId, message in messages.items():
            with spool.openMessage(queueId) as f:
                data = f.read()
            number = numbers.setdefault(queueId, len(acknowledged))
            self.assertEqual(data, (b"%d " % number + b"z" * 990 + b"\r\n") * 100)
            self.assertEqual(message.size, len(data))
        self.assertEqual(self.listing("tmp"), [])


class UpdateRemoveTests(SpoolTestMixin, SynchronousTestCase):
    def test_update(self) -> None:
        """update stores new recipient states durably; a reload sees them."""
        queueId = self.commit()
        old = self.spool.load(queueId)
        first, second = old.recipients
        new = attrs.evolve(
            old,
            recipients=(
                first.withResult(DeliveryResult(first.address, success=True), NOW + 5),
                second.withResult(
                    DeliveryResult(second.address, False, code=451, text="later"), NOW + 5
                ),
            ),
            nextAttempt=NOW + 300,
            held=True,
            warned=True,
        )
        del self.fs.calls[:]
        self.assertIs(self.successResultOf(self.spool.update(new)), new)
        durable = [c for c in self.fs.calls if c[0] in ("fsync", "rename", "syncDirectory")]
        self.assertEqual(
            durable,
            [
                ("fsync", f"tmp/{queueId}.json"),
                ("rename", f"tmp/{queueId}.json", f"queue/{queueId}.json"),
                ("syncDirectory", "queue"),
            ],
        )
        loaded = self.reopen().load(queueId)
        self.assertEqual(loaded, new)
        self.assertEqual(loaded.recipients[0].status, RecipientStatus.DELIVERED)
        self.assertEqual(loaded.recipients[1].attempts, 1)

    def test_updateFails(self) -> None:
        """A failed update keeps the old state and leaves no temp file."""
        queueId = self.commit()
        old = self.spool.load(queueId)
        self.fs.failOn("fsync", ".json", errno.ENOSPC)
        self.failureResultOf(self.spool.update(attrs.evolve(old, held=True)), SpoolFullError)
        self.assertEqual(self.spool.load(queueId), old)
        self.assertEqual(self.listing("tmp"), [])

    def test_updateMissing(self) -> None:
        queueId = self.commit()
        message = self.spool.load(queueId)
        self.successResultOf(self.spool.remove(queueId))
        self.failureResultOf(self.spool.update(message), KeyError)
        self.assertEqual(self.listing("queue"), [])

    def test_remove(self) -> None:
        """remove deletes json then msg, fsyncs the directory; idempotent."""
        queueId = self.commit()
        del self.fs.calls[:]
        self.assertIsNone(self.successResultOf(self.spool.remove(queueId)))
        self.assertEqual(
            self.fs.calls,
            [
                ("remove", f"queue/{queueId}.json"),
                ("remove", f"queue/{queueId}.msg"),
                ("syncDirectory", "queue"),
            ],
        )
        self.assertRaises(KeyError, self.spool.load, queueId)
        self.assertRaises(KeyError, self.spool.openMessage, queueId)
        self.assertEqual(self.spool.pending(), [])
        self.successResultOf(self.spool.remove(queueId))

    def test_serialized(self) -> None:
        """
        Changes to one message run one at a time in call order: an update
        asked for after a remove finds the message gone.
        """
        queueId = self.commit()
        message = self.spool.load(queueId)
        runner = DeferredRunner()
        self.spool.runBlocking = runner
        removed = self.spool.remove(queueId)
        updated = self.spool.update(message)
        self.assertEqual(len(runner.calls), 1)
        runner.runAll()
        self.successResultOf(removed)
        self.failureResultOf(updated, KeyError)
        self.assertEqual(self.listing("queue"), [])
        self.assertEqual(self.spool._locks, {})

    def test_uncommittedIsInvisible(self) -> None:
        """A message whose commit has not finished cannot be opened."""
        self.spool.runBlocking = DeferredRunner()
        writer = self.spool.begin(ENVELOPE, SESSION)
        writer.commit()
        self.assertRaises(KeyError, self.spool.openMessage, writer.queueId)
        self.assertRaises(KeyError, self.spool.load, writer.queueId)
        self.assertEqual(self.spool.pending(), [])


class RealClock:
    seconds = staticmethod(time.time)


class QueueIdTests(SpoolTestMixin, SynchronousTestCase):
    def test_sortableAndUnique(self) -> None:
        """
        10,000 ids, from a stopped clock, a slow one and the real one, are
        unique, well formed, in order and of unguessable random parts.
        """
        for clock in (Clock(), self.clock, RealClock()):
            newId = QueueIdFactory(clock)  # type: ignore[arg-type]
            ids = []
            for i in range(10_000):
                ids.append(newId())
                if isinstance(clock, Clock) and clock is self.clock and i % 7 == 0:
                    clock.advance(0.0001)
            self.assertEqual(len(set(ids)), len(ids))
            self.assertEqual(sorted(ids), ids)
            self.assertTrue(all(isQueueId(i) for i in ids))
            self.assertGreater(len({i[13:] for i in ids}), 9_900)

    def test_timeOrder(self) -> None:
        """Ids of a later time sort after those of an earlier one."""
        early = QueueIdFactory(Clock())()
        later = QueueIdFactory(self.clock)()
        self.assertLess(early, later)
        self.assertEqual(len(later), 20)

    def test_badIds(self) -> None:
        """Malformed ids are unknown ids: no path leaves queue/."""
        queueId = self.commit()
        bads: list[Any] = ["../queue/" + queueId, queueId.lower(), queueId + "\n", queueId[:-1],
                           "", "/etc/passwd", queueId + ".msg", 42]  # fmt: skip
        for bad in bads:
            self.assertRaises(KeyError, self.spool.load, bad)
            self.assertRaises(KeyError, self.spool.openMessage, bad)
            self.failureResultOf(self.spool.remove(bad), KeyError)
            message = attrs.evolve(self.spool.load(queueId), queueId=bad)
            self.failureResultOf(self.spool.update(message), KeyError)
        self.assertEqual(self.spool.load(queueId).queueId, queueId)


class EncodingTests(SynchronousTestCase):
    def test_everyFieldRoundTrips(self) -> None:
        """The hand-written toJSON of each value names every attrs field."""
        from mailgw.envelope import RecipientState, Session

        session = attrs.evolve(SESSION, sessionId="s1")
        for value in (session, RecipientState(ENVELOPE.recipients[0], attempts=2, code=450)):
            data = value.toJSON()
            fields = {f.name for f in attrs.fields(type(value))} - {"extra"}
            self.assertEqual(set(data), fields)
            self.assertEqual(type(value).fromJSON(data), value)
        self.assertIsInstance(SESSION, Session)
        self.assertEqual(Session.fromJSON(session.toJSON()).sessionId, "s1")
        # A session without an id is written as older versions wrote it.
        self.assertNotIn("sessionId", SESSION.toJSON())

    def test_versionWritten(self) -> None:
        message = QueuedMessage.arrived("0" * 20, ENVELOPE, SESSION, NOW, 10)
        self.assertEqual(message.toJSON()["version"], 1)
        data = message.toJSON()
        del data["version"]  # the files of the first releases
        self.assertEqual(QueuedMessage.fromJSON(data), message)

    def test_unknownKeysKept(self) -> None:
        """
        A newer gateway's keys, at every level, are read past and written
        back unchanged (a rollback loses nothing); its version is kept.
        """
        data = QueuedMessage.arrived("0" * 20, ENVELOPE, SESSION, NOW, 10).toJSON()
        data["version"] = 7
        data["future"] = {"a": [1, 2]}
        data["envelope"]["dsnEnvid"] = "xyz"
        data["session"]["proxy"] = "203.0.113.9"
        data["recipients"][0]["notify"] = ["FAILURE"]
        message = QueuedMessage.fromJSON(data)
        self.assertEqual(message.recipients[0].address, ENVELOPE.recipients[0])
        self.assertEqual(message.toJSON(), data)
        later = attrs.evolve(message, held=True)
        self.assertEqual(later.toJSON()["recipients"][0]["notify"], ["FAILURE"])

    def test_badVersion(self) -> None:
        data = QueuedMessage.arrived("0" * 20, ENVELOPE, SESSION, NOW, 10).toJSON()
        for bad in (0, -1, "2", True, None):
            data["version"] = bad
            self.assertRaises(ValueError, QueuedMessage.fromJSON, data)
