"""
The shared-limits keys of ``[limits]`` (mailgw/sharedconfig.py) and the
counts the gateway builds from them (mailgw/limits/backend.py), without a
Redis: tests/integration/test_redis_limits.py has the real one.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw._configparse import ConfigError
from mailgw.auth.passwd import addUser
from mailgw.cli.app import main
from mailgw.config import LimitsConfig, configFromDict
from mailgw.limits.backend import makeSharedCounters
from mailgw.sharedconfig import RedisAddress, parseBackend
from mailgw.tls import makeSelfSigned


class ParseBackendTests(SynchronousTestCase):
    def test_urls(self) -> None:
        self.assertEqual(parseBackend("redis://10.0.2.20"), RedisAddress("10.0.2.20", 6379, "", 0))
        self.assertEqual(
            parseBackend("redis://redis.example:6380/3"), RedisAddress("redis.example", 6380, "", 3)
        )
        self.assertEqual(parseBackend("redis://[::1]:7000/"), RedisAddress("::1", 7000, "", 0))
        self.assertEqual(
            parseBackend("unix:///run/redis/redis.sock?db=2"),
            RedisAddress("", 6379, "/run/redis/redis.sock", 2),
        )
        self.assertEqual(parseBackend("unix:///run/r.sock").path, "/run/r.sock")

    def test_describeHasNoSecret(self) -> None:
        self.assertEqual(parseBackend("redis://h:1/2").describe(), "redis://h:1/2")
        self.assertEqual(parseBackend("unix:///r.sock?db=1").describe(), "unix:///r.sock?db=1")

    def test_configErrorsNameTheKey(self) -> None:
        for key, value, words in [
            ("backend", "redis://:pw@h/0", "password_file"),
            ("backend", "rediss://h/0", "redis:// or unix://"),
            ("namespace", "a b", "letters"),
            ("backend_password_file", "/x", "only used with a backend"),
        ]:
            e = self.assertRaises(ConfigError, configFromDict, {"limits": {key: value}}, "f.toml")
            self.assertEqual((e.source, e.key), ("f.toml", f"limits.{key}"))
            self.assertIn(words, e.problem)
            self.assertNotIn(":pw@", str(e))

    def test_defaults(self) -> None:
        limits = configFromDict({}, "f.toml").limits
        self.assertEqual(
            (limits.backend, limits.namespace, limits.backendSyncInterval),
            ("", "mailgw", 0.05),
        )
        self.assertEqual((limits.backendStaleness, limits.backendTimeout), (1.0, 2.0))


class MakeSharedCountersTests(SynchronousTestCase):
    def test_noBackend(self) -> None:
        self.assertIsNone(makeSharedCounters(LimitsConfig(), "f.toml", Clock()))

    def test_built(self) -> None:
        limits = attrs.evolve(
            LimitsConfig(),
            backend="redis://127.0.0.1:1/4",
            backendSyncInterval=0.2,
            backendStaleness=3.0,
            backendTimeout=0.5,
            backendRetry=7.0,
        )
        counters = makeSharedCounters(limits, "f.toml", Clock())
        assert counters is not None
        self.assertEqual(
            (counters.interval, counters.staleness, counters.timeout, counters.retry),
            (0.2, 3.0, 0.5, 7.0),
        )
        self.assertEqual(counters.description, "Redis redis://127.0.0.1:1/4")
        self.assertFalse(counters.up)  # nothing reached until started

    def test_passwordFileMissing(self) -> None:
        limits = attrs.evolve(
            LimitsConfig(), backend="redis://127.0.0.1/0", backendPasswordFile=self.mktemp()
        )
        e = self.assertRaises(ConfigError, makeSharedCounters, limits, "f.toml", Clock())
        self.assertEqual(e.key, "limits.backend_password_file")

    def test_redisPackageMissing(self) -> None:
        saved = sys.modules.get("redis")
        sys.modules["redis"] = None  # type: ignore[assignment]  # import redis: ImportError
        if saved is None:
            self.addCleanup(sys.modules.pop, "redis", None)
        else:
            self.addCleanup(sys.modules.__setitem__, "redis", saved)
        limits = attrs.evolve(LimitsConfig(), backend="redis://127.0.0.1/0")
        e = self.assertRaises(ConfigError, makeSharedCounters, limits, "f.toml", Clock())
        self.assertEqual(e.key, "limits.backend")
        self.assertIn("mailgw[redis]", e.problem)


class CheckConfigTests(SynchronousTestCase):
    def test_passwordFileChecked(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        makeSelfSigned(str(base / "c.pem"), str(base / "k.pem"), "localhost")
        addUser(str(base / "passwd"), "a@b.c", "pw")
        secret = base / "redis.password"
        secret.write_text("s3cret\n")
        os.chmod(secret, 0o644)
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["tcp:port=0:interface=127.0.0.1"]
[spool]
directory = "{base}/spool"
[tls]
certificate = "{base}/c.pem"
key = "{base}/k.pem"
[auth]
backends = ["passwd:{base}/passwd"]
[limits]
backend = "redis://127.0.0.1:1/0"
backend_password_file = "{secret}"
"""
        )
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["check-config", "--config", str(config)])
        self.assertEqual(code, 1)
        self.assertIn("limits.backend_password_file", err.getvalue())
        self.assertIn("must not be readable by others", err.getvalue())
        self.assertNotIn("s3cret", out.getvalue() + err.getvalue())
        os.chmod(secret, 0o600)
        out.truncate(0)
        err.truncate(0)
        self.assertEqual(main(["check-config", "--config", str(config)]), 0, err.getvalue())
