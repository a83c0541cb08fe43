"""
The spool shards of the workers: worker K keeps its messages in
``SPOOL/shard-K``, a spool of its own (its own lock, queue and control
socket), so a message is in exactly one shard and a worker's replacement,
which takes the same index, finds every message the dead one held.

A spool that a single process used before (messages in ``SPOOL/queue``)
is moved into shard 0 when the supervisor starts, before any worker runs.
"""

from __future__ import annotations

import fcntl
import os
import re

from twisted.logger import Logger

from mailgw.interfaces import SpoolError
from mailgw.queue.files import FileSystem, isQueueId

_log = Logger()

SHARD_PREFIX = "shard-"
_SHARD = re.compile(r"shard-(0|[1-9][0-9]{0,3})\Z")


def shardDirectory(spool: str, index: int) -> str:
    """The spool directory of worker ``index``."""
    if index < 0:
        raise ValueError(f"a worker index is not negative, got {index}")
    return os.path.join(spool, f"{SHARD_PREFIX}{index}")


def shardDirectories(spool: str) -> list[str]:
    """
    The shards found under ``spool``, in the order of their index; also
    those of workers no longer configured (``workers`` lowered), whose
    messages the queue commands must still show.
    """
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _SHARD.match(name)
        if match and os.path.isdir(os.path.join(spool, name)):
            found.append((int(match.group(1)), os.path.join(spool, name)))
    return [path for _, path in sorted(found)]


def lockSpool(spool: str) -> int:
    """
    Take ``SPOOL/lock`` for the supervisor's lifetime: no single-process
    gateway, and no second supervisor, uses the spool while it runs.

    @return: the descriptor holding the lock.
    @raise SpoolError: another process holds it.
    """
    os.makedirs(spool, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(spool, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(f"spool {spool} is in use by another process") from None
    return fd


def _link(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        pass  # an earlier migration got this far


def migrateLegacy(spool: str, fs: FileSystem | None = None) -> int:
    """
    Move the committed messages of a single-process spool (``SPOOL/queue``)
    into shard 0, crash-safe and idempotent: both files are hard-linked
    into the shard and the shard's directory synced before the old names
    are removed, so at every moment the message is committed in at least
    one place, and a migration cut short is finished by the next start
    (it runs before worker 0 does). Uncommitted files are left to a
    single-process gateway's recovery.

    @return: how many messages were moved.
    """
    fs = fs if fs is not None else FileSystem()
    old = os.path.join(spool, "queue")
    try:
        names = set(os.listdir(old))
    except FileNotFoundError:
        return 0
    ids = sorted(
        name[: -len(".json")]
        for name in names
        if name.endswith(".json") and isQueueId(name[: -len(".json")])
    )
    ids = [queueId for queueId in ids if queueId + ".msg" in names]
    if not ids:
        return 0
    shard = shardDirectory(spool, 0)
    new = os.path.join(shard, "queue")
    os.makedirs(new, mode=0o700, exist_ok=True)
    for queueId in ids:
        # The message before its state: the state's presence is the commit.
        _link(os.path.join(old, queueId + ".msg"), os.path.join(new, queueId + ".msg"))
        _link(os.path.join(old, queueId + ".json"), os.path.join(new, queueId + ".json"))
    fs.syncDirectory(new)
    fs.syncDirectory(shard)
    for queueId in ids:
        os.unlink(os.path.join(old, queueId + ".json"))
        os.unlink(os.path.join(old, queueId + ".msg"))
    fs.syncDirectory(old)
    _log.info(
        "Moved {count} queued messages of the single-process spool into {shard}",
        count=len(ids),
        shard=shard,
    )
    return len(ids)
