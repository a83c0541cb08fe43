"""
The defence against password guessing: failure budgets per client address,
per network and per account, delays that grow with the failures, and trust
for the address a user last logged in from.

The throttle never learns whether a login exists, so guessing at unknown
users costs an attacker exactly what guessing at real ones does.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailgw.config import LimitsConfig
from mailgw.limits._counters import DEFAULT_MAX_KEYS, Client, ExpiringKeys, LeakyCounts, client
from mailgw.limits.replies import AUTH_THROTTLED, AUTH_THROTTLED_CLOSE
from mailgw.server.replies import SMTPReply

# Logins are counted and logged by their first this many characters: a
# longer one is no real login, and must not cost memory or log space.
LOGIN_LIMIT = 256


@attrs.frozen
class AuthDecision:
    """
    What to do with one AUTH attempt. Wait ``delay`` seconds before the
    answer; when ``refuse`` is set, answer ``reply`` without checking any
    credentials (454, transient), and when ``disconnect`` is also set,
    answer ``reply`` (421) and close the connection. ``reason`` names the
    budget or counter that decided (``address-budget``, ``network-budget``,
    ``account-budget``, ``address-failures``, ``account-failures``; empty
    when nothing did), ``failures`` is that counter's count, and ``logLine``
    the line the throttle logged (empty when it logged none).
    """

    delay: float = 0.0
    refuse: bool = False
    disconnect: bool = False
    reply: SMTPReply | None = None
    reason: str = ""
    failures: int = 0
    logLine: str = ""
    attempt: AuthAttempt | None = None


@attrs.define
class AuthAttempt:
    """
    One AUTH attempt that L{AuthThrottle.begin} let through, counted as a
    failure from its start. Exactly one outcome counts; later calls do
    nothing.
    """

    _throttle: AuthThrottle
    _address: str
    _login: str | None
    _settled: bool = False

    def _settle(self) -> bool:
        first, self._settled = not self._settled, True
        return first

    def succeeded(self) -> None:
        """The login is right: refund the count and trust the address."""
        if self._settle():
            self._throttle._refund(self._address, self._login)
            self._throttle.succeeded(self._address, self._login)

    def failed(self) -> None:
        """Wrong credentials: the count stays."""
        self._settle()

    def notApplicable(self) -> None:
        """The mechanism cannot check this login: refund."""
        if self._settle():
            self._throttle._refund(self._address, self._login)

    def unavailable(self) -> None:
        """A backend error: refund."""
        if self._settle():
            self._throttle._refund(self._address, self._login)

    def abandoned(self) -> None:
        """The client left before the answer: the count stays."""
        self._settle()


def _escape(text: str, quoted: bool) -> str:
    """
    ``text`` safe inside one log line: ``"`` and ``\\`` backslash-escaped,
    non-printable characters (and, outside quotes, space and ``=``, which
    separate fields) written as ``\\xHH``, ``\\uHHHH`` or ``\\UHHHHHHHH``.
    """
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and (quoted or ch not in " ="):
            out.append(ch)  # isprintable(): no control, format or separator characters
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def formatLogLine(
    address: str,
    network: str,
    login: str | None,
    failures: int,
    action: str,
    delay: float,
    reason: str,
) -> str:
    """
    The one line logged for each AUTH decision that delays, refuses or
    disconnects, for fail2ban and its kind to match::

        mailgw auth-throttle: client=203.0.113.7 network=203.0.113.0/24
        failures=11 action=disconnect delay=0.0 reason=address-budget login="bob"

    (on one line). The fields are always present and in this order; the
    login, the one field a client chooses, comes last, quoted, with ``"``
    and ``\\`` backslash-escaped and every non-printable character
    (CR, LF, NUL, U+2028 ...) written as ``\\xHH``, ``\\uHHHH`` or
    ``\\UHHHHHHHH``, and cut to its first 256 characters (then ``...``
    follows the closing quote). A missing login is ``login=""``.
    """
    text = login or ""
    cut = "..." if len(text) > LOGIN_LIMIT else ""
    return (
        f"mailgw auth-throttle: client={_escape(address, False)} "
        f"network={_escape(network, False)} failures={failures} action={action} "
        f'delay={delay:.1f} reason={reason} login="{_escape(text[:LOGIN_LIMIT], True)}"{cut}'
    )


def accountKey(login: str | None) -> str | None:
    """The key ``login`` is counted under: case-folded, cut to 256 characters."""
    # Cut before folding too: folding a 12 KB line would be wasted work.
    return None if login is None else login[:LOGIN_LIMIT].casefold()[:LOGIN_LIMIT]


class AuthThrottle:
    """
    Failure budgets over a sliding window of ``settings.authFailureWindow``
    seconds, per client address (an IPv6 client is its /64), per network
    (IPv4 /24, IPv6 /56) and per account (the login as given, case-folded).

    Call L{check} before each AUTH attempt, then L{failed} or L{succeeded}
    with its outcome. A login that succeeds from an address is trusted there
    for ``settings.authTrustPeriod``: attempts for it from that address are
    exempt from the network and account budgets (and its failures there
    count against its address only), so spraying an account from elsewhere
    cannot lock its user out. The address budget applies to every attempt.
    Addresses in ``settings.exempt`` (a webmail front end) are exempt from
    the address and network budgets; the account budget and the delays it
    causes still apply to them, and their failures still count against the
    account.

    The delay before each answer grows with the failures counted against
    the client address or the account, whichever is more: none for the
    first ``settings.authFreeFailures``, then ``settings.authDelay``
    doubling up to ``settings.authDelayMax``.

    Each table keeps at most ``maxKeys`` keys. Decisions that delay, refuse
    or disconnect are logged through ``log`` (see L{formatLogLine}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: LimitsConfig,
        maxKeys: int = DEFAULT_MAX_KEYS,
        log: Logger | None = None,
    ) -> None:
        self._settings = settings
        window = settings.authFailureWindow
        self._addresses = LeakyCounts(clock, settings.authFailuresPerAddress, window, maxKeys)
        self._networks = LeakyCounts(clock, settings.authFailuresPerNetwork, window, maxKeys)
        self._accounts = LeakyCounts(clock, settings.authFailuresPerAccount, window, maxKeys)
        self._trusted = ExpiringKeys(clock, settings.authTrustPeriod, maxKeys)
        self._log = log if log is not None else Logger(namespace=__name__)

    def _classify(self, address: str, login: str | None) -> tuple[Client, str | None, bool, bool]:
        who = client(address)
        account = accountKey(login)
        exempt = who.within(self._settings.exempt)
        trusted = account is not None and (who.key, account) in self._trusted
        return who, account, exempt, trusted

    def delayFor(self, failures: int) -> float:
        """The delay after ``failures`` failures: none for the free ones, then doubling."""
        s = self._settings
        extra = failures - s.authFreeFailures
        if extra < 0:
            return 0.0
        return float(min(s.authDelay * 2.0 ** min(extra, 64), s.authDelayMax))

    def check(self, address: str, login: str | None) -> AuthDecision:
        """
        The decision for an AUTH attempt by ``login`` (None: not known yet)
        from ``address``. Changes no count.
        """
        s = self._settings
        who, account, exempt, trusted = self._classify(address, login)
        byAddress = 0 if exempt else self._addresses.count(who.key)
        byNetwork = 0 if exempt or trusted else self._networks.count(who.networkKey)
        byAccount = 0 if account is None or trusted else self._accounts.count(account)
        failures = max(byAddress, byAccount)
        delay = self.delayFor(failures)
        if byAddress >= s.authFailuresPerAddress:
            # Dropping the connection costs the client a new connection,
            # which the connection limits count; no delay holds it open.
            decision = AuthDecision(
                0.0, True, True, AUTH_THROTTLED_CLOSE, "address-budget", byAddress
            )
        elif byNetwork >= s.authFailuresPerNetwork:
            decision = AuthDecision(delay, True, False, AUTH_THROTTLED, "network-budget", byNetwork)
        elif byAccount >= s.authFailuresPerAccount:
            decision = AuthDecision(delay, True, False, AUTH_THROTTLED, "account-budget", byAccount)
        elif delay > 0:
            reason = "address-failures" if byAddress >= byAccount else "account-failures"
            decision = AuthDecision(delay, reason=reason, failures=failures)
        else:
            return AuthDecision()
        action = "disconnect" if decision.disconnect else "refuse" if decision.refuse else "delay"
        line = formatLogLine(
            address=who.address,
            network=who.network,
            login=login,
            failures=decision.failures,
            action=action,
            delay=decision.delay,
            reason=decision.reason,
        )
        if decision.refuse:
            self._log.warn("{logLine}", logLine=line)
        else:
            self._log.info("{logLine}", logLine=line)
        return attrs.evolve(decision, logLine=line)

    def begin(self, address: str, login: str | None, mechanism: str) -> AuthDecision:
        """
        Like L{check}; when the attempt may go on, it is counted as a
        failure now and the decision's ``attempt`` takes its outcome.
        """
        decision = self.check(address, login)
        if decision.refuse:
            return decision
        self.failed(address, login)
        return attrs.evolve(decision, attempt=AuthAttempt(self, address, login))

    def _refund(self, address: str, login: str | None) -> None:
        who, account, exempt, trusted = self._classify(address, login)
        if not exempt:
            self._addresses.add(who.key, -1.0)
            if not trusted:
                self._networks.add(who.networkKey, -1.0)
        if account is not None and not trusted:
            self._accounts.add(account, -1.0)

    def failed(self, address: str, login: str | None) -> None:
        """Count a failed AUTH attempt (bad credentials, unknown user alike)."""
        who, account, exempt, trusted = self._classify(address, login)
        if not exempt:
            self._addresses.add(who.key)
            if not trusted:
                self._networks.add(who.networkKey)
        if account is not None and not trusted:
            self._accounts.add(account)

    def succeeded(self, address: str, login: str | None) -> None:
        """
        Trust ``login`` from ``address`` for the trust period. Counts are
        kept: a success with one account must not buy guesses at others.
        """
        account = accountKey(login)
        if account is not None:
            self._trusted.add((client(address).key, account))

    def trackedKeys(self) -> int:
        """How many keys the throttle holds, over all its tables."""
        return len(self._addresses) + len(self._networks) + len(self._accounts) + len(self._trusted)
