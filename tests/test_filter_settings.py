"""
Tests for L{mailgw.filter.settings}: the [filter], [reinject] and [etrn]
sections as read, as ``mailgw show-config`` writes them back, and as the
example configuration spells their defaults.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from mailgw.cli.show import render
from mailgw.config import Config, configFromDict
from mailgw.filter.settings import LOOPBACK, EtrnConfig, FilterConfig, ReinjectConfig
from tests import test_checkcli

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "etc", "mailgw.toml")


class FilterSettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = Config()
        self.assertFalse(config.filter.enabled)
        self.assertEqual(config.filter.name, "")
        self.assertEqual(config.reinject, ReinjectConfig((), LOOPBACK))
        self.assertEqual(config.etrn, EtrnConfig(False, ()))

    def test_exampleSpellsTheDefaults(self) -> None:
        with open(EXAMPLE, "rb") as f:
            data = tomllib.load(f)
        parsed = configFromDict({k: data[k] for k in ("filter", "reinject", "etrn")})
        self.assertEqual(parsed.filter, FilterConfig())
        self.assertEqual(parsed.reinject, ReinjectConfig())
        self.assertEqual(parsed.etrn, EtrnConfig())

    def test_addresses(self) -> None:
        for text, protocol, host, port in [
            ("smtp:127.0.0.1:10024", "smtp", "127.0.0.1", 10024),
            ("lmtp:[::1]:10024", "lmtp", "::1", 10024),
            ("smtp:localhost:10026", "smtp", "localhost", 10026),
            ("smtp:127.0.0.2:25", "smtp", "127.0.0.2", 25),
        ]:
            f = configFromDict({"filter": {"content_filter": text}}).filter
            self.assertEqual((f.protocol, f.host, f.port, f.name), (protocol, host, port, text))
            self.assertTrue(f.enabled)

    def test_holdReplies(self) -> None:
        f = configFromDict({"filter": {"hold_replies": ["quarantin", r"^4\.7\.1"]}}).filter
        self.assertTrue(f.holdReplies[0].search("550 5.7.1 QUARANTINED"))

    def test_showConfigRoundTrip(self) -> None:
        """show-config writes the sections as a file that reads back the same."""
        config = configFromDict(
            {
                "filter": {
                    "content_filter": "lmtp:[::1]:10024",
                    "hold_replies": ["quarantin"],
                    "reply_timeout": 120,
                },
                "reinject": {
                    "listen": ["tcp:port=10025:interface=127.0.0.1"],
                    "networks": ["127.0.0.1/32"],
                },
                "etrn": {"enabled": True, "networks": ["192.0.2.0/24"]},
            }
        )
        again = configFromDict(tomllib.loads(render(config)))
        self.assertEqual(again.filter, config.filter)
        self.assertEqual(again.reinject, config.reinject)
        self.assertEqual(again.etrn.networks, (ipaddress.ip_network("192.0.2.0/24"),))
        changed = render(config, changed=True)
        self.assertIn('content_filter = "lmtp:[::1]:10024"', changed)
        self.assertNotIn("max_connections", changed)
        self.assertNotIn("[filter]", render(Config(), changed=True))


class CheckConfigTests(SynchronousTestCase):
    setUp = test_checkcli.CheckConfigTests.setUp
    run_ = test_checkcli.CheckConfigTests.run_
    extraArgs: list[str] = []

    def test_reinjectionListenerChecked(self) -> None:
        """check-config binds the reinjection listeners too: a port taken twice is named."""
        text = test_checkcli.CheckConfigTests.GOOD
        text += '[reinject]\nlisten = ["tcp:port={port}:interface=127.0.0.1"]\n'
        code, _, err = self.run_(text)
        self.assertEqual(code, 1)
        self.assertIn("reinject.listen: tcp:port=", err)
