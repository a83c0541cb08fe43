"""
The SCRAM-SHA-256 exchange (RFC 5802, RFC 7677) for SMTP AUTH, without
channel binding (``n,,`` and ``y,,``; ``p=`` is refused: mailgw does not
offer SCRAM-SHA-256-PLUS).

    C: n,,n=user,r=CNONCE
    (the exchange asks the backends for the user's keys: L{NeedKeys})
    S: r=CNONCE SNONCE,s=SALT,i=ITERATIONS
    C: c=biws,r=CNONCE SNONCE,p=PROOF
    (the portal checks the proof: L{ScramCredentials})
    S: v=SERVERSIGNATURE         (only once the login succeeded)
    C: (empty)
    S: 235

A user without keys, or unknown, meets decoy keys (the same salt at every
attempt) and fails exactly as a wrong password does, after the same work.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred

from mailgw.auth.scram import IScramCredentials, IScramKeys, ScramCredentials, ScramKeys, decoyKeys
from mailgw.server.sasl import Challenge, Done, SASLFailure

__all__ = ["NeedKeys", "ScramExchange", "lookupKeys"]

# Made once per process: decoy salts are stable for a name while it runs.
_DECOY_SECRET = os.urandom(32)


@attrs.define
class _IterationCounts:
    """
    The iteration counts of the real keys served so far, so that decoys
    carry the one most served: an unknown user's ``i=`` must not differ
    from a known one's (keys stored by Dovecot commonly have 4096, mailgw's
    own 10000). Bounded: a handful of distinct counts is what a site has.
    """

    counts: dict[int, int] = attrs.field(factory=dict)
    limit: int = 16

    def saw(self, iterations: int) -> None:
        if iterations in self.counts or len(self.counts) < self.limit:
            self.counts[iterations] = self.counts.get(iterations, 0) + 1

    def usual(self, default: int) -> int:
        if not self.counts:
            return default
        return max(self.counts.items(), key=lambda item: (item[1], item[0]))[0]


_SERVED = _IterationCounts()


@attrs.frozen
class NeedKeys:
    """The exchange waits for the keys of ``username``: call L{ScramExchange.keysFound}."""

    username: bytes


def _failure(reason: str, malformed: bool = False) -> SASLFailure:
    return SASLFailure(reason, malformed)


def _attributes(message: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not part[:1].isalpha():
            raise _failure("SCRAM attribute is not a=value", malformed=True)
        pairs.append((part[:1], part[2:]))
    return pairs


def _saslname(value: bytes) -> bytes:
    """RFC 5802 5.1: ``=2C`` is ``,``, ``=3D`` is ``=``, any other ``=`` is an error."""
    out = value.replace(b"=2C", b",").replace(b"=3D", b"=")
    if b"=" in value.replace(b"=2C", b"").replace(b"=3D", b""):
        raise _failure("bad escape in SCRAM user name", malformed=True)
    return out


def lookupKeys(portal: Portal, username: bytes) -> Deferred[tuple[ScramKeys, Any] | None]:
    """
    The keys of C{username} from the first checker, in the portal's order,
    that has some, with that checker; C{None} when none has any. A checker
    that fails (a backend down) fails the lookup: 454, as a login would.
    """
    registered = portal.checkers.get(IScramCredentials)  # type: ignore[call-overload]
    checkers = list(getattr(registered, "checkers", [registered] if registered else []))

    def tryNext(_: object, index: int) -> Deferred[tuple[ScramKeys, Any] | None]:
        if index == len(checkers):
            return defer.succeed(None)
        checker = checkers[index]
        if not IScramKeys.providedBy(checker):
            return tryNext(None, index + 1)
        d = defer.maybeDeferred(checker.scramKeys, username)

        def found(keys: ScramKeys | None) -> Any:
            return (keys, checker) if keys is not None else tryNext(None, index + 1)

        return d.addCallback(found)

    return tryNext(None, 0)


def _serverNonce() -> bytes:
    return base64.b64encode(secrets.token_bytes(18))


@attrs.define
class ScramExchange:
    """
    One SCRAM-SHA-256 exchange; see the module docstring for its steps.
    ``serverNonce`` makes the server's part of the nonce (a test vector's).
    """

    serverNonce: Callable[[], bytes] = _serverNonce
    _state: str = "first"
    _gs2Header: bytes = b""
    _clientFirstBare: bytes = b""
    _serverFirst: bytes = b""
    _nonce: bytes = b""
    _username: bytes = b""
    _keys: ScramKeys | None = None
    _source: Any = None
    credentials: ScramCredentials | None = None

    def start(self, initial: bytes | None) -> Challenge | NeedKeys | Done:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, response: bytes) -> NeedKeys | Done:
        if self._state == "first":
            return self._clientFirst(response)
        if self._state == "final":
            return self._clientFinal(response)
        raise _failure("SCRAM exchange out of order", malformed=True)

    def _clientFirst(self, message: bytes) -> NeedKeys:
        flag, comma, rest = message.partition(b",")
        if not comma:
            raise _failure("SCRAM client-first has no GS2 header", malformed=True)
        if flag.startswith(b"p="):
            raise _failure("SCRAM channel binding is not supported here (no -PLUS offered)")
        if flag not in (b"n", b"y"):
            raise _failure("SCRAM channel binding flag must be n, y or p=", malformed=True)
        authzid, comma, bare = rest.partition(b",")
        if not comma:
            raise _failure("SCRAM client-first has no GS2 header", malformed=True)
        attributes = _attributes(bare)
        if len(attributes) < 2 or attributes[0][0] != b"n" or attributes[1][0] != b"r":
            raise _failure("SCRAM client-first must start n=...,r=...", malformed=True)
        if any(name == b"m" for name, _ in attributes):
            raise _failure("SCRAM extension m= not supported", malformed=True)
        username, nonce = _saslname(attributes[0][1]), attributes[1][1]
        if not username or not nonce or any(c < 0x21 or c > 0x7E for c in nonce):
            raise _failure("SCRAM user name or nonce empty or unprintable", malformed=True)
        if authzid:
            if not authzid.startswith(b"a=") or _saslname(authzid[2:]) != username:
                raise _failure("authorization identity differs from authentication identity")
        self._gs2Header = flag + b"," + authzid + b","
        self._clientFirstBare = bare
        self._username = username
        self._nonce = nonce + self.serverNonce()
        self._state = "keys"
        return NeedKeys(username)

    def clientFirst(self) -> bytes:
        """The client-first message, whole (for a service that takes the exchange over)."""
        return self._gs2Header + self._clientFirstBare

    def keysFound(self, found: tuple[ScramKeys, Any] | None) -> Challenge:
        """The lookup's answer: send the server-first message."""
        assert self._state == "keys"
        # Made for every user, so that a known one costs what an unknown one does.
        decoy = decoyKeys(_DECOY_SECRET, self._username)
        if found is not None:
            _SERVED.saw(found[0].iterations)
        else:
            decoy = attrs.evolve(decoy, iterations=_SERVED.usual(decoy.iterations))
        self._keys, self._source = found if found is not None else (decoy, None)
        salt = base64.b64encode(self._keys.salt)
        self._serverFirst = b"r=%s,s=%s,i=%d" % (self._nonce, salt, self._keys.iterations)
        self._state = "final"
        return Challenge(self._serverFirst)

    def _clientFinal(self, message: bytes) -> Done:
        withoutProof, comma, proofPart = message.rpartition(b",")
        if not comma or not proofPart.startswith(b"p="):
            raise _failure("SCRAM client-final must end with p=", malformed=True)
        attributes = _attributes(withoutProof)
        if len(attributes) < 2 or attributes[0][0] != b"c" or attributes[1][0] != b"r":
            raise _failure("SCRAM client-final must start c=...,r=...", malformed=True)
        try:
            binding = base64.b64decode(attributes[0][1], validate=True)
            proof = base64.b64decode(proofPart[2:], validate=True)
        except (binascii.Error, ValueError):
            raise _failure("SCRAM client-final is not base64", malformed=True) from None
        if not secrets.compare_digest(binding, self._gs2Header):
            raise _failure("SCRAM channel binding differs from the GS2 header")
        if not secrets.compare_digest(attributes[1][1], self._nonce):
            raise _failure("SCRAM nonce differs from ours")
        assert self._keys is not None
        self._state = "done"
        self.credentials = ScramCredentials(
            self._username,
            self._keys,
            self._source,
            self._clientFirstBare + b"," + self._serverFirst + b"," + withoutProof,
            proof,
        )
        return Done(self.credentials)
