"""
The defence against password guessing: failure budgets per client address,
per network and per account, delays that grow with the failures, caps on the
verifications in flight, and trust for the address a user last logged in
from.

An attempt is counted as a failure when it starts (L{AuthThrottle.begin}),
so a burst of parallel guesses meets the budgets as a sequence of guesses
would; its outcome then refunds it or lets it stand (L{AuthAttempt}).

The throttle never learns whether a login exists, so guessing at unknown
users costs an attacker exactly what guessing at real ones does.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.auth.mechanisms import MechanismUnavailable
from mailgw.config import LimitsConfig
from mailgw.limits._counters import (
    DEFAULT_MAX_KEYS,
    Client,
    Contributions,
    ExpiringKeys,
    client,
)
from mailgw.limits.authlog import LOGIN_LIMIT, accountKey, formatLogLine
from mailgw.limits.shared import SyncedCounters, makeTable
from mailgw.replies import AUTH_BUSY, AUTH_THROTTLED, AUTH_THROTTLED_CLOSE, SMTPReply

__all__ = [
    "LOGIN_LIMIT",
    "AuthAttempt",
    "AuthDecision",
    "AuthThrottle",
    "accountKey",
    "formatLogLine",
]

# What one attempt added to the (address, network, account) tables.
Amounts = tuple[float, float, float]
_NOTHING: Amounts = (0.0, 0.0, 0.0)


@attrs.frozen
class AuthDecision:
    """
    What to do with one AUTH attempt. Wait ``delay`` seconds before the
    answer; when ``refuse`` is set, answer ``reply`` without checking any
    credentials (454, transient), and when ``disconnect`` is also set,
    answer ``reply`` (421) and close the connection. ``reason`` names the
    budget, counter or cap that decided (``address-budget``,
    ``network-budget``, ``account-budget``, ``address-failures``,
    ``account-failures``, ``address-concurrency``, ``account-concurrency``,
    ``total-concurrency``; empty when nothing did), ``failures`` is that
    counter's count (for a cap: the verifications in flight), and
    ``logLine`` the line the throttle logged (empty when it logged none).

    ``attempt`` is set by L{AuthThrottle.begin} when the attempt may go
    ahead: the attempt, already counted, whose outcome must be reported.
    """

    delay: float = 0.0
    refuse: bool = False
    disconnect: bool = False
    reply: SMTPReply | None = None
    reason: str = ""
    failures: int = 0
    logLine: str = ""
    attempt: AuthAttempt | None = attrs.field(default=None, eq=False)


@attrs.frozen
class _Subject:
    """Who attempts: the client, the account key, and how the throttle sees them."""

    who: Client
    account: str | None
    exempt: bool
    trusted: bool

    @property
    def pair(self) -> tuple[Hashable, str] | None:
        return None if self.account is None else (self.who.key, self.account)


class AuthAttempt:
    """
    One AUTH attempt that L{AuthThrottle.begin} let through: counted as a
    failure already, and holding a verification slot. Report its outcome
    with exactly one of the methods below; the first call wins, later ones
    do nothing.
    """

    def __init__(
        self,
        throttle: AuthThrottle,
        subject: _Subject,
        login: str | None,
        mechanism: str,
        amounts: Amounts,
        shared: tuple[Hashable, bytes] | None = None,
        holdsSlot: bool = True,
    ) -> None:
        self._throttle = throttle
        self._subject = subject
        self.login = login
        self.mechanism = mechanism
        self._amounts = amounts
        self._shared = shared
        self._holdsSlot = holdsSlot
        #: None while pending, then the name of the method that ended it.
        self.outcome: str | None = None

    def __repr__(self) -> str:
        return f"<AuthAttempt {self._subject.who.address} {self.mechanism} {self.outcome}>"

    def _end(self, outcome: str) -> bool:
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self._throttle._release(self._subject, self._shared, self._holdsSlot)
        return True

    def succeeded(self) -> None:
        """
        The login is right: refund this attempt, forget the failures of this
        login from this address (in the address's, network's and account's
        counts), and trust the login at this address.
        """
        if self._end("succeeded"):
            self._throttle._refund(self._subject, self._amounts)
            self._throttle._forgive(self._subject)
            self._throttle._trust(self._subject)

    def failed(self) -> None:
        """Wrong credentials (or an unknown login): the failure stands."""
        self._end("failed")

    def notApplicable(self) -> None:
        """
        The backend cannot serve this mechanism for this login
        (L{mailgw.auth.MechanismUnavailable}): nothing was guessed, refund.
        """
        if self._end("notApplicable"):
            self._throttle._refund(self._subject, self._amounts)

    def unavailable(self) -> None:
        """The backend could not tell (an error, 454): refund."""
        if self._end("unavailable"):
            self._throttle._refund(self._subject, self._amounts)

    def abandoned(self) -> None:
        """
        The connection went away before the answer: the failure stands (the
        verification ran, or would have), so hanging up buys nothing.
        """
        self._end("abandoned")

    def settle(self, result: object) -> str:
        """
        Report the outcome that ``result`` of C{Portal.login} shows, and
        return its name: a L{Failure} of L{MechanismUnavailable} is
        C{notApplicable}; of L{UnauthorizedLogin} or L{UnhandledCredentials},
        C{failed}; of anything else (a backend error), C{unavailable}; any
        other result, C{succeeded}. The one place where a login's result
        becomes an outcome.
        """
        if not isinstance(result, Failure):
            self.succeeded()
            return "succeeded"
        if result.check(MechanismUnavailable):
            self.notApplicable()
            return "notApplicable"
        if result.check(UnauthorizedLogin, UnhandledCredentials):
            self.failed()
            return "failed"
        self.unavailable()
        return "unavailable"


class AuthThrottle:
    """
    Failure budgets over a sliding window of ``settings.authFailureWindow``
    seconds, per client address (an IPv6 client is its /64), per network
    (IPv4 /24, IPv6 /56) and per account (the login as given, case-folded);
    and caps on the attempts in flight per address
    (``settings.authConcurrentPerAddress``), per account
    (``settings.authConcurrentPerAccount``) and in total
    (``settings.authConcurrentTotal``).

    Call L{begin} before each AUTH attempt; when it lets the attempt go
    ahead, report the outcome on its L{AuthAttempt}. A login that succeeds
    from an address is trusted there for ``settings.authTrustPeriod``:
    attempts for it from that address are exempt from the network and
    account budgets and from the concurrency caps (its failures there count
    against its address only, and its attempts in flight do not count
    against itself until they fail), so spraying an account from elsewhere
    cannot lock its user out. The address budget applies to every attempt.
    Addresses in ``settings.exempt`` (a webmail front end) are exempt from
    the address and network budgets and the per-address cap; the account
    budget and the delays it causes still apply to them, and their failures
    still count against the account.

    A success forgets the failures of that login from that address, and
    only those: a client that tried a mechanism or a stale password first
    is not slowed down, while a success with one account buys no guesses
    at others.

    The delay before each answer grows with the failures counted against
    the client address or the account, whichever is more: none for the
    first ``settings.authFreeFailures``, then ``settings.authDelay``
    doubling up to ``settings.authDelayMax``.

    Each table keeps at most ``maxKeys`` keys. Decisions that delay, refuse
    or disconnect are logged through ``log`` (see L{formatLogLine}).

    With ``shared`` the three failure budgets are counted across the site
    (tables ``auth-address``, ``auth-network``, ``auth-account``; see
    L{mailgw.limits.shared}); trust, the caps on attempts in flight and
    what each pair added stay in this process.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: LimitsConfig,
        maxKeys: int = DEFAULT_MAX_KEYS,
        log: Logger | None = None,
        shared: SyncedCounters | None = None,
    ) -> None:
        self._settings = settings
        window = settings.authFailureWindow
        s = settings
        self._addresses = makeTable(
            clock, shared, "auth-address", s.authFailuresPerAddress, window, maxKeys
        )
        self._networks = makeTable(
            clock, shared, "auth-network", s.authFailuresPerNetwork, window, maxKeys
        )
        self._accounts = makeTable(
            clock, shared, "auth-account", s.authFailuresPerAccount, window, maxKeys
        )
        # What each (address, account) pair added to the three tables above.
        self._pairs = Contributions(
            clock, (self._addresses, self._networks, self._accounts), maxKeys
        )
        self._trusted = ExpiringKeys(clock, settings.authTrustPeriod, maxKeys)
        # Attempts in flight: at most authConcurrentTotal (plus trusted
        # ones) keys in each table.
        self._busyAddresses: dict[Hashable, int] = {}
        self._busyAccounts: dict[Hashable, int] = {}
        # Attempts begun by trusted (address, account) pairs.
        self._busyTrusted: dict[Hashable, int] = {}
        self._busyTotal = 0
        # (account, fingerprint) of identical attempts in flight: they share one slot.
        self._shared: dict[Hashable, int] = {}
        self._log = log if log is not None else Logger(namespace=__name__)
        #: L{mailgw.metrics.Metrics}, or None: metrics are off.
        self.metrics: Any = None

    def _classify(self, address: str, login: str | None) -> _Subject:
        who = client(address)
        account = accountKey(login)
        exempt = who.within(self._settings.exempt)
        trusted = account is not None and (who.key, account) in self._trusted
        return _Subject(who, account, exempt, trusted)

    def prefetch(self, address: str) -> None:
        """
        A connection from ``address`` has opened: with shared counts, ask
        for its address's and network's failures now, in the background, so
        that its AUTH sees the site's count; nothing otherwise.
        """
        who = client(address)
        self._addresses.prefetch(who.key)
        self._networks.prefetch(who.networkKey)

    def delayFor(self, failures: int) -> float:
        """The delay after ``failures`` failures: none for the free ones, then doubling."""
        s = self._settings
        extra = failures - s.authFreeFailures
        if extra < 0:
            return 0.0
        return float(min(s.authDelay * 2.0 ** min(extra, 64), s.authDelayMax))

    def _budgets(self, subject: _Subject) -> AuthDecision:
        """The decision of the failure budgets and delays, not logged."""
        s = self._settings
        who, account = subject.who, subject.account
        exempt, trusted = subject.exempt, subject.trusted
        byAddress = 0 if exempt else self._addresses.count(who.key)
        if trusted:
            # A known user's own attempts in flight (a relay client's burst
            # of sessions while its password is being verified) do not
            # count against it: they are likely right, and are counted once
            # they have failed. The connection limits bound how many there
            # can be.
            byAddress = max(0, byAddress - self._busyTrusted.get(subject.pair, 0))
        byNetwork = 0 if exempt or trusted else self._networks.count(who.networkKey)
        byAccount = 0 if account is None or trusted else self._accounts.count(account)
        failures = max(byAddress, byAccount)
        delay = self.delayFor(failures)
        if byAddress >= s.authFailuresPerAddress:
            # Dropping the connection costs the client a new connection,
            # which the connection limits count; no delay holds it open.
            return AuthDecision(0.0, True, True, AUTH_THROTTLED_CLOSE, "address-budget", byAddress)
        if byNetwork >= s.authFailuresPerNetwork:
            return AuthDecision(delay, True, False, AUTH_THROTTLED, "network-budget", byNetwork)
        if byAccount >= s.authFailuresPerAccount:
            return AuthDecision(delay, True, False, AUTH_THROTTLED, "account-budget", byAccount)
        if delay > 0:
            reason = "address-failures" if byAddress >= byAccount else "account-failures"
            return AuthDecision(delay, reason=reason, failures=failures)
        return AuthDecision()

    def _concurrency(self, subject: _Subject, delay: float) -> AuthDecision | None:
        """A refusal when a cap on the attempts in flight is reached, else None."""
        if subject.trusted:
            return None
        s = self._settings
        # The narrowest cause first: it is the one worth logging.
        busy: list[tuple[int, int, str]] = []
        if not subject.exempt:
            inFlight = self._busyAddresses.get(subject.who.key, 0)
            busy.append((inFlight, s.authConcurrentPerAddress, "address-concurrency"))
        if subject.account is not None:
            inFlight = self._busyAccounts.get(subject.account, 0)
            busy.append((inFlight, s.authConcurrentPerAccount, "account-concurrency"))
        busy.append((self._busyTotal, s.authConcurrentTotal, "total-concurrency"))
        for inFlight, cap, reason in busy:
            if inFlight >= cap:
                return AuthDecision(delay, True, False, AUTH_BUSY, reason, inFlight)
        return None

    def _logged(self, decision: AuthDecision, subject: _Subject, login: str | None) -> AuthDecision:
        """``decision``, logged when it delays, refuses or disconnects."""
        if not decision.reason:
            return decision
        action = "disconnect" if decision.disconnect else "refuse" if decision.refuse else "delay"
        if self.metrics is not None:
            self.metrics.throttleDecision(decision.reason, action)
        line = formatLogLine(
            address=subject.who.address,
            network=subject.who.network,
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

    def begin(
        self,
        address: str,
        login: str | None,
        mechanism: str,
        fingerprint: bytes | None = None,
    ) -> AuthDecision:
        """
        The decision for an AUTH attempt by ``login`` (None: not known)
        from ``address`` with ``mechanism``. Unless it refuses, the attempt
        is counted as a failure at once and holds a slot in flight:
        ``decision.attempt`` is the L{AuthAttempt} whose outcome the caller
        must report, exactly once, whatever happens to the connection.

        ``fingerprint`` (a keyed digest of the login and its secret, or
        None) lets identical attempts under way share one slot: the
        backends verify identical logins in flight once (a relay client
        opening 20 sessions at once with a cold cache costs one password
        check), so they count once against the caps on verifications in
        flight, and once against the failure budgets: they are one guess,
        whatever its outcome, so a relay client's burst of first logins is
        not delayed by its own attempts, and an attacker repeating a guess
        in parallel gains nothing. An identical attempt begun after the
        others ended counts again.
        """
        subject = self._classify(address, login)
        decision = self._budgets(subject)
        shared = None
        if fingerprint is not None and subject.account is not None:
            shared = (subject.account, fingerprint)
        joins = shared is not None and self._shared.get(shared, 0) > 0
        if not decision.refuse and not joins:
            busy = self._concurrency(subject, decision.delay)
            if busy is not None:
                decision = busy
        if not decision.refuse:
            amounts = _NOTHING if joins else self._count(subject)
            if not joins:
                self._hold(subject)
            if shared is not None:
                self._shared[shared] = self._shared.get(shared, 0) + 1
            attempt = AuthAttempt(
                self, subject, login, mechanism, amounts, shared, holdsSlot=not joins
            )
            decision = attrs.evolve(decision, attempt=attempt)
        return self._logged(decision, subject, login)

    # -- bookkeeping, for AuthAttempt -----------------------------------

    def _count(self, subject: _Subject) -> Amounts:
        who = subject.who
        amounts: Amounts = (
            0.0 if subject.exempt else 1.0,
            0.0 if subject.exempt or subject.trusted else 1.0,
            0.0 if subject.account is None or subject.trusted else 1.0,
        )
        if amounts[0]:
            self._addresses.add(who.key)
        if amounts[1]:
            self._networks.add(who.networkKey)
        if subject.account is not None and amounts[2]:
            self._accounts.add(subject.account)
        pair = subject.pair
        if pair is not None and amounts != _NOTHING:
            self._pairs.add(pair, amounts)
        return amounts

    def _takeBack(self, subject: _Subject, amounts: tuple[float, ...]) -> None:
        byAddress, byNetwork, byAccount = amounts
        self._addresses.remove(subject.who.key, byAddress)
        self._networks.remove(subject.who.networkKey, byNetwork)
        if subject.account is not None:
            self._accounts.remove(subject.account, byAccount)

    def _refund(self, subject: _Subject, amounts: Amounts) -> None:
        self._takeBack(subject, amounts)
        pair = subject.pair
        if pair is not None:
            self._pairs.subtract(pair, amounts)

    def _forgive(self, subject: _Subject) -> None:
        """Take back every failure this login has counted from this address."""
        pair = subject.pair
        if pair is not None:
            self._takeBack(subject, self._pairs.take(pair))

    def _trust(self, subject: _Subject) -> None:
        pair = subject.pair
        if pair is not None:
            self._trusted.add(pair)

    def _hold(self, subject: _Subject) -> None:
        self._busyTotal += 1
        key = subject.who.key
        self._busyAddresses[key] = self._busyAddresses.get(key, 0) + 1
        if subject.account is not None:
            self._busyAccounts[subject.account] = self._busyAccounts.get(subject.account, 0) + 1
        if subject.trusted:
            self._busyTrusted[subject.pair] = self._busyTrusted.get(subject.pair, 0) + 1

    def _release(
        self,
        subject: _Subject,
        shared: tuple[Hashable, bytes] | None = None,
        holdsSlot: bool = True,
    ) -> None:
        if shared is not None:
            _decrement(self._shared, shared)
        if not holdsSlot:
            return
        self._busyTotal = max(0, self._busyTotal - 1)
        _decrement(self._busyAddresses, subject.who.key)
        if subject.account is not None:
            _decrement(self._busyAccounts, subject.account)
        if subject.trusted:
            _decrement(self._busyTrusted, subject.pair)

    @property
    def inFlight(self) -> int:
        """How many attempts are in flight (begun, outcome not reported yet)."""
        return self._busyTotal

    # -- the interface before begin(), kept until the server uses begin() --

    def check(self, address: str, login: str | None) -> AuthDecision:
        """
        The decision of the budgets for an AUTH attempt by ``login`` from
        ``address``, logged; changes no count and takes no slot.
        Superseded by L{begin}.
        """
        subject = self._classify(address, login)
        return self._logged(self._budgets(subject), subject, login)

    def failed(self, address: str, login: str | None) -> None:
        """Count a failed AUTH attempt (bad credentials, unknown user alike)."""
        self._count(self._classify(address, login))

    def succeeded(self, address: str, login: str | None) -> None:
        """
        Forget the failures of ``login`` from ``address`` and trust it
        there for the trust period. Other logins' counts are kept: a
        success with one account must not buy guesses at others.
        """
        subject = self._classify(address, login)
        self._forgive(subject)
        self._trust(subject)

    def trackedKeys(self) -> int:
        """How many keys the throttle holds, over all its tables."""
        return (
            len(self._addresses)
            + len(self._networks)
            + len(self._accounts)
            + len(self._pairs)
            + len(self._trusted)
        )


def _decrement(table: dict[Hashable, int], key: Hashable) -> None:
    count = table.get(key, 0)
    if count <= 1:
        table.pop(key, None)
    else:
        table[key] = count - 1
