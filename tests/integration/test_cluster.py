"""
The cluster of docs/cluster.md, for real: two gateways (embedded
GatewayService, each with its own spool, one shared passwd file) behind a
real ``haproxy`` (``mode tcp``, ``send-proxy-v2``, health checks on
``/healthz``) sharing their limits on one real ``redis-server``.

A password spray spread over both nodes is throttled as one; a user's
quota holds across nodes; the logs name the real client addresses (from
the PROXY v2 header); with Redis stopped the nodes count locally without
refusing a legitimate user, and share again once it is back.

Clients bind to different loopback addresses (127.0.0.0/8 is all
loopback) to stand for different clients; HAProxy reaches the nodes from
127.0.0.1, so a node that did not read the PROXY header would log that.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from mailgw.auth.passwd import addUser
from mailgw.config import configFromDict
from mailgw.limits import client
from mailgw.limits.shared import keyText
from mailgw.service import GatewayService
from tests.integration.redisserver import RedisServer
from tests.integration.support import (
    PASSWORD,
    USER,
    clientContext,
    freePort,
    makeFixtures,
    shortDirectory,
    stopProcess,
)

BOB = "bob@example.com"
BUDGET = 6  # auth_failures_per_address
QUOTA = 3  # messages_per_user
NAMESPACE = "cluster-test"


def haproxyPath() -> str:
    path = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if path is None:
        raise SkipTest("haproxy is not installed (Debian package haproxy)")
    return path


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


def dialog(port: int, source: str, cafile: str, lines: list[bytes]) -> tuple[bytes, list[bytes]]:
    """
    Through HAProxy from ``source`` over implicit TLS: the greeting, and
    the reply to each of ``lines`` (stops at a 421 or a closed connection).
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    with clientContext(cafile).wrap_socket(raw, server_hostname="localhost") as s:
        f = s.makefile("rb")
        greeting = f.readline()
        replies = []
        for line in lines:
            s.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            replies.append(reply)
            if not reply or reply.startswith(b"421"):
                break
        return greeting, replies


def message(user: str) -> list[bytes]:
    return [
        b"EHLO client.example",
        plain(user, PASSWORD),
        f"MAIL FROM:<{user}>".encode(),
        b"RCPT TO:<someone@example.org>",
        b"DATA",
        f"From: <{user}>\r\nSubject: cluster\r\n\r\nhello\r\n.".encode(),
    ]


class ClusterTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        haproxy = haproxyPath()
        self.redis = RedisServer(self)
        self.redis.start()
        self.lines: list[str] = []

        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        base = shortDirectory(self)
        self.files = makeFixtures(base / "shared")
        addUser(self.files["passwd"], BOB, PASSWORD)
        self.nodes: list[GatewayService] = []
        backends = []
        for name in ("n1", "n2"):
            metricsPort = freePort()
            config = configFromDict(
                {
                    "server": {
                        "hostname": f"{name}.example",
                        "submission": [],
                        "submissions": ["tcp:0:interface=127.0.0.1"],
                    },
                    "tls": {"certificate": self.files["cert"], "key": self.files["key"]},
                    "auth": {"backends": [f"passwd:{self.files['passwd']}"]},
                    # Each node's spool on its own disk (here: its own directory).
                    "spool": {"directory": str(base / name / "spool")},
                    "proxy": {"trusted": ["127.0.0.1"]},
                    "metrics": {"listen": f"tcp:{metricsPort}:interface=127.0.0.1"},
                    "limits": {
                        "auth_failures_per_address": BUDGET,
                        "auth_failures_per_network": 1000,
                        "auth_failures_per_account": 1000,
                        "auth_free_failures": 1000,  # no delays: the budget alone decides
                        "messages_per_user": QUOTA,
                        "backend": self.redis.url,
                        "namespace": NAMESPACE,
                        "backend_sync_interval": 0.01,
                        "backend_staleness": 0.2,
                        "backend_timeout": 1.0,
                        "backend_retry": 0.2,
                    },
                },
                source=f"{name}.toml",
            )
            node = GatewayService(config, reactor)
            node.startService()
            self.addCleanup(node.stopService)
            [port] = yield node.whenListening()
            self.nodes.append(node)
            backends.append((name, port.getHost().port, metricsPort))
        self.port = freePort()
        self.stats = str(base / "haproxy.sock")
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} send-proxy-v2 check port {metrics}"
            for name, port, metrics in backends
        )
        haproxyConfig = base / "haproxy.cfg"
        haproxyConfig.write_text(
            f"""global
    maxconn 256
    stats socket {self.stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout check 2s

frontend submissions
    bind 127.0.0.1:{self.port}
    default_backend mailgw

backend mailgw
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 300ms fall 2 rise 1
{servers}
"""
        )
        check = subprocess.run(
            [haproxy, "-c", "-f", str(haproxyConfig)], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.haproxyLog = base / "haproxy.log"
        with open(self.haproxyLog, "wb") as out:
            self.haproxy = subprocess.Popen(
                [haproxy, "-db", "-f", str(haproxyConfig)], stdout=out, stderr=subprocess.STDOUT
            )
        self.addCleanup(stopProcess, self.haproxy)
        yield self.waitFor(lambda: self.nodes[0].sharedCounters.up, "n1 shares")  # type: ignore[union-attr]
        yield self.waitFor(lambda: self.nodes[1].sharedCounters.up, "n2 shares")  # type: ignore[union-attr]
        yield deferToThread(self.waitForServersUp)

    def waitForServersUp(self) -> None:
        """Both servers UP in HAProxy's health checks (GET /healthz on each node)."""
        deadline = time.monotonic() + 30
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.haproxy.poll() is not None:
                self.fail("haproxy exited:\n" + self.haproxyLog.read_text(errors="replace"))
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.stats)
                    s.sendall(b"show stat\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
            except OSError:
                time.sleep(0.1)
                continue
            rows = [line.split(",") for line in data.decode().splitlines() if line[:1] != "#"]
            states = {row[1]: row[17] for row in rows if len(row) > 17 and row[0] == "mailgw"}
            if states.get("n1", "").startswith("UP") and states.get("n2", "").startswith("UP"):
                return
            time.sleep(0.1)
        self.fail(f"haproxy's servers are not UP: {states}")

    @inlineCallbacks
    def waitFor(self, condition: Any, what: str) -> Any:
        for _ in range(300):  # bounded: 15 s
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"never: {what}")

    def shared(self, table: str, key: str) -> float:
        """The level Redis holds (read with our own client, for the test)."""
        import redis

        with redis.Redis(host="127.0.0.1", port=self.redis.port) as r:
            level = r.hget(f"{NAMESPACE}:{table}:{key}", "l")
        return float(level) if level is not None else 0.0

    def session(self, source: str, lines: list[bytes]) -> Any:
        return deferToThread(dialog, self.port, source, self.files["cert"], lines)

    @inlineCallbacks
    def spray(self, source: str, attempts: int) -> Any:
        """
        One wrong password per connection from ``source``, each attempt
        once the previous one has reached Redis (attempts further apart than
        the sync interval, see docs/cluster.md): the nodes' greetings and
        the AUTH replies.
        """
        key = keyText(client(source).key)
        results = []
        for i in range(attempts):
            greeting, replies = yield self.session(
                source, [b"EHLO spray.example", plain(f"user{i}@example.com", "wrong")]
            )
            results.append((greeting.split()[1], replies[-1][:3]))
            if replies[-1].startswith(b"535"):
                expected = sum(code == b"535" for _, code in results)
                yield self.waitFor(
                    lambda n=expected: self.shared("auth-address", key) >= n - 0.01,
                    f"failure {expected} from {source} counted in Redis",
                )
        return results

    @inlineCallbacks
    def test_sprayThrottledAsOne(self) -> Any:
        results = yield self.spray("127.0.9.5", BUDGET + 4)
        codes = [code for _, code in results]
        # The budget counted once over both nodes: BUDGET failures, then 421
        # and disconnect, whichever node the connection lands on (each node
        # alone would have allowed BUDGET, 2 * BUDGET in all).
        self.assertEqual(codes, [b"535"] * BUDGET + [b"421"] * 4)
        nodes = {node for node, code in results if code == b"535"}
        self.assertEqual(nodes, {b"n1.example", b"n2.example"})
        refusedBy = {node for node, code in results if code == b"421"}
        self.assertEqual(refusedBy, {b"n1.example", b"n2.example"})
        # The logs name the real client, from the PROXY v2 header.
        throttled = [line for line in self.lines if "auth-throttle: client=" in line]
        self.assertTrue(throttled)
        self.assertTrue(all("client=127.0.9.5 " in line for line in throttled), throttled)
        failed = [line for line in self.lines if line.startswith("auth failed")]
        self.assertEqual(len(failed), BUDGET)
        self.assertTrue(all("client=127.0.9.5" in line for line in failed), failed)
        self.assertFalse([line for line in self.lines if "client=127.0.0.1" in line])
        # A real user from another address is not touched.
        greeting, replies = yield self.session("127.0.7.1", [b"EHLO c", plain(USER, PASSWORD)])
        self.assertTrue(replies[-1].startswith(b"235"), replies)

    @inlineCallbacks
    def test_quotaHoldsAcrossNodes(self) -> Any:
        served = []
        for i in range(QUOTA + 2):
            greeting, replies = yield self.session("127.0.8.1", message(USER))
            served.append(greeting.split()[1])
            if i < QUOTA:
                self.assertTrue(replies[-1].startswith(b"250"), replies)
                yield self.waitFor(
                    lambda n=i + 1: self.shared("quota-messages", keyText(USER)) >= n - 0.01,
                    f"message {i + 1} counted in Redis",
                )
            else:
                # Refused at MAIL (451 4.7.1) on whichever node: the quota is the site's.
                self.assertTrue(replies[2].startswith(b"451 4.7.1"), replies)
        self.assertEqual(set(served), {b"n1.example", b"n2.example"})
        # Another user's quota is their own.
        _, replies = yield self.session("127.0.8.1", message(BOB))
        self.assertTrue(replies[-1].startswith(b"250"), replies)

    @inlineCallbacks
    def test_redisDownThenBack(self) -> Any:
        self.redis.stop()
        # A legitimate user goes on sending through both nodes.
        served = []
        for _ in range(2):
            greeting, replies = yield self.session("127.0.6.1", message(BOB))
            self.assertTrue(replies[-1].startswith(b"250"), replies)
            served.append(greeting.split()[1])
        self.assertEqual(set(served), {b"n1.example", b"n2.example"})
        yield self.waitFor(
            lambda: not any(node.sharedCounters.up for node in self.nodes),  # type: ignore[union-attr]
            "both nodes count locally",
        )
        downs = [
            line for line in self.lines if "unreachable (" in line and "counting locally" in line
        ]
        self.assertEqual(len(downs), 2)  # one line per node
        for node in self.nodes:
            assert node.metrics is not None
            self.assertEqual(node.metrics.sharedUp._value.get(), 0)
            self.assertGreaterEqual(node.metrics.sharedErrors._value.get(), 1)
        # Fail safe, not open: each node still holds its own budget.
        codes = []
        for i in range(2 * BUDGET + 2):
            _, replies = yield self.session(
                "127.0.9.9", [b"EHLO c", plain(f"user{i}@example.com", "wrong")]
            )
            codes.append(replies[-1][:3])
        self.assertEqual(codes, [b"535"] * (2 * BUDGET) + [b"421"] * 2)
        # Redis is back (empty): the nodes share again.
        self.redis.start()
        yield self.waitFor(
            lambda: all(node.sharedCounters.up for node in self.nodes),  # type: ignore[union-attr]
            "both nodes share again",
        )
        ups = [line for line in self.lines if "reachable, counting site-wide" in line]
        self.assertEqual(len(ups), 4)  # each node: at start, and back
        results = yield self.spray("127.0.9.10", BUDGET + 2)
        self.assertEqual([code for _, code in results], [b"535"] * BUDGET + [b"421"] * 2)
