"""
Tests for ``mailgw dkim keygen`` and ``mailgw dkim show`` (mailgw.cli.dkim),
and for the DKIM keys in ``mailgw check-config``.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailgw.cli import main
from mailgw.dkim.config import DomainSigning
from mailgw.dkim.keys import loadKey
from mailgw.dkim.signer import MessageSigner
from tests import test_checkcli
from tests.dkimhelp import verifyAll, writeKey, zoneValue

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"


class CommandTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()

    def mailgw(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return main(list(args)), out.getvalue(), err.getvalue()


class KeygenTests(CommandTestCase):
    def keygen(self, *args: str) -> tuple[int, str, str]:
        return self.mailgw("dkim", "keygen", "--directory", str(self.base / "keys"), *args)

    def check(self, algorithm: str, *args: str) -> None:
        code, out, err = self.keygen("Example.ORG", "Mail2026", "--algorithm", algorithm, *args)
        self.assertEqual((code, err), (0, ""))
        path = self.base / "keys" / "example.org.mail2026.key"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertIn(f"written to {path}", out)
        name, value = zoneValue(out)
        self.assertEqual(name, "mail2026._domainkey.example.org.")
        self.assertTrue(value.startswith("v=DKIM1; k="))
        # The printed record verifies a signature made with the written key (dkimpy).
        key = loadKey(DomainSigning("example.org", "mail2026", str(path), algorithm))
        signed = MessageSigner([key]).sign(MESSAGE) + MESSAGE
        self.assertEqual(verifyAll(signed, {name: value}), [True])
        wrong = value[:-6] + ("B" if value[-6] == "A" else "A") + value[-5:]
        self.assertEqual(verifyAll(signed, {name: wrong}), [False])

    def test_rsa(self) -> None:
        self.check("rsa-sha256")
        out = self.mailgw(
            "dkim",
            "keygen",
            "--directory",
            str(self.base / "k4"),
            "x.example",
            "s",
            "--bits",
            "4096",
        )[1]
        value = zoneValue(out)[1]
        self.assertGreater(len(value), 255)  # split into strings of 255 at most

    def test_ed25519(self) -> None:
        self.check("ed25519-sha256")

    def test_umaskDoesNotWiden(self) -> None:
        old = os.umask(0)
        try:
            self.check("ed25519-sha256")
        finally:
            os.umask(old)

    def test_neverOverwrites(self) -> None:
        self.assertEqual(self.keygen("example.org", "s")[0], 0)
        path = self.base / "keys" / "example.org.s.key"
        before = path.read_bytes()
        code, out, err = self.keygen("example.org", "s")
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{path}: already exists; give --force", err)
        self.assertEqual(path.read_bytes(), before)
        code, out, err = self.keygen("example.org", "s", "--force")
        self.assertEqual(code, 0)
        self.assertNotEqual(path.read_bytes(), before)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.base / "keys")), ["example.org.s.key"])

    def test_badArguments(self) -> None:
        for args, problem in (
            (("example.org", "s", "--bits", "512"), "--bits 512: must be from 1024 to 4096"),
            (("not a domain", "s"), "not a domain: not a valid domain name"),
            (("example.org", "bad selector"), "a selector is a DNS name"),
        ):
            code, _, err = self.keygen(*args)
            self.assertEqual(code, 1)
            self.assertIn(problem, err)
        self.assertFalse((self.base / "keys").exists())


class ShowTests(CommandTestCase):
    def config(self, key: str, algorithm: str = "rsa-sha256") -> str:
        path = self.base / "mailgw.toml"
        path.write_text(
            "[[dkim.domains]]\n"
            f'domain = "example.org"\nselector = "s1"\nkey_file = "{key}"\n'
            f'algorithm = "{algorithm}"\n'
        )
        return str(path)

    def test_show(self) -> None:
        key = writeKey(str(self.base), "k.key", "ed25519-sha256")
        code, out, err = self.mailgw("dkim", "show", "--config", self.config(key, "ed25519-sha256"))
        self.assertEqual((code, err), (0, ""))
        loaded = loadKey(DomainSigning("example.org", "s1", key, "ed25519-sha256"))
        self.assertEqual(zoneValue(out), ("s1._domainkey.example.org.", loaded.record))

    def test_badKey(self) -> None:
        key = writeKey(str(self.base), "k.key", "ed25519-sha256")
        config = self.config(key)  # an Ed25519 key for rsa-sha256
        code, out, err = self.mailgw("dkim", "show", "--config", config)
        self.assertEqual(code, 1)
        self.assertIn(f"{config}: dkim.domains[0].key_file: {key} is an Ed25519 key", err)

    def test_showConfigRoundTrip(self) -> None:
        """mailgw show-config prints each [[dkim.domains]], and reading it back gives the same."""
        from mailgw.config import loadConfig

        key = writeKey(str(self.base), "k.key", "ed25519-sha256")
        config = self.config(key, "ed25519-sha256")
        with open(config, "a") as f:
            f.write('oversign = ["from", "subject"]\n')
        code, out, err = self.mailgw("show-config", "--config", config)
        self.assertEqual((code, err), (0, ""))
        self.assertIn('[[dkim.domains]]\ndomain = "example.org"\nselector = "s1"\n', out)
        again = self.base / "again.toml"
        again.write_text(out)
        self.assertEqual(loadConfig(str(again)).dkim, loadConfig(config).dkim)
        self.assertEqual(len(loadConfig(str(again)).dkim.domains), 1)

    def test_nothingConfigured(self) -> None:
        path = self.base / "mailgw.toml"
        path.write_text("")
        code, out, _ = self.mailgw("dkim", "show", "--config", str(path))
        self.assertEqual(code, 0)
        self.assertIn("nothing is signed", out)


class CheckConfigDKIMTests(SynchronousTestCase):
    """check-config reads the DKIM keys: each problem names file, key and problem."""

    setUp = test_checkcli.CheckConfigTests.setUp
    run_ = test_checkcli.CheckConfigTests.run_
    GOOD = test_checkcli.CheckConfigTests.GOOD
    extraArgs = ["--no-listen"]

    def test_dkimKeys(self) -> None:
        good = writeKey(str(self.base), "good.key")
        first = f'[[dkim.domains]]\ndomain = "example.org"\nselector = "a"\nkey_file = "{good}"\n'
        entries = first + (
            "[[dkim.domains]]\n"
            'domain = "example.org"\nselector = "b"\nkey_file = "{base}/none.key"\n'
            "[[dkim.domains]]\n"
            f'domain = "example.com"\nselector = "c"\nkey_file = "{good}"\n'
            'algorithm = "ed25519-sha256"\n'
        )
        code, _, err = self.run_(self.GOOD + entries)
        self.assertEqual(code, 1)
        self.assertIn("mailgw.toml: dkim.domains[1].key_file: cannot read", err)
        self.assertIn("mailgw.toml: dkim.domains[2].key_file:", err)
        self.assertIn("is an RSA key, but algorithm is ed25519-sha256", err)
        self.assertNotIn("dkim.domains[0]", err)
        code, out, err = self.run_(self.GOOD + first)
        self.assertEqual((code, err), (0, ""), out)
