"""
Tests for L{mailgw.limits}: the AUTH throttle, the connection limiter and
the submission quotas, driven by a fake clock.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, cast

import attrs
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent, formatEventAsClassicLogText
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import LimitsConfig
from mailgw.limits import (
    AUTH_THROTTLED,
    AUTH_THROTTLED_CLOSE,
    DEFAULT_MAX_KEYS,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_ADDRESS,
    AuthDecision,
    AuthThrottle,
    ConnectionLimiter,
    SubmissionQuota,
    client,
    formatLogLine,
)

DEFAULTS = LimitsConfig()

SECURITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "security.md")  # fmt: skip

#: The fail2ban filter docs/security.md recommends.
FAILREGEX = (
    r"^\s*(?:\S+\s+)?\[[\w.#]+\] mailgw auth-throttle: client=<ADDR> network=\S+ "
    r"failures=\d+ action=disconnect delay="
)


def settings(**changes: Any) -> LimitsConfig:
    return attrs.evolve(DEFAULTS, **changes)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


class ClientTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        who = client("203.0.113.7")
        self.assertEqual((who.address, who.network), ("203.0.113.7", "203.0.113.0/24"))
        self.assertNotEqual(who.key, client("203.0.113.8").key)
        self.assertEqual(who.networkKey, client("203.0.113.8").networkKey)
        self.assertNotEqual(who.networkKey, client("203.0.114.7").networkKey)

    def test_ipv4Mapped(self) -> None:
        """An IPv4 client on an IPv6 socket is counted as the IPv4 address."""
        self.assertEqual(client("::ffff:203.0.113.7"), client("203.0.113.7"))
        self.assertEqual(client("::ffff:203.0.113.7").address, "203.0.113.7")

    def test_ipv6(self) -> None:
        """IPv6 clients are their /64, networks are /56."""
        who = client("2001:DB8:0:AB12:1:2:3:4")
        self.assertEqual(who.address, "2001:db8:0:ab12:1:2:3:4")
        self.assertEqual(who.network, "2001:db8:0:ab00::/56")
        self.assertEqual(who.key, client("2001:db8:0:ab12:ffff::").key)
        self.assertNotEqual(who.key, client("2001:db8:0:ab13::1").key)
        self.assertEqual(who.networkKey, client("2001:db8:0:abff::1").networkKey)
        self.assertNotEqual(who.networkKey, client("2001:db8:0:ac00::1").networkKey)
        self.assertEqual(client("fe80::1%eth0"), client("fe80::1"))

    def test_notAnAddress(self) -> None:
        who = client("/run/mailgw.sock")
        self.assertEqual((who.address, who.network, who.ip), ("/run/mailgw.sock",) * 2 + (None,))
        self.assertEqual(who.key, "/run/mailgw.sock")
        self.assertFalse(who.within([net("0.0.0.0/0")]))

    def test_within(self) -> None:
        networks = [net("192.0.2.0/24"), net("2001:db8::/32")]
        self.assertTrue(client("192.0.2.9").within(networks))
        self.assertTrue(client("::ffff:192.0.2.9").within(networks))
        self.assertTrue(client("2001:db8:1::1").within(networks))
        self.assertFalse(client("192.0.3.9").within(networks))
        self.assertFalse(client("127.0.0.1").within([]))


class AuthThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []

    def throttle(self, **changes: Any) -> AuthThrottle:
        return AuthThrottle(
            self.clock,
            settings(**changes),
            log=Logger(observer=cast(ILogObserver, self.events.append)),
        )

    def attempt(self, throttle: AuthThrottle, address: str, login: str | None) -> AuthDecision:
        """One attempt that the server lets through and that fails."""
        decision = throttle.check(address, login)
        self.assertFalse(decision.refuse, (address, login, decision))
        throttle.failed(address, login)
        return decision

    def test_delaysGrowThenDisconnect(self) -> None:
        """
        One address: three free failures, then delays doubling from 1 s to
        16 s, then, with the address budget (10) spent, 421 and disconnect.
        """
        throttle = self.throttle()
        delays = [self.attempt(throttle, "203.0.113.7", "bob").delay for _ in range(10)]
        self.assertEqual(delays, [0, 0, 0, 1, 2, 4, 8, 16, 16, 16])
        decision = throttle.check("203.0.113.7", "bob")
        self.assertEqual(
            attrs.evolve(decision, logLine=""),
            AuthDecision(0.0, True, True, AUTH_THROTTLED_CLOSE, "address-budget", 10),
        )
        self.assertEqual(
            AUTH_THROTTLED_CLOSE.toBytes(),
            b"421 4.7.0 Too many authentication failures; closing connection\r\n",
        )
        # Any login, and no login at all, from that address.
        self.assertTrue(throttle.check("203.0.113.7", "alice").disconnect)
        self.assertTrue(throttle.check("203.0.113.7", None).disconnect)
        # Another address of the same network is not affected.
        self.assertEqual(throttle.check("203.0.113.8", "carol"), AuthDecision())

    def test_refuseThenDisconnect(self) -> None:
        """
        A spent account budget refuses that login with 454 and keeps the
        connection; the spent address budget then disconnects.
        """
        throttle = self.throttle(authFailuresPerAccount=5)
        for _ in range(5):
            self.attempt(throttle, "203.0.113.7", "bob")
        refused = throttle.check("203.0.113.7", "BOB")
        self.assertTrue(refused.refuse)
        self.assertFalse(refused.disconnect)
        self.assertEqual(refused.reply, AUTH_THROTTLED)
        wire = b"454 4.7.0 Too many authentication failures; try again later\r\n"
        self.assertEqual(AUTH_THROTTLED.toBytes(), wire)
        self.assertEqual(
            (refused.reason, refused.failures, refused.delay), ("account-budget", 5, 4)
        )
        for i in range(5):
            self.attempt(throttle, "203.0.113.7", f"user{i}")
        self.assertEqual(throttle.check("203.0.113.7", "user9").reason, "address-budget")
        self.assertTrue(throttle.check("203.0.113.7", "user9").disconnect)

    def test_unknownUsersCostTheSame(self) -> None:
        """Every login, existing or not, spends the address budget alike."""
        throttle = self.throttle()
        for i in range(10):
            self.attempt(throttle, "198.51.100.1", f"nosuchuser{i}")
        self.assertTrue(throttle.check("198.51.100.1", "bob").disconnect)

    def test_sprayingOneNetwork(self) -> None:
        """
        Spraying from many addresses of one /24 spends its network budget
        (30); a user who logged in before keeps working, from another
        network and from inside the sprayed one.
        """
        throttle = self.throttle()
        throttle.succeeded("198.51.100.20", "bob")
        throttle.succeeded("203.0.113.200", "Carol")
        for i in range(30):
            self.attempt(throttle, f"203.0.113.{i + 1}", ["bob", "carol", "dave"][i % 3])
        decision = throttle.check("203.0.113.99", "erin")
        self.assertEqual((decision.refuse, decision.disconnect), (True, False))
        self.assertEqual((decision.reason, decision.failures), ("network-budget", 30))
        self.assertEqual(decision.reply, AUTH_THROTTLED)
        self.assertTrue(throttle.check("203.0.113.200", "bob").refuse)
        self.assertEqual(throttle.check("203.0.113.200", "carol"), AuthDecision())
        self.assertEqual(throttle.check("198.51.100.20", "bob"), AuthDecision())
        # Elsewhere, bob's 10 failures slow attempts at "bob" down.
        elsewhere = throttle.check("198.51.100.21", "bob")
        self.assertEqual((elsewhere.refuse, elsewhere.reason), (False, "account-failures"))
        self.assertEqual(elsewhere.delay, 16)

    def test_accountBudget(self) -> None:
        """
        20 failures for "bob" from as many networks refuse "bob" everywhere,
        except from the address where bob logged in recently; there the
        address budget still applies.
        """
        throttle = self.throttle()
        throttle.succeeded("192.0.2.55", "bob")
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        for address, login in [("10.99.0.1", "bob"), ("10.0.0.1", "Bob"), ("192.0.2.56", "BOB")]:
            decision = throttle.check(address, login)
            self.assertEqual((decision.refuse, decision.reason), (True, "account-budget"))
            self.assertEqual(decision.delay, 16)  # 20 account failures: the longest delay
        self.assertEqual(throttle.check("10.99.0.1", "alice"), AuthDecision())
        self.assertEqual(throttle.check("192.0.2.55", "bob"), AuthDecision())
        self.assertEqual(throttle.check("192.0.2.55", "BoB"), AuthDecision())
        # Bob's stale password at his trusted address: counted against the
        # address only, never against the account or the network.
        for _ in range(10):
            self.attempt(throttle, "192.0.2.55", "bob")
        self.assertTrue(throttle.check("192.0.2.55", "bob").disconnect)
        self.assertEqual(throttle.check("192.0.2.99", "carol"), AuthDecision())
        self.clock.advance(3600)
        self.assertEqual(throttle.check("10.99.0.1", "bob"), AuthDecision())

    def test_trustExpires(self) -> None:
        throttle = self.throttle(authTrustPeriod=100)
        throttle.succeeded("192.0.2.55", "bob")
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        self.clock.advance(99)
        self.assertFalse(throttle.check("192.0.2.55", "bob").refuse)
        self.clock.advance(1)
        self.assertEqual(throttle.check("192.0.2.55", "bob").reason, "account-budget")

    def test_noTrust(self) -> None:
        throttle = self.throttle(authTrustPeriod=0)
        throttle.succeeded("192.0.2.55", "bob")
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        self.assertTrue(throttle.check("192.0.2.55", "bob").refuse)
        self.assertEqual(throttle.trackedKeys(), 20 + 20 + 1)

    def test_successKeepsCounts(self) -> None:
        """Logging in with one account does not buy more guesses at others."""
        throttle = self.throttle()
        for i in range(9):
            self.attempt(throttle, "203.0.113.7", f"victim{i}")
        throttle.succeeded("203.0.113.7", "mallory")
        self.attempt(throttle, "203.0.113.7", "victim9")
        self.assertTrue(throttle.check("203.0.113.7", "victim10").disconnect)

    def test_windowRestoresBudgets(self) -> None:
        """
        Failures leak away at budget per window: a spent address budget
        allows one attempt more after window / budget seconds, and every
        budget is whole again one window after the last failure.
        """
        throttle = self.throttle()
        for _ in range(10):
            self.attempt(throttle, "203.0.113.7", "bob")
        for i in range(20):
            self.attempt(throttle, f"203.0.113.{i + 100}", f"u{i}")  # the network's 30
        self.assertEqual(throttle.check("203.0.113.50", "bob").reason, "network-budget")
        self.clock.advance(119)
        self.assertTrue(throttle.check("203.0.113.50", "bob").refuse)
        self.clock.advance(1)  # 3600 / 30: one failure of the network's leaked away
        self.assertFalse(throttle.check("203.0.113.50", "bob").refuse)
        self.clock.advance(239)
        self.assertTrue(throttle.check("203.0.113.7", "x").disconnect)
        self.clock.advance(1)  # 3600 / 10: one failure of the address's leaked away
        decision = throttle.check("203.0.113.7", None)
        self.assertEqual((decision.refuse, decision.failures, decision.delay), (False, 9, 16))
        self.clock.advance(3600 - 360)
        self.assertEqual(throttle.check("203.0.113.7", "bob"), AuthDecision())
        self.assertEqual(throttle.check("203.0.113.50", "bob"), AuthDecision())

    def test_ipv6Grouping(self) -> None:
        """
        IPv6 clients are counted per /64 and networks per /56; an
        IPv4-mapped address counts as the IPv4 address.
        """
        throttle = self.throttle()
        for i in range(10):
            self.attempt(throttle, f"2001:db8:0:1::{i + 1}", f"u{i}")
        self.assertTrue(throttle.check("2001:db8:0:1:ffff::9", "x").disconnect)
        for i in range(20):
            self.attempt(throttle, f"2001:db8:0:{i + 2:x}::1", f"v{i}")
        decision = throttle.check("2001:db8:0:ff:1::1", "y")
        self.assertEqual((decision.reason, decision.failures), ("network-budget", 30))
        self.assertEqual(throttle.check("2001:db8:0:100::1", "y"), AuthDecision())
        for _ in range(10):
            self.attempt(throttle, "::ffff:192.0.2.1", "z")
        self.assertTrue(throttle.check("192.0.2.1", "z").disconnect)

    def test_exempt(self) -> None:
        """
        An exempt address has no address or network budget; the account
        budget still applies to it.
        """
        throttle = self.throttle(exempt=(net("192.0.2.10/32"),))
        for i in range(100):
            self.attempt(throttle, "192.0.2.10", f"user{i}")
        self.assertEqual(throttle.check("192.0.2.10", "alice"), AuthDecision())
        self.assertEqual(throttle.check("192.0.2.11", "alice"), AuthDecision())
        for _ in range(20):
            self.attempt(throttle, "192.0.2.10", "bob")
        self.assertEqual(throttle.check("192.0.2.10", "bob").reason, "account-budget")

    def test_delayFor(self) -> None:
        throttle = self.throttle(authFreeFailures=0, authDelay=0.5, authDelayMax=3)
        self.assertEqual([throttle.delayFor(n) for n in range(5)], [0.5, 1, 2, 3, 3])
        self.assertEqual(throttle.delayFor(10**6), 3)
        self.assertEqual(self.throttle(authDelay=0, authDelayMax=0).delayFor(50), 0)

    def test_noLogin(self) -> None:
        """A login not known yet is checked and counted by address and network only."""
        throttle = self.throttle()
        for _ in range(10):
            self.attempt(throttle, "203.0.113.7", None)
        self.assertTrue(throttle.check("203.0.113.7", None).disconnect)
        self.assertEqual(throttle.trackedKeys(), 2)
        throttle.succeeded("203.0.113.7", None)
        self.assertEqual(throttle.trackedKeys(), 2)

    def test_memoryBounded(self) -> None:
        """
        200,000 attackers, each from its own /56 (address i in /56 number i)
        and with its own login, leave at most DEFAULT_MAX_KEYS keys in each
        table.
        """
        throttle = self.throttle()
        for i in range(200_000):
            # check() only reads; failed() is what adds keys.
            throttle.failed(f"2001:db8:{i >> 8:x}:{(i & 0xFF) << 8:x}::1", f"user{i}")
        self.assertEqual(throttle.trackedKeys(), 3 * DEFAULT_MAX_KEYS)
        # The newest are remembered, the oldest forgotten.
        last = "2001:db8:30d:3f00::1"  # 199,999 = 0x30d3f
        self.assertEqual(throttle.check(last, "user199999").failures, 0)  # no delay yet
        self.assertEqual(throttle._addresses.count(client(last).key), 1)
        self.assertEqual(throttle._networks.count(client(last).networkKey), 1)
        self.assertEqual(throttle._addresses.count(client("2001:db8::1").key), 0)

    def test_smallCap(self) -> None:
        throttle = AuthThrottle(self.clock, DEFAULTS, maxKeys=100)
        for i in range(1000):
            throttle.failed(f"10.{i // 256}.{i % 256}.1", f"user{i}")
            throttle.succeeded(f"10.{i // 256}.{i % 256}.1", f"user{i}")
        self.assertEqual(throttle.trackedKeys(), 400)

    def test_expiredKeysForgotten(self) -> None:
        """Once their failures leaked away, keys are dropped as others change."""
        throttle = self.throttle()
        for i in range(100):
            throttle.failed(f"10.0.{i}.1", f"user{i}")
        self.assertEqual(throttle.trackedKeys(), 300)
        self.clock.advance(3600)
        for _ in range(100):
            throttle.failed("192.0.2.1", "bob")
        self.assertEqual(throttle.trackedKeys(), 3)

    def test_logLine(self) -> None:
        """Each decision that delays, refuses or disconnects logs one fixed line."""
        throttle = self.throttle()
        for _ in range(3):
            self.attempt(throttle, "203.0.113.7", "bob")
        self.assertEqual(self.events, [])
        self.attempt(throttle, "203.0.113.7", "bob")
        for i in range(6):
            self.attempt(throttle, "203.0.113.7", f"u{i}")
        decision = throttle.check("203.0.113.7", "bob")
        expected = (
            "mailgw auth-throttle: client=203.0.113.7 network=203.0.113.0/24 failures=10 "
            'action=disconnect delay=0.0 reason=address-budget login="bob"'
        )
        self.assertEqual(decision.logLine, expected)
        lines = [formatEvent(e) for e in self.events]
        self.assertEqual(len(lines), 8)
        self.assertEqual(lines[-1], expected)
        self.assertEqual(
            lines[0],
            "mailgw auth-throttle: client=203.0.113.7 network=203.0.113.0/24 failures=3 "
            'action=delay delay=1.0 reason=address-failures login="bob"',
        )

    def test_logLineRefuse(self) -> None:
        throttle = self.throttle()
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        decision = throttle.check("::ffff:10.99.0.1", "Bob")
        self.assertEqual(
            decision.logLine,
            "mailgw auth-throttle: client=10.99.0.1 network=10.99.0.0/24 failures=20 "
            'action=refuse delay=16.0 reason=account-budget login="Bob"',
        )
        self.assertEqual(formatEvent(self.events[-1]), decision.logLine)

    def test_formatLogLine(self) -> None:
        self.assertEqual(
            formatLogLine("2001:db8::1", "2001:db8::/56", None, 4, "delay", 2, "account-failures"),
            "mailgw auth-throttle: client=2001:db8::1 network=2001:db8::/56 failures=4 "
            'action=delay delay=2.0 reason=account-failures login=""',
        )

    def test_logLineEscaping(self) -> None:
        """A login cannot break the line, close its quotes, or add fields."""
        login = 'x" client=198.51.100.1\r\nmailgw auth-throttle: \\ \x00\x7f\x85\u2028\U000e0001é'
        line = formatLogLine("203.0.113.7", "203.0.113.0/24", login, 1, "delay", 1, "r")
        self.assertEqual(
            line,
            "mailgw auth-throttle: client=203.0.113.7 network=203.0.113.0/24 failures=1 "
            r'action=delay delay=1.0 reason=r login="x\" client=198.51.100.1\x0d\x0amailgw '
            r'auth-throttle: \\ \x00\x7f\x85\u2028\U000e0001é"',
        )
        self.assertEqual(len(line.splitlines()), 1)
        self.assertEqual(line.count("client="), 2)
        self.assertTrue(line.startswith("mailgw auth-throttle: client=203.0.113.7 "))
        long = formatLogLine("a b=c", "n", "a" * 1000, 1, "delay", 1, "r")
        self.assertTrue(long.endswith('login="' + "a" * 256 + '"...'))
        self.assertIn(r"client=a\x20b\x3dc ", long)

    def test_logLineNewlineLogin(self) -> None:
        throttle = self.throttle()
        for _ in range(4):
            self.attempt(throttle, "203.0.113.7", "bob\nmailgw auth-throttle: client=192.0.2.1")
        self.assertEqual(len(self.events), 1)
        self.assertEqual(len(formatEvent(self.events[0]).splitlines()), 1)


class Fail2banTests(SynchronousTestCase):
    """The documented fail2ban filter against the lines twistd writes."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        log = Logger(namespace="mailgw.limits.auth", observer=observer)
        self.throttle = AuthThrottle(Clock(), DEFAULTS, log=log)
        # fail2ban's <ADDR>, and the date it cuts from the line first.
        self.regex = re.compile(FAILREGEX.replace("<ADDR>", r"(?P<addr>[0-9A-Fa-f.:]+)"))

    def banned(self) -> list[str]:
        found = []
        for event in self.events:
            line = formatEventAsClassicLogText(event) or ""
            for text in (line, line.split(" ", 1)[1]):  # with and without the date
                match = self.regex.search(text.rstrip("\n"))
                if match:
                    found.append(match.group("addr"))
        return found

    def test_documented(self) -> None:
        with open(SECURITY, encoding="utf-8") as f:
            self.assertIn(f"failregex = {FAILREGEX}\n", f.read())

    def test_matchesDisconnect(self) -> None:
        for _ in range(10):
            self.throttle.check("203.0.113.7", "bob")
            self.throttle.failed("203.0.113.7", "bob")
        self.assertEqual(self.banned(), [])  # delays only
        self.throttle.check("203.0.113.7", "bob")
        self.assertEqual(self.banned(), ["203.0.113.7"] * 2)

    def test_loginInjection(self) -> None:
        """No login makes the filter ban an address other than the client's."""
        fake = "] mailgw auth-throttle: client=192.0.2.99 network=x failures=1 action=disconnect"
        for login in [fake, "x\n" + fake, f'"{fake}', "\r[a#warn] " + fake + " delay=0"]:
            for _ in range(11):
                self.throttle.check("203.0.113.7", login)
                self.throttle.failed("203.0.113.7", login)
        self.assertNotIn("192.0.2.99", self.banned())
        self.assertIn("203.0.113.7", self.banned())


class ConnectionLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_perAddress(self) -> None:
        """Loopback is not exempt: the 21st connection from one address is refused."""
        limiter = ConnectionLimiter(self.clock, DEFAULTS)
        for _ in range(20):
            self.assertIsNone(limiter.open("127.0.0.1"))
        reply = limiter.open("127.0.0.1")
        assert reply is not None
        self.assertEqual(reply, TOO_MANY_FROM_ADDRESS)
        self.assertEqual(reply.toBytes(), b"421 4.7.0 Too many connections from your address\r\n")
        self.assertEqual((limiter.openFrom("127.0.0.1"), limiter.openConnections), (20, 20))
        self.assertIsNone(limiter.open("127.0.0.2"))
        limiter.close("127.0.0.1")
        self.assertIsNone(limiter.open("127.0.0.1"))
        self.assertIsNotNone(limiter.open("::ffff:127.0.0.1"))

    def test_ipv6PerAddress(self) -> None:
        limiter = ConnectionLimiter(self.clock, attrs.evolve(DEFAULTS, maxConnectionsPerAddress=2))
        self.assertIsNone(limiter.open("2001:db8::1"))
        self.assertIsNone(limiter.open("2001:db8::2"))
        self.assertEqual(limiter.open("2001:db8::ffff:3"), TOO_MANY_FROM_ADDRESS)
        self.assertIsNone(limiter.open("2001:db8:0:1::1"))

    def test_total(self) -> None:
        limiter = ConnectionLimiter(self.clock, attrs.evolve(DEFAULTS, maxConnections=3))
        for i in range(3):
            self.assertIsNone(limiter.open(f"192.0.2.{i}"))
        reply = limiter.open("192.0.2.9")
        assert reply is not None
        self.assertEqual(reply, TOO_MANY_CONNECTIONS)
        self.assertEqual(reply.toBytes(), b"421 4.3.2 Too many connections; try again later\r\n")
        self.assertEqual(limiter.openConnections, 3)
        self.assertEqual(limiter.openFrom("192.0.2.9"), 0)
        limiter.close("192.0.2.1")
        self.assertIsNone(limiter.open("192.0.2.9"))
        self.assertEqual(limiter.openConnections, 3)

    def test_rate(self) -> None:
        """
        60 connections per minute per address; refused ones are not
        counted, and the budget comes back at one per second.
        """
        limiter = ConnectionLimiter(self.clock, DEFAULTS)
        for _ in range(60):
            self.assertIsNone(limiter.open("203.0.113.7"))
            limiter.close("203.0.113.7")
        self.assertEqual(limiter.open("203.0.113.7"), TOO_MANY_FROM_ADDRESS)
        self.assertEqual(limiter.open("203.0.113.7"), TOO_MANY_FROM_ADDRESS)
        self.assertIsNone(limiter.open("203.0.113.8"))
        self.clock.advance(1)
        self.assertIsNone(limiter.open("203.0.113.7"))
        self.assertIsNotNone(limiter.open("203.0.113.7"))
        self.clock.advance(60)
        for _ in range(19):
            self.assertIsNone(limiter.open("203.0.113.7"))

    def test_exempt(self) -> None:
        """Exempt networks have no per-address limits, but count in the total."""
        limiter = ConnectionLimiter(
            self.clock, attrs.evolve(DEFAULTS, maxConnections=100, exempt=(net("127.0.0.0/8"),))
        )
        for _ in range(100):
            self.assertIsNone(limiter.open("127.0.0.1"))
        self.assertEqual(limiter.open("127.0.0.1"), TOO_MANY_CONNECTIONS)
        limiter.close("127.0.0.1")
        self.assertEqual(limiter.openConnections, 99)
        self.assertEqual(limiter.trackedKeys(), 0)

    def test_close(self) -> None:
        """close() forgets an address with no open connection; unknown ones change nothing."""
        limiter = ConnectionLimiter(self.clock, DEFAULTS)
        self.assertIsNone(limiter.open("192.0.2.1"))
        self.assertIsNone(limiter.open("192.0.2.2"))
        limiter.close("192.0.2.1")
        limiter.close("192.0.2.1")
        limiter.close("192.0.2.77")
        self.assertEqual((limiter.openConnections, limiter.openFrom("192.0.2.2")), (1, 1))
        self.clock.advance(60)
        limiter.close("192.0.2.2")
        self.assertEqual(limiter.openConnections, 0)
        self.assertEqual(limiter._open, {})

    def test_rateMemoryBounded(self) -> None:
        limiter = ConnectionLimiter(self.clock, DEFAULTS, maxKeys=1000)
        for i in range(5000):
            address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            self.assertIsNone(limiter.open(address))
            limiter.close(address)
        self.assertEqual(limiter.trackedKeys(), 1000)


class SubmissionQuotaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_messages(self) -> None:
        quota = SubmissionQuota(self.clock, attrs.evolve(DEFAULTS, messagesPerUser=3))
        for _ in range(3):
            self.assertIsNone(quota.checkMessage("Bob"))
            quota.record("bob", 1)
        reply = quota.checkMessage("BOB")
        assert reply is not None
        self.assertEqual(
            reply.toBytes(),
            b"451 4.7.1 Message rate limit exceeded for user BOB; try again later\r\n",
        )
        self.assertIsNone(quota.checkMessage("alice"))
        self.clock.advance(1199)  # 3 per hour: one more every 1200 s
        self.assertIsNotNone(quota.checkMessage("bob"))
        self.clock.advance(1)
        self.assertIsNone(quota.checkMessage("bob"))
        self.clock.advance(2400)
        for _ in range(3):
            self.assertIsNone(quota.checkMessage("bob"))
            quota.record("bob", 1)
        self.assertIsNotNone(quota.checkMessage("bob"))

    def test_recipients(self) -> None:
        quota = SubmissionQuota(self.clock, attrs.evolve(DEFAULTS, recipientsPerUser=10))
        quota.record("bob", 8)
        self.assertIsNone(quota.checkRecipient("bob", 0))
        self.assertIsNone(quota.checkRecipient("Bob", 1))
        reply = quota.checkRecipient("bob", 2)
        assert reply is not None
        self.assertEqual(
            reply.toBytes(),
            b"452 4.5.3 Recipient rate limit exceeded for user bob; try again later\r\n",
        )
        self.assertIsNone(quota.checkRecipient("alice", 9))
        self.assertIsNotNone(quota.checkRecipient("alice", 10))
        self.clock.advance(3600)
        self.assertIsNone(quota.checkRecipient("bob", 9))

    def test_defaults(self) -> None:
        quota = SubmissionQuota(self.clock, DEFAULTS)
        for _ in range(999):
            quota.record("bob", 5)
        self.assertIsNone(quota.checkMessage("bob"))
        self.assertIsNotNone(quota.checkRecipient("bob", 5))
        self.assertIsNone(quota.checkRecipient("bob", 4))
        quota.record("bob", 0)
        self.assertIsNotNone(quota.checkMessage("bob"))

    def test_disabled(self) -> None:
        quota = SubmissionQuota(
            self.clock, attrs.evolve(DEFAULTS, messagesPerUser=0, recipientsPerUser=0)
        )
        for _ in range(10_000):
            quota.record("bob", 1000)
        self.assertIsNone(quota.checkMessage("bob"))
        self.assertIsNone(quota.checkRecipient("bob", 10**6))
        self.assertEqual(quota.trackedKeys(), 0)

    def test_userInReply(self) -> None:
        """A user name cannot add reply lines; a long one is cut."""
        quota = SubmissionQuota(self.clock, attrs.evolve(DEFAULTS, messagesPerUser=1))
        user = "bob\r\n250 ok" + "x" * 100
        quota.record(user, 1)
        reply = quota.checkMessage(user)
        assert reply is not None
        self.assertEqual(len(reply.toBytes().split(b"\r\n")), 2)
        self.assertIn("bob??250 ok", reply.text)
        self.assertIn("x...; try again later", reply.text)

    def test_memoryBounded(self) -> None:
        quota = SubmissionQuota(self.clock, DEFAULTS, maxKeys=50)
        for i in range(500):
            quota.record(f"user{i}", 1)
        self.assertEqual(quota.trackedKeys(), 100)
