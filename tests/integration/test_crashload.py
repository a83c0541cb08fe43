"""
SIGKILL at random moments under concurrent load, repeated: every message
acknowledged with 250 is delivered, and the duplicates the crashes cause
are counted and bounded by what was in flight.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailgw.queue.spool import SpoolReader
from tests.integration.support import (
    PASSWORD,
    ROOT,
    USER,
    clientContext,
    freePort,
    makeFixtures,
    shortDirectory,
    stopProcess,
    twistdCommand,
    waitForPort,
)
from tests.upstream import UpstreamFactory, UpstreamProtocol, startUpstream

MESSAGES = 150
CLIENTS = 4
KILLS = 3
PER_HOST = 5  # [queue] max_per_host below: deliveries in flight at most
#: Seconds the upstream takes to answer each final dot: deliveries take
#: time, as real ones do, so that a kill finds some of them in flight.
DOT_DELAY = 0.05
_SUBJECT = re.compile(rb"^Subject: (msg-\d+)\r$", re.MULTILINE)


class _SlowUpstream(UpstreamProtocol):
    """Answers each final dot after L{DOT_DELAY} seconds, nothing meanwhile."""

    def stage(self, name: str, reply: str) -> bool:
        if name != "dot":
            return super().stage(name, reply)
        self.halted = True

        def answer() -> None:
            if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
                return
            self.halted = False
            super(_SlowUpstream, self).stage(name, reply)
            self.dataReceived(b"")

        reactor.callLater(DOT_DELAY, answer)  # type: ignore[attr-defined]
        return True


class CrashUnderLoadTests(TestCase):
    timeout = 240

    @inlineCallbacks
    def test_randomKills(self) -> Any:
        rng = random.Random(int(os.environ.get("MAILGW_CRASH_SEED", "20261129")))
        self.patch(UpstreamFactory, "protocol", _SlowUpstream)
        upstream = yield startUpstream(reactor)
        self.addCleanup(upstream.stop)
        base = shortDirectory(self)
        files = makeFixtures(base / "files", base / "spool")
        submission = freePort()
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["tcp:port={submission}:interface=127.0.0.1"]
[tls]
certificate = "{files["cert"]}"
key = "{files["key"]}"
[auth]
backends = ["passwd:{files["passwd"]}"]
[spool]
directory = "{files["spool"]}"
[queue]
retry_min = 1
retry_max = 1
retry_jitter = 0
max_per_host = {PER_HOST}
[limits]
connection_rate_per_address = 100000
max_connections_per_address = 1000
messages_per_user = 0
recipients_per_user = 0
[breaker]
enabled = false
[relay]
smarthosts = ["127.0.0.1:{upstream.portNumber}"]
tls = "none"
"""
        )
        log = base / "twistd.log"
        processes: list[subprocess.Popen[bytes]] = []

        errors = base / "twistd.err"

        def start(tries: int = 2) -> None:
            # What twistd writes before its log is open (a start-up error) goes
            # to twistd.err, so that a failed restart says why.
            with open(errors, "ab") as err:
                process = subprocess.Popen(
                    twistdCommand(
                        "--nodaemon",
                        "--pidfile=",
                        f"--logfile={log}",
                        "mailgw",
                        "--config",
                        str(config),
                    ),  # fmt: skip
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),
                    stderr=err,
                )
            processes.append(process)
            try:
                waitForPort(submission, process, str(log))
            except AssertionError:
                if process.poll() is None or tries <= 1:
                    raise AssertionError(errors.read_text(errors="replace")) from None
                # A restart right after a SIGKILL can lose a race for the
                # port or the spool's lock: one more try, then the error.
                time.sleep(0.5)
                start(tries - 1)

        self.addCleanup(lambda: [stopProcess(p) for p in processes])
        acknowledged: set[str] = set()
        attempts: Counter[str] = Counter()
        lock = threading.Lock()
        todo = list(range(MESSAGES))
        stop = time.monotonic() + 150

        def client() -> None:
            context = clientContext(files["cert"])
            while time.monotonic() < stop:
                with lock:
                    if not todo:
                        return
                    batch, todo[:] = todo[:5], todo[5:]
                try:
                    with smtplib.SMTP("localhost", submission, timeout=20) as smtp:
                        smtp.starttls(context=context)
                        smtp.login(USER, PASSWORD)
                        while batch:
                            subject = f"msg-{batch[0]}"
                            with lock:
                                attempts[subject] += 1
                            body = f"Subject: {subject}\r\n\r\n{subject}\r\n"
                            smtp.sendmail(USER, ["bob@example.org"], body.encode())
                            with lock:
                                acknowledged.add(subject)
                            batch.pop(0)
                except (OSError, smtplib.SMTPException):
                    with lock:
                        todo.extend(batch)  # not acknowledged: the client sends again
                    time.sleep(0.1)

        yield deferToThread(start)
        clients = [deferToThread(client) for _ in range(CLIENTS)]
        for _ in range(KILLS):
            yield deferLater(reactor, rng.uniform(0.5, 2.0), lambda: None)
            processes[-1].send_signal(signal.SIGKILL)
            yield deferToThread(processes[-1].wait)
            yield deferToThread(start)
        for d in clients:  # noqa: UP028 - inlineCallbacks waits on each
            yield d
        self.assertEqual(len(acknowledged), MESSAGES, "the clients did not finish")
        for _ in range(600):
            if not SpoolReader(files["spool"]).pending():
                break
            yield deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the queue did not drain")
        processes[-1].terminate()
        yield deferToThread(processes[-1].wait)

        delivered: Counter[str] = Counter()
        for transaction in upstream.transactions:
            for match in _SUBJECT.finditer(transaction.data):
                delivered[match.group(1).decode()] += 1
        lost = acknowledged - set(delivered)
        self.assertEqual(lost, set(), "acknowledged but never delivered")
        resent = {s for s, n in attempts.items() if n > 1}
        duplicates = sum(n - 1 for s, n in delivered.items() if s not in resent)
        print(
            f"\ncrash-load: {MESSAGES} messages, {KILLS} kills: {duplicates} duplicate "
            f"deliveries by the gateway, {len(resent)} messages resent by clients "
            f"(no 250 seen), {sum(delivered.values())} deliveries in all"
        )
        # A kill can repeat only the deliveries in flight at that moment:
        # at most max_per_host transactions to the one smarthost.
        self.assertLessEqual(duplicates, KILLS * PER_HOST)
