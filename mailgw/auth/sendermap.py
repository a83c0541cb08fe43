"""
The sender login map read from an auth backend's own source (the
C{sender_login_maps = "sql:FILE"} or C{"ldap:FILE"} of
L{mailgw.policy.senders.SenderLoginPolicy}), so that a site keeps the
addresses each login may use where it keeps the logins.

Answers are cached briefly (a minute by default) per login, and identical
lookups under way are shared; lookups run in the backend's threads, never
on the reactor thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.policy.senders import Grant, _parseEntry

__all__ = ["CachedSenderSource", "openSenderSource"]

Lookup = Callable[[str], defer.Deferred[list[str]]]


@attrs.define
class CachedSenderSource:
    """
    The L{Grant} of each login, from ``lookup(login) -> Deferred[list of
    entries]`` (addresses, C{@domain}, C{*}, as in a map file), remembered
    for ``maxAge`` seconds of ``clock`` (at most ``maxEntries`` logins).
    Entries that are not valid are logged and skipped; a lookup that fails
    fails the Deferred (and is not cached).
    """

    lookup: Lookup
    clock: Any
    name: str = "sender source"
    maxAge: float = 60.0
    maxEntries: int = 10_000
    _entries: OrderedDict[str, tuple[float, Grant]] = attrs.field(init=False, factory=OrderedDict)
    _inflight: dict[str, list[defer.Deferred[Grant]]] = attrs.field(init=False, factory=dict)
    log = Logger()

    def grant(self, login: str) -> defer.Deferred[Grant]:
        """What ``login`` may use, as the source lists it."""
        hit = self._entries.get(login)
        if hit is not None:
            if hit[0] > self.clock.seconds():
                return defer.succeed(hit[1])
            del self._entries[login]
        waiting: defer.Deferred[Grant] = defer.Deferred()
        if login in self._inflight:
            self._inflight[login].append(waiting)
            return waiting
        self._inflight[login] = [waiting]

        def done(result: Grant | Failure) -> None:
            if not isinstance(result, Failure):
                self._entries[login] = (self.clock.seconds() + self.maxAge, result)
                while len(self._entries) > self.maxEntries:
                    self._entries.popitem(last=False)
            for d in self._inflight.pop(login, []):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        d = defer.maybeDeferred(self.lookup, login)
        d.addCallback(self._parse, login).addBoth(done)
        return waiting

    def _parse(self, entries: list[str], login: str) -> Grant:
        grant = Grant()
        for entry in entries:
            entry = entry.strip()
            try:
                if not entry:
                    raise ValueError("empty entry")
                grant = grant.merge(_parseEntry(entry))
            except ValueError as e:
                self.log.warn(
                    "{source}: entry for {login!r} skipped: {problem}",
                    source=self.name,
                    login=login,
                    problem=str(e),
                )
        return grant

    def clear(self) -> None:
        self._entries.clear()


@attrs.frozen
class _Unopened:
    """A source whose settings were only checked (no reactor): every lookup fails."""

    spec: str

    def grant(self, login: str) -> defer.Deferred[Grant]:
        return defer.fail(RuntimeError(f"{self.spec}: opened without a reactor"))


@attrs.frozen
class _OpenSenders:
    """
    ``senders(login)`` of the backend's open database or directory, looked
    up at each call: a reload that retired the checkers of an older version
    of the settings file closed that one's pool, and the next call opens
    the current one.
    """

    current: Callable[[], Any]

    def __call__(self, login: str) -> defer.Deferred[list[str]]:
        return self.current().senders(login)  # type: ignore[no-any-return]


def openSenderSource(spec: str, reactor: Any) -> CachedSenderSource | _Unopened:
    """
    The source ``spec`` names: C{sql:FILE} (the C{senders_query} of an
    C{sql:} settings file) or C{ldap:FILE} (the C{senders_*} settings of an
    C{ldap:} settings file). ``reactor`` runs the lookups' threads and the
    cache's clock; with C{None} the settings are only checked (as
    C{mailgw check-config} does), and every lookup of the source returned
    fails.

    @raise ValueError: unknown kind, no reactor, or the file cannot be used
        (the message names the file and key).
    """
    kind, _, path = spec.partition(":")
    if not path:
        raise ValueError(f"{spec}: name the backend settings file: {kind}:FILE")
    if kind == "sql":
        from mailgw.auth.sql import loadSQLSettings, sharedDatabase

        settings = loadSQLSettings(path)
        if not settings.sendersQuery:
            raise ValueError(f"{path}: senders_query: must be set to read sender maps from it")
        if reactor is None:
            return _Unopened(spec)
        return CachedSenderSource(
            _OpenSenders(lambda: sharedDatabase(settings, reactor)), reactor, name=spec
        )
    if kind == "ldap":
        from mailgw.auth.ldap import loadLDAPSettings, sharedDirectory

        ldapSettings = loadLDAPSettings(path)
        if not ldapSettings.sendersAttributes:
            raise ValueError(f"{path}: senders_attributes: must be set to read sender maps from it")
        if reactor is None:
            return _Unopened(spec)
        return CachedSenderSource(
            _OpenSenders(lambda: sharedDirectory(ldapSettings, reactor)), reactor, name=spec
        )
    raise ValueError(f"{spec}: unknown sender map source {kind!r}: sql:FILE or ldap:FILE")
