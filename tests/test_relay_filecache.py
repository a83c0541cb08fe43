"""
Tests for L{mailgw.relay.filecache} and the relay's use of it: client TLS
contexts and relay passwords are built once, off the reactor thread, and
again only when their file changes (issue 13, "Nothing blocking on the
reactor thread").
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import RelayConfig, Route, Smarthost, TLSMode
from mailgw.relay.filecache import FileCache, runInline
from mailgw.relay.relay import Relay
from mailgw.relay.routing import StaticResolver
from tests.test_relay import PendingEndpoint, makeMessage, openBody
from tests.upstream import makeTLSFiles


class Recording:
    """A runBlocking that runs inline and records what it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        self.ran.append(getattr(f, "__name__", repr(f)))
        return runInline(f, *args)


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class FileCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        write(self.path, b"one")
        self.runner = Recording()
        self.cache: FileCache[bytes] = FileCache(self.runner, size=2)

    def get(self, key: str = "k", path: str | None = None) -> bytes:
        path = path or self.path

        def build() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return self.successResultOf(self.cache.get(key, path, build))

    def test_builtOnceWhileUnchanged(self) -> None:
        self.assertEqual([self.get(), self.get(), self.get()], [b"one"] * 3)
        self.assertEqual(self.cache.builds, 1)
        # The stat and the build both ran through runBlocking, every time.
        self.assertEqual(self.runner.ran, ["_refresh"] * 3)

    def test_rebuiltWhenContentChanges(self) -> None:
        self.get()
        write(self.path, b"three")
        self.assertEqual(self.get(), b"three")
        self.assertEqual(self.cache.builds, 2)

    def test_rebuiltWhenOnlyMtimeChanges(self) -> None:
        """Same size, new modification time: built again."""
        self.get()
        write(self.path, b"two")
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        self.assertEqual(self.get(), b"two")
        self.assertEqual(self.cache.builds, 2)

    def test_rebuiltWhenReplaced(self) -> None:
        """A new file renamed over the old one (same size and mtime): built again."""
        self.get()
        st = os.stat(self.path)
        other = self.path + ".new"
        write(other, b"owt")
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(other, self.path)
        self.assertEqual(self.get(), b"owt")
        self.assertEqual(self.cache.builds, 2)

    def test_missingFileNeverCached(self) -> None:
        """The error comes from build, every time; nothing is kept."""
        missing = self.path + ".missing"
        for _ in range(2):
            d = self.cache.get("m", missing, lambda: open(missing, "rb").read())
            self.failureResultOf(d, FileNotFoundError)
        self.assertEqual((self.cache.builds, len(self.cache)), (0, 0))

    def test_leastRecentlyUsedGoesFirst(self) -> None:
        self.get("a")
        self.get("b")
        self.get("a")
        self.get("c")  # size 2: "b" goes
        self.assertEqual(self.cache.builds, 3)
        self.get("a")
        self.assertEqual(self.cache.builds, 3)
        self.get("b")
        self.assertEqual(self.cache.builds, 4)


class RelayCacheTests(SynchronousTestCase):
    """The relay builds TLS contexts and reads passwords through the cache."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.endpoints: list[PendingEndpoint] = []
        self.runner = Recording()

    def makeRelay(self, route: Route) -> Relay:
        def endpointFactory(destination: Any, timeout: float) -> PendingEndpoint:
            endpoint = PendingEndpoint(destination.host)
            self.endpoints.append(endpoint)
            return endpoint

        return Relay(
            Clock(),
            RelayConfig(default=route),
            StaticResolver(),
            "gw.example.com",
            openBody,
            endpointFactory=endpointFactory,
            runBlocking=self.runner,
        )

    def attempt(self, relay: Relay) -> None:
        d = relay.deliver(makeMessage())
        while not d.called:
            [e for e in self.endpoints if not e.attempt.called][0].refuse()
        self.successResultOf(d)

    def test_tlsContextCachedUntilCAFileChanges(self) -> None:
        files = makeTLSFiles(os.path.join(self.base, "a"))
        route = Route(
            smarthosts=(Smarthost("localhost", 25), Smarthost("127.0.0.1", 25)),
            tls=TLSMode.STARTTLS,
            caFile=files.certificate,
        )
        relay = self.makeRelay(route)
        self.attempt(relay)
        self.assertEqual(relay.tlsCreators.builds, 2)  # one per host name
        self.attempt(relay)
        self.attempt(relay)
        self.assertEqual(relay.tlsCreators.builds, 2)
        self.assertIn("_refresh", self.runner.ran)
        # A renewed CA file (another certificate): both rebuilt.
        other = makeTLSFiles(os.path.join(self.base, "b"))
        os.rename(other.certificate, files.certificate)
        self.attempt(relay)
        self.assertEqual(relay.tlsCreators.builds, 4)

    def test_systemTrustCached(self) -> None:
        """Without a CA file, the context on the system store is kept too."""
        route = Route(smarthosts=(Smarthost("a.test", 25),), tls=TLSMode.STARTTLS)
        relay = self.makeRelay(route)
        self.attempt(relay)
        self.attempt(relay)
        self.assertEqual(relay.tlsCreators.builds, 1)

    def test_passwordReadOnceUntilChanged(self) -> None:
        os.makedirs(self.base)
        path = os.path.join(self.base, "password")
        write(path, b"first\n")
        route = Route(
            smarthosts=(Smarthost("a.test", 25),),
            tls=TLSMode.NONE,
            authUser="relay",
            authPasswordFile=path,
        )
        relay = self.makeRelay(route)

        def password() -> str:
            auth = self.successResultOf(Deferred.fromCoroutine(relay._auth(route)))
            return auth[1]  # type: ignore[no-any-return,index]

        self.assertEqual([password(), password()], ["first", "first"])
        self.assertEqual(relay.secrets.builds, 1)
        self.assertNotIn("first", repr(relay.secrets))
        write(path, b"second-longer\n")
        self.assertEqual(password(), "second-longer")
        self.assertEqual(relay.secrets.builds, 2)
        self.attempt(relay)
        self.assertEqual(relay.secrets.builds, 2)
