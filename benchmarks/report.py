"""
How the driver prints its figures: the machine, the throughput table with a
gateway/reference ratio row per scenario, and the memory table of scenario M.
"""

from __future__ import annotations

from typing import Any

COLUMNS = [
    ("scenario", 8),
    ("server", 9),
    ("msgs/s", 9),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("accepted", 8),
    ("rej/err", 7),
    ("unsent", 6),
    ("delivered", 9),
    ("cpu ms/msg", 10),
    ("peak RSS MiB", 12),
    ("wall s", 7),
]


#: A load generator busy this share of its wall time was the bottleneck.
SATURATED = 0.9


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(kib: Any) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def _ratio(gateway: Any, reference: Any, digits: int = 2) -> str:
    if not gateway or not reference:
        return "-"
    return f"{gateway / reference:.{digits}f}x"


def printMachine(
    machine: dict[str, str], serverCPUs: Any, clientCPUs: Any, gatewayConfig: str = ""
) -> None:
    print("machine")
    for key, value in machine.items():
        print(f"  {key:<13} {value}")
    settings = [line for line in gatewayConfig.splitlines() if "=" in line]
    if settings:
        print(f"  gateway       {'; '.join(settings)}")
    if serverCPUs:
        print(f"  pinning       servers on CPU {sorted(serverCPUs)}, load and sink on CPU "
              f"{sorted(clientCPUs)}")  # fmt: skip
    print(flush=True)


def _line(cells: list[str]) -> str:
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def _loadSaturated(row: dict[str, Any]) -> bool:
    """Whether the load generator's CPUs were busy: the server could do more."""
    cpus = row.get("client_cpus") or 1
    return bool(row["wall_seconds"]) and (
        row["client_cpu_s"] >= SATURATED * row["wall_seconds"] * cpus
    )


def _cells(row: dict[str, Any]) -> list[str]:
    if row["server"] != "reference":
        delivered = _number(row["delivered"])
        if row["delivered"] is not None and row["delivered"] != row["accepted"]:
            delivered += "!"
    else:
        delivered = "-"
    peak = _mib(row["peak_rss_kib"]) + ("*" if row.get("peak_since_start") else "")
    rate = _number(row["msgs_per_s"])
    if _loadSaturated(row):
        rate += "^"
    return [
        row["scenario"],
        row["server"],
        rate,
        _number(row["latency_p50_ms"], 2),
        _number(row["latency_p99_ms"], 2),
        str(row["accepted"]),
        f"{row['rejected']}/{row['errors']}",
        str(row["unsent"]),
        delivered,
        _number(row["cpu_ms_per_msg"], 2),
        peak,
        _number(row["wall_seconds"]),
    ]


def _ratioCells(gateway: dict[str, Any], reference: dict[str, Any], label: str) -> list[str]:
    cells = [""] * len(COLUMNS)
    cells[1] = label
    for index, key in (
        (2, "msgs_per_s"),
        (3, "latency_p50_ms"),
        (4, "latency_p99_ms"),
        (9, "cpu_ms_per_msg"),
        (10, "peak_rss_kib"),
    ):
        cells[index] = _ratio(gateway.get(key), reference.get(key))
    return cells


def printTable(rows: list[dict[str, Any]]) -> None:
    """One line per run, then a gateway/reference line per scenario."""
    if not rows:
        return
    print(_line([name for name, _ in COLUMNS]))
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        runs = {row["server"]: row for row in rows if row["scenario"] == scenario}
        for row in runs.values():
            print(_line(_cells(row)))
        for other, label in (("reference", "gw/ref"), ("postfix", "gw/postfix")):
            if "gateway" in runs and other in runs:
                print(_line(_ratioCells(runs["gateway"], runs[other], label)))
        for row in runs.values():
            if row.get("resumed"):
                print(
                    f"  {scenario} {row['server']}: {row['resumed']} of {row['tls_sessions']} "
                    "TLS sessions resumed"
                )
            if row["error_kinds"]:
                print(f"  {scenario} {row['server']} errors: {row['error_kinds']}")
    print(
        "delivered: counted by the sink (n/a: nothing arrived, the gateway does not relay); "
        "'!' delivered != accepted;\n'^' the load generator was the bottleneck (its CPU "
        f"time >= {SATURATED:.0%} of its wall time on each of its CPUs): compare cpu ms/msg; "
        "'*' peak since the process started;\npostfix: CPU and RSS summed over its processes "
        "(exited ones' CPU included), no peak"
    )
    print(flush=True)


def _saturated(serial: dict[str, Any]) -> str:
    wall = serial.get("rest_wall_seconds") or 0
    return "^" if wall and serial["rest_client_cpu_s"] >= SATURATED * wall else ""


def printMemory(results: list[dict[str, Any]]) -> None:
    """Scenario M, one column per server."""
    if not results:
        return
    servers = [r["server"] for r in results]
    print("M memory".ljust(44) + "".join(name.rjust(22) for name in servers))

    def show(label: str, values: list[str]) -> None:
        print(f"  {label}".ljust(44) + "".join(v.rjust(22) for v in values))

    show("RSS at start of M (MiB)", [_mib(r["rss_start_kib"]) for r in results])
    big = [r["big"] for r in results]
    size = big[0]["size"] // (1024 * 1024)
    show(f"{size} MiB message: accepted", [str(b["accepted"]) for b in big])
    show("  RSS before / after (MiB)", [f"{_mib(b['before_kib'])} / {_mib(b['after_kib'])}"
                                        for b in big])  # fmt: skip
    show("  peak RSS (MiB)", [_mib(b["peak_kib"]) for b in big])
    idle = [r["idle"] for r in results]
    show(f"{idle[0]['sessions']} idle TLS sessions: held", [str(i["held"]) for i in idle])
    show("  RSS before / holding (MiB)", [f"{_mib(i['before_kib'])} / {_mib(i['holding_kib'])}"
                                          for i in idle])  # fmt: skip
    show("  KiB per idle session", [_number(i["per_session_kib"]) for i in idle])
    show("  RSS after release (MiB)", [_mib(i["after_kib"]) for i in idle])
    serial = [r["serial"] for r in results]
    show(f"{serial[0]['total']} STARTTLS sessions in a row", [""] * len(results))
    show(f"  RSS after {serial[0]['first']} (MiB)",
         [_mib(s["rss_after_first_kib"]) for s in serial])  # fmt: skip
    show(f"  RSS after {serial[0]['total']} (MiB)",
         [_mib(s["rss_after_rest_kib"]) for s in serial])  # fmt: skip
    show("  sessions ok", [str(s["first_sessions_ok"] + s["rest_sessions_ok"]) for s in serial])
    show("  sessions/s", [_number(s["rest_sessions_per_s"]) + _saturated(s) for s in serial])
    for r in results:
        errors = {
            **r["idle"]["errors"],
            **r["serial"]["first_errors"],
            **r["serial"]["rest_errors"],
        }
        if errors:
            print(f"  M {r['server']} errors: {errors}")
    print(flush=True)
