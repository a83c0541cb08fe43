"""
Tests for L{mailgw.breaker.rules} and L{mailgw.breaker.baseline}: each rule
with figures (an account with history against its busiest hour, a new one
against the ceilings), and what the baseline learns from logins, messages
and bounces.
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mailgw.breaker.baseline import HOUR, AccountState, Figures, HourStats, networkOf
from mailgw.breaker.config import BreakerConfig
from mailgw.breaker.rules import RULES, checks, firstTripped

CONFIG = BreakerConfig()
START = 1_700_000_000.0 - 1_700_000_000.0 % HOUR  # the start of an hour
QUIET = Figures(
    messages=0, recipients=0, domains=0, networks=0, sent=0, bounces=0, peakMessages=10,
    peakRecipients=15, peakDomains=4, peakNetworks=1, bounceShare=0.02, history=100,
)  # fmt: skip


def check(figures: Figures, rule: str, config: BreakerConfig = CONFIG) -> tuple[bool, float]:
    [found] = [c for c in checks(figures, config) if c.rule == rule]
    return found.tripped, found.threshold


class RuleTests(SynchronousTestCase):
    def test_quiet(self) -> None:
        self.assertIsNone(firstTripped(QUIET, CONFIG))
        self.assertEqual([c.rule for c in checks(QUIET, CONFIG)], list(RULES))

    def test_messagesAgainstTheBusiestHour(self) -> None:
        # 3 x 10 = 30 > the floor of 20: 30 is allowed, 31 trips.
        self.assertEqual(check(attrs.evolve(QUIET, messages=30), "messages"), (False, 30.0))
        tripped = firstTripped(attrs.evolve(QUIET, messages=31), CONFIG)
        assert tripped is not None
        self.assertEqual((tripped.rule, tripped.value, tripped.threshold), ("messages", 31, 30))
        self.assertEqual(
            tripped.text,
            "messages: 31 messages in the last hour > 30 "
            "(3 x 10, the busiest hour of the last 28 days)",
        )

    def test_messagesFloor(self) -> None:
        # A quiet account (busiest hour: 2) may still send 20 in an hour.
        quiet = attrs.evolve(QUIET, peakMessages=2)
        self.assertEqual(check(attrs.evolve(quiet, messages=20), "messages"), (False, 20.0))
        found = [c for c in checks(attrs.evolve(quiet, messages=21), CONFIG)][1]
        self.assertTrue(found.tripped)
        self.assertIn("the floor; 3 x 2, the busiest hour, is below it", found.text)

    def test_recipients(self) -> None:
        # 3 x 15 = 45 distinct recipients > the floor of 40.
        self.assertEqual(check(attrs.evolve(QUIET, recipients=45), "recipients"), (False, 45.0))
        self.assertEqual(check(attrs.evolve(QUIET, recipients=46), "recipients"), (True, 45.0))

    def test_domains(self) -> None:
        # 3 x 4 = 12 new domains > the floor of 10.
        self.assertEqual(check(attrs.evolve(QUIET, domains=12), "domains"), (False, 12.0))
        self.assertEqual(check(attrs.evolve(QUIET, domains=13), "domains"), (True, 12.0))

    def test_networks(self) -> None:
        # 2 x 1 = 2 is below the floor of 3: the fourth new network trips.
        self.assertEqual(check(attrs.evolve(QUIET, networks=3), "networks"), (False, 3.0))
        self.assertEqual(check(attrs.evolve(QUIET, networks=4), "networks"), (True, 3.0))
        busy = attrs.evolve(QUIET, peakNetworks=3, networks=6)
        self.assertEqual(check(busy, "networks"), (False, 6.0))

    def test_bounces(self) -> None:
        # 9 of 10 bounced: below the minimum of 10 bounces, nothing trips.
        few = attrs.evolve(QUIET, sent=10, bounces=9)
        self.assertEqual(check(few, "bounces"), (False, 0.2))
        # 10 of 40 (25%) > max(20%, 3 x 2%).
        tripped, threshold = check(attrs.evolve(QUIET, sent=40, bounces=10), "bounces")
        self.assertEqual((tripped, threshold), (True, 0.2))
        self.assertFalse(check(attrs.evolve(QUIET, sent=50, bounces=10), "bounces")[0])
        # An account that usually bounces 10%: 3 x 10% = 30%.
        sloppy = attrs.evolve(QUIET, bounceShare=0.1, sent=40, bounces=12)
        self.assertEqual(check(sloppy, "bounces"), (False, 0.30000000000000004))
        [text] = [c.text for c in checks(attrs.evolve(QUIET, sent=40, bounces=10), CONFIG)
                  if c.rule == "bounces"]  # fmt: skip
        self.assertEqual(
            text,
            "bounces: 25% of recipients bounced in the last hour > 20% "
            "(the floor; 10 bounced, at least 10 count)",
        )

    def test_newAccountCeilings(self) -> None:
        new = attrs.evolve(QUIET, history=19, peakMessages=1)
        self.assertEqual(check(attrs.evolve(new, messages=200), "messages"), (False, 200.0))
        self.assertEqual(check(attrs.evolve(new, messages=201), "messages"), (True, 200.0))
        self.assertEqual(check(attrs.evolve(new, recipients=401), "recipients"), (True, 400.0))
        self.assertEqual(check(attrs.evolve(new, domains=50), "domains"), (False, 50.0))
        self.assertEqual(check(attrs.evolve(new, domains=51), "domains"), (True, 50.0))
        self.assertEqual(check(attrs.evolve(new, networks=5), "networks"), (False, 5.0))
        self.assertEqual(check(attrs.evolve(new, networks=6), "networks"), (True, 5.0))
        found = firstTripped(attrs.evolve(new, messages=201), CONFIG)
        assert found is not None
        self.assertIn("the ceiling of an account with 19 of 20 hours of history", found.text)

    def test_configuredFactors(self) -> None:
        config = attrs.evolve(CONFIG, messagesFactor=5.0, messagesFloor=60)
        self.assertEqual(check(attrs.evolve(QUIET, messages=60), "messages", config), (False, 60))
        config = attrs.evolve(config, messagesFloor=1)
        self.assertEqual(check(attrs.evolve(QUIET, messages=51), "messages", config), (True, 50))

    def test_firstInOrder(self) -> None:
        both = attrs.evolve(QUIET, messages=100, networks=10)
        found = firstTripped(both, CONFIG)
        assert found is not None
        self.assertEqual(found.rule, "networks")


class NetworkTests(SynchronousTestCase):
    def test_networks(self) -> None:
        self.assertEqual(networkOf("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(networkOf("::ffff:192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(networkOf("2001:db8:1:2ff:1::5"), "2001:db8:1:200::/56")
        self.assertEqual(networkOf("fe80::1%eth0"), "fe80::/56")
        self.assertEqual(networkOf("local"), "local")


class BaselineTests(SynchronousTestCase):
    def state(self) -> AccountState:
        return AccountState(firstSeen=START, lastSeen=START)

    def test_learnsHours(self) -> None:
        state = self.state()
        state.login(START + 10, "192.0.2.0/24", 28)
        state.message(START + 20, ["a@x.example", "b@y.example"], 28)
        state.message(START + 30, ["a@x.example"], 28)
        state.bounce(START + 40, 1, 28)
        f = state.figures(START + 50)
        self.assertEqual(
            (f.messages, f.recipients, f.domains, f.networks, f.sent, f.bounces), (2, 2, 2, 1, 3, 1)
        )
        self.assertEqual(f.history, 0)
        # The next hour closes this one into the history.
        state.message(START + HOUR + 5, ["c@x.example"], 28)
        self.assertEqual(state.history, [HourStats(int(START // HOUR), 2, 2, 2, 1, 3, 1)])
        f = state.figures(START + HOUR + 5)
        self.assertEqual((f.peakMessages, f.peakRecipients, f.peakDomains), (2, 2, 2))
        self.assertAlmostEqual(f.bounceShare, 1 / 3)
        # The window is the last 3600 seconds: three messages, x.example known.
        self.assertEqual((f.messages, f.domains), (3, 2))
        f = state.figures(START + HOUR + 31)
        self.assertEqual(
            (f.messages, f.recipients, f.domains, f.networks, f.sent, f.bounces), (1, 1, 0, 0, 1, 1)
        )
        # A recipient used again stays in the window from its last use.
        state.message(START + HOUR + 40, ["a@x.example"], 28)
        state.bounce(START + HOUR + 41, 2, 28)
        f = state.figures(START + 2 * HOUR + 20)
        self.assertEqual((f.messages, f.recipients, f.sent, f.bounces), (1, 1, 1, 2))
        self.assertEqual(state.figures(START + 3 * HOUR).sent, 0)

    def test_forgetsOldDomainsAndHours(self) -> None:
        state = self.state()
        state.message(START, ["a@x.example"], 2)
        state.message(START + 3 * 86400, ["b@y.example"], 2)
        self.assertEqual(list(state.domains), ["y.example"])
        self.assertEqual(state.history, [])  # the first hour is older than 2 days

    def test_rearm(self) -> None:
        state = self.state()
        for i in range(5):
            state.message(START + i, [f"r{i}@d{i}.example"], 28)
        state.trip = {"rule": "domains"}
        state.rearm(START + 10)
        f = state.figures(START + 11)
        self.assertEqual((f.messages, f.recipients, f.domains), (0, 0, 0))
        self.assertIsNone(state.trip)
        self.assertEqual(len(state.domains), 5)  # the baseline stays

    def test_roundTrip(self) -> None:
        state = self.state()
        state.login(START, "192.0.2.0/24", 28)
        state.message(START + 1, ["a@x.example"], 28)
        state.message(START + HOUR, ["a@x.example"], 28)
        state.trip = {"rule": "messages", "value": 3}
        again = AccountState.fromJSON(state.toJSON())
        self.assertEqual(again.toJSON(), state.toJSON())
        self.assertEqual(again.figures(START + HOUR).peakMessages, 1)
