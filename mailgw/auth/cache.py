"""
A short-lived cache of verified passwords, so that a client that logs in for
every message (most do) pays for the argon2 hash once, not every time.

Like Dovecot's auth cache it lives in memory only, is bounded in size and
age, and is dropped when the users file changes. It never holds a password:
entries are keyed by an HMAC, under a key made at start-up, of the login, the
stored hash and the password. Only successes are cached, so every wrong
password still costs a full verification.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class VerifiedCache:
    """
    Remembers (login, stored hash, password) triples that verified, for
    ``maxAge`` seconds, at most ``maxEntries`` of them (the oldest go first).
    """

    def __init__(
        self,
        maxEntries: int = 10_000,
        maxAge: float = 600.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maxEntries = maxEntries
        self.maxAge = maxAge
        self._now = now
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def _digest(self, login: str, passwordHash: str, password: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (login.encode("utf-8"), passwordHash.encode("ascii"), password):
            # Length-prefixed, so no two different triples share a digest input.
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()

    def key(self, login: str, passwordHash: str, password: bytes) -> bytes:
        """An opaque key for the triple (no password in it)."""
        return self._digest(login, passwordHash, password)

    def __contains__(self, triple: tuple[str, str, bytes]) -> bool:
        digest = self._digest(*triple)
        expires = self._entries.get(digest)
        if expires is None:
            return False
        if expires <= self._now():
            del self._entries[digest]
            return False
        return True

    def add(self, login: str, passwordHash: str, password: bytes) -> None:
        digest = self._digest(login, passwordHash, password)
        self._entries.pop(digest, None)
        self._entries[digest] = self._now() + self.maxAge
        while len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class InFlight:
    """
    Identical requests under way share one answer: the first starts the
    work, the others wait for its result (a burst of logins with the same
    password, a client opening many connections at once, hashes once).
    """

    def __init__(self) -> None:
        self._waiting: dict[Hashable, list[Deferred[Any]]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def run(self, key: Hashable, start: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """``start()``'s result, or that of the one under way for ``key``."""
        waiting: Deferred[Any] = Deferred()
        if key in self._waiting:
            self._waiting[key].append(waiting)
            return waiting
        self._waiting[key] = [waiting]

        def done(result: object) -> None:
            for d in self._waiting.pop(key, []):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        start().addBoth(done)
        return waiting
