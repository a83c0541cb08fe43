"""
Tests for the relay route settings of L{mailgw.config}: TLS levels, MTA-STS,
sender-dependent routes and subdomain route keys, and their precedence.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailgw.config import ConfigError, RelayConfig, Route, TLSLevel, TLSMode, configFromDict
from mailgw.envelope import splitAddress


def relay(**data: Any) -> RelayConfig:
    return configFromDict({"relay": data}).relay


class LevelTests(SynchronousTestCase):
    def test_mxDefaults(self) -> None:
        route = relay(mx=True).default
        assert route is not None
        self.assertEqual((route.tlsLevel, route.mtaSts), (TLSLevel.MAY, True))

    def test_mxWithTLSKeepsItsMeaning(self) -> None:
        """A written ``tls`` without ``tls_level`` stays verified (no silent downgrade)."""
        route = relay(mx=True, tls="starttls").default
        assert route is not None
        self.assertIsNone(route.tlsLevel)
        route = relay(mx=True, tls_level="").default
        assert route is not None
        self.assertEqual(route.tlsLevel, TLSLevel.MAY)

    def test_smarthostDefaultUnchanged(self) -> None:
        route = relay(smarthosts=["smtp.example.net"]).default
        assert route is not None
        self.assertEqual((route.tlsLevel, route.tls, route.mtaSts), (None, TLSMode.STARTTLS, False))

    def test_levels(self) -> None:
        for level in TLSLevel:
            route = relay(mx=True, tls_level=level.value).default
            assert route is not None
            self.assertEqual(route.tlsLevel, level)
        route = relay(
            mx=True, tls_level="secure", tls_match=["Example.org", ".example.org"]
        ).default
        assert route is not None
        self.assertEqual(route.tlsMatch, ("example.org", ".example.org"))
        route = relay(mx=True, mta_sts=False).default
        assert route is not None
        self.assertFalse(route.mtaSts)

    def test_refused(self) -> None:
        cases = [
            ({"mx": True, "tls_level": "paranoid"}, "relay.tls_level"),
            ({"smarthosts": ["a.example"], "tls_level": "dane"}, "relay.tls_level"),
            ({"smarthosts": ["a.example"], "tls_level": "none"}, "relay.tls_level"),
            ({"smarthosts": ["a.example"], "mta_sts": True}, "relay.mta_sts"),
            ({"mx": True, "tls_match": ["example.org"]}, "relay.tls_match"),
            ({"mx": True, "tls_level": "may", "tls": "opportunistic"}, "relay.tls"),
            (
                {"smarthosts": ["a.example:465"], "tls": "implicit", "tls_level": "may"},
                "relay.tls_level",
            ),
        ]
        for data, key in cases:
            e = self.assertRaises(ConfigError, configFromDict, {"relay": data})
            self.assertEqual(e.key, key, data)

    def test_noPasswordWithoutRequiredTLS(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("pw\n")
        import os

        os.chmod(path, 0o600)
        data = {
            "smarthosts": ["a.example"],
            "tls_level": "may",
            "auth_user": "u",
            "auth_password_file": path,
        }
        e = self.assertRaises(ConfigError, configFromDict, {"relay": data})
        self.assertEqual(e.key, "relay.tls_level")
        data["tls_level"] = "encrypt"
        self.assertIsNotNone(configFromDict({"relay": data}).relay.default)


class PrecedenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = relay(
            smarthosts=["default.example.net"],
            domains={
                "example.org": {"smarthosts": ["exact.example.net"]},
                ".example.org": {"smarthosts": ["sub.example.net"]},
                ".deep.example.org": {"smarthosts": ["deep.example.net"]},
            },
            senders={
                "Alice@Example.com": {"smarthosts": ["alice.example.net"]},
                "@example.com": {"smarthosts": ["domain.example.net"]},
            },
        )

    def host(self, domain: str, sender: str | None = None) -> str:
        route = self.config.routeFor(domain, splitAddress(sender) if sender else None)
        assert route is not None
        return route.smarthosts[0].host

    def test_subdomainKeys(self) -> None:
        self.assertEqual(self.host("example.org"), "exact.example.net")
        self.assertEqual(self.host("a.example.org"), "sub.example.net")
        self.assertEqual(self.host("x.deep.example.org"), "deep.example.net")
        self.assertEqual(self.host("deep.example.org"), "sub.example.net")
        self.assertEqual(self.host("badexample.org"), "default.example.net")

    def test_senders(self) -> None:
        self.assertEqual(self.host("x.test", "alice@EXAMPLE.com"), "alice.example.net")
        self.assertEqual(self.host("x.test", "bob@example.com"), "domain.example.net")
        self.assertEqual(self.host("x.test", "bob@sub.example.com"), "default.example.net")
        self.assertEqual(self.host("x.test"), "default.example.net")

    def test_recipientDomainBeforeSender(self) -> None:
        self.assertEqual(self.host("a.example.org", "alice@example.com"), "sub.example.net")

    def test_badSenderKeys(self) -> None:
        for key in ("nodomain", "a@", "@exa mple.com"):
            data = {"relay": {"senders": {key: {"smarthosts": ["a.example"]}}}}
            e = self.assertRaises(ConfigError, configFromDict, data)
            self.assertEqual(e.key, f'relay.senders."{key}"')
        data = {"relay": {"senders": {"a@b.example": {"mx": True}}}}
        self.assertRaises(ConfigError, configFromDict, data)

    def test_routeFromCode(self) -> None:
        route = Route(mx=True)
        self.assertIs(RelayConfig(domains={".example.org": route}).routeFor("a.example.org"), route)
