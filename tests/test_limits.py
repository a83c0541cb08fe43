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
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, Logger, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailgw.auth import MechanismUnavailable
from mailgw.auth.realm import makePortal
from mailgw.config import LimitsConfig
from mailgw.interfaces import ISubmitter
from mailgw.limits import (
    AUTH_BUSY,
    AUTH_THROTTLED,
    AUTH_THROTTLED_CLOSE,
    DEFAULT_MAX_KEYS,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_ADDRESS,
    AuthAttempt,
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


def peek(throttle: AuthThrottle, address: str, login: str | None) -> AuthDecision:
    """The decision for an attempt, which is then refunded (as if not applicable)."""
    decision = throttle.begin(address, login, "PLAIN")
    if decision.attempt is not None:
        decision.attempt.notApplicable()
    return decision


def loggedIn(throttle: AuthThrottle, address: str, login: str | None) -> None:
    """A successful login, which the throttle lets through."""
    decision = throttle.begin(address, login, "PLAIN")
    assert decision.attempt is not None, decision
    decision.attempt.succeeded()


def failOnce(throttle: AuthThrottle, address: str, login: str | None) -> AuthDecision:
    """A failed attempt, which the throttle lets through."""
    decision = throttle.begin(address, login, "PLAIN")
    assert decision.attempt is not None, decision
    decision.attempt.failed()
    return decision


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
        decision = throttle.begin(address, login, "PLAIN")
        self.assertFalse(decision.refuse, (address, login, decision))
        assert decision.attempt is not None
        decision.attempt.failed()
        return decision

    def test_delaysGrowThenDisconnect(self) -> None:
        """
        One address: three free failures, then delays doubling from 1 s to
        16 s, then, with the address budget (10) spent, 421 and disconnect.
        """
        throttle = self.throttle()
        delays = [self.attempt(throttle, "203.0.113.7", "bob").delay for _ in range(10)]
        self.assertEqual(delays, [0, 0, 0, 1, 2, 4, 8, 16, 16, 16])
        decision = peek(throttle, "203.0.113.7", "bob")
        self.assertEqual(
            attrs.evolve(decision, logLine=""),
            AuthDecision(0.0, True, True, AUTH_THROTTLED_CLOSE, "address-budget", 10),
        )
        self.assertEqual(
            AUTH_THROTTLED_CLOSE.toBytes(),
            b"421 4.7.0 Too many authentication failures; closing connection\r\n",
        )
        # Any login, and no login at all, from that address.
        self.assertTrue(peek(throttle, "203.0.113.7", "alice").disconnect)
        self.assertTrue(peek(throttle, "203.0.113.7", None).disconnect)
        # Another address of the same network is not affected.
        self.assertEqual(peek(throttle, "203.0.113.8", "carol"), AuthDecision())

    def test_refuseThenDisconnect(self) -> None:
        """
        A spent account budget refuses that login with 454 and keeps the
        connection; the spent address budget then disconnects.
        """
        throttle = self.throttle(authFailuresPerAccount=5)
        for _ in range(5):
            self.attempt(throttle, "203.0.113.7", "bob")
        refused = peek(throttle, "203.0.113.7", "BOB")
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
        self.assertEqual(peek(throttle, "203.0.113.7", "user9").reason, "address-budget")
        self.assertTrue(peek(throttle, "203.0.113.7", "user9").disconnect)

    def test_unknownUsersCostTheSame(self) -> None:
        """Every login, existing or not, spends the address budget alike."""
        throttle = self.throttle()
        for i in range(10):
            self.attempt(throttle, "198.51.100.1", f"nosuchuser{i}")
        self.assertTrue(peek(throttle, "198.51.100.1", "bob").disconnect)

    def test_sprayingOneNetwork(self) -> None:
        """
        Spraying from many addresses of one /24 spends its network budget
        (30); a user who logged in before keeps working, from another
        network and from inside the sprayed one.
        """
        throttle = self.throttle()
        loggedIn(throttle, "198.51.100.20", "bob")
        loggedIn(throttle, "203.0.113.200", "Carol")
        for i in range(30):
            self.attempt(throttle, f"203.0.113.{i + 1}", ["bob", "carol", "dave"][i % 3])
        decision = peek(throttle, "203.0.113.99", "erin")
        self.assertEqual((decision.refuse, decision.disconnect), (True, False))
        self.assertEqual((decision.reason, decision.failures), ("network-budget", 30))
        self.assertEqual(decision.reply, AUTH_THROTTLED)
        self.assertTrue(peek(throttle, "203.0.113.200", "bob").refuse)
        self.assertEqual(peek(throttle, "203.0.113.200", "carol"), AuthDecision())
        self.assertEqual(peek(throttle, "198.51.100.20", "bob"), AuthDecision())
        # Elsewhere, bob's 10 failures slow attempts at "bob" down.
        elsewhere = peek(throttle, "198.51.100.21", "bob")
        self.assertEqual((elsewhere.refuse, elsewhere.reason), (False, "account-failures"))
        self.assertEqual(elsewhere.delay, 16)

    def test_accountBudget(self) -> None:
        """
        20 failures for "bob" from as many networks refuse "bob" everywhere,
        except from the address where bob logged in recently; there the
        address budget still applies.
        """
        throttle = self.throttle()
        loggedIn(throttle, "192.0.2.55", "bob")
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        for address, login in [("10.99.0.1", "bob"), ("10.0.0.1", "Bob"), ("192.0.2.56", "BOB")]:
            decision = peek(throttle, address, login)
            self.assertEqual((decision.refuse, decision.reason), (True, "account-budget"))
            self.assertEqual(decision.delay, 16)  # 20 account failures: the longest delay
        self.assertEqual(peek(throttle, "10.99.0.1", "alice"), AuthDecision())
        self.assertEqual(peek(throttle, "192.0.2.55", "bob"), AuthDecision())
        self.assertEqual(peek(throttle, "192.0.2.55", "BoB"), AuthDecision())
        # Bob's stale password at his trusted address: counted against the
        # address only, never against the account or the network.
        for _ in range(10):
            self.attempt(throttle, "192.0.2.55", "bob")
        self.assertTrue(peek(throttle, "192.0.2.55", "bob").disconnect)
        self.assertEqual(peek(throttle, "192.0.2.99", "carol"), AuthDecision())
        self.clock.advance(3600)
        self.assertEqual(peek(throttle, "10.99.0.1", "bob"), AuthDecision())

    def test_trustExpires(self) -> None:
        throttle = self.throttle(authTrustPeriod=100)
        loggedIn(throttle, "192.0.2.55", "bob")
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        self.clock.advance(99)
        self.assertFalse(peek(throttle, "192.0.2.55", "bob").refuse)
        self.clock.advance(1)
        self.assertEqual(peek(throttle, "192.0.2.55", "bob").reason, "account-budget")

    def test_noTrust(self) -> None:
        throttle = self.throttle(authTrustPeriod=0)
        loggedIn(throttle, "192.0.2.55", "bob")
        for i in range(20):
            self.attempt(throttle, f"10.{i}.0.1", "bob")
        self.assertTrue(peek(throttle, "192.0.2.55", "bob").refuse)
        # addresses, networks, the account, and the 20 (address, account) pairs
        self.assertEqual(throttle.trackedKeys(), 20 + 20 + 1 + 20)

    def test_successKeepsCounts(self) -> None:
        """Logging in with one account does not buy more guesses at others."""
        throttle = self.throttle()
        for i in range(9):
            self.attempt(throttle, "203.0.113.7", f"victim{i}")
        loggedIn(throttle, "203.0.113.7", "mallory")
        self.attempt(throttle, "203.0.113.7", "victim9")
        self.assertTrue(peek(throttle, "203.0.113.7", "victim10").disconnect)

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
        self.assertEqual(peek(throttle, "203.0.113.50", "bob").reason, "network-budget")
        self.clock.advance(119)
        self.assertTrue(peek(throttle, "203.0.113.50", "bob").refuse)
        self.clock.advance(1)  # 3600 / 30: one failure of the network's leaked away
        self.assertFalse(peek(throttle, "203.0.113.50", "bob").refuse)
        self.clock.advance(239)
        self.assertTrue(peek(throttle, "203.0.113.7", "x").disconnect)
        self.clock.advance(1)  # 3600 / 10: one failure of the address's leaked away
        decision = peek(throttle, "203.0.113.7", None)
        self.assertEqual((decision.refuse, decision.failures, decision.delay), (False, 9, 16))
        self.clock.advance(3600 - 360)
        self.assertEqual(peek(throttle, "203.0.113.7", "bob"), AuthDecision())
        self.assertEqual(peek(throttle, "203.0.113.50", "bob"), AuthDecision())

    def test_ipv6Grouping(self) -> None:
        """
        IPv6 clients are counted per /64 and networks per /56; an
        IPv4-mapped address counts as the IPv4 address.
        """
        throttle = self.throttle()
        for i in range(10):
            self.attempt(throttle, f"2001:db8:0:1::{i + 1}", f"u{i}")
        self.assertTrue(peek(throttle, "2001:db8:0:1:ffff::9", "x").disconnect)
        for i in range(20):
            self.attempt(throttle, f"2001:db8:0:{i + 2:x}::1", f"v{i}")
        decision = peek(throttle, "2001:db8:0:ff:1::1", "y")
        self.assertEqual((decision.reason, decision.failures), ("network-budget", 30))
        self.assertEqual(peek(throttle, "2001:db8:0:100::1", "y"), AuthDecision())
        for _ in range(10):
            self.attempt(throttle, "::ffff:192.0.2.1", "z")
        self.assertTrue(peek(throttle, "192.0.2.1", "z").disconnect)

    def test_exempt(self) -> None:
        """
        An exempt address has no address or network budget; the account
        budget still applies to it.
        """
        throttle = self.throttle(exempt=(net("192.0.2.10/32"),))
        for i in range(100):
            self.attempt(throttle, "192.0.2.10", f"user{i}")
        self.assertEqual(peek(throttle, "192.0.2.10", "alice"), AuthDecision())
        self.assertEqual(peek(throttle, "192.0.2.11", "alice"), AuthDecision())
        for _ in range(20):
            self.attempt(throttle, "192.0.2.10", "bob")
        self.assertEqual(peek(throttle, "192.0.2.10", "bob").reason, "account-budget")

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
        self.assertTrue(peek(throttle, "203.0.113.7", None).disconnect)
        self.assertEqual(throttle.trackedKeys(), 2)
        failOnce(throttle, "203.0.113.8", None)  # nothing to trust or forgive without a login
        self.assertEqual(throttle.trackedKeys(), 3)

    def test_memoryBounded(self) -> None:
        """
        200,000 attackers, each from its own /56 (address i in /56 number i)
        and with its own login, leave at most DEFAULT_MAX_KEYS keys in each
        table.
        """
        throttle = self.throttle()
        for i in range(200_000):
            failOnce(throttle, f"2001:db8:{i >> 8:x}:{(i & 0xFF) << 8:x}::1", f"user{i}")
        self.assertEqual(throttle.trackedKeys(), 4 * DEFAULT_MAX_KEYS)
        # The newest are remembered, the oldest forgotten.
        last = "2001:db8:30d:3f00::1"  # 199,999 = 0x30d3f
        self.assertEqual(peek(throttle, last, "user199999").failures, 0)  # no delay yet
        self.assertEqual(throttle._addresses.count(client(last).key), 1)
        self.assertEqual(throttle._networks.count(client(last).networkKey), 1)
        self.assertEqual(throttle._addresses.count(client("2001:db8::1").key), 0)

    def test_smallCap(self) -> None:
        throttle = AuthThrottle(self.clock, DEFAULTS, maxKeys=100)
        for i in range(1000):
            failOnce(throttle, f"10.{i // 256}.{i % 256}.1", f"user{i}")
            loggedIn(throttle, f"10.{i // 256}.{i % 256}.1", f"other{i}")
        sizes = [
            len(throttle._addresses),
            len(throttle._networks),
            len(throttle._accounts),
            len(throttle._pairs),
            len(throttle._trusted),
        ]
        # The last refund of a key the cap made room for leaves 99 in two tables.
        self.assertEqual(sizes, [100, 100, 99, 99, 100])

    def test_expiredKeysForgotten(self) -> None:
        """Once their failures leaked away, keys are dropped as others change."""
        throttle = self.throttle()
        for i in range(100):
            failOnce(throttle, f"10.0.{i}.1", f"user{i}")
        self.assertEqual(throttle.trackedKeys(), 400)
        self.clock.advance(3600)
        for i in range(60):
            failOnce(throttle, f"192.0.{2 + i % 2}.{i % 8 + 1}", f"bob{i % 4}")
        # 8 addresses, 2 networks, 4 accounts, 8 pairs
        self.assertEqual(throttle.trackedKeys(), 8 + 2 + 4 + 8)

    def test_logLine(self) -> None:
        """Each decision that delays, refuses or disconnects logs one fixed line."""
        throttle = self.throttle()
        for _ in range(3):
            self.attempt(throttle, "203.0.113.7", "bob")
        self.assertEqual(self.events, [])
        self.attempt(throttle, "203.0.113.7", "bob")
        for i in range(6):
            self.attempt(throttle, "203.0.113.7", f"u{i}")
        decision = peek(throttle, "203.0.113.7", "bob")
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
        decision = peek(throttle, "::ffff:10.99.0.1", "Bob")
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
            failOnce(self.throttle, "203.0.113.7", "bob")
        self.assertEqual(self.banned(), [])  # delays only
        peek(self.throttle, "203.0.113.7", "bob")
        self.assertEqual(self.banned(), ["203.0.113.7"] * 2)

    def test_loginInjection(self) -> None:
        """No login makes the filter ban an address other than the client's."""
        fake = "] mailgw auth-throttle: client=192.0.2.99 network=x failures=1 action=disconnect"
        for login in [fake, "x\n" + fake, f'"{fake}', "\r[a#warn] " + fake + " delay=0"]:
            for _ in range(11):
                decision = self.throttle.begin("203.0.113.7", login, "PLAIN")
                if decision.attempt is not None:
                    decision.attempt.failed()
        self.assertNotIn("192.0.2.99", self.banned())
        self.assertIn("203.0.113.7", self.banned())


@implementer(ICredentialsChecker)
class HandChecker:
    """
    A checker of plain passwords whose answers the test gives by hand:
    each verification waits in ``pending`` until L{answer} fires it.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, passwords: dict[bytes, bytes]) -> None:
        self.passwords = passwords
        self.pending: list[tuple[Any, Deferred[Any]]] = []
        self.verifications = 0
        self.peak = 0

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        d: Deferred[bytes | tuple[()]] = Deferred()
        self.pending.append((credentials, d))
        self.verifications += 1
        self.peak = max(self.peak, len(self.pending))
        return d

    def answer(self) -> None:
        """Answer every verification under way: right, or UnauthorizedLogin."""
        pending, self.pending = self.pending, []
        for credentials, d in pending:
            if self.passwords.get(credentials.username) == credentials.password:
                d.callback(credentials.username)
            else:
                d.errback(UnauthorizedLogin())


class Session:
    """
    One AUTH as the server handles it with the throttle: begin, wait the
    delay, ask the portal, report the outcome. ``code`` is the reply sent
    (None while under way).
    """

    def __init__(
        self,
        throttle: AuthThrottle,
        clock: Clock,
        portal: Any,
        address: str,
        login: str,
        password: bytes,
        mechanism: str = "PLAIN",
    ) -> None:
        self.code: int | None = None
        self.decision = throttle.begin(address, login, mechanism)
        if self.decision.refuse:
            assert self.decision.reply is not None
            self.code = self.decision.reply.code
            return
        attempt = self.decision.attempt
        assert attempt is not None
        self.attempt = attempt
        credentials = UsernamePassword(login.encode(), password)
        d = deferLater(clock, self.decision.delay, portal.login, credentials, None, ISubmitter)
        d.addBoth(self._answered)

    def _answered(self, outcome: Any) -> None:
        settled = self.attempt.settle(outcome)
        self.code = {"succeeded": 235, "unavailable": 454}.get(settled, 535)


class AuthAttemptTests(SynchronousTestCase):
    """L{AuthThrottle.begin} and the outcomes of an L{AuthAttempt}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []

    def throttle(self, **changes: Any) -> AuthThrottle:
        return AuthThrottle(
            self.clock,
            settings(**changes),
            log=Logger(observer=cast(ILogObserver, self.events.append)),
        )

    def begun(self, throttle: AuthThrottle, address: str, login: str | None) -> AuthAttempt:
        decision = throttle.begin(address, login, "PLAIN")
        assert decision.attempt is not None, decision
        return decision.attempt

    def counts(self, throttle: AuthThrottle, address: str, login: str) -> tuple[int, int, int]:
        who = client(address)
        return (
            throttle._addresses.count(who.key),
            throttle._networks.count(who.networkKey),
            throttle._accounts.count(login.casefold()),
        )

    def test_countedWhenBegun(self) -> None:
        """
        An attempt counts as a failure as soon as it begins: ten attempts
        under way from one address spend its budget before any is answered.
        """
        throttle = self.throttle(authConcurrentPerAddress=50, authConcurrentPerAccount=50)
        attempts = [self.begun(throttle, "203.0.113.7", "bob") for _ in range(10)]
        self.assertEqual(self.counts(throttle, "203.0.113.7", "bob"), (10, 10, 10))
        self.assertEqual(throttle.inFlight, 10)
        decision = throttle.begin("203.0.113.7", "bob", "PLAIN")
        self.assertEqual((decision.disconnect, decision.reason), (True, "address-budget"))
        self.assertIsNone(decision.attempt)
        self.assertEqual(throttle.inFlight, 10)
        for attempt in attempts:
            attempt.abandoned()  # hanging up keeps the count
        self.assertEqual(throttle.inFlight, 0)
        self.assertTrue(peek(throttle, "203.0.113.7", "alice").disconnect)

    def test_outcomes(self) -> None:
        """failed and abandoned keep the count; notApplicable and unavailable refund it."""
        throttle = self.throttle()
        for outcome, kept in [
            ("failed", 1),
            ("abandoned", 1),
            ("notApplicable", 0),
            ("unavailable", 0),
        ]:
            address = f"10.{kept}.{len(outcome)}.1"
            attempt = self.begun(throttle, address, outcome)
            self.assertEqual(attempt.mechanism, "PLAIN")
            self.assertEqual(self.counts(throttle, address, outcome), (1, 1, 1))
            getattr(attempt, outcome)()
            self.assertEqual(attempt.outcome, outcome)
            self.assertEqual(self.counts(throttle, address, outcome), (kept,) * 3, outcome)
            self.assertEqual(throttle.inFlight, 0)

    def test_settle(self) -> None:
        """settle() turns what Portal.login gave into the outcome."""
        throttle = self.throttle()
        for result, expected, counts in [
            (Failure(MechanismUnavailable()), "notApplicable", (0, 0, 0)),
            (Failure(UnauthorizedLogin()), "failed", (1, 1, 1)),
            (Failure(UnhandledCredentials()), "failed", (2, 2, 2)),
            (Failure(OSError("users file gone")), "unavailable", (2, 2, 2)),
            ((object(), object(), None), "succeeded", (0, 0, 0)),
        ]:
            attempt = self.begun(throttle, "192.0.2.1", "bob")
            self.assertEqual(attempt.settle(result), expected)
            self.assertEqual(attempt.outcome, expected)
            self.assertEqual(self.counts(throttle, "192.0.2.1", "bob"), counts)

    def test_firstOutcomeWins(self) -> None:
        throttle = self.throttle()
        attempt = self.begun(throttle, "192.0.2.1", "bob")
        attempt.failed()
        attempt.succeeded()
        attempt.notApplicable()
        attempt.abandoned()
        self.assertEqual(attempt.outcome, "failed")
        self.assertEqual(self.counts(throttle, "192.0.2.1", "bob"), (1, 1, 1))
        other = self.begun(throttle, "198.51.100.2", "carol")
        other.succeeded()
        other.failed()
        other.abandoned()
        self.assertEqual(self.counts(throttle, "198.51.100.2", "carol"), (0, 0, 0))
        self.assertEqual(throttle.inFlight, 0)
        self.assertEqual(throttle._busyAddresses, {})
        self.assertEqual(throttle._busyAccounts, {})

    def test_successForgivesThisLoginHere(self) -> None:
        """
        A success takes back this login's failures from this address, from
        the address's, network's and account's counts, and nothing else:
        failures of other logins here, and of this login elsewhere, stay.
        """
        throttle = self.throttle()
        for _ in range(3):
            failOnce(throttle, "192.0.2.7", "bob")
        for _ in range(2):
            failOnce(throttle, "192.0.2.7", "mallory")
        for i in range(4):
            failOnce(throttle, f"10.{i}.0.1", "bob")
        failOnce(throttle, "192.0.2.8", "carol")
        self.assertEqual(self.counts(throttle, "192.0.2.7", "bob"), (5, 6, 7))
        loggedIn(throttle, "192.0.2.7", "BOB")
        self.assertEqual(self.counts(throttle, "192.0.2.7", "bob"), (2, 3, 4))
        self.assertEqual(self.counts(throttle, "192.0.2.7", "mallory"), (2, 3, 2))

    def test_fallbackNeverSlowed(self) -> None:
        """
        Issue 15: a client that tries CRAM-MD5 first and then PLAIN with
        the right password, twelve times in a row, is never delayed or
        refused, whether its backend calls the CRAM-MD5 attempt not
        applicable or a plain failure; another user at the same address is
        not affected either.
        """
        for cramOutcome in ("notApplicable", "failed"):
            throttle = self.throttle()
            for _ in range(12):
                cram = throttle.begin("198.51.100.4", "alice", "CRAM-MD5")
                assert cram.attempt is not None
                getattr(cram.attempt, cramOutcome)()
                plain = throttle.begin("198.51.100.4", "alice", "PLAIN")
                assert plain.attempt is not None
                plain.attempt.succeeded()
                self.assertEqual((cram.delay, plain.delay), (0, 0), cramOutcome)
            self.assertEqual(peek(throttle, "198.51.100.4", "bob"), AuthDecision())
            self.assertEqual(self.counts(throttle, "198.51.100.4", "alice"), (0, 0, 0))
        self.assertEqual(self.events, [])

    def test_sprayStillThrottled(self) -> None:
        """
        A spray of many accounts from one network is refused as before,
        even when the sprayer logs in with an account of its own between
        guesses.
        """
        throttle = self.throttle()
        for i in range(30):
            address = f"203.0.113.{i // 5 + 1}"
            failOnce(throttle, address, f"victim{i}")
            loggedIn(throttle, address, "mallory")
        decision = peek(throttle, "203.0.113.50", "victim99")
        self.assertEqual((decision.refuse, decision.reason), (True, "network-budget"))
        for _ in range(4):
            failOnce(throttle, "198.51.100.1", f"v{_}")
            loggedIn(throttle, "198.51.100.1", "mallory")
        for i in range(6):
            failOnce(throttle, "198.51.100.1", f"w{i}")
        self.assertTrue(peek(throttle, "198.51.100.1", "w9").disconnect)

    def test_concurrencyPerAddress(self) -> None:
        """
        At most auth_concurrent_per_address attempts from one address are
        under way; the next gets 454 4.7.0 without being counted, and a
        slot comes back as soon as an attempt ends.
        """
        throttle = self.throttle(authFreeFailures=20, authFailuresPerAddress=50)
        attempts = [self.begun(throttle, "192.0.2.9", f"user{i}") for i in range(8)]
        decision = throttle.begin("192.0.2.9", "user8", "PLAIN")
        self.assertEqual(
            attrs.evolve(decision, logLine=""),
            AuthDecision(0.0, True, False, AUTH_BUSY, "address-concurrency", 8),
        )
        self.assertEqual(
            AUTH_BUSY.toBytes(),
            b"454 4.7.0 Too many authentication attempts in progress; try again later\r\n",
        )
        self.assertEqual(
            decision.logLine,
            "mailgw auth-throttle: client=192.0.2.9 network=192.0.2.0/24 failures=8 "
            'action=refuse delay=0.0 reason=address-concurrency login="user8"',
        )
        self.assertEqual(formatEvent(self.events[-1]), decision.logLine)
        self.assertEqual(self.counts(throttle, "192.0.2.9", "user8"), (8, 8, 0))
        self.assertFalse(throttle.begin("192.0.2.10", "user8", "PLAIN").refuse)
        attempts[0].failed()
        self.begun(throttle, "192.0.2.9", "user8")

    def test_identicalAttemptsShareASlot(self) -> None:
        """
        Identical attempts under way (one login, one password: a relay
        client opening 20 sessions at once with a cold cache) share one
        verification slot, so none is refused, and every slot comes back.
        Different passwords for the account are still capped.
        """
        throttle = self.throttle(authFreeFailures=50, authFailuresPerAddress=100,
                                 authFailuresPerAccount=100)  # fmt: skip
        same = [
            throttle.begin("192.0.2.9", "relay", "PLAIN", fingerprint=b"F" * 32) for _ in range(20)
        ]
        self.assertEqual([d.refuse for d in same], [False] * 20)
        self.assertEqual(throttle.inFlight, 1)
        guesses = [
            throttle.begin("192.0.2.9", "relay", "PLAIN", fingerprint=bytes([i]) * 32)
            for i in range(20)
        ]
        refused = [d for d in guesses if d.refuse]
        self.assertEqual(len(guesses) - len(refused), 7)  # the cap of 8, one held by F
        self.assertEqual({d.reason for d in refused}, {"address-concurrency"})
        for decision in same + guesses:
            if decision.attempt is not None:
                decision.attempt.succeeded() if decision in same else decision.attempt.failed()
        self.assertEqual(throttle.inFlight, 0)
        self.assertEqual(throttle._shared, {})

    def test_identicalAttemptsAreOneGuess(self) -> None:
        """
        Identical attempts under way count once against the failure budgets:
        twenty parallel first logins of a relay client are not delayed by
        their own provisional failures (with the defaults, the twentieth was
        delayed by seconds), and twenty parallel repeats of one wrong
        password are one failure. Repeated after they ended, it counts again.
        """
        throttle = self.throttle()
        first = [
            throttle.begin("192.0.2.9", "relay", "PLAIN", fingerprint=b"R" * 32) for _ in range(20)
        ]
        self.assertEqual([(d.refuse, d.delay) for d in first], [(False, 0.0)] * 20)
        self.assertEqual(self.counts(throttle, "192.0.2.9", "relay"), (1, 1, 1))
        for decision in first:
            decision.attempt.succeeded()
        self.assertEqual(self.counts(throttle, "192.0.2.9", "relay"), (0, 0, 0))

        wrong = [
            throttle.begin("198.51.100.7", "bob", "PLAIN", fingerprint=b"W" * 32) for _ in range(20)
        ]
        for decision in wrong:
            decision.attempt.failed()
        self.assertEqual(self.counts(throttle, "198.51.100.7", "bob"), (1, 1, 1))
        again = throttle.begin("198.51.100.7", "bob", "PLAIN", fingerprint=b"W" * 32)
        again.attempt.failed()
        self.assertEqual(self.counts(throttle, "198.51.100.7", "bob"), (2, 2, 2))

    def test_concurrencyPerAccount(self) -> None:
        """
        At most auth_concurrent_per_account attempts at one login are under
        way, from anywhere; its user's trusted address is exempt.
        """
        throttle = self.throttle()
        loggedIn(throttle, "192.0.2.55", "bob")
        for i in range(8):
            self.begun(throttle, f"10.{i}.0.1", "bob")
        decision = throttle.begin("10.99.0.1", "Bob", "PLAIN")
        self.assertEqual((decision.reply, decision.reason), (AUTH_BUSY, "account-concurrency"))
        self.begun(throttle, "192.0.2.55", "bob")
        self.begun(throttle, "10.99.0.1", "alice")

    def test_trustedBurst(self) -> None:
        """
        A relay client that logged in before opens 20 sessions at once while
        its password is being verified: none is delayed or refused for the
        others in flight, and once they succeed nothing is counted. Were
        they wrong, their failures would count once answered.
        """
        throttle = self.throttle()
        loggedIn(throttle, "192.0.2.25", "relay")
        decisions = [throttle.begin("192.0.2.25", "relay", "PLAIN") for _ in range(20)]
        self.assertEqual(decisions, [AuthDecision()] * 20)
        self.assertEqual(self.counts(throttle, "192.0.2.25", "relay"), (20, 0, 0))
        for decision in decisions:
            assert decision.attempt is not None
            decision.attempt.succeeded()
        self.assertEqual(self.counts(throttle, "192.0.2.25", "relay"), (0, 0, 0))
        self.assertEqual(throttle._busyTrusted, {})
        attempts = [self.begun(throttle, "192.0.2.25", "relay") for _ in range(12)]
        for attempt in attempts:
            attempt.failed()
        self.assertTrue(peek(throttle, "192.0.2.25", "relay").disconnect)

    def test_untrustedBurstCounted(self) -> None:
        """
        Attempts in flight of a login not trusted there count against each
        other: the fourth is delayed, the ninth refused.
        """
        throttle = self.throttle()
        delays = [throttle.begin("192.0.2.26", "relay", "PLAIN").delay for _ in range(8)]
        self.assertEqual(delays, [0, 0, 0, 1, 2, 4, 8, 16])
        self.assertEqual(throttle.begin("192.0.2.26", "relay", "PLAIN").reply, AUTH_BUSY)

    def test_concurrencyTotal(self) -> None:
        """
        At most auth_concurrent_total attempts are under way in all; trusted
        logins still go ahead, and exempt addresses have no per-address cap.
        """
        throttle = self.throttle(authConcurrentTotal=10, exempt=(net("192.0.2.10/32"),))
        loggedIn(throttle, "198.51.100.1", "bob")
        for i in range(10):
            self.begun(throttle, "192.0.2.10", f"user{i}")
        decision = throttle.begin("203.0.113.1", "carol", "LOGIN")
        self.assertEqual((decision.reply, decision.reason), (AUTH_BUSY, "total-concurrency"))
        self.assertEqual(decision.failures, 10)
        self.begun(throttle, "198.51.100.1", "bob")
        self.assertEqual(throttle.inFlight, 11)

    def portal(self, checker: HandChecker) -> Any:
        return makePortal([checker])

    def settle(self, checker: HandChecker) -> None:
        """Answer every verification and run every delay, until nothing is left."""
        while checker.pending or self.clock.getDelayedCalls():
            checker.answer()
            calls = self.clock.getDelayedCalls()
            if calls:
                self.clock.advance(min(c.getTime() for c in calls) - self.clock.seconds())

    def test_parallelBurst(self) -> None:
        """
        Defect 11 of issue 13: 200 sessions from one address each send one
        guess for one account at the same moment (the right password is
        number 150). At most auth_failures_per_address guesses are
        verified, never more than auth_concurrent_per_address at once, the
        right password is not let through, and afterwards another user from
        another address, and the account's user from the address where he
        logged in before, log in at once.
        """
        throttle = self.throttle()
        checker = HandChecker({b"bob": b"right", b"carol": b"hers"})
        portal = self.portal(checker)
        bobAtHome = Session(throttle, self.clock, portal, "192.0.2.55", "bob", b"right")
        self.settle(checker)
        self.assertEqual(bobAtHome.code, 235)
        checker.verifications = 0
        sessions = [
            Session(
                throttle,
                self.clock,
                portal,
                "203.0.113.66",
                "bob",
                b"right" if i == 150 else f"guess{i}".encode(),
            )
            for i in range(200)
        ]
        self.clock.advance(0)
        self.assertEqual(len(checker.pending), 3)  # the free failures; the rest wait a delay
        self.settle(checker)
        codes = [s.code for s in sessions]
        # Eight went ahead (three at once, five after growing delays), the
        # other 192 were refused at once without a verification.
        self.assertEqual((checker.verifications, checker.peak), (8, 3))
        self.assertEqual((codes.count(535), codes.count(454)), (8, 192))
        self.assertNotIn(235, codes)
        self.assertEqual(throttle.inFlight, 0)
        reasons = {s.decision.reason for s in sessions if s.decision.refuse}
        self.assertEqual(reasons, {"address-concurrency"})
        # Another user from another address, and bob from home: no delay.
        carol = Session(throttle, self.clock, portal, "198.51.100.7", "carol", b"hers")
        bob = Session(throttle, self.clock, portal, "192.0.2.55", "bob", b"right")
        self.assertEqual((carol.decision.delay, bob.decision.delay), (0, 0))
        self.settle(checker)
        self.assertEqual((carol.code, bob.code), (235, 235))
        # The attacking address has two guesses left, each after 16 s.
        self.assertEqual(peek(throttle, "203.0.113.66", "bob").delay, 16)

    def test_parallelBurstWithoutDelays(self) -> None:
        """
        The same burst with no delays: the cap holds the verifications in
        flight, and the address budget, counted as attempts begin, stops
        the rest.
        """
        throttle = self.throttle(authDelay=0, authDelayMax=0)
        checker = HandChecker({b"bob": b"right"})
        portal = self.portal(checker)
        sessions = [
            Session(throttle, self.clock, portal, "203.0.113.66", "bob", f"g{i}".encode())
            for i in range(200)
        ]
        self.clock.advance(0)
        self.assertEqual(len(checker.pending), 8)
        self.settle(checker)
        later = [
            Session(throttle, self.clock, portal, "203.0.113.66", "bob", f"h{i}".encode())
            for i in range(5)
        ]
        self.settle(checker)
        self.assertEqual((checker.verifications, checker.peak), (10, 8))
        self.assertEqual(
            {s.decision.reason for s in sessions if s.code == 454}, {"address-concurrency"}
        )
        self.assertEqual([s.code for s in later], [535, 535, 421, 421, 421])


class ConnectionLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_perAddress(self) -> None:
        """Loopback is not exempt: the 51st connection from one address is refused."""
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

    def test_relayClientBurst(self) -> None:
        """
        Issue 15: a relay client that opens a new session for each message
        and logs in, 100 in a burst (up to 20 at once), is never refused
        with the defaults; the rate still refuses unauthenticated floods.
        """
        limiter = ConnectionLimiter(self.clock, DEFAULTS)
        refused = 0
        for _wave in range(5):
            for _ in range(20):
                refused += limiter.open("192.0.2.25") is not None
            for _ in range(20):
                limiter.authenticated("192.0.2.25")
                limiter.close("192.0.2.25", authenticated=True)
        self.assertEqual(refused, 0)
        self.assertEqual(limiter.trackedKeys(), 0)
        for _ in range(60):
            self.assertIsNone(limiter.open("192.0.2.26"))
            limiter.close("192.0.2.26")
        self.assertEqual(limiter.open("192.0.2.26"), TOO_MANY_FROM_ADDRESS)
        # A session that logs in gives back its own connection only.
        self.assertIsNone(limiter.open("192.0.2.25"))
        limiter.authenticated("192.0.2.25")
        self.assertEqual(limiter.open("192.0.2.26"), TOO_MANY_FROM_ADDRESS)

    def test_authenticatedLeaveTheAddressCount(self) -> None:
        """
        Sessions that logged in no longer count against the address: a
        relay client's 20 sessions at once, still closing, leave room for
        its next ones, while unauthenticated ones stay capped; the total
        counts them all, and everything is released in the end.
        """
        limiter = ConnectionLimiter(self.clock, DEFAULTS)
        for _ in range(DEFAULTS.maxConnectionsPerAddress):
            self.assertIsNone(limiter.open("192.0.2.25"))
            limiter.authenticated("192.0.2.25")
        for _ in range(DEFAULTS.maxConnectionsPerAddress):
            self.assertIsNone(limiter.open("192.0.2.25"))
        self.assertEqual(limiter.open("192.0.2.25"), TOO_MANY_FROM_ADDRESS)
        self.assertEqual(limiter.openConnections, 2 * DEFAULTS.maxConnectionsPerAddress)
        for _ in range(DEFAULTS.maxConnectionsPerAddress):
            limiter.close("192.0.2.25", authenticated=True)
            limiter.close("192.0.2.25")
        self.assertEqual(limiter.openConnections, 0)
        self.assertEqual(limiter.openFrom("192.0.2.25"), 0)

    def test_authenticatedWithoutCount(self) -> None:
        """authenticated() never takes the rate below zero, and ignores exempt addresses."""
        limiter = ConnectionLimiter(self.clock, attrs.evolve(DEFAULTS, exempt=(net("::1/128"),)))
        limiter.authenticated("192.0.2.1")
        limiter.authenticated("::1")
        for _ in range(60):
            self.assertIsNone(limiter.open("192.0.2.1"))
            limiter.close("192.0.2.1")
        self.assertEqual(limiter.open("192.0.2.1"), TOO_MANY_FROM_ADDRESS)

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
