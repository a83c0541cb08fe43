"""
The breaker's rules: pure functions of an account's L{Figures} and the
``[breaker]`` settings, each saying what it compared, so that a trip (and
``mailgw account show``) can be explained in one line (docs/breaker.md).

An account with at least ``min_history_hours`` active hours is compared
with itself: a figure of the last hour trips its rule when it exceeds
``max(floor, factor x the busiest hour learnt)``. A newer account is held to
fixed ceilings. The bounce rule compares shares, and only once enough
recipients have bounced to mean something.
"""

from __future__ import annotations

from typing import Any

import attrs

from mailgw.breaker.baseline import Figures
from mailgw.breaker.config import BreakerConfig

#: The rules, in the order they are evaluated (and reported).
RULES = ("networks", "messages", "recipients", "domains", "bounces")

_WHAT = {
    "messages": "messages",
    "recipients": "distinct recipients",
    "domains": "new recipient domains",
    "networks": "new client networks",
}


@attrs.frozen
class Check:
    """
    One rule applied: ``value`` (the last hour) against ``threshold``;
    ``tripped`` when it exceeds it. ``basis`` says where the threshold
    comes from.
    """

    rule: str
    value: float
    threshold: float
    tripped: bool
    basis: str

    @property
    def text(self) -> str:
        """One line: ``messages: 61 in the last hour > 45 (3 x 15, ...)``."""
        if self.rule == "bounces":
            value = f"{self.value:.0%} of recipients bounced in the last hour"
            threshold = f"{self.threshold:.0%}"
        else:
            value = f"{self.value:g} {_WHAT[self.rule]} in the last hour"
            threshold = f"{self.threshold:g}"
        sign = ">" if self.tripped else "<="
        return f"{self.rule}: {value} {sign} {threshold} ({self.basis})"

    def toJSON(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "text": self.text}


def _scaled(
    rule: str, value: int, peak: int, factor: float, floor: int, ceiling: int, f: Figures,
    c: BreakerConfig,
) -> Check:  # fmt: skip
    if f.history < c.minHistoryHours:
        basis = (
            f"the ceiling of an account with {f.history} of {c.minHistoryHours} hours of history"
        )
        threshold = float(ceiling)
    else:
        scaled = factor * peak
        threshold = max(float(floor), scaled)
        if scaled >= floor:
            basis = f"{factor:g} x {peak}, the busiest hour of the last {c.historyDays} days"
        else:
            basis = f"the floor; {factor:g} x {peak}, the busiest hour, is below it"
    return Check(rule, value, threshold, value > threshold, basis)


def _bounces(f: Figures, c: BreakerConfig) -> Check:
    share = f.bounces / f.sent if f.sent else (1.0 if f.bounces else 0.0)
    scaled = c.bouncesFactor * f.bounceShare
    threshold = max(c.bouncesFloor, scaled)
    if scaled > c.bouncesFloor:
        basis = f"{c.bouncesFactor:g} x {f.bounceShare:.1%}, the account's usual share"
    else:
        basis = f"the floor; {f.bounces} bounced, at least {c.bouncesMinimum} count"
    tripped = f.bounces >= c.bouncesMinimum and share > threshold
    return Check("bounces", round(min(share, 1.0), 4), threshold, tripped, basis)


def checks(f: Figures, c: BreakerConfig) -> list[Check]:
    """Every rule applied to ``f``, in L{RULES} order."""
    return [
        _scaled("networks", f.networks, f.peakNetworks, c.networksFactor, c.networksFloor,
                c.newAccountNetworks, f, c),
        _scaled("messages", f.messages, f.peakMessages, c.messagesFactor, c.messagesFloor,
                c.newAccountMessages, f, c),
        _scaled("recipients", f.recipients, f.peakRecipients, c.recipientsFactor,
                c.recipientsFloor, c.newAccountRecipients, f, c),
        _scaled("domains", f.domains, f.peakDomains, c.domainsFactor, c.domainsFloor,
                c.newAccountDomains, f, c),
        _bounces(f, c),
    ]  # fmt: skip


def firstTripped(f: Figures, c: BreakerConfig) -> Check | None:
    """The first rule ``f`` trips, or None."""
    return next((check for check in checks(f, c) if check.tripped), None)
