"""
The benchmark driver: starts a counting sink, the reference server, the
gateway (``twistd mailgw`` relaying to the sink) and, when it is installed,
Postfix (relaying to the sink too), runs the scenarios with the load
generator against the gateway and then, with the same load, against the
others, and prints one table.

    .venv/bin/python benchmarks/run.py [--scenario A,AR,B,C,M] [--quick]

See benchmarks/README.md for the scenarios and what each figure means.
Everything listens on 127.0.0.1 only; every load generator run ends by
C{--deadline} and the whole run by C{--total-deadline}, after which the
figures gathered so far are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procinfo  # noqa: E402
from benchmarks.postfix import unavailable as postfixUnavailable  # noqa: E402
from benchmarks.processes import (  # noqa: E402
    GATEWAY_CONFIG,
    HERE,
    USER,
    Processes,
    Server,
    readJSONLine,
)
from benchmarks.report import printMachine, printMemory, printTable  # noqa: E402

MIB = 1024 * 1024


@attrs.frozen
class Load:
    """One throughput scenario: what the load generator is told."""

    mode: str
    messages: int
    size: int
    connections: int
    perConnection: int
    resume: bool = False


@attrs.frozen
class MemoryLoad:
    """Scenario M: one big message, idle sessions held open, sessions in a row."""

    bigSize: int
    idle: int
    serialFirst: int
    serial: int


FULL = {
    "A": Load("starttls", 2000, 4096, 20, 1),
    "AR": Load("starttls", 2000, 4096, 20, 1, resume=True),
    "B": Load("starttls", 2000, 4096, 20, 50),
    "C": Load("implicit", 2000, 4096, 20, 1),
}
QUICK = {
    "A": Load("starttls", 12, 4096, 4, 1),
    "AR": Load("starttls", 12, 4096, 4, 1, resume=True),
    "B": Load("starttls", 20, 4096, 2, 10),
    "C": Load("implicit", 12, 4096, 4, 1),
}
SCENARIOS = ("A", "AR", "B", "C", "M")
FULL_MEMORY = MemoryLoad(20 * MIB, 1000, 1000, 20000)
QUICK_MEMORY = MemoryLoad(1 * MIB, 20, 20, 60)


class Bench(Processes):
    """The scenarios: the load generator runs, what they cost, the report."""

    # Measuring

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def runDeadline(self) -> float:
        return max(1.0, min(self.options.deadline, self.remaining()))

    def loadgenCommand(self, server: Server, mode: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            str(HERE / "loadgen.py"),
            "--port",
            str(server.port(mode)),
            "--mode",
            mode,
            "--user",
            USER,
            "--password",
            self.password,
            "--cafile",
            self.certificate,
            "--deadline",
            str(self.runDeadline()),
            *extra,
        ]

    def loadProcesses(self) -> int:
        """Load generator processes: --processes, or one per load CPU."""
        if self.options.processes:
            return int(self.options.processes)
        return len(self.clientCPUs) if self.clientCPUs else 1

    def loadgen(self, server: Server, mode: str, *extra: str) -> dict[str, Any]:
        argv = self.loadgenCommand(server, mode, *extra)
        done = subprocess.run(argv, capture_output=True, timeout=self.runDeadline() + 120)
        if done.returncode != 0:
            raise RuntimeError(f"loadgen failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return dict(json.loads(done.stdout.splitlines()[-1]))

    def sinkCount(self) -> int:
        try:
            return int(json.loads(self.statusFile.read_text())["received"])
        except (OSError, ValueError, KeyError):
            return 0

    def waitDelivered(self, before: int, accepted: int) -> int | None:
        """
        How many of C{accepted} messages reached the sink: wait until all
        did, or until nothing arrives for a while. None when none arrived
        at all (the gateway does not relay, or not yet).
        """
        if accepted == 0:
            return 0
        firstWait, stallWait = (3.0, 5.0) if self.quick else (10.0, 20.0)
        last, lastChange = before, time.monotonic()
        while self.remaining() > 0:
            count = self.sinkCount()
            if count - before >= accepted:
                break
            now = time.monotonic()
            if count != last:
                last, lastChange = count, now
            elif now - lastChange > (firstWait if count == before else stallWait):
                break
            time.sleep(0.2)
        got = self.sinkCount() - before
        return got or None

    def measure(self, server: Server, name: str, load: Load) -> dict[str, Any]:
        """One throughput run against C{server}, with its CPU and memory cost."""
        peakReset = server.resetPeak()
        cpu = server.cpuSeconds()
        sinkBefore = self.sinkCount()
        processes = self.loadProcesses()
        extra = ["--resume"] if load.resume else []
        result = self.loadgen(
            server,
            load.mode,
            "--messages",
            str(load.messages),
            "--size",
            str(load.size),
            "--connections",
            str(load.connections),
            "--per-connection",
            str(load.perConnection),
            "--processes",
            str(processes),
            *extra,
        )
        cpuAtEnd = server.cpuSeconds()
        delivered: int | None = None
        if server.name != "reference":
            delivered = self.waitDelivered(sinkBefore, result["accepted"])
            if delivered is not None and delivered != result["accepted"]:
                self.notes.append(
                    f"{name}: the sink received {delivered} of {result['accepted']} accepted"
                )
        # The relay's work after the load ended counts too: a message costs
        # what it takes to accept it and to pass it on.
        cpuTotal = server.cpuSeconds() - cpu
        memory = server.memoryKiB()
        accepted = result["accepted"]
        loadCPUs = len(self.clientCPUs) if self.clientCPUs else self.usableCPUs
        return {
            "scenario": name,
            "server": server.name,
            **result,
            "delivered": delivered,
            "server_cpu_s": round(cpuTotal, 3),
            "server_cpu_during_load_s": round(cpuAtEnd - cpu, 3),
            "cpu_ms_per_msg": round(cpuTotal * 1000 / accepted, 3) if accepted else None,
            "peak_rss_kib": memory.get("VmHWM"),
            "peak_since_start": not peakReset and not server.tree,
            "client_cpus": min(processes, loadCPUs),
            "rss_kib": memory.get("VmRSS"),
        }

    def memory(self, server: Server, load: MemoryLoad) -> dict[str, Any]:
        """Scenario M against C{server}."""
        rss = lambda: procinfo.memoryKiB(server.pid)["VmRSS"]  # noqa: E731
        result: dict[str, Any] = {"server": server.name, "rss_start_kib": rss()}

        # One small message first, so the big one's figures leave out the
        # first AUTH (argon2 takes 64 MiB when the password cache is cold).
        self.loadgen(server, "starttls", "--messages", "1", "--connections", "1")
        procinfo.resetPeak(server.pid)
        before = rss()
        big = self.loadgen(
            server, "starttls", "--messages", "1", "--size", str(load.bigSize),
            "--connections", "1", "--session-timeout", "240",
        )  # fmt: skip
        memory = procinfo.memoryKiB(server.pid)
        result["big"] = {
            "size": load.bigSize,
            "accepted": big["accepted"],
            "errors": big["errors"],
            "before_kib": before,
            "after_kib": memory["VmRSS"],
            "peak_kib": memory["VmHWM"],
        }
        result["idle"] = self.idleSessions(server, load.idle)

        serial: dict[str, Any] = {"first": load.serialFirst, "total": load.serial}
        for label, count in (("first", load.serialFirst), ("rest", load.serial - load.serialFirst)):
            done = self.loadgen(
                server, "starttls", "--auth", "none", "--per-connection", "0",
                "--sessions", str(count), "--connections", "20",
            )  # fmt: skip
            serial[f"{label}_sessions_ok"] = done["sessions"] - done["session_errors"]
            serial[f"{label}_sessions_per_s"] = done["sessions_per_s"]
            serial[f"{label}_client_cpu_s"] = done["client_cpu_s"]
            serial[f"{label}_wall_seconds"] = done["wall_seconds"]
            serial[f"rss_after_{label}_kib"] = rss()
            serial[f"{label}_errors"] = done["error_kinds"]
        result["serial"] = serial
        return result

    def idleSessions(self, server: Server, count: int) -> dict[str, Any]:
        """Open C{count} STARTTLS sessions at once, hold them, measure, release."""
        before = procinfo.memoryKiB(server.pid)["VmRSS"]
        holdFor = max(5.0, min(120.0, self.runDeadline()))
        argv = self.loadgenCommand(
            server, "starttls", "--auth", "none", "--per-connection", "0",
            "--sessions", str(count), "--connections", str(count), "--ramp", "50",
            "--hold", str(holdFor),
        )  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            status = readJSONLine(process.stderr)
            holding = procinfo.memoryKiB(server.pid)["VmRSS"]
            process.send_signal(signal.SIGUSR1)
            output, _ = process.communicate(timeout=holdFor + 60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        final = json.loads(output.splitlines()[-1])
        time.sleep(0.5)
        held = int(status.get("holding", 0))
        return {
            "sessions": count,
            "held": held,
            "before_kib": before,
            "holding_kib": holding,
            "after_kib": procinfo.memoryKiB(server.pid)["VmRSS"],
            "per_session_kib": round((holding - before) / held, 1) if held else None,
            "errors": final["error_kinds"],
        }

    # The run

    def run(self) -> dict[str, Any]:
        scenarios = self.options.scenario
        loads = QUICK if self.quick else FULL
        if self.options.messages:
            loads = {k: attrs.evolve(v, messages=self.options.messages) for k, v in loads.items()}
        machine = procinfo.machine()
        machine["cores"] = f"{os.cpu_count()} (usable: {self.usableCPUs})"
        report: dict[str, Any] = {"machine": machine, "rows": [], "memory": []}
        printMachine(report["machine"], self.serverCPUs, self.clientCPUs, GATEWAY_CONFIG)
        gateways = [self.startGateway(n) for n in self.options.workers]
        gateway = gateways[0]
        reference = self.startReference()
        servers = [*gateways, reference]
        why = "--no-postfix" if self.options.no_postfix else postfixUnavailable()
        if why is None:
            try:
                servers.append(self.startPostfix())
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                self.notes.append(f"postfix did not start: {e}")
        else:
            self.notes.append(f"no postfix row: {why}")
        report["gateway_rss_start_kib"] = procinfo.memoryKiB(gateway.pid)["VmRSS"]
        memoryLoad = QUICK_MEMORY if self.quick else FULL_MEMORY
        for name in scenarios:
            for server in servers:
                if name == "M" and server.tree:
                    self.notes.append(
                        f"M {server.name} skipped: a process per session (1000 idle sessions "
                        "are 1000 processes, past its default process limit of 100)"
                    )
                elif self.remaining() <= 0:
                    self.notes.append(f"total deadline passed: {name} {server.name} skipped")
                elif server.process.poll() is not None:
                    self.notes.append(f"{server.name} has exited: {name} skipped")
                else:
                    # One failed run must not cost the figures of the others.
                    try:
                        if name == "M":
                            report["memory"].append(self.memory(server, memoryLoad))
                        else:
                            report["rows"].append(self.measure(server, name, loads[name]))
                    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                        self.notes.append(f"{name} {server.name} failed: {e}")
                        self.failures += 1
        report["machine"]["load average (end)"] = f"{procinfo.loadAverage():.2f}"
        report["notes"] = self.notes
        return report


def parseArguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the mailgw benchmark scenarios.")
    add = parser.add_argument
    add("--scenario", default=",".join(SCENARIOS), help="comma-separated: A, AR, B, C, M")
    add("--quick", action="store_true", help="tiny versions of the scenarios (smoke test, CI)")
    add("--deadline", type=float, default=300, help="seconds for each load generator run")
    add("--total-deadline", type=float, default=3600, help="seconds for the whole run")
    add("--cheap-hash", action="store_true", help="a cheap argon2 hash (not the real cost)")
    add("--no-pin", action="store_true", help="do not pin servers and load to CPUs")
    add("--messages", type=int, default=0, help="messages of A, AR, B and C (0: as defined)")
    add("--processes", type=int, default=0, help="load generator processes (0: one per load CPU)")
    add("--no-postfix", action="store_true", help="no Postfix row even when it is installed")
    add(
        "--workers",
        default="1",
        help="comma-separated worker counts: a gateway row for each ([server] workers)",
    )
    add("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    add("--keep", action="store_true", help="keep the temp directory (gateway log, spool)")
    options = parser.parse_args(argv)
    options.scenario = [s.strip().upper() for s in options.scenario.split(",") if s.strip()]
    try:
        options.workers = [int(n) for n in options.workers.split(",") if n.strip()] or [1]
    except ValueError:
        parser.error("--workers takes numbers, e.g. 1,2")
    if min(options.workers) < 1:
        parser.error("--workers takes numbers of at least 1")
    unknown = set(options.scenario) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parseArguments(argv)
    bench = Bench(options)
    try:
        bench.pin()
        bench.makeFiles()
        bench.startSink()
        report = bench.run()
    finally:
        bench.stopAll()
        if options.keep:
            print(f"\nkept: {bench.directory}")
        else:
            shutil.rmtree(bench.directory, ignore_errors=True)
    printTable(report["rows"])
    printMemory(report["memory"])
    for note in report["notes"]:
        print(f"note: {note}")
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
