"""
What the driver reads about processes and the machine: CPU time and memory
of a process from /proc (Linux), and a description of the box.
"""

from __future__ import annotations

import os
import platform
import ssl
import sys

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int) -> float:
    """User + system CPU seconds of every thread of C{pid} so far."""
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name, which may hold spaces: utime and
        # stime are fields 14 and 15 of proc(5).
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def descendants(pid: int) -> list[int]:
    """C{pid} and every process below it, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                children.setdefault(int(_stat(int(name))[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def treeCPUSeconds(pid: int) -> float:
    """
    CPU seconds of C{pid} and every process below it, those that have
    exited included: a process's own time (utime, stime) plus that of its
    children it has waited for (cutime, cstime; fields 14-17 of proc(5)).
    For a server that forks a process per session (Postfix's master).
    """
    total = 0
    for process in descendants(pid):
        try:
            fields = _stat(process)
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])
    return total / CLOCK_TICKS


def treeRSSKiB(pid: int) -> int:
    """The resident memory of C{pid} and every process below it, in KiB."""
    total = 0
    for process in descendants(pid):
        try:
            total += memoryKiB(process).get("VmRSS", 0)
        except OSError:
            continue
    return total


def memoryKiB(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of C{pid}, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def resetPeak(pid: int) -> bool:
    """
    Reset VmHWM of C{pid} to its current RSS (Linux 4.0+, our own
    processes); False when the kernel refuses, and the peak then covers the
    whole life of the process.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadAverage() -> float:
    """The one-minute load average."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpuModel() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pyOpenSSLVersion() -> str:
    """The OpenSSL the gateway's TLS runs on (pyOpenSSL's, often not Python's)."""
    try:
        from OpenSSL import SSL
    except ImportError:
        return "n/a"
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")


def machine() -> dict[str, str]:
    """The facts a reader needs to compare figures between boxes."""
    import twisted

    return {
        "cpu": cpuModel(),
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "twisted": twisted.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "pyopenssl": _pyOpenSSLVersion(),
        "load average": f"{loadAverage():.2f}",
    }
