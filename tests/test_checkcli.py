"""
Tests for ``mailgw check-config`` (mailgw.cli.check).
"""

from __future__ import annotations

import datetime
import io
import os
import resource
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailgw.auth.passwd import addUser
from mailgw.cli import main
from mailgw.config import configFromDict, loadConfig
from mailgw.tls import makeSelfSigned
from tests.integration.support import freePort, shortDirectory


class CheckConfigTests(SynchronousTestCase):
    extraArgs: list[str] = []

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        makeSelfSigned(str(self.base / "c.pem"), str(self.base / "k.pem"), "localhost")
        addUser(str(self.base / "passwd"), "a@b.c", "pw")
        self.port = freePort()

    def run_(self, text: str) -> tuple[int, str, str]:
        config = self.base / "mailgw.toml"
        config.write_text(text.format(base=self.base, port=self.port))
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["check-config", "--config", str(config), *self.extraArgs])
        return code, out.getvalue(), err.getvalue()

    GOOD = """
[server]
hostname = "localhost"
submission = ["tcp:port={port}:interface=127.0.0.1"]
[spool]
directory = "{base}/spool"
[tls]
certificate = "{base}/c.pem"
key = "{base}/k.pem"
[auth]
backends = ["passwd:{base}/passwd"]
"""

    def test_ok(self) -> None:
        code, out, err = self.run_(self.GOOD)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(": ok (1 listener(s), 1 auth backend(s), no relay route", out)

    def test_missingKey(self) -> None:
        code, out, err = self.run_(self.GOOD.replace("k.pem", "missing.pem"))
        self.assertEqual(code, 1)
        self.assertIn("mailgw.toml: tls.key:", err)

    def test_missingPasswdFile(self) -> None:
        code, _, err = self.run_(self.GOOD.replace("/passwd", "/nope"))
        self.assertEqual(code, 1)
        self.assertIn("auth.backends", err)

    def test_missingSenderMap(self) -> None:
        code, _, err = self.run_(self.GOOD + '[policy]\nsender_login_maps = "{base}/none"\n')
        self.assertEqual(code, 1)
        self.assertIn("policy.sender_login_maps", err)

    def test_exampleFileNamesItsProblems(self) -> None:
        """The shipped example needs its certificate: the error says so."""
        example = Path(__file__).parents[1] / "etc" / "mailgw.toml"
        text = example.read_text().replace("{", "{{").replace("}", "}}")
        self.extraArgs = ["--no-listen"]  # its ports are 587 and 465
        code, _, err = self.run_(text)
        self.assertEqual(code, 1)
        self.assertIn("tls.certificate", err)

    def test_everyProblem(self) -> None:
        """Every problem is reported, not just the first; the exit code is 1."""
        text = (
            self.GOOD.replace("k.pem", "missing.pem").replace("/passwd", "/nope")
            + '[policy]\nsender_login_maps = "{base}/none"\n'
        )
        code, out, err = self.run_(text)
        self.assertEqual((code, out), (1, ""))
        lines = err.splitlines()
        self.assertEqual(len(lines), 3, err)
        self.assertIn("tls.key", lines[0])
        self.assertIn("auth.backends", lines[1])
        self.assertIn("policy.sender_login_maps", lines[2])

    def test_portInUse(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", self.port))
            s.listen(1)
            code, _, err = self.run_(self.GOOD)
        self.assertEqual(code, 1)
        self.assertIn(f"server.submission: cannot listen on tcp:port={self.port}", err)
        self.assertIn("already in use", err)

    def test_noListenSkipsBinding(self) -> None:
        self.extraArgs = ["--no-listen"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", self.port))
            s.listen(1)
            code, _, err = self.run_(self.GOOD)
        self.assertEqual((code, err), (0, ""))

    def test_addressNotHere(self) -> None:
        code, _, err = self.run_(self.GOOD.replace("interface=127.0.0.1", "interface=192.0.2.1"))
        self.assertEqual(code, 1)
        self.assertIn("192.0.2.1 is not an address of this machine", err)

    def test_twoListenersOnePort(self) -> None:
        text = self.GOOD.replace("submission = [", 'submissions = ["tcp:{port}"]\nsubmission = [')
        code, _, err = self.run_(text)
        self.assertEqual(code, 1)
        self.assertIn(f"server.submissions: tcp:{self.port} uses port {self.port}", err)

    def test_spoolNotADirectory(self) -> None:
        (self.base / "afile").write_text("")
        code, _, err = self.run_(self.GOOD.replace("{base}/spool", "{base}/afile/spool"))
        self.assertEqual(code, 1)
        self.assertIn("spool.directory:", err)
        self.assertIn("afile is not a directory", err)

    def test_spoolNotWritable(self) -> None:
        """
        The spool is checked as the user check-config runs as (the service's
        user under systemd): root runs the command as nobody here.
        """
        ro = self.base / "ro"
        ro.mkdir(mode=0o755)
        os.chmod(ro, 0o755)
        self.addCleanup(os.chmod, ro, 0o700)
        if os.getuid() != 0:
            os.chmod(ro, 0o555)
            code, _, err = self.run_(self.GOOD.replace("{base}/spool", "{base}/ro/spool"))
        else:
            # Somewhere nobody can reach: a directory of its own under /tmp.
            public = shortDirectory(self)
            os.chmod(public, 0o755)
            (public / "ro").mkdir(mode=0o755)
            config = public / "mailgw.toml"
            config.write_text(
                self.GOOD.replace("{base}/spool", f"{public}/ro/spool").format(
                    base=self.base, port=self.port
                )
            )
            os.chmod(config, 0o644)
            argv = [sys.executable, "-m", "mailgw", "check-config", "--config", str(config)]
            try:
                result = subprocess.run(
                    argv, capture_output=True, text=True, user=65534, timeout=60
                )
            except PermissionError:
                raise SkipTest(f"nobody cannot run {sys.executable}") from None
            code, err = result.returncode, result.stderr
        self.assertEqual(code, 1, err)
        self.assertIn("spool.directory: cannot write in", err)

    def test_spoolOnReadOnlyFileSystem(self) -> None:
        """Even root cannot create the spool in /proc."""
        if not os.path.isdir("/proc/self"):
            raise SkipTest("no /proc here")
        code, _, err = self.run_(self.GOOD.replace("{base}/spool", "/proc/mailgw-spool"))
        self.assertEqual(code, 1)
        self.assertIn("spool.directory: cannot write in /proc (to create /proc/mailgw-spool)", err)

    def test_keyReadableByOthers(self) -> None:
        os.chmod(self.base / "k.pem", 0o644)
        code, _, err = self.run_(self.GOOD)
        self.assertEqual(code, 1)
        self.assertIn("tls.key:", err)
        self.assertIn("readable by everyone", err)

    def test_keyReadableByGroup(self) -> None:
        os.chmod(self.base / "k.pem", 0o640)
        code, out, err = self.run_(self.GOOD)
        self.assertEqual(code, 0)
        self.assertIn("mailgw: warning:", err)
        self.assertIn("readable by its group", err)
        self.assertIn("1 warning(s)", out)

    def test_filterWithoutReinjection(self) -> None:
        """A content filter with nowhere to hand mail back: a warning, and where."""
        code, out, err = self.run_(
            self.GOOD + '[filter]\ncontent_filter = "smtp:127.0.0.1:10024"\n'
        )
        self.assertEqual(code, 0)
        self.assertIn("mailgw.toml: filter.content_filter: no [reinject] listen", err)
        self.assertIn("1 warning(s)", out)
        reinject = f'[reinject]\nlisten = ["tcp:port={freePort()}:interface=127.0.0.1"]\n'
        code, out, err = self.run_(
            self.GOOD + '[filter]\ncontent_filter = "smtp:127.0.0.1:10024"\n' + reinject
        )
        self.assertEqual((code, err), (0, ""))

    def newCertificate(self, hostname: str, days: int, ago: int = 0) -> None:
        for name in ("c.pem", "k.pem"):
            (self.base / name).unlink()
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=ago)
        makeSelfSigned(
            str(self.base / "c.pem"), str(self.base / "k.pem"), hostname, days=days, now=now
        )

    def test_expiredCertificate(self) -> None:
        self.newCertificate("localhost", days=10, ago=20)
        code, _, err = self.run_(self.GOOD)
        self.assertEqual(code, 1)
        self.assertIn("tls.certificate:", err)
        self.assertIn("the certificate expired on", err)

    def test_expiringCertificate(self) -> None:
        self.newCertificate("localhost", days=5)
        code, _, err = self.run_(self.GOOD)
        self.assertEqual(code, 0)
        self.assertIn("mailgw: warning:", err)
        self.assertIn("in 4 day(s): renew it", err)

    def test_certificateForAnotherName(self) -> None:
        code, _, err = self.run_(self.GOOD.replace('"localhost"', '"mail.example.com"'))
        self.assertEqual(code, 0)
        self.assertIn("not valid for mail.example.com", err)

    def test_fileDescriptors(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            raise SkipTest("no hard limit on open files")
        code, _, err = self.run_(self.GOOD + f"[limits]\nmax_connections = {hard}\n")
        self.assertEqual(code, 0)
        self.assertIn("limits.max_connections:", err)
        self.assertIn(f"the hard limit is {hard}", err)


class ShowConfigTests(SynchronousTestCase):
    def run_(self, text: str, *args: str) -> tuple[int, str, str]:
        config = Path(self.mktemp())
        config.write_text(text)
        self.path = str(config)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return main(["show-config", "--config", str(config), *args]), out.getvalue(), err.getvalue()

    TEXT = """
[server]
submission = ["tcp:587"]
max_recipients = 7
[limits]
exempt = ["10.0.0.0/8"]
[relay]
smarthosts = ["smtp.example.net:587", "[2001:db8::1]:25"]
connect_timeout = 10
[relay.domains."example.org"]
mx = true
tls = "opportunistic"
[relay.domains.".example.net"]
mx = true
tls = "starttls"
[relay.domains."example.com"]
mx = true
tls_level = "secure"
tls_match = [".example.com"]
[relay.senders."@example.com"]
smarthosts = ["smtp.example.com"]
[policy]
allowed_recipient_domains = ["example.org"]
[policy.recipient_domains]
"alice@example.com" = [".example.net"]
"""

    def test_roundTrip(self) -> None:
        """What show-config prints, read back, is the same configuration."""
        code, out, err = self.run_(self.TEXT)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("max_recipients = 7\n", out)
        self.assertIn("max_message_size = 36700160\n", out)  # a default, shown too
        again = configFromDict(tomllib.loads(out), source=self.path)
        self.assertEqual(again, loadConfig(self.path))

    def test_changed(self) -> None:
        code, out, _ = self.run_(self.TEXT, "--changed")
        self.assertEqual(code, 0)
        self.assertIn("max_recipients = 7\n", out)
        self.assertNotIn("max_message_size", out)
        self.assertNotIn("[queue]", out)
        again = configFromDict(tomllib.loads(out), source=self.path)
        self.assertEqual(again, loadConfig(self.path))

    def test_badFile(self) -> None:
        code, _, err = self.run_("[server]\nmax_recipients = 'x'\n")
        self.assertEqual(code, 1)
        self.assertIn("server.max_recipients", err)
