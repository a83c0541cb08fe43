"""
Smoke tests for the benchmark tools in C{benchmarks/}: they run the tools on
a tiny load so that the tools cannot rot. Nothing here asserts on timings;
speed is what the benchmarks print, never what a test checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from benchmarks import fanout, loadgen, postfix, procinfo, report, smtpclient, smtpserver
from mailgw.tls import makeSelfSigned

ROOT = Path(__file__).resolve().parents[1]


class FakeTransport(asyncio.Transport):
    """Records what an asyncio protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass


def connectSink(keep: bool = True) -> tuple[Any, FakeTransport, list[bytes | None]]:
    messages: list[bytes | None] = []
    settings = smtpserver.ServerSettings(keepMessages=keep, onMessage=messages.append)
    protocol = smtpserver.SMTPServerProtocol(settings, smtpserver.Counters(), False)
    transport = FakeTransport()
    protocol.connection_made(transport)
    del transport.written[:]
    return protocol, transport, messages


class ServerProtocolTests(unittest.SynchronousTestCase):
    """The shared server core, in memory."""

    def test_pipelinedTransaction(self) -> None:
        """
        A pipelined group is answered in one write, in order; dot-stuffed
        lines are unstuffed, and a terminator split over reads is found.
        """
        protocol, transport, messages = connectSink()
        protocol.data_received(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        replies = bytes(transport.written).split(b"\r\n")
        self.assertIn(b"250-PIPELINING", replies)
        self.assertNotIn(b"250-STARTTLS", replies)
        self.assertEqual(replies[-4:], [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with"
                                        b" <CR><LF>.<CR><LF>", b""])  # fmt: skip
        for chunk in (b"Subject: x\r\n\r\n..dot\r\nbody\r", b"\n.", b"\r", b"\nQUIT\r\n"):
            protocol.data_received(chunk)
        self.assertEqual(messages, [b"Subject: x\r\n\r\n.dot\r\nbody\r\n"])
        self.assertTrue(
            bytes(transport.written).endswith(b"250 2.0.0 Ok: accepted\r\n221 2.0.0 Bye\r\n")
        )
        self.assertTrue(transport.closed)
        self.assertEqual(protocol.counters.messages, 1)

    def test_emptyMessage(self) -> None:
        """A final dot right after DATA ends an empty message."""
        protocol, transport, messages = connectSink()
        protocol.data_received(b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n")
        self.assertEqual(messages, [b""])

    def test_authRequired(self) -> None:
        """With a user set, MAIL needs AUTH, and AUTH needs TLS."""
        settings = smtpserver.ServerSettings(user=b"u", password=b"p")
        protocol = smtpserver.SMTPServerProtocol(settings, smtpserver.Counters(), False)
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"EHLO x\r\nAUTH PLAIN AHUAcA==\r\nMAIL FROM:<a@b>\r\n")
        self.assertIn(b"503 5.5.1 AUTH not available", transport.written)
        self.assertIn(b"530 5.7.0", transport.written)


class MessageTests(unittest.SynchronousTestCase):
    def test_sizes(self) -> None:
        """makeMessage makes messages of the asked size, without dot-stuffing."""
        for size in (300, 4096, 4097, 100_000):
            headers, rest = smtpclient.makeMessage(size, "a@b", "c@d")
            message = headers + smtpclient.messageId(7) + rest
            self.assertEqual(len(message), size)
            self.assertNotIn(b"\n.", message)
            self.assertTrue(message.endswith(b"\r\n"))

    def test_percentile(self) -> None:
        self.assertIsNone(loadgen.percentile([], 0.5))
        self.assertEqual(loadgen.percentile([1.0, 2.0, 3.0, 4.0], 0.5), 2.0)
        self.assertEqual(loadgen.percentile([float(i) for i in range(1, 101)], 0.99), 99.0)


async def _against(settings: smtpserver.ServerSettings, argv: list[str], tls: Any = None) -> Any:
    """Run the load generator against an in-process server; (figures, counters)."""
    counters = smtpserver.Counters()
    server = await smtpserver.listen(settings, counters, 0, implicitTLS=tls)
    try:
        port = smtpserver.boundPort(server)
        figures = await loadgen.generate(loadgen.parseArguments(["--port", str(port), *argv]))
    finally:
        server.close()
    return figures, counters


class LoadGeneratorTests(unittest.SynchronousTestCase):
    """The load generator against the sink and reference cores on 127.0.0.1."""

    def setUp(self) -> None:
        base = self.mktemp()
        os.mkdir(base)
        self.cert, self.key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
        makeSelfSigned(self.cert, self.key, "localhost")

    def test_plain(self) -> None:
        settings = smtpserver.ServerSettings()
        argv = ["--mode", "plain", "--auth", "none", "--messages", "25", "--size", "2000",
                "--connections", "3", "--per-connection", "4", "--deadline", "30"]  # fmt: skip
        figures, counters = asyncio.run(_against(settings, argv))
        self.assertEqual((figures["accepted"], figures["errors"], figures["unsent"]), (25, 0, 0))
        self.assertEqual(figures["sessions"], 7)
        self.assertEqual(counters.messages, 25)
        self.assertIsNotNone(figures["latency_p99_ms"])

    def test_tlsAndAuth(self) -> None:
        """STARTTLS and implicit TLS, PLAIN and LOGIN, verified against the CA."""
        context = smtpserver.serverContext(self.cert, self.key)
        settings = smtpserver.ServerSettings(tlsContext=context, user=b"u@x", password=b"pw")
        for mode, auth in (("starttls", "PLAIN"), ("implicit", "LOGIN")):
            argv = ["--mode", mode, "--auth", auth, "--user", "u@x", "--password", "pw",
                    "--cafile", self.cert, "--messages", "6", "--connections", "2"]  # fmt: skip
            figures, counters = asyncio.run(
                _against(settings, argv, context if mode == "implicit" else None)
            )
            self.assertEqual((figures["accepted"], figures["errors"]), (6, 0), figures)
            self.assertEqual(counters.messages, 6)

    def test_wrongPassword(self) -> None:
        """A refused AUTH is a session error, counted, not a crash."""
        context = smtpserver.serverContext(self.cert, self.key)
        settings = smtpserver.ServerSettings(tlsContext=context, user=b"u@x", password=b"pw")
        argv = ["--user", "u@x", "--password", "wrong", "--messages", "3", "--connections", "1"]
        figures, counters = asyncio.run(_against(settings, argv))
        self.assertEqual((figures["accepted"], figures["errors"]), (0, 3))
        self.assertEqual(counters.authFailures, 3)
        self.assertEqual(len(figures["error_kinds"]), 1)

    def test_resume(self) -> None:
        """
        --resume: every worker offers its previous session; all but each
        worker's first session are resumed (the core issues tickets, as the
        gateway does).
        """
        context = smtpserver.serverContext(self.cert, self.key)
        settings = smtpserver.ServerSettings(tlsContext=context, user=b"u@x", password=b"pw")
        for mode in ("starttls", "implicit"):
            argv = ["--mode", mode, "--user", "u@x", "--password", "pw", "--cafile", self.cert,
                    "--messages", "9", "--connections", "3", "--resume"]  # fmt: skip
            figures, _ = asyncio.run(
                _against(settings, argv, context if mode == "implicit" else None)
            )
            self.assertEqual((figures["accepted"], figures["errors"]), (9, 0), figures)
            self.assertEqual((figures["tls_sessions"], figures["resumed"]), (9, 6), mode)
        argv = ["--user", "u@x", "--password", "pw", "--cafile", self.cert, "--messages", "4"]
        figures, _ = asyncio.run(_against(settings, argv))
        self.assertEqual((figures["tls_sessions"], figures["resumed"]), (4, 0))

    def test_processes(self) -> None:
        """--processes 2: two children share the load; their figures are merged."""
        settings = smtpserver.ServerSettings()

        async def run() -> tuple[dict[str, Any], smtpserver.Counters]:
            counters = smtpserver.Counters()
            server = await smtpserver.listen(settings, counters, 0)
            argv = ["--port", str(smtpserver.boundPort(server)), "--mode", "plain",
                    "--auth", "none", "--messages", "25", "--per-connection", "4",
                    "--connections", "3", "--processes", "2"]  # fmt: skip
            try:
                figures = await asyncio.to_thread(
                    fanout.runProcesses, ROOT / "benchmarks" / "loadgen.py", argv,
                    loadgen.parseArguments(argv),
                )  # fmt: skip
            finally:
                server.close()
            return figures, counters

        figures, counters = asyncio.run(run())
        self.assertEqual((figures["accepted"], figures["errors"]), (25, 0), figures)
        self.assertEqual((figures["sessions"], figures["processes"]), (7, 2))
        self.assertEqual(counters.messages, 25)
        self.assertIsNotNone(figures["latency_p99_ms"])

    def test_hold(self) -> None:
        """--hold keeps sessions open until released (here by its timer)."""
        settings = smtpserver.ServerSettings(
            tlsContext=smtpserver.serverContext(self.cert, self.key)
        )
        argv = ["--auth", "none", "--per-connection", "0", "--sessions", "5",
                "--connections", "5", "--hold", "0.5", "--ramp", "2"]  # fmt: skip
        figures, counters = asyncio.run(_against(settings, argv))
        self.assertEqual((figures["sessions"], figures["session_errors"]), (5, 0))
        self.assertEqual(counters.sessions, 5)


class FanoutTests(unittest.SynchronousTestCase):
    """How the load is divided between processes and their figures merged."""

    def test_childArguments(self) -> None:
        argv = ["--port", "1", "--messages", "25", "--per-connection", "4", "--connections", "5"]
        options = loadgen.parseArguments([*argv, "--processes", "3"])
        children = [loadgen.parseArguments(a) for a in fanout.childArguments(argv, options)]
        self.assertEqual([c.messages for c in children], [12, 8, 5])
        self.assertEqual([c.connections for c in children], [2, 2, 1])
        self.assertTrue(all(c.child and c.processes == 1 for c in children))
        argv = ["--port", "1", "--per-connection", "0", "--sessions", "7", "--connections", "2"]
        options = loadgen.parseArguments([*argv, "--processes", "3"])
        children = [loadgen.parseArguments(a) for a in fanout.childArguments(argv, options)]
        self.assertEqual([c.sessions for c in children], [3, 2, 2])
        self.assertEqual([c.connections for c in children], [1, 1, 1])

    def test_merge(self) -> None:
        options = loadgen.parseArguments(["--port", "1"])
        part = {"accepted": 2, "rejected": 0, "errors": 1, "unsent": 0, "sessions": 3,
                "session_errors": 1, "tls_sessions": 3, "resumed": 1, "client_cpu_s": 0.5,
                "deadline_hit": False, "error_kinds": {"x": 1}}  # fmt: skip
        first = {**part, "started": 10.0, "ended": 11.0, "latencies_s": [0.001, 0.003]}
        second = {**part, "started": 10.5, "ended": 12.0, "latencies_s": [0.002, 0.004]}
        merged = fanout.merge([first, second], options)
        self.assertEqual((merged["accepted"], merged["resumed"], merged["processes"]), (4, 2, 2))
        self.assertEqual(merged["wall_seconds"], 2.0)
        self.assertEqual(merged["msgs_per_s"], 2.0)
        self.assertEqual(merged["latency_p50_ms"], 2.0)
        self.assertEqual(merged["client_cpu_s"], 1.0)
        self.assertEqual(merged["error_kinds"], {"x": 2})


class ProcInfoTests(unittest.SynchronousTestCase):
    def test_tree(self) -> None:
        """A process tree's CPU counts exited children; its RSS sums the living."""
        me = os.getpid()
        before = procinfo.treeCPUSeconds(me)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nsys.stdin.read()"], stdin=subprocess.PIPE
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        self.assertIn(child.pid, procinfo.descendants(me))
        self.assertGreater(procinfo.treeRSSKiB(me), procinfo.memoryKiB(me)["VmRSS"])
        self.assertGreaterEqual(procinfo.treeCPUSeconds(me), before)


class SinkTests(unittest.SynchronousTestCase):
    """benchmarks/sink.py as a process: --expect, --store, the exit line."""

    def test_expect(self) -> None:
        store = os.path.abspath(self.mktemp())
        sink = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "sink.py"),
                "--expect",
                "3",
                "--timeout",
                "60",
                "--store",
                store,
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(sink.wait)
        self.addCleanup(sink.kill)
        assert sink.stdout is not None
        port = json.loads(sink.stdout.readline())["port"]
        argv = ["--port", str(port), "--mode", "plain", "--auth", "none", "--messages", "3"]
        figures = asyncio.run(loadgen.generate(loadgen.parseArguments(argv)))
        self.assertEqual(figures["accepted"], 3)
        self.assertEqual(sink.wait(timeout=30), 0)
        final = json.loads(sink.stdout.read().splitlines()[-1])
        self.assertEqual((final["received"], final["reached"]), (3, True))
        self.assertEqual(len(os.listdir(store)), 3)


class DriverTests(unittest.SynchronousTestCase):
    """benchmarks/run.py --quick, end to end: sink, reference server, gateway."""

    def test_quick(self) -> None:
        output = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "run.py"),
                "--quick",
                "--cheap-hash",
                "--json",
                output,
                "--deadline",
                "60",
                "--total-deadline",
                "150",
                "--no-postfix",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=240,
            cwd=str(ROOT),
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        figures = json.loads(Path(output).read_text())
        rows = {(r["scenario"], r["server"]): r for r in figures["rows"]}
        self.assertEqual(
            set(rows),
            {(s, server) for s in ("A", "AR", "B", "C") for server in ("gateway", "reference")},
        )
        self.assertGreater(rows["AR", "gateway"]["resumed"], 0)
        self.assertEqual(rows["A", "gateway"]["resumed"], 0)
        for row in rows.values():
            self.assertGreater(row["accepted"], 0, row)
            self.assertIn("delivered", row)
            self.assertIsNotNone(row["cpu_ms_per_msg"])
        self.assertEqual([m["server"] for m in figures["memory"]], ["gateway", "reference"])
        self.assertIn("gw/ref", done.stdout)
        self.assertIn("python", figures["machine"])

    def test_postfix(self) -> None:
        """A Postfix row, when Postfix can run here: it accepts and relays."""
        why = postfix.unavailable()
        if why is not None:
            raise unittest.SkipTest(why)
        output = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "run.py"),
                "--quick",
                "--cheap-hash",
                "--scenario",
                "A,AR",
                "--json",
                output,
                "--deadline",
                "60",
                "--total-deadline",
                "150",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=240,
            cwd=str(ROOT),
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        rows = {
            (r["scenario"], r["server"]): r for r in json.loads(Path(output).read_text())["rows"]
        }
        for scenario in ("A", "AR"):
            row = rows[scenario, "postfix"]
            self.assertEqual((row["accepted"], row["delivered"]), (12, 12), row)
            self.assertIsNotNone(row["cpu_ms_per_msg"])
        self.assertGreater(rows["AR", "postfix"]["resumed"], 0)
        self.assertIn("gw/postfix", done.stdout)


class ReportTests(unittest.SynchronousTestCase):
    def test_ratio(self) -> None:
        self.assertEqual(report._ratio(10.0, 40.0), "0.25x")
        self.assertEqual(report._ratio(None, 40.0), "-")

    def test_saturated(self) -> None:
        """The '^' mark: the load generator's CPU time against its CPUs."""
        row = {"wall_seconds": 2.0, "client_cpu_s": 1.9}
        self.assertTrue(report._loadSaturated(row))
        self.assertFalse(report._loadSaturated({**row, "client_cpus": 2}))
        self.assertTrue(report._loadSaturated({**row, "client_cpu_s": 3.7, "client_cpus": 2}))
