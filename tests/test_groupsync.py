"""
Tests for L{mailgw.queue.files.GroupSync}: directory fsyncs shared between
the spool's threads, each caller covered by an fsync that started after it.
"""

from __future__ import annotations

import errno
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from mailgw.queue.files import FileSystem, GroupSync


class SlowFileSystem(FileSystem):
    """syncDirectory takes a while and records when each one started and ended."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.clock = 0
        self.syncs: list[tuple[int, int]] = []  # (start tick, end tick)
        self.failures = 0

    def tick(self) -> int:
        with self.lock:
            self.clock += 1
            return self.clock

    def syncDirectory(self, path: str) -> None:
        start = self.tick()
        time.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            self.tick()
            raise OSError(errno.EIO, "injected")
        self.syncs.append((start, self.tick()))


class GroupSyncTests(SynchronousTestCase):
    def run_threads(self, fs: SlowFileSystem, sync: GroupSync, count: int) -> list[object]:
        calls: list[object] = [None] * count

        def one(index: int) -> None:
            called = fs.tick()
            try:
                sync.sync()
            except OSError as e:
                calls[index] = e
                return
            calls[index] = (called, fs.tick())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return calls

    def test_shared(self) -> None:
        """Many callers at once share fewer fsyncs than there are callers."""
        fs = SlowFileSystem()
        calls = self.run_threads(fs, GroupSync(fs, "queue"), 16)
        self.assertLess(len(fs.syncs), 16)
        self.assertGreaterEqual(len(fs.syncs), 1)
        for called, returned in calls:  # type: ignore[misc]
            # Covered: an fsync started after the call and ended before the return.
            self.assertTrue(
                any(called < start and end < returned for start, end in fs.syncs),
                (called, returned, fs.syncs),
            )

    def test_alone(self) -> None:
        """One caller at a time: one fsync each."""
        fs = SlowFileSystem(delay=0)
        sync = GroupSync(fs, "queue")
        for _ in range(3):
            sync.sync()
        self.assertEqual(len(fs.syncs), 3)

    def test_failure(self) -> None:
        """
        A failed fsync fails the caller that ran it; the callers it was to
        cover are covered by a later, successful one (or fail with their own).
        """
        fs = SlowFileSystem()
        fs.failures = 1
        calls = self.run_threads(fs, GroupSync(fs, "queue"), 8)
        errors = [c for c in calls if isinstance(c, OSError)]
        self.assertEqual(len(errors), 1)
        for call in calls:
            if isinstance(call, tuple):
                called, returned = call
                self.assertTrue(any(called < s and e < returned for s, e in fs.syncs))
