"""
File descriptors: every client connection, relay connection, spool file,
listener and the control socket holds one. ``twistd mailgw`` raises the
soft ``RLIMIT_NOFILE`` to the hard limit at start-up (systemd's default soft
limit is 1024), and ``mailgw check-config`` warns when the connection limits
do not fit in what the process may open.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

#: Descriptors kept for what is not a client connection: listeners, the
#: control socket, spool files being written or read, log files, DNS,
#: Python's own. Relay connections (queue.max_concurrency) come on top.
HEADROOM = 64

#: The soft limit asked for when the hard limit is unlimited.
_UNLIMITED_CAP = 1 << 20


def raiseSoftLimit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> tuple[int, int]:
    """
    Raise the soft limit on open files to the hard limit.

    @return: (the soft limit before, the soft limit now); equal when it
        was already there or could not be raised.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return (soft, soft)
        return (soft, target)
    return (soft, soft)


def needed(config: Any) -> int:
    """The descriptors the configured limits may use at once."""
    return int(config.limits.maxConnections) + int(config.queue.maxConcurrency) + HEADROOM


def fitProblem(
    config: Any, getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
) -> str | None:
    """
    A warning when ``limits.max_connections`` (plus relay connections and
    headroom) does not fit in the hard limit on open files, which start-up
    raises the soft limit to; None when it fits.
    """
    _, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return None
    want = needed(config)
    if want <= hard:
        return None
    return (
        f"limits.max_connections = {config.limits.maxConnections} plus "
        f"queue.max_concurrency = {config.queue.maxConcurrency} and {HEADROOM} for files "
        f"need {want} file descriptors, but the hard limit is {hard}: raise it "
        "(LimitNOFILE= in the unit) or lower max_connections"
    )
