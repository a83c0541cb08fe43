"""
The package metadata tells the truth: every dependency floor in setup.cfg is
pinned in .ci/oldest-constraints.txt (which CI runs the whole suite against),
and the Twisted API the relay needs exists in the Twisted installed here.
"""

from __future__ import annotations

import configparser
import inspect
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parents[1]
_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _floors(text: str) -> dict[str, str]:
    floors = {}
    for line in text.strip().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _REQUIREMENT.match(line)
        if match:
            floors[_normalise(match.group(1))] = match.group(2)
    return floors


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


class FloorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.setup = configparser.ConfigParser()
        self.setup.read(ROOT / "setup.cfg")
        self.pins = {}
        for line in (ROOT / ".ci" / "oldest-constraints.txt").read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                self.pins[_normalise(name)] = version

    def test_everyFloorPinned(self) -> None:
        """Each declared floor is in the constraints file, at that very version."""
        floors = _floors(self.setup["options"]["install_requires"])
        floors.update(_floors(self.setup["options.extras_require"]["test"]))
        self.assertIn("twisted", floors)
        for name, floor in floors.items():
            self.assertIn(name, self.pins, f"{name} >= {floor} is not in the constraints file")
            self.assertEqual(_release(self.pins[name]), _release(floor), name)

    def test_twistedFloor(self) -> None:
        """
        Implicit-TLS relay passes its clock to wrapClientTLS (Twisted 26.4):
        the declared floor is at least that.
        """
        from twisted.internet.endpoints import wrapClientTLS

        self.assertIn("clock", inspect.signature(wrapClientTLS).parameters)
        floors = _floors(self.setup["options"]["install_requires"])
        self.assertGreaterEqual(_release(floors["twisted"]), (26, 4))

    def test_noPluginPackageInit(self) -> None:
        """twisted/plugins/ must not become a regular package (it would shadow Twisted's)."""
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())
        self.assertTrue((ROOT / "twisted" / "plugins" / "mailgw_tap.py").exists())
