"""
``twistd mailgw`` with ``[server] workers = 2`` on 127.0.0.1: messages
land in both shards and are all relayed; ``mailgw queue`` sees every
shard; a worker killed while its messages wait is started again and its
messages are delivered; SIGHUP reloads both workers; SIGTERM stops all;
a password spray spread over both workers is throttled as one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.queue.spool import SpoolReader
from mailgw.workers.shards import shardDirectory
from tests.integration.support import (
    PASSWORD,
    USER,
    clientContext,
    freePort,
    makeFixtures,
    shortDirectory,
    spawnTwistd,
    waitForPort,
)
from tests.upstream import startUpstream

MESSAGE = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def waitUntil(check: Callable[[], Any], what: str, limit: float = 60) -> Any:
    """Poll ``check`` (blocking, in a thread) until it is true, at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {limit} s: {what}")


class WorkersTests(TestCase):
    timeout = 240

    def startGateway(self, relayPort: int, limits: dict[str, Any] | None = None) -> None:
        base = shortDirectory(self)
        self.files = makeFixtures(base / "fx", base / "spool")
        self.spool = self.files["spool"]
        self.port = freePort()
        lines = [
            "[server]",
            'hostname = "localhost"',
            f'submission = ["tcp:port={self.port}:interface=127.0.0.1"]',
            "workers = 2",
            "[tls]",
            f'certificate = "{self.files["cert"]}"',
            f'key = "{self.files["key"]}"',
            "[auth]",
            f'backends = ["passwd:{self.files["passwd"]}"]',
            "[spool]",
            f'directory = "{self.spool}"',
            "[relay]",
            f'smarthosts = ["localhost:{relayPort}"]',
            'tls = "none"',
            "[queue]",
            "retry_min = 1",
            "retry_max = 2",
            "retry_jitter = 0",
            "[limits]",
            *(f"{key} = {value}" for key, value in (limits or {}).items()),
        ]
        self.config = base / "mailgw.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.logPath = base / "log"
        self.process = spawnTwistd(self, self.config, self.logPath)
        waitForPort(self.port, self.process, str(self.logPath))
        self.waitForLog(r"\[worker-1\] Control socket listening", 1)
        self.waitForLog(r"\[worker-0\] Control socket listening", 1)

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    def waitForLog(self, pattern: str, count: int, limit: float = 60) -> None:
        waitUntil(
            lambda: len(re.findall(pattern, self.log())) >= count,
            f"{count} log lines {pattern!r}:\n{self.log()[-3000:]}",
            limit,
        )

    def submit(self, count: int) -> list[str]:
        """``count`` messages, each over its own connection, 8 at a time."""

        def one(_: int) -> str:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as smtp:
                smtp.starttls(context=clientContext(self.files["cert"]))
                smtp.login(USER, PASSWORD)
                smtp.mail(USER)
                smtp.rcpt("bob@example.org")
                code, reply = smtp.data(MESSAGE)
                assert code == 250, reply
                return reply.decode().rsplit(" ", 1)[-1]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(count)))

    def shardIds(self, index: int) -> set[str]:
        return {m.queueId for m in SpoolReader(shardDirectory(self.spool, index)).pending()}

    def mailgw(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mailgw", *args, "--spool", self.spool]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def workerPid(self, index: int) -> int:
        found = re.findall(rf"worker {index} started \(pid (\d+)", self.log())
        return int(found[-1])

    @inlineCallbacks
    def test_shardsKillReloadDeliverStop(self) -> Any:
        relayPort = freePort()  # nothing listens yet: the upstream is down
        yield deferToThread(self.startGateway, relayPort)

        # Many connections: both workers take some, each into its own shard.
        ids: list[str] = []
        for _ in range(8):  # bounded: until both shards hold messages
            ids += yield deferToThread(self.submit, 8)
            if self.shardIds(0) and self.shardIds(1):
                break
        self.assertTrue(self.shardIds(0), "worker 0 took no message")
        self.assertTrue(self.shardIds(1), "worker 1 took no message")
        self.assertEqual(self.shardIds(0) | self.shardIds(1), set(ids))
        self.assertFalse(self.shardIds(0) & self.shardIds(1))

        # `mailgw queue list` shows every shard's messages.
        listed = yield deferToThread(self.mailgw, "queue", "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual({m["id"] for m in json.loads(listed.stdout)}, set(ids))
        # A control command reaches the shard that holds the message.
        someId = sorted(self.shardIds(1))[0]
        held = yield deferToThread(self.mailgw, "queue", "hold", someId)
        self.assertEqual(held.returncode, 0, held.stderr)
        self.assertTrue(SpoolReader(shardDirectory(self.spool, 1)).load(someId).held)
        released = yield deferToThread(self.mailgw, "queue", "release", someId)
        self.assertEqual(released.returncode, 0, released.stderr)

        # SIGKILL worker 1 while its messages wait: it is started again.
        waiting = self.shardIds(1)
        os.kill(self.workerPid(1), signal.SIGKILL)
        yield deferToThread(self.waitForLog, r"worker 1 exited \(signal 9\); restarting", 1)
        yield deferToThread(self.waitForLog, r"worker 1 started \(pid", 2)
        yield deferToThread(self.waitForLog, r"\[worker-1\] Control socket listening", 2)
        self.assertEqual(self.shardIds(1), waiting)

        # SIGHUP reloads both workers.
        self.process.send_signal(signal.SIGHUP)
        yield deferToThread(self.waitForLog, r"\[worker-0\] Reloaded the configuration", 1)
        yield deferToThread(self.waitForLog, r"\[worker-1\] Reloaded the configuration", 1)

        # The upstream comes back: every message of both shards is relayed.
        upstream = yield startUpstream(reactor, port=relayPort)
        self.addCleanup(upstream.stop)
        flushed = yield deferToThread(self.mailgw, "queue", "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        received = yield upstream.waitForTransactions(len(ids))
        self.assertEqual(len(received), len(ids))
        yield deferToThread(
            waitUntil, lambda: not self.shardIds(0) and not self.shardIds(1), "empty shards"
        )

        # SIGTERM stops the supervisor and every worker.
        pids = [self.workerPid(0), self.workerPid(1)]
        self.process.send_signal(signal.SIGTERM)
        code = yield deferToThread(self.process.wait, 60)
        # twistd ends with the signal that stopped its reactor.
        self.assertIn(code, (0, -signal.SIGTERM), self.log()[-3000:])
        for pid in pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertIn("worker 0 stopped (status 0)", self.log())
        self.assertIn("worker 1 stopped (status 0)", self.log())

    def spray(self, attempts: int, source: str = "127.0.0.1") -> list[int]:
        """One wrong password per connection, each for another user: the replies' codes."""
        codes = []
        for i in range(attempts):
            try:
                with smtplib.SMTP(
                    "127.0.0.1", self.port, timeout=60, source_address=(source, 0)
                ) as smtp:
                    smtp.starttls(context=clientContext(self.files["cert"]))
                    smtp.ehlo()
                    smtp.user, smtp.password = f"user{i}@example.com", "wrong password"
                    try:
                        # One attempt: login() would try every mechanism.
                        smtp.auth("PLAIN", smtp.auth_plain)
                        codes.append(235)
                    except smtplib.SMTPAuthenticationError as e:
                        codes.append(e.smtp_code)
            except smtplib.SMTPServerDisconnected:
                codes.append(421)
            time.sleep(0.2)
        return codes

    @inlineCallbacks
    def test_sprayOverTwoWorkersThrottledAsOne(self) -> Any:
        budget = 6
        limits = {
            "auth_failures_per_address": budget,
            "auth_failures_per_network": 1000,
            "auth_failures_per_account": 1000,
            "auth_free_failures": 1000,
            "auth_delay": 0,
        }
        yield deferToThread(self.startGateway, freePort(), limits)
        # Which worker accepts a connection is the kernel's choice: spray
        # from a fresh address (a fresh budget) until a spray was spread
        # over both, so that each worker alone would have let `budget` through.
        rounds = []
        for n in range(2, 8):
            source = f"127.0.0.{n}"
            codes = yield deferToThread(self.spray, 24, source)
            served = [
                len(re.findall(rf"\[worker-{i}\] disconnect from client={source} ", self.log()))
                for i in (0, 1)
            ]
            rounds.append(served)
            if all(count >= 3 for count in served):
                break
        self.assertTrue(all(count >= 3 for count in served), f"connections per worker: {rounds}")
        failures = codes.count(535)
        # Counted per worker, up to 2 * budget would be refused as 535 (a
        # full verification each); counted once, the budget plus what the
        # counts' sync may let through in flight.
        self.assertGreaterEqual(failures, budget, codes)
        self.assertLessEqual(failures, budget + 2, f"{codes} served {served}")
        self.assertNotIn(235, codes)
