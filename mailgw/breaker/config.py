"""
The ``[breaker]`` section: read by L{mailgw.config} (which calls
L{readBreaker}), documented in docs/configuration.md and docs/breaker.md.
"""

from __future__ import annotations

from typing import Any

import attrs

from mailgw._configparse import (
    _boolean,
    _choice,
    _duration,
    _fraction,
    _integer,
    _Invalid,
    _string,
    _Table,
)

#: What a trip does: hold the account's new mail and refuse its logins
#: (454 4.7.0), or only hold its mail.
ON_TRIP = ("hold-and-refuse", "hold")


@attrs.frozen
class BreakerConfig:
    """
    Every threshold of the rules (docs/breaker.md). A rule on an account
    with history trips when the figure of the last hour exceeds
    ``max(floor, factor x the account's busiest hour)``; an account with
    fewer than ``minHistoryHours`` active hours is held to the
    ``newAccount*`` ceilings instead.
    """

    enabled: bool = True
    onTrip: str = "hold-and-refuse"
    minHistoryHours: int = 20
    historyDays: int = 28
    messagesFactor: float = 3.0
    messagesFloor: int = 20
    recipientsFactor: float = 3.0
    recipientsFloor: int = 40
    domainsFactor: float = 3.0
    domainsFloor: int = 10
    networksFactor: float = 2.0
    networksFloor: int = 3
    bouncesFactor: float = 3.0
    bouncesFloor: float = 0.2
    bouncesMinimum: int = 10
    newAccountMessages: int = 200
    newAccountRecipients: int = 400
    newAccountDomains: int = 50
    newAccountNetworks: int = 5
    forgetAfter: float = 90 * 86400.0
    maxAccounts: int = 100000
    saveInterval: float = 60.0
    adminAddress: str = ""
    webhook: bool = False

    @property
    def refuseLogins(self) -> bool:
        return self.onTrip == "hold-and-refuse"


def _factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
        raise _Invalid(f"must be a number >= 1, got {value!r}")
    return float(value)


def _address(value: Any) -> str:
    text = _string(value)
    local, at, domain = text.rpartition("@")
    if text and (not at or not local or not domain or any(c in text for c in " <>\r\n\t")):
        raise _Invalid(f"must be an address such as 'postmaster@example.com', got {value!r}")
    return text


def readBreaker(t: _Table) -> BreakerConfig:
    """The ``[breaker]`` table; a bad value is a ConfigError naming the key."""
    d = BreakerConfig()
    days = _integer(1)
    return BreakerConfig(
        enabled=t.get("enabled", _boolean, d.enabled),
        onTrip=t.get("on_trip", _choice(*ON_TRIP), d.onTrip),
        minHistoryHours=t.get("min_history_hours", _integer(0), d.minHistoryHours),
        historyDays=t.get("history_days", days, d.historyDays),
        messagesFactor=t.get("messages_factor", _factor, d.messagesFactor),
        messagesFloor=t.get("messages_floor", _integer(1), d.messagesFloor),
        recipientsFactor=t.get("recipients_factor", _factor, d.recipientsFactor),
        recipientsFloor=t.get("recipients_floor", _integer(1), d.recipientsFloor),
        domainsFactor=t.get("domains_factor", _factor, d.domainsFactor),
        domainsFloor=t.get("domains_floor", _integer(1), d.domainsFloor),
        networksFactor=t.get("networks_factor", _factor, d.networksFactor),
        networksFloor=t.get("networks_floor", _integer(1), d.networksFloor),
        bouncesFactor=t.get("bounces_factor", _factor, d.bouncesFactor),
        bouncesFloor=t.get("bounces_floor", _fraction, d.bouncesFloor),
        bouncesMinimum=t.get("bounces_minimum", _integer(1), d.bouncesMinimum),
        newAccountMessages=t.get("new_account_messages", _integer(1), d.newAccountMessages),
        newAccountRecipients=t.get("new_account_recipients", _integer(1), d.newAccountRecipients),
        newAccountDomains=t.get("new_account_domains", _integer(1), d.newAccountDomains),
        newAccountNetworks=t.get("new_account_networks", _integer(1), d.newAccountNetworks),
        forgetAfter=t.get("forget_after", _duration(), d.forgetAfter),
        maxAccounts=t.get("max_accounts", _integer(1), d.maxAccounts),
        saveInterval=t.get("save_interval", _duration(), d.saveInterval),
        adminAddress=t.get("admin_address", _address, d.adminAddress),
        webhook=t.get("webhook", _boolean, d.webhook),
    )
