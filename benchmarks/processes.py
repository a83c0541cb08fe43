"""
The processes a benchmark run needs, set up and torn down: a temp directory
with a certificate and a passwd file, the counting sink, the reference
server and the gateway (``twistd mailgw``), pinned to CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import postfix, procinfo  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
USER = "bench@localhost"

#: What the gateway runs with besides its command-line options. Every
#: client here is 127.0.0.1, so the per-address connection limits and the
#: per-user quotas would measure the defences, not the gateway; the idle
#: sessions of M need more than the default 1000 connections. One user sending
#: thousands of messages an hour is what the account breaker stops: it is off.
GATEWAY_CONFIG = """\
[limits]
exempt = ["127.0.0.1/32"]
max_connections = 2000
messages_per_user = 0
recipients_per_user = 0

[breaker]
enabled = false
"""


@attrs.define
class Server:
    """
    A server under test: its process and its two ports. A C{tree} server
    (Postfix) is its process and every process below it: its CPU time and
    memory are summed over them, and it has no one peak RSS.
    """

    name: str
    process: subprocess.Popen[bytes]
    starttls: int
    implicit: int
    tree: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpuSeconds(self) -> float:
        if self.tree:
            return procinfo.treeCPUSeconds(self.pid)
        return procinfo.cpuSeconds(self.pid)

    def memoryKiB(self) -> dict[str, int]:
        """VmRSS and, for one process, VmHWM (KiB)."""
        if self.tree:
            return {"VmRSS": procinfo.treeRSSKiB(self.pid)}
        return procinfo.memoryKiB(self.pid)

    def resetPeak(self) -> bool:
        return False if self.tree else procinfo.resetPeak(self.pid)

    def port(self, mode: str) -> int:
        return self.implicit if mode == "implicit" else self.starttls


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readJSONLine(stream: Any) -> dict[str, Any]:
    """The first line of C{stream} that is a JSON object."""
    for raw in iter(stream.readline, b""):
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise RuntimeError("the process ended without printing its JSON line")


class Processes:
    """The temp directory, the processes and the CPUs they run on."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.quick = options.quick
        self.deadline = time.monotonic() + options.total_deadline
        self.directory = Path(tempfile.mkdtemp(prefix="mailgw-bench-"))
        self.password = secrets.token_urlsafe(16)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.serverCPUs: set[int] | None = None
        self.clientCPUs: set[int] | None = None
        self.statusFile = self.directory / "sink.json"
        self.notes: list[str] = []
        self.failures = 0

    # Set-up

    def pin(self) -> None:
        """
        Servers on the first usable CPU; this driver, the sink and the load
        generator's processes on all the others.
        """
        cpus = sorted(os.sched_getaffinity(0))
        self.usableCPUs = len(cpus)
        if self.options.no_pin or len(cpus) < 2:
            self.notes.append("processes not pinned to CPUs")
            return
        self.serverCPUs, self.clientCPUs = {cpus[0]}, set(cpus[1:])
        os.sched_setaffinity(0, self.clientCPUs)

    def makeFiles(self) -> None:
        from argon2 import PasswordHasher

        from mailgw.auth.passwd import addUser
        from mailgw.tls import makeSelfSigned

        self.certificate = str(self.directory / "cert.pem")
        self.key = str(self.directory / "key.pem")
        self.passwd = str(self.directory / "passwd")
        makeSelfSigned(self.certificate, self.key, "localhost")
        hasher = None
        if self.options.cheap_hash:
            # Not the production cost: shows what the gateway spends apart
            # from verifying the password.
            hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
            self.notes.append("--cheap-hash: argon2id t=1 m=8KiB p=1, NOT the real AUTH cost")
        addUser(self.passwd, USER, self.password, hasher=hasher)
        self.config = self.directory / "mailgw.toml"
        self.config.write_text(GATEWAY_CONFIG)

    def spawn(self, argv: list[str], server: bool, **kwargs: Any) -> subprocess.Popen[bytes]:
        cpus = self.serverCPUs if server else None
        process = subprocess.Popen(
            argv,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            **kwargs,
        )
        self.processes.append(process)
        return process

    def startSink(self) -> None:
        process = self.spawn(
            [
                sys.executable,
                str(HERE / "sink.py"),
                "--status-file",
                str(self.statusFile),
                "--deadline",
                str(self.options.total_deadline + 60),
            ],
            server=False,
            stdout=subprocess.PIPE,
        )
        self.sinkPort = int(readJSONLine(process.stdout)["port"])

    def startReference(self) -> Server:
        process = self.spawn(
            [
                sys.executable,
                str(HERE / "refserver.py"),
                "--certificate",
                self.certificate,
                "--key",
                self.key,
                "--user",
                USER,
                "--password",
                self.password,
                "--deadline",
                str(self.options.total_deadline + 60),
            ],
            server=True,
            stdout=subprocess.PIPE,
        )
        ports = readJSONLine(process.stdout)
        return Server("reference", process, int(ports["starttls"]), int(ports["implicit"]))

    def startGateway(self, workers: int = 1) -> Server:
        """``twistd mailgw``; with ``workers`` > 1 its supervisor and workers."""
        starttls, implicit = freePort(), freePort()
        suffix = f"-{workers}w" if workers > 1 else ""
        self.gatewayLog = self.directory / f"gateway{suffix}.log"
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.gatewayLog}",
            "mailgw",
            "--config",
            str(self.config),
            "--submission",
            f"tcp:port={starttls}:interface=127.0.0.1",
            "--submissions",
            f"tcp:port={implicit}:interface=127.0.0.1",
            "--certificate",
            self.certificate,
            "--key",
            self.key,
            "--auth",
            f"passwd:{self.passwd}",
            "--spool",
            str(self.directory / f"spool{suffix}"),
            "--workers",
            str(workers),
            "--hostname",
            "localhost",
            "--relay",
            f"127.0.0.1:{self.sinkPort}",
            "--relay-tls",
            "none",
        ]
        path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        process = self.spawn(argv, server=True, cwd=str(ROOT), env=env)
        # The workers' CPU time and memory are summed with the supervisor's.
        name = f"gateway {workers}w" if workers > 1 else "gateway"
        server = Server(name, process, starttls, implicit, tree=workers > 1)
        try:
            self.waitListening(server, limit=60)
        except RuntimeError as e:
            log = self.gatewayLog.read_text(errors="replace") if self.gatewayLog.exists() else ""
            raise RuntimeError(f"{e}\n--- gateway log (end) ---\n{log[-3000:]}") from None
        return server

    def startPostfix(self) -> Server:
        """Postfix on two free ports, relaying to the sink (L{benchmarks.postfix})."""
        starttls, implicit = freePort(), freePort()
        directory = self.directory / "postfix"
        postfix.configure(
            directory,
            self.certificate,
            self.key,
            self.sinkPort,
            (starttls, implicit),
            USER,
            self.password,
        )
        process = self.spawn(postfix.masterCommand(directory), server=True)
        server = Server("postfix", process, starttls, implicit, tree=True)
        self.waitListening(server, limit=60)
        return server

    def waitListening(self, server: Server, limit: float) -> None:
        end = time.monotonic() + limit
        pending = [server.starttls, server.implicit]
        while pending:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.returncode}")
            if time.monotonic() > end:
                raise RuntimeError(f"{server.name} does not listen on {pending} after {limit} s")
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.1)

    def stopAll(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
