"""
Tests for L{mailgw.config}.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any

import attrs
from twisted.internet.ssl import CertificateOptions
from twisted.trial import unittest

from mailgw import tls
from mailgw.config import (
    AuthConfig,
    Config,
    ConfigError,
    LimitsConfig,
    PolicyConfig,
    ProxyConfig,
    QueueConfig,
    RelayConfig,
    Route,
    ServerConfig,
    Smarthost,
    SpoolConfig,
    TLSConfig,
    TLSMode,
    configFromDict,
    loadConfig,
    mergeOverrides,
    readConfigFile,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "mailgw.toml")
REFERENCE = os.path.join(ROOT, "docs", "configuration.md")

ROUTE_KEYS = [
    "smarthosts",
    "mx",
    "tls",
    "ca_file",
    "auth_user",
    "auth_password_file",
    "auth_mechanism",
    "connect_timeout",
    "tls_level",
    "tls_match",
    "mta_sts",
]

#: Every key of the schema, by section.
SCHEMA = {
    "server": [
        "hostname",
        "submission",
        "submissions",
        "max_message_size",
        "max_recipients",
        "max_line_length",
        "idle_timeout",
        "max_errors",
        "legacy_auth_line",
        "command_timeout",
        "session_timeout",
        "max_header_size",
        "max_received_headers",
        "received_client_address",
        "pre_auth_timeout",
        "max_junk_commands",
        "close_timeout",
        "accept_bare_lf",
        "binary_mime",
        "workers",
    ],
    "tls": ["certificate", "key", "min_version", "ticket_lifetime"],
    "auth": ["backends"],
    "spool": ["directory"],
    "queue": [
        "retry_min",
        "retry_max",
        "retry_jitter",
        "max_lifetime",
        "bounce_lifetime",
        "delay_warning",
        "max_concurrency",
        "max_per_host",
    ],
    "limits": [
        "max_connections",
        "max_connections_per_address",
        "connection_rate_per_address",
        "exempt",
        "auth_failures_per_address",
        "auth_failures_per_network",
        "auth_failures_per_account",
        "auth_failure_window",
        "auth_free_failures",
        "auth_delay",
        "auth_delay_max",
        "auth_trust_period",
        "auth_concurrent_per_address",
        "auth_concurrent_per_account",
        "auth_concurrent_total",
        "messages_per_user",
        "recipients_per_user",
        "quota_window",
        "backend",
        "namespace",
        "backend_password_file",
        "backend_sync_interval",
        "backend_staleness",
        "backend_timeout",
        "backend_retry",
    ],
    "policy": [
        "sender_login_maps",
        "check_header_from",
        "allow_null_sender",
        "allowed_recipient_domains",
    ],
    "proxy": ["trusted", "header_timeout"],
    "metrics": ["listen"],
    "api": ["token_file", "allow_changes"],
    "webhooks": ["urls", "secret_file", "timeout", "retries", "retry_delay", "backlog"],
    "filter": [
        "content_filter",
        "hold_replies",
        "connect_timeout",
        "reply_timeout",
        "max_connections",
    ],
    "reinject": ["listen", "networks"],
    "etrn": ["enabled", "networks"],
    "milter": [
        "servers",
        "connect_timeout",
        "command_timeout",
        "content_timeout",
        "default_action",
    ],
    "breaker": [
        "enabled",
        "on_trip",
        "min_history_hours",
        "history_days",
        "messages_factor",
        "messages_floor",
        "recipients_factor",
        "recipients_floor",
        "domains_factor",
        "domains_floor",
        "networks_factor",
        "networks_floor",
        "bounces_factor",
        "bounces_floor",
        "bounces_minimum",
        "new_account_messages",
        "new_account_recipients",
        "new_account_domains",
        "new_account_networks",
        "forget_after",
        "max_accounts",
        "save_interval",
        "admin_address",
        "webhook",
    ],  # fmt: skip
    "relay": ROUTE_KEYS,
}

#: Bad lists of networks, for every key that takes one.
BAD_NETWORKS: list[Any] = [
    "192.0.2.0/24",
    ["192.0.2.1/24"],
    ["192.0.2.0/33"],
    ["2001:db8::1/32"],
    ["not-a-network"],
    ["example.org"],
    [""],
    [24],
    [" 192.0.2.0/24"],
]

#: For each key, values it must refuse.
BAD_VALUES: dict[str, dict[str, list[Any]]] = {
    "server": {
        "hostname": [5, "no spaces.example", "-lead.example", "a" * 64 + ".example"],
        "submission": ["tcp:587", [587], ["tcp:abc"], ["nosuch:1"], ["ssl:465"], [""]],
        "submissions": ["tcp:465", ["tls:465"], ["tcp:port=x"]],
        "max_message_size": [0, -1, "ten", "35X", True, 1.5],
        "max_recipients": [0, "ten", True, 2.0],
        "max_line_length": [997, "ten"],
        "idle_timeout": [0, -1, "300", float("nan"), float("inf"), True],
        "max_errors": [0, "x"],
        "legacy_auth_line": [1, "yes"],
        "command_timeout": [0, -1, "60", True, float("inf")],
        "session_timeout": [0, "30m", False],
        "max_header_size": [0, 4095, "1K", "x", True],
        "max_received_headers": [0, -1, 1.5, "50"],
        "received_client_address": [1, "no"],
        "pre_auth_timeout": [0, -1, "30", True],
        "max_junk_commands": [-1, 1.5, "20"],
        "close_timeout": [0, float("inf"), "5"],
        "accept_bare_lf": [1, "yes"],
        "binary_mime": [1, "yes"],
        "workers": [0, 1025, "many", True, 1.5],
    },
    "tls": {
        "certificate": [1, ["a"]],
        "key": [1],
        "min_version": ["TLSv1.1", "TLSv1.0", "TLSv1", "SSLv3", "tlsv1.2", 1.2],
        "ticket_lifetime": [-1, "3600", True, 1.5],
    },
    "auth": {"backends": ["memory:a:b", [1], [""]]},
    "spool": {"directory": ["", 1]},
    "queue": {
        "retry_min": [0, "5m"],
        "retry_max": [-1, 299],
        "retry_jitter": [-0.1, 1.5, "0.1", True],
        "max_lifetime": [0],
        "bounce_lifetime": [0, "x"],
        "delay_warning": [-1, "4h"],
        "max_concurrency": [0, 1.0],
        "max_per_host": [0],
    },
    "limits": {
        "max_connections": [0, -1, "1000", 1.5, True],
        "max_connections_per_address": [0, "20"],
        "connection_rate_per_address": [0, 60.0],
        "exempt": BAD_NETWORKS,
        "auth_failures_per_address": [0, "10"],
        "auth_failures_per_network": [0, -3],
        "auth_failures_per_account": [0, 2.5],
        "auth_failure_window": [0, -1, "1h"],
        "auth_free_failures": [-1, "3", 1.0],
        "auth_delay": [-1, "1s", float("nan")],
        "auth_delay_max": [-1, 0.5, "16"],
        "auth_trust_period": [-1, "7d"],
        "auth_concurrent_per_address": [0, "8"],
        "auth_concurrent_per_account": [0, 1.5],
        "auth_concurrent_total": [0, -64],
        "messages_per_user": [-1, "1000", 10.0],
        "recipients_per_user": [-1, True],
        "quota_window": [0, "1h"],
        "backend": [
            6379,
            "127.0.0.1:6379",
            "http://127.0.0.1/",
            "redis://:secret@127.0.0.1:6379/0",
            "redis://user:secret@127.0.0.1/0",
            "redis://127.0.0.1:99999/0",
            "redis://127.0.0.1/x",
            "redis:///0",
            "redis://127.0.0.1/0?password=x",
            "unix://host/tmp/redis.sock",
            "unix:///tmp/redis.sock?password=x",
            "unix:///tmp/redis.sock?db=x",
        ],
        "namespace": ["", "a b", "a/b", 1],
        "backend_password_file": ["/etc/mailgw/redis.password", 1],
        "backend_sync_interval": [0, -1, "0.05"],
        "backend_staleness": [0, "1"],
        "backend_timeout": [0, True],
        "backend_retry": [0, "5s"],
    },
    "policy": {
        "sender_login_maps": [1, ["/etc/mailgw/senders"], True],
        "check_header_from": ["on", "REJECT", True, ""],
        "allow_null_sender": [0, "false"],
        "allowed_recipient_domains": ["example.org", ["exa mple.org"], [1]],
    },
    "proxy": {
        "trusted": BAD_NETWORKS,
        "header_timeout": [0, -5, "5"],
    },
    "metrics": {
        "listen": [9466, ["tcp:9466"], "bogus:9466", "ssl:9466"],
    },
    "api": {"token_file": [1, ["x"]], "allow_changes": ["yes", 1]},
    "webhooks": {
        "urls": ["http://x/", ["ftp://x/"], ["http://"], ["http://x:port/"], [""]],
        "secret_file": [1, True],
        "timeout": [0, -1, "10"],
        "retries": [-1, 1.5, "3"],
        "retry_delay": [0, "5"],
        "backlog": [0, "1000"],
    },
    "filter": {
        "content_filter": [
            10024,
            "127.0.0.1:10024",
            "smtp:192.0.2.7:10024",
            "smtp:amavis.example.org:10024",
            "esmtp:127.0.0.1:10024",
            "smtp:127.0.0.1:0",
            "smtp:127.0.0.1:70000",
            "smtp:::1:10024",
            "smtp:[::1]",
        ],
        "hold_replies": ["quarantine", ["("], [1]],
        "connect_timeout": [0, "30s"],
        "reply_timeout": [0, -1, "10m"],
        "max_connections": [0, "2"],
    },
    "reinject": {
        "listen": ["tcp:10025", ["bogus:10025"], [10025]],
        "networks": BAD_NETWORKS,
    },
    "etrn": {
        "enabled": ["yes", 1],
        "networks": BAD_NETWORKS,
    },
    "milter": {
        # A bad entry of the list is named by its index (tests/test_milter_edits.py).
        "servers": ["inet:127.0.0.1:8891", 8891, {"address": "inet:127.0.0.1:8891"}],
        "connect_timeout": [0, -1, "30"],
        "command_timeout": [0, "30s"],
        "content_timeout": [-120, True],
        "default_action": ["discard", "TEMPFAIL", 1],
    },
    "breaker": {
        "enabled": [1, "yes"],
        "on_trip": ["refuse", "", True],
        "min_history_hours": [-1, 1.5, "20"],
        "history_days": [0, "28"],
        "messages_factor": [0.5, 0, "3", True, float("nan")],
        "messages_floor": [0, "20"],
        "recipients_factor": [0.99],
        "recipients_floor": [0],
        "domains_factor": [0.9],
        "domains_floor": [0],
        "networks_factor": [-2],
        "networks_floor": [0],
        "bounces_factor": [0],
        "bounces_floor": [1.5, -0.1, "0.2"],
        "bounces_minimum": [0],
        "new_account_messages": [0],
        "new_account_recipients": [0],
        "new_account_domains": [0],
        "new_account_networks": [0, "5"],
        "forget_after": [0, -1, "90d"],
        "max_accounts": [0],
        "save_interval": [0, "10"],
        "admin_address": ["nobody", "<a@b.example>", "a b@c.example", 5, "@x.example"],
        "webhook": ["true", 1],
    },
    "relay": {
        "smarthosts": [
            "smtp.example.net:587",
            ["::1:25"],
            ["smtp.example.net:0"],
            ["smtp.example.net:65536"],
            ["smtp example.net:25"],
            ["[not-ipv6]:25"],
            ["smtp.example.net:25:1"],
        ],
        "mx": ["true", 1],
        "tls": ["STARTTLS", "tls", True],
        "ca_file": [1],
        "auth_user": [1],
        "auth_password_file": [1, "/nonexistent/password"],
        "auth_mechanism": ["CRAM-MD5", 1],
        "connect_timeout": [0, "30s"],
        "tls_level": ["paranoid", 1, "dane"],
        "tls_match": ["example.org", ["exa mple.org"], ["example.org"]],
        "mta_sts": ["yes", True],
    },
}


def _routeWith(key: str, value: object) -> dict[str, object]:
    """A route that is valid but for ``key``."""
    route: dict[str, object] = {"smarthosts": ["smtp.example.net"], key: value}
    if key == "auth_password_file":
        route["auth_user"] = "gw"
    return route


def _write(case: unittest.SynchronousTestCase, data: bytes | str, mode: int = 0o600) -> str:
    path = case.mktemp()
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


class DefaultsTests(unittest.SynchronousTestCase):
    def test_empty(self) -> None:
        config = configFromDict({}, source="<test>")
        self.assertEqual(config, Config(source="<test>"))
        self.assertEqual(
            config.server,
            ServerConfig(
                hostname="",
                submission=(),
                submissions=(),
                maxMessageSize=36700160,
                maxRecipients=100,
                maxLineLength=65536,
                idleTimeout=300,
                maxErrors=20,
                legacyAuthLine=False,
                commandTimeout=60,
                sessionTimeout=1800,
                maxHeaderSize=262144,
                maxReceivedHeaders=50,
            ),
        )
        self.assertEqual(config.tls, TLSConfig("", "", "TLSv1.2"))
        self.assertEqual(config.auth, AuthConfig(()))
        self.assertEqual(config.spool, SpoolConfig("/var/spool/mailgw"))
        self.assertEqual(config.queue, QueueConfig(300, 3600, 0.1, 432000, 432000, 14400, 20, 5))
        self.assertEqual(config.relay, RelayConfig(default=None, domains={}))
        self.assertEqual(
            config.limits,
            LimitsConfig(
                maxConnections=1000,
                maxConnectionsPerAddress=20,
                connectionRatePerAddress=60,
                exempt=(),
                authFailuresPerAddress=10,
                authFailuresPerNetwork=30,
                authFailuresPerAccount=20,
                authFailureWindow=3600,
                authFreeFailures=3,
                authDelay=1.0,
                authDelayMax=16.0,
                authTrustPeriod=604800,
                messagesPerUser=1000,
                recipientsPerUser=5000,
                quotaWindow=3600,
            ),
        )
        self.assertEqual(
            config.policy,
            PolicyConfig(senderLoginMaps="", checkHeaderFrom="off", allowNullSender=False),
        )
        self.assertEqual(config.proxy, ProxyConfig(trusted=(), headerTimeout=5))

    def test_routeDefaults(self) -> None:
        route = configFromDict({"relay": {"smarthosts": ["smtp.example.net"]}}).relay.default
        self.assertEqual(
            route,
            Route(
                smarthosts=(Smarthost("smtp.example.net", 587),),
                mx=False,
                tls=TLSMode.STARTTLS,
                caFile="",
                authUser="",
                authPasswordFile="",
                authMechanism="PLAIN",
                connectTimeout=30,
            ),
        )

    def test_fqdn(self) -> None:
        self.assertEqual(Config().fqdn(lambda: "box.example.org"), "box.example.org")
        named = configFromDict({"server": {"hostname": "mail.example.org"}})
        self.assertEqual(named.fqdn(lambda: "box.example.org"), "mail.example.org")
        self.assertTrue(Config().fqdn())


class BadValueTests(unittest.SynchronousTestCase):
    def test_everyKey(self) -> None:
        """Each bad value of each key is refused with an error naming the key."""
        self.assertEqual({s: list(keys) for s, keys in BAD_VALUES.items()}, SCHEMA)
        for section, keys in BAD_VALUES.items():
            for key, values in keys.items():
                for value in values:
                    data = {section: {key: value}}
                    if section == "relay":
                        data[section] = _routeWith(key, value)
                    with self.subTest(key=f"{section}.{key}", value=value):
                        e = self.assertRaises(ConfigError, configFromDict, data, "<test>")
                        self.assertEqual(e.key, f"{section}.{key}")
                        self.assertTrue(str(e).startswith(f"<test>: {section}.{key}: "))

    def test_domainRouteKeys(self) -> None:
        """A domain route's keys are checked the same way, with its name in the key."""
        for key, values in BAD_VALUES["relay"].items():
            for value in values:
                data = {"relay": {"domains": {"example.org": _routeWith(key, value)}}}
                with self.subTest(key=key, value=value):
                    e = self.assertRaises(ConfigError, configFromDict, data, "<test>")
                    self.assertEqual(e.key, f'relay.domains."example.org".{key}')

    def test_message(self) -> None:
        e = self.assertRaises(
            ConfigError,
            configFromDict,
            {"server": {"max_recipients": "ten"}},
            "/etc/mailgw/mailgw.toml",
        )
        self.assertEqual(
            str(e),
            "/etc/mailgw/mailgw.toml: server.max_recipients: must be an integer >= 1, got 'ten'",
        )

    def test_tlsVersionReason(self) -> None:
        e = self.assertRaises(ConfigError, configFromDict, {"tls": {"min_version": "TLSv1.1"}})
        self.assertIn("RFC 8996", str(e))

    def test_sectionNotATable(self) -> None:
        e = self.assertRaises(ConfigError, configFromDict, {"server": 5})
        self.assertEqual(e.key, "server")

    def test_networkHostBits(self) -> None:
        """A network with host bits set is refused with the network meant."""
        e = self.assertRaises(
            ConfigError, configFromDict, {"limits": {"exempt": ["10.1.2.3/8"]}}, "<test>"
        )
        self.assertEqual(
            str(e),
            "<test>: limits.exempt: '10.1.2.3/8' has host bits set; did you mean '10.0.0.0/8'?",
        )
        e = self.assertRaises(ConfigError, configFromDict, {"proxy": {"trusted": ["proxy"]}})
        self.assertEqual(e.key, "proxy.trusted")
        self.assertIn("'proxy'", e.problem)

    def test_authDelayMaxBelowDelay(self) -> None:
        e = self.assertRaises(
            ConfigError, configFromDict, {"limits": {"auth_delay": 4, "auth_delay_max": 2}}
        )
        self.assertEqual(e.key, "limits.auth_delay_max")
        self.assertIn("auth_delay", e.problem)

    def test_retryMaxBelowMin(self) -> None:
        e = self.assertRaises(
            ConfigError, configFromDict, {"queue": {"retry_min": 600, "retry_max": 300}}
        )
        self.assertEqual(e.key, "queue.retry_max")


class GoodValueTests(unittest.SynchronousTestCase):
    def test_sizes(self) -> None:
        for text, octets in [("35M", 36700160), ("64K", 65536), ("1G", 1 << 30), ("2000", 2000)]:
            config = configFromDict({"server": {"max_message_size": text}})
            self.assertEqual(config.server.maxMessageSize, octets)
        config = configFromDict({"server": {"max_line_length": "998"}})
        self.assertEqual(config.server.maxLineLength, 998)

    def test_durationsAndFractions(self) -> None:
        config = configFromDict(
            {
                "server": {"idle_timeout": 2.5},
                "queue": {"delay_warning": 0, "retry_jitter": 0, "retry_min": 60},
            }
        )
        self.assertEqual(config.server.idleTimeout, 2.5)
        self.assertEqual(config.queue.delayWarning, 0)
        self.assertEqual(config.queue.retryJitter, 0.0)

    def test_networks(self) -> None:
        config = configFromDict(
            {
                "limits": {"exempt": ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "::1"]},
                "proxy": {"trusted": ["127.0.0.1", "10.0.0.0/8"]},
            }
        )
        self.assertEqual(
            config.limits.exempt,
            tuple(
                ipaddress.ip_network(n)
                for n in ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32", "::1/128"]
            ),
        )
        self.assertEqual(
            config.proxy.trusted,
            (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")),
        )

    def test_newSections(self) -> None:
        config = configFromDict(
            {
                "server": {"max_header_size": "64K", "command_timeout": 0.5},
                "limits": {
                    "messages_per_user": 0,
                    "recipients_per_user": 0,
                    "auth_free_failures": 0,
                    "auth_delay": 0,
                    "auth_delay_max": 0,
                    "auth_trust_period": 0,
                },
                "policy": {
                    "sender_login_maps": "/etc/mailgw/senders",
                    "check_header_from": "reject",
                    "allow_null_sender": True,
                },
                "proxy": {"header_timeout": 0.25},
            }
        )
        self.assertEqual(config.server.maxHeaderSize, 65536)
        self.assertEqual(config.server.commandTimeout, 0.5)
        self.assertEqual(
            config.limits,
            LimitsConfig(
                messagesPerUser=0,
                recipientsPerUser=0,
                authFreeFailures=0,
                authDelay=0,
                authDelayMax=0,
                authTrustPeriod=0,
            ),
        )
        self.assertEqual(config.policy, PolicyConfig("/etc/mailgw/senders", "reject", True))
        self.assertEqual(config.proxy.headerTimeout, 0.25)

    def test_listeners(self) -> None:
        listeners = ["tcp:587:interface=127.0.0.1", "unix:/run/mailgw.sock", "systemd:index=0"]
        config = configFromDict({"server": {"submission": listeners}})
        self.assertEqual(config.server.submission, tuple(listeners))

    def test_smarthosts(self) -> None:
        hosts = ["smtp.example.net:25", "[2001:db8::1]", "192.0.2.1:2525", "relay"]
        route = configFromDict({"relay": {"smarthosts": hosts}}).relay.default
        assert route is not None
        self.assertEqual(
            route.smarthosts,
            (
                Smarthost("smtp.example.net", 25),
                Smarthost("2001:db8::1", 587),
                Smarthost("192.0.2.1", 2525),
                Smarthost("relay", 587),
            ),
        )
        self.assertEqual(str(route.smarthosts[1]), "[2001:db8::1]:587")
        self.assertEqual(str(route.smarthosts[0]), "smtp.example.net:25")

    def test_implicitDefaultPort(self) -> None:
        route = configFromDict(
            {"relay": {"smarthosts": ["smtp.example.net"], "tls": "implicit"}}
        ).relay.default
        assert route is not None
        self.assertEqual(route.smarthosts, (Smarthost("smtp.example.net", 465),))

    def test_mechanismCase(self) -> None:
        route = configFromDict(
            {"relay": {"smarthosts": ["a.example"], "auth_mechanism": "login"}}
        ).relay.default
        assert route is not None
        self.assertEqual(route.authMechanism, "LOGIN")

    def test_mx(self) -> None:
        config = configFromDict({"relay": {"mx": True, "tls": "opportunistic"}})
        self.assertEqual(
            config.relay.default, Route(mx=True, tls=TLSMode.OPPORTUNISTIC, mtaSts=True)
        )


class UnknownKeyTests(unittest.SynchronousTestCase):
    def test_unknownKey(self) -> None:
        e = self.assertRaises(
            ConfigError, configFromDict, {"server": {"max_recipient": 5}}, "<test>"
        )
        self.assertEqual(e.key, "server.max_recipient")
        self.assertIn("unknown key", e.problem)
        self.assertIn("'max_recipients'", e.problem)

    def test_unknownSection(self) -> None:
        e = self.assertRaises(ConfigError, configFromDict, {"sever": {}})
        self.assertEqual(e.key, "sever")

    def test_unknownDomainRouteKey(self) -> None:
        data = {"relay": {"domains": {"example.org": {"mx": True, "smarthost": ["a"]}}}}
        e = self.assertRaises(ConfigError, configFromDict, data)
        self.assertEqual(e.key, 'relay.domains."example.org".smarthost')


class FileTests(unittest.SynchronousTestCase):
    def test_syntaxError(self) -> None:
        path = _write(self, '[server]\nhostname = "a.example"\nmax_recipients = = 5\n')
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(e.source, path)
        self.assertEqual(e.key, "line 3")
        self.assertTrue(str(e).startswith(f"{path}: line 3: TOML syntax error"))

    def test_syntaxErrorAtEnd(self) -> None:
        path = _write(self, '[server]\nhostname = "a.example"\nx = [1,\n')
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(e.key, "line 4")

    def test_unquotedDomain(self) -> None:
        path = _write(self, "[relay.domains.example.org]\nmx = true\n")
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(e.key, 'relay.domains."example".org')
        self.assertIn('[relay.domains."example.org"]', e.problem)

    def test_valueErrorNamesFile(self) -> None:
        path = _write(self, "[server]\nmax_recipients = 0\n")
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual((e.source, e.key), (path, "server.max_recipients"))

    def test_missingFile(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(e.source, path)
        self.assertIn("cannot read", e.problem)

    def test_notUTF8(self) -> None:
        path = _write(self, b'[server]\nhostname = "\xff"\n')
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(e.key, "line 2")

    def test_loads(self) -> None:
        path = _write(self, '[server]\nsubmission = ["tcp:587"]\n')
        config = loadConfig(path)
        self.assertEqual(config.source, path)
        self.assertEqual(config.server.submission, ("tcp:587",))

    def test_mergeOverrides(self) -> None:
        path = _write(self, '[tls]\ncertificate = "/a.pem"\nkey = "/a.key"\n')
        data = readConfigFile(path)
        merged = mergeOverrides(data, {"tls.certificate": "/b.pem", "relay.tls": "none"})
        self.assertEqual(data["tls"]["certificate"], "/a.pem")
        self.assertEqual(
            merged, {"tls": {"certificate": "/b.pem", "key": "/a.key"}, "relay": {"tls": "none"}}
        )


class RelayTests(unittest.SynchronousTestCase):
    def test_tlsNoneNeedsLoopback(self) -> None:
        for hosts in (["smtp.example.net:25"], ["127.0.0.1:25", "192.0.2.1:25"]):
            data = {"relay": {"smarthosts": hosts, "tls": "none"}}
            e = self.assertRaises(ConfigError, configFromDict, data)
            self.assertEqual(e.key, "relay.tls")
        hosts = ["127.0.0.1:25", "127.1.2.3:25", "[::1]:25", "localhost:25", "LOCALHOST:26"]
        route = configFromDict({"relay": {"smarthosts": hosts, "tls": "none"}}).relay.default
        assert route is not None
        self.assertEqual(route.tls, TLSMode.NONE)

    def test_mxExclusions(self) -> None:
        for extra in ({"smarthosts": ["a.example"]}, {"tls": "none"}, {"tls": "implicit"}):
            self.assertRaises(ConfigError, configFromDict, {"relay": {"mx": True, **extra}})

    def test_noDefaultRoute(self) -> None:
        config = configFromDict({"relay": {"tls": "implicit", "connect_timeout": 5}})
        self.assertIsNone(config.relay.default)
        self.assertIsNone(config.relay.routeFor("example.org"))

    def test_domainRouteNeedsDestination(self) -> None:
        data = {"relay": {"domains": {"example.org": {"tls": "implicit"}}}}
        e = self.assertRaises(ConfigError, configFromDict, data)
        self.assertEqual(e.key, 'relay.domains."example.org".smarthosts')

    def test_domainKeys(self) -> None:
        data = {"relay": {"domains": {"Bücher.Example": {"mx": True}, "EXAMPLE.org": {"mx": True}}}}
        self.assertEqual(
            sorted(configFromDict(data).relay.domains), ["example.org", "xn--bcher-kva.example"]
        )
        for bad in ("exa mple.org", "-x.example", "a..example"):
            data = {"relay": {"domains": {bad: {"mx": True}}}}
            e = self.assertRaises(ConfigError, configFromDict, data)
            self.assertEqual(e.key, f'relay.domains."{bad}"')
        data = {"relay": {"domains": {"example.org": {"mx": True}, "Example.ORG": {"mx": True}}}}
        self.assertRaises(ConfigError, configFromDict, data)

    def test_routeFor(self) -> None:
        config = configFromDict(
            {
                "relay": {
                    "smarthosts": ["default.example.net"],
                    "domains": {
                        "example.org": {"smarthosts": ["org.example.net"]},
                        "bücher.example": {"mx": True},
                    },
                }
            }
        )
        relay = config.relay
        default, org, idn = (
            relay.default,
            relay.domains["example.org"],
            relay.domains["xn--bcher-kva.example"],
        )
        self.assertEqual(org.smarthosts, (Smarthost("org.example.net", 587),))
        self.assertIs(relay.routeFor("example.org"), org)
        self.assertIs(relay.routeFor("EXAMPLE.Org."), org)
        self.assertIs(relay.routeFor("BÜCHER.example"), idn)
        self.assertIs(relay.routeFor("xn--bcher-kva.example"), idn)
        self.assertIs(relay.routeFor("sub.example.org"), default)
        self.assertIs(relay.routeFor("example.com"), default)
        self.assertIs(relay.routeFor("[192.0.2.1]"), default)
        self.assertIs(relay.routeFor(""), default)
        self.assertIsNone(RelayConfig(domains={"example.org": org}).routeFor("example.com"))

    def test_passwordFile(self) -> None:
        path = _write(self, "s3cret pass\nsecond line\n", 0o600)
        route = configFromDict(
            {
                "relay": {
                    "smarthosts": ["smtp.example.net"],
                    "auth_user": "gw",
                    "auth_password_file": path,
                }
            }
        ).relay.default
        assert route is not None
        self.assertEqual((route.authUser, route.authPassword()), ("gw", "s3cret pass"))
        self.assertIsNone(Route().authPassword())

    def test_passwordFileOpenToOthers(self) -> None:
        for mode in (0o640, 0o604, 0o620, 0o601):
            path = _write(self, "secret\n", mode)
            data = {
                "relay": {
                    "smarthosts": ["smtp.example.net"],
                    "auth_user": "gw",
                    "auth_password_file": path,
                }
            }
            e = self.assertRaises(ConfigError, configFromDict, data)
            self.assertEqual(e.key, "relay.auth_password_file")
            self.assertIn(f"mode 0{mode:o}", e.problem)
            self.assertIn("chmod 600", e.problem)

    def test_emptyPasswordFile(self) -> None:
        route = Route(authUser="gw", authPasswordFile=_write(self, "\nx\n"))
        self.assertRaises(ValueError, route.authPassword)

    def test_authNeedsBoth(self) -> None:
        path = _write(self, "secret\n")
        for extra in ({"auth_user": "gw"}, {"auth_password_file": path}):
            data = {"relay": {"smarthosts": ["a.example"], **extra}}
            self.assertRaises(ConfigError, configFromDict, data)

    def test_authNotOpportunistic(self) -> None:
        path = _write(self, "secret\n")
        data = {
            "relay": {
                "smarthosts": ["a.example"],
                "tls": "opportunistic",
                "auth_user": "gw",
                "auth_password_file": path,
            }
        }
        e = self.assertRaises(ConfigError, configFromDict, data)
        self.assertEqual(e.key, "relay.tls")


class StartCheckTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        base = self.mktemp()
        os.mkdir(base)
        self.cert, self.key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
        tls.makeSelfSigned(self.cert, self.key, "mail.example.org")
        self.config = configFromDict(
            {
                "server": {"submission": ["tcp:587"]},
                "tls": {"certificate": self.cert, "key": self.key},
                "auth": {"backends": ["memory:alice:secret"]},
            },
            source="<test>",
        )

    def _fails(self, key: str, **changes: object) -> ConfigError:
        config = self.config
        for name, value in changes.items():
            section, field = name.split("__")
            config = attrs.evolve(
                config, **{section: attrs.evolve(getattr(config, section), **{field: value})}
            )
        e = self.assertRaises(ConfigError, config.check)
        self.assertEqual((e.source, e.key), ("<test>", key))
        return e

    def test_passes(self) -> None:
        self.assertIsInstance(self.config.check(), CertificateOptions)
        only465 = attrs.evolve(
            self.config, server=ServerConfig(submission=(), submissions=("tcp:465",))
        )
        only465.check()

    def test_noListener(self) -> None:
        self._fails("server.submission", server__submission=())

    def test_noCertificate(self) -> None:
        self._fails("tls.certificate", tls__certificate="")
        self._fails("tls.key", tls__key="")

    def test_missingCertificate(self) -> None:
        e = self._fails("tls.certificate", tls__certificate=self.mktemp())
        self.assertIn("no such file", e.problem)
        self._fails("tls.key", tls__key=self.mktemp())

    def test_mismatchedKey(self) -> None:
        other = self.mktemp()
        os.mkdir(other)
        tls.makeSelfSigned(other + "/c.pem", other + "/k.pem", "x.example")
        e = self._fails("tls.key", tls__key=other + "/k.pem")
        self.assertIn("does not match", e.problem)

    def test_noAuthBackend(self) -> None:
        self._fails("auth.backends", auth__backends=())
        self._fails("auth.backends", auth__backends=("nosuchbackend:x",))

    def test_authNotRequired(self) -> None:
        config = attrs.evolve(self.config, auth=AuthConfig())
        self.assertIsInstance(config.check(requireAuth=False), CertificateOptions)

    def test_senderLoginMaps(self) -> None:
        e = self._fails("policy.sender_login_maps", policy__senderLoginMaps=self.mktemp())
        self.assertIn("cannot read", e.problem)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("")
        config = attrs.evolve(self.config, policy=PolicyConfig(senderLoginMaps=path))
        self.assertIsInstance(config.check(), CertificateOptions)

    def test_routeCAFile(self) -> None:
        route = Route(smarthosts=(Smarthost("a.example", 587),), caFile=self.mktemp())
        config = attrs.evolve(self.config, relay=RelayConfig(default=route))
        e = self.assertRaises(ConfigError, config.check)
        self.assertEqual(e.key, "relay.ca_file")
        config = attrs.evolve(self.config, relay=RelayConfig(domains={"example.org": route}))
        e = self.assertRaises(ConfigError, config.check)
        self.assertEqual(e.key, 'relay.domains."example.org".ca_file')


class ExampleFileTests(unittest.SynchronousTestCase):
    def test_loadsWithDefaults(self) -> None:
        config = loadConfig(EXAMPLE)
        expected = Config(
            server=ServerConfig(submission=("tcp:587",), submissions=("tcp:465",)),
            tls=TLSConfig(certificate="/etc/mailgw/cert.pem", key="/etc/mailgw/key.pem"),
            auth=AuthConfig(backends=("passwd:/etc/mailgw/passwd",)),
            source=EXAMPLE,
        )
        self.assertEqual(config, expected)

    def test_everyKeyWrittenOut(self) -> None:
        with open(EXAMPLE, "rb") as f:
            data = tomllib.load(f)
        self.assertEqual(sorted(data), sorted(SCHEMA))
        for section, keys in SCHEMA.items():
            self.assertEqual(sorted(data[section]), sorted(keys), section)

    def test_referenceDocumentsEveryKey(self) -> None:
        with open(REFERENCE, encoding="utf-8") as f:
            text = f.read()
        for section, keys in SCHEMA.items():
            for key in keys:
                self.assertIn(f"`{key}`", text, f"{section}.{key}")
        for option in ["--config", "--submission", "--submissions", "--certificate", "--key",
                       "--auth", "--spool", "--hostname", "--relay", "--relay-tls",
                       "--relay-ca", "--relay-auth", "--metrics"]:  # fmt: skip
            self.assertIn(f"`{option}", text)


class HAProxyEndpointRefusedTests(unittest.SynchronousTestCase):
    def test_haproxyListenerRefused(self) -> None:
        from mailgw.config import ConfigError, configFromDict

        with self.assertRaises(ConfigError) as e:
            configFromDict({"server": {"submission": ["haproxy:tcp:587"]}}, source="f.toml")
        self.assertIn("f.toml: server.submission:", str(e.exception))
        self.assertIn("[proxy] trusted", str(e.exception))


class ServerSettingsTests(unittest.SynchronousTestCase):
    def test_writtenOnce(self) -> None:
        """
        Every listener setting but the host name is a [server] field of the
        same name and default, copied by name: adding one to ServerSettings
        without its [server] key fails here, not silently at run time.
        """
        import attrs

        from mailgw.config import ServerConfig
        from mailgw.server.settings import ServerSettings
        from mailgw.service import serverSettings

        server = {f.name: f.default for f in attrs.fields(ServerConfig)}
        for field in attrs.fields(ServerSettings):
            if field.name == "hostname":
                continue
            self.assertIn(field.name, server)
            self.assertEqual(field.default, server[field.name], field.name)
        config = configFromDict(
            {"server": {"hostname": "mx.example.org", "pre_auth_timeout": 12, "max_errors": 3}}
        )
        settings = serverSettings(config)
        self.assertEqual(
            (settings.hostname, settings.preAuthTimeout, settings.maxErrors),
            ("mx.example.org", 12, 3),
        )
