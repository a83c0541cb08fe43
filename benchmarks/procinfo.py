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
        "load average": f"{loadAverage():.2f}",
    }
