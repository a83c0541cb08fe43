"""
The load generator: many SMTP submission sessions against one server on
127.0.0.1, from one asyncio process, with its own small SMTP client (no
smtplib: one StreamReader/StreamWriter pair per session, STARTTLS through
C{StreamWriter.start_tls}, MAIL/RCPT/DATA sent in one write when the server
offers PIPELINING, RFC 2920).

    .venv/bin/python benchmarks/loadgen.py --port 2587 --mode starttls \\
        --auth PLAIN --user U --password P --messages 2000 --size 4096 \\
        --connections 20 --per-connection 1

It prints ONE JSON line: accepted, rejected, errors, unsent, wall_seconds,
msgs_per_s, latency_p50_ms, latency_p99_ms (from writing the final "." to
reading its reply) and more (see benchmarks/README.md). Every run ends by
C{--deadline} (default 300 s): sessions still open then are cut and their
messages counted as unsent.

C{--resume} makes every worker offer the TLS session (ticket) of its previous
session, as a client that reconnects for every message does; the figures
then count the sessions the server resumed.

C{--processes N} splits the load over N load generator processes (the
sessions and connections divided between them), started together, their
figures merged: one Python process manages about 480 STARTTLS + AUTH
sessions a second, so a faster server needs more of them (and the CPUs for
them).

C{--per-connection 0 --sessions N} runs N sessions without messages (connect,
TLS, EHLO, AUTH if asked, QUIT). C{--hold S} keeps every session open after
that until S seconds passed, SIGUSR1 arrives or the deadline: once all are
open (or failed) it writes ``{"holding": n, "failed": m}`` to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import resource
import signal
import ssl
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fanout  # noqa: E402
from benchmarks.fanout import percentile  # noqa: E402
from benchmarks.smtpclient import (  # noqa: E402
    ProtocolError,
    ResumingContext,
    clientContext,
    ehlo,
    expect,
    makeMessage,
    messageId,
    readReply,
)


@attrs.define
class Results:
    """What every session together achieved."""

    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    unsent: int = 0
    sessions: int = 0
    sessionErrors: int = 0
    tlsSessions: int = 0
    resumed: int = 0
    latencies: list[float] = attrs.Factory(list)
    errorKinds: Counter[str] = attrs.Factory(Counter)

    def error(self, exc: BaseException) -> None:
        self.sessionErrors += 1
        kind = f"{type(exc).__name__}: {exc}"[:120]
        if kind in self.errorKinds or len(self.errorKinds) < 10:
            self.errorKinds[kind] += 1
        else:
            self.errorKinds["(other)"] += 1


class LoadGenerator:
    """The plan (sessions and their messages), the shared state, the results."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.results = Results()
        self.tls = options.mode != "plain"
        self.context = clientContext(options.cafile) if self.tls else None
        self.headers, self.body = makeMessage(options.size, options.sender, options.recipient)
        self.envelope = (
            f"MAIL FROM:<{options.sender}>\r\nRCPT TO:<{options.recipient}>\r\n".encode()
        )
        per = options.per_connection
        if options.sessions is not None:
            self.totalSessions = options.sessions
            self.totalMessages = options.sessions * per
        else:
            self.totalMessages = options.messages
            self.totalSessions = math.ceil(options.messages / per) if per else 0
        self.nextSession = 0
        self.messagesTaken = 0
        self.sequence = 0
        self.ramp = asyncio.Semaphore(options.ramp) if options.ramp else None
        self.holding = 0
        self.settled = 0
        self.release = asyncio.Event()
        self.deadline = 0.0

    def take(self) -> int | None:
        """Messages for the next session, or None when every session ran."""
        if self.nextSession >= self.totalSessions:
            return None
        self.nextSession += 1
        count = min(self.options.per_connection, self.totalMessages - self.messagesTaken)
        self.messagesTaken += count
        return count

    def expired(self) -> bool:
        return asyncio.get_running_loop().time() >= self.deadline

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.options.deadline
        workers = min(self.options.connections, self.totalSessions)
        cpu, started = time.process_time(), time.monotonic()
        await asyncio.gather(*(self.worker() for _ in range(workers)))
        ended = time.monotonic()
        cpu = time.process_time() - cpu
        return self.report(started, ended, cpu)

    async def worker(self) -> None:
        context = self.context
        if self.tls and self.options.resume:
            context = clientContext(self.options.cafile, resuming=True)
        while not self.expired():
            count = self.take()
            if count is None:
                return
            await self.session(count, context)

    async def session(self, count: int, context: ssl.SSLContext | None = None) -> None:
        """One connection carrying C{count} messages; never raises."""
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        finished = 0
        held = False
        self.results.sessions += 1
        limit = min(self.deadline, loop.time() + self.options.session_timeout)
        try:
            async with asyncio.timeout_at(limit) as timeout:
                ramp = self.ramp if self.ramp is not None else contextlib.nullcontext()
                async with ramp:
                    reader, writer = await self.connect(context)
                    pipelining = await self.handshake(reader, writer, context)
                quitSent = False
                for number in range(1, count + 1):
                    # QUIT may close a pipelined group (RFC 2920 3.1): it
                    # rides with the last final dot unless we hold.
                    quitSent = pipelining and number == count and not self.options.hold
                    await self.sendMessage(reader, writer, pipelining, quitSent)
                    finished += 1
                if self.options.hold:
                    timeout.reschedule(self.deadline)
                    held = True
                    self.settle(True)
                    await self.release.wait()
                if not quitSent:
                    writer.write(b"QUIT\r\n")
                await readReply(reader)
        except TimeoutError as e:
            if self.expired():
                self.results.unsent += count - finished
            else:
                self.results.errors += count - finished
                self.results.error(e)
        except Exception as e:
            # Connect, TLS, protocol or a bug of ours: counted by kind (the
            # kinds are in the report), never the end of the whole run.
            self.results.errors += count - finished
            self.results.error(e)
        finally:
            if self.options.hold and not held:
                self.settle(False)
            if writer is not None:
                # After 221 the server closes; so do we, without the TLS
                # close_notify exchange (as smtplib does): it would cost two
                # more sends per session and say nothing about the server.
                writer.transport.abort()

    async def connect(
        self, context: ssl.SSLContext | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        options = self.options
        if options.mode == "implicit":
            return await asyncio.open_connection(
                options.host,
                options.port,
                ssl=context,
                server_hostname=options.server_name,
            )
        return await asyncio.open_connection(options.host, options.port)

    async def handshake(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext | None,
    ) -> bool:
        """Greeting, EHLO, STARTTLS, EHLO, AUTH; whether PIPELINING is offered."""
        options = self.options
        await expect(reader, 220, "greeting")
        extensions = await ehlo(reader, writer)
        if options.mode == "starttls":
            if "STARTTLS" not in extensions:
                raise ProtocolError("STARTTLS not offered")
            writer.write(b"STARTTLS\r\n")
            await expect(reader, 220, "STARTTLS")
            assert context is not None
            await writer.start_tls(context, server_hostname=options.server_name)
            extensions = await ehlo(reader, writer)
        if self.tls:
            # After a reply under TLS: a TLS 1.3 server's tickets came before it.
            self.noteSession(writer, context)
        if options.auth == "PLAIN":
            token = f"\0{options.user}\0{options.password}".encode()
            writer.write(b"AUTH PLAIN " + base64.b64encode(token) + b"\r\n")
            await expect(reader, 235, "AUTH PLAIN")
        elif options.auth == "LOGIN":
            writer.write(b"AUTH LOGIN\r\n")
            await expect(reader, 334, "AUTH LOGIN")
            writer.write(base64.b64encode(options.user.encode()) + b"\r\n")
            await expect(reader, 334, "AUTH LOGIN user")
            writer.write(base64.b64encode(options.password.encode()) + b"\r\n")
            await expect(reader, 235, "AUTH LOGIN password")
        return "PIPELINING" in extensions

    def noteSession(self, writer: asyncio.StreamWriter, context: ssl.SSLContext | None) -> None:
        """Count a TLS session and whether it was resumed; keep it to resume."""
        tlsObject = writer.get_extra_info("ssl_object")
        if tlsObject is None:
            return
        self.results.tlsSessions += 1
        self.results.resumed += bool(tlsObject.session_reused)
        if isinstance(context, ResumingContext):
            context.session = tlsObject.session

    def settle(self, ok: bool) -> None:
        """Count a session as open or failed; tell when all are one or the other."""
        self.settled += 1
        self.holding += ok
        if self.settled == self.totalSessions:
            failed = self.settled - self.holding
            sys.stderr.write(json.dumps({"holding": self.holding, "failed": failed}) + "\n")
            sys.stderr.flush()

    async def sendMessage(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pipelining: bool,
        quit: bool = False,
    ) -> None:
        """
        One transaction; with C{quit}, QUIT follows the final dot in the
        same write (the caller then reads the 221).
        """
        self.sequence += 1
        envelope = self.envelope
        if pipelining:
            writer.write(envelope + b"DATA\r\n")
            codes = [(await readReply(reader))[0] for _ in range(3)]
        else:
            codes = []
            for command in (*envelope.splitlines(keepends=True), b"DATA\r\n"):
                writer.write(command)
                codes.append((await readReply(reader))[0])
                if codes[-1] >= 400:
                    break
        end = b".\r\nQUIT\r\n" if quit else b".\r\n"
        if codes[-1] != 354:
            self.results.rejected += 1
            writer.write(b"RSET\r\nQUIT\r\n" if quit else b"RSET\r\n")
            await readReply(reader)
            return
        if codes[0] >= 400 or codes[1] >= 400:
            # A server that says 354 without a recipient: end the empty message.
            writer.write(end)
            await readReply(reader)
            self.results.rejected += 1
            return
        writer.write(self.headers + messageId(self.sequence) + self.body)
        if len(self.body) > 65536:
            # Let a big message leave first, so the latency is the server's.
            await writer.drain()
        writer.write(end)
        sent = time.perf_counter()
        code, _ = await readReply(reader)
        if 200 <= code < 300:
            self.results.accepted += 1
            self.results.latencies.append(time.perf_counter() - sent)
        else:
            self.results.rejected += 1

    def report(self, started: float, ended: float, cpu: float) -> dict[str, Any]:
        results = self.results
        wall = ended - started
        latencies = sorted(results.latencies)
        notStarted = self.totalMessages - self.messagesTaken

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        finishedSessions = results.sessions - results.sessionErrors
        return {
            "accepted": results.accepted,
            "rejected": results.rejected,
            "errors": results.errors,
            "unsent": results.unsent + notStarted,
            "wall_seconds": round(wall, 3),
            "msgs_per_s": round(results.accepted / wall, 2) if wall > 0 else 0.0,
            "latency_p50_ms": ms(percentile(latencies, 0.50)),
            "latency_p99_ms": ms(percentile(latencies, 0.99)),
            "sessions": results.sessions,
            "session_errors": results.sessionErrors,
            "sessions_per_s": round(finishedSessions / wall, 2) if wall > 0 else 0.0,
            "client_cpu_s": round(cpu, 3),
            "processes": 1,
            "tls_sessions": results.tlsSessions,
            "resumed": results.resumed,
            "deadline_hit": self.nextSession < self.totalSessions or results.unsent > 0,
            "error_kinds": dict(results.errorKinds),
            "mode": self.options.mode,
            "auth": self.options.auth,
            "connections": self.options.connections,
            "per_connection": self.options.per_connection,
            "size": self.options.size,
            # For merging the figures of several processes (--processes):
            # time.monotonic() is one clock for every process of the machine.
            "started": started,
            "ended": ended,
            "latencies_s": latencies if self.options.child else None,
        }


def raiseFileLimit() -> None:
    """Many concurrent sessions need many descriptors: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def generate(options: argparse.Namespace) -> dict[str, Any]:
    """Run the load described by C{options}; the figures as a dict."""
    generator = LoadGenerator(options)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGUSR1, generator.release.set)
    if options.hold:
        loop.call_later(options.hold, generator.release.set)
    return await generator.run()


def parseArguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SMTP submission load generator.")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, required=True)
    add("--mode", choices=["starttls", "implicit", "plain"], default="starttls")
    add("--auth", choices=["PLAIN", "LOGIN", "NONE"], default="PLAIN", type=str.upper)
    add("--user", default="bench@localhost")
    add("--password", default="")
    add("--sender", help="MAIL FROM address (default: --user)")
    add("--recipient", default="sink@example.org", help="RCPT TO address")
    add("--messages", type=int, default=100, help="messages in all")
    add("--size", type=int, default=4096, help="octets per message")
    add("--connections", type=int, default=10, help="sessions open at once")
    add("--per-connection", type=int, default=1, help="messages per session (may be 0)")
    add("--sessions", type=int, help="run this many sessions (messages = sessions * K)")
    add("--cafile", help="verify the server against these CAs (default: no verification)")
    add("--server-name", default="localhost", help="TLS server name (SNI, verification)")
    add("--deadline", type=float, default=300, help="stop after S seconds and report")
    add("--session-timeout", type=float, default=60, help="cut one session after S seconds")
    add("--ramp", type=int, default=0, help="at most N sessions connecting at once (0: any)")
    add("--hold", type=float, default=0, help="keep each session open S s before QUIT")
    add("--resume", action="store_true", help="offer each worker's previous TLS session")
    add("--processes", type=int, default=1, help="split the load over N processes")
    add("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.auth = "none" if options.auth == "NONE" else options.auth
    options.sender = options.sender or options.user
    if options.sessions is None and options.per_connection < 1:
        parser.error("--per-connection 0 needs --sessions")
    if options.hold and options.connections < (options.sessions or 0):
        parser.error("--hold needs --connections >= --sessions (all open at once)")
    if options.processes < 1:
        parser.error("--processes must be 1 or more")
    if options.processes > 1 and options.hold:
        parser.error("--hold runs in one process (it reports when all sessions are open)")
    if min(options.messages, options.size, options.connections, options.per_connection) < 0:
        parser.error("counts must not be negative")
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parseArguments(argv)
    raiseFileLimit()
    if options.processes > 1:
        result = fanout.runProcesses(Path(__file__).resolve(), argv, options)
    else:
        if options.child:
            sys.stdout.write(json.dumps({"ready": True}) + "\n")
            sys.stdout.flush()
            sys.stdin.readline()
        result = asyncio.run(generate(options))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
