"""
L{AccountBreaker}: the breaker over every account, in memory
(L{mailgw.breaker.store.PersistentBreaker} keeps it in the spool
directory). It feeds each observation into the account's
L{AccountState}, applies the rules after each, and on a trip records the
trip, announces it through the alert seam and, from then on, holds the
account's messages and (``on_trip = "hold-and-refuse"``) refuses its logins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.breaker.alerts import LogAlert
from mailgw.breaker.baseline import AccountState, networkOf
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.rules import Check, checks, firstTripped
from mailgw.envelope import QueuedMessage
from mailgw.interfaces import IAccountBreaker, IBreakerAlert

_log = Logger(namespace="mailgw.breaker")


def isoTime(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


@implementer(IAccountBreaker)
class AccountBreaker:
    """
    See L{IAccountBreaker}. ``alerts`` are told of each trip after the log
    line (L{LogAlert}, always first). ``changed(account, urgent)`` (set by
    the persistent breaker) is called after every change of an account,
    ``urgent`` when it should be saved at once (a trip, a reset).
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: BreakerConfig,
        alerts: Sequence[IBreakerAlert] = (),
    ) -> None:
        self.clock = clock
        self.config = config
        self.alerts: list[IBreakerAlert] = [LogAlert(), *alerts]
        self.accounts: dict[str, AccountState] = {}
        self.changed: Callable[[str, bool], None] = lambda account, urgent: None

    @property
    def refuseLogins(self) -> bool:
        return self.config.refuseLogins

    def _account(self, name: str, now: float) -> AccountState:
        state = self.accounts.get(name)
        if state is None:
            if len(self.accounts) >= self.config.maxAccounts:
                self._evict()
            state = self.accounts[name] = AccountState(firstSeen=now, lastSeen=now)
        return state

    def _evict(self) -> None:
        """Forget the least recently seen hundredth of the armed accounts (at the cap)."""
        armed = [n for n, s in self.accounts.items() if s.trip is None]
        armed.sort(key=lambda n: self.accounts[n].lastSeen)
        for name in armed[: max(1, len(armed) // 100)]:
            del self.accounts[name]

    def expire(self) -> int:
        """Forget armed accounts unseen for ``forget_after``; @return: how many."""
        limit = self.clock.seconds() - self.config.forgetAfter
        old = [n for n, s in self.accounts.items() if s.trip is None and s.lastSeen < limit]
        for name in old:
            del self.accounts[name]
        return len(old)

    # -- observations ---------------------------------------------------------------

    def observeLogin(self, account: str, clientAddress: str) -> bool:
        now = self.clock.seconds()
        state = self._account(account, now)
        if state.trip is None:
            state.login(now, networkOf(clientAddress), self.config.historyDays)
            self._evaluate(account, state, now, clientAddress, None)
        else:
            state.lastSeen = now
        self.changed(account, False)
        if state.trip is not None and self.refuseLogins:
            _log.info(
                "breaker: login refused user={user!r} client={client} (tripped by {rule})",
                user=account,
                client=clientAddress,
                rule=state.trip.get("rule"),
            )
            return False
        return True

    def observeMessage(
        self, account: str, recipients: Iterable[str], clientAddress: str, queueId: str
    ) -> bool:
        now = self.clock.seconds()
        state = self._account(account, now)
        if state.trip is None:
            state.message(now, recipients, self.config.historyDays)
            self._evaluate(account, state, now, clientAddress, queueId)
        if state.trip is None:
            self.changed(account, False)
            return False
        state.held += 1
        state.lastSeen = now
        self.changed(account, False)
        return True

    def observeBounces(self, account: str, count: int, queueId: str) -> None:
        if count <= 0:
            return
        now = self.clock.seconds()
        state = self._account(account, now)
        if state.trip is None:
            state.bounce(now, count, self.config.historyDays)
            self._evaluate(account, state, now, None, queueId)
            self.changed(account, False)

    def _evaluate(
        self, account: str, state: AccountState, now: float, client: str | None,
        queueId: str | None,
    ) -> None:  # fmt: skip
        figures = state.figures(now)
        check = firstTripped(figures, self.config)
        if check is None:
            return
        state.forgetHour(now)
        state.trip = self._event(account, check, figures.toJSON(), now, client, queueId)
        state.held = 0
        for alert in self.alerts:
            try:
                alert.tripped(dict(state.trip))
            except Exception:
                _log.failure("breaker: alert {alert!r} failed", alert=alert)
        self.changed(account, True)

    def _event(
        self, account: str, check: Check, figures: dict[str, Any], now: float,
        client: str | None, queueId: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        """The trip as recorded, logged and sent (docs/breaker.md: the payload)."""
        return {
            "account": account,
            "rule": check.rule,
            "text": check.text,
            "value": check.value,
            "threshold": check.threshold,
            "figures": figures,
            "time": isoTime(now),
            "timestamp": now,
            "client": client,
            "queueId": queueId,
            "action": self.config.onTrip,
        }

    # -- the queue's hooks (QueueRunner.screen and .bounced) -------------------------

    def screen(self, message: QueuedMessage) -> str | None:
        """Count a committed message; why to hold it, or None."""
        user = message.session.user
        if user is None:
            return None  # the gateway's own (bounces, alerts)
        recipients = [str(r) for r in message.envelope.recipients]
        client = message.session.clientAddress
        if not self.observeMessage(user, recipients, client, message.queueId):
            return None
        return f"account {user!r} tripped the breaker"

    def bounced(self, message: QueuedMessage, count: int) -> None:
        """``count`` recipients of ``message`` were refused for good."""
        if message.session.user is not None:
            self.observeBounces(message.session.user, count, message.queueId)

    # -- the operator ---------------------------------------------------------------

    def isTripped(self, account: str) -> bool:
        state = self.accounts.get(account)
        return state is not None and state.trip is not None

    def state(self, account: str) -> dict[str, Any] | None:
        state = self.accounts.get(account)
        if state is None:
            return None
        now = self.clock.seconds()
        figures = state.figures(now)
        return {
            "account": account,
            "tripped": state.trip is not None,
            "trip": state.trip,
            "held": state.held,
            "action": self.config.onTrip,
            "firstSeen": isoTime(state.firstSeen),
            "lastSeen": isoTime(state.lastSeen),
            "armedSince": isoTime(state.armedAt) if state.armedAt else None,
            "figures": figures.toJSON(),
            "checks": [c.toJSON() for c in checks(figures, self.config)],
            "domains": len(state.domains),
            "networks": sorted(state.networks),
        }

    def reset(self, account: str) -> bool:
        state = self.accounts[account]
        wasTripped = state.trip is not None
        state.rearm(self.clock.seconds())
        _log.info(
            "breaker: account reset user={user!r} (was {what})",
            user=account,
            what="tripped" if wasTripped else "armed",
        )
        self.changed(account, True)
        return wasTripped

    # -- storage ---------------------------------------------------------------------

    def toJSON(self) -> dict[str, Any]:
        return {name: state.toJSON() for name, state in self.accounts.items()}

    def restore(self, data: dict[str, Any]) -> int:
        """
        Take the accounts of a stored state; one that cannot be read is
        skipped (and logged). @return: how many were taken.
        """
        taken = 0
        for name, value in data.items():
            try:
                self.accounts[str(name)] = AccountState.fromJSON(value)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                _log.error(
                    "breaker: stored state of {user!r} unreadable ({error}); starting it afresh",
                    user=str(name)[:128],
                    error=e,
                )
                continue
            taken += 1
        return taken
