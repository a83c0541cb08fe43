"""
The control-socket commands of the breaker (L{mailgw.control} dispatches
them here): ``account-show`` and ``account-reset`` (one account name in
``ids``), and ``release-account`` (relay an account's held mail)::

    -> {"command": "account-show", "ids": ["alice@example.com"]}
    <- {"ok": true, "count": 1, "account": {...}}
    -> {"command": "release-account", "ids": ["alice@example.com"]}
    <- {"ok": true, "count": 12, "ids": ["...", ...]}
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from mailgw.interfaces import IAccountBreaker

ACCOUNT_COMMANDS = ("account-show", "account-reset", "release-account")
_log = Logger(namespace="mailgw.control")


def _error(text: str, count: int = 0) -> dict[str, Any]:
    return {"ok": False, "error": text, "count": count}


def _name(account: str) -> str:
    return account if len(account) <= 80 else account[:77] + "..."


def accountCommand(
    breaker: IAccountBreaker | None, queue: Any, command: str, ids: list[str]
) -> Deferred[dict[str, Any]]:
    """Carry out an account command; the answer never fails."""
    if len(ids) != 1:
        return succeed(_error(f"{command} needs exactly one account"))
    [account] = ids
    if command == "release-account":
        return Deferred.fromCoroutine(_release(queue, account))
    if breaker is None:
        return succeed(_error("the breaker is off on this gateway ([breaker] enabled = false)"))
    if command == "account-show":
        state = breaker.state(account)
        if state is None:
            return succeed(_error(f"unknown account {_name(account)} (the breaker never saw it)"))
        return succeed({"ok": True, "count": 1, "account": state})
    try:
        wasTripped = breaker.reset(account)
    except KeyError:
        return succeed(_error(f"unknown account {_name(account)} (the breaker never saw it)"))
    _log.info("Control: account-reset {user!r}", user=account)
    return succeed({"ok": True, "count": 1, "wasTripped": wasTripped})


async def _release(queue: Any, account: str) -> dict[str, Any]:
    ids = queue.heldOf(account)
    released: list[str] = []
    for queueId in ids:
        try:
            await maybeDeferred(queue.release, queueId)
        except KeyError:
            continue  # delivered or deleted meanwhile
        except Exception as e:
            _log.failure("Control: release {queueId} failed", queueId=queueId)
            return {**_error(f"release {queueId} failed: {e}", len(released)), "ids": released}
        released.append(queueId)
    _log.info("Control: released {count} held messages of {user!r}", count=len(released),
              user=account)  # fmt: skip
    return {"ok": True, "count": len(released), "ids": released}
