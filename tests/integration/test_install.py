"""
The release as an operator gets it: build the sdist and wheel from a copy of
the source tree, install the wheel (and its declared dependencies, from the
index pip is configured with) into a fresh virtualenv outside the checkout,
and from there run ``mailgw check-config`` and a real submission through
``twistd mailgw`` (STARTTLS and implicit TLS, AUTH, message in the spool).

This is the test that catches a package or file missing from the wheel: the
rest of the suite imports mailgw from the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import smtplib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailgw.tls import makeSelfSigned
from tests.integration.support import (
    PASSWORD,
    ROOT,
    USER,
    clientContext,
    freePort,
    run,
    shortDirectory,
    stopProcess,
    waitForPort,
)

#: What the copy of the source tree leaves out: local state, never sources.
_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "_trial_temp*",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    "dropin.cache",
    "demo",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
)


def _buildToolingMissing() -> str | None:
    for module in ("build", "venv", "ensurepip", "pip"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} module is not installed"
    return None


def sourcePackages() -> set[str]:
    """Every package directory under mailgw/ in the checkout, as a wheel path."""
    return {
        str(init.parent.relative_to(ROOT)) + "/__init__.py"
        for init in (ROOT / "mailgw").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


class WheelInstallTests(TestCase):
    # The first run on a machine downloads the dependencies; later runs
    # install them from pip's cache in seconds.
    timeout = 900

    def setUp(self) -> None:
        missing = _buildToolingMissing()
        if missing:
            raise SkipTest(f"cannot build a wheel here: {missing}")
        self.work = shortDirectory(self)

    def environ(self, venv: Path) -> dict[str, str]:
        """A shell's environment in ``venv``, which knows nothing of the checkout."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "/usr/bin:/bin")])
        env["VIRTUAL_ENV"] = str(venv)
        return env

    @inlineCallbacks
    def runChecked(self, *argv: str, **kwargs: Any) -> Any:
        result = yield run(*argv, **kwargs)
        self.assertEqual(
            result.returncode,
            0,
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}",
        )
        return result

    @inlineCallbacks
    def build(self) -> Any:
        source, dist = self.work / "src", self.work / "dist"
        shutil.copytree(ROOT, source, ignore=_IGNORE)
        # As a release is built: the sdist first, then the wheel from the sdist.
        yield self.runChecked(
            sys.executable, "-m", "build", "--outdir", str(dist), str(source), timeout=600
        )
        (wheel,) = dist.glob("*.whl")
        (sdist,) = dist.glob("*.tar.gz")
        return wheel, sdist

    def checkContents(self, wheel: Path, sdist: Path) -> None:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
        version = wheel.name.split("-")[1]
        missing = sourcePackages() - names
        self.assertEqual(missing, set(), "packages missing from the wheel")
        self.assertIn("twisted/plugins/mailgw_tap.py", names)
        self.assertIn("twisted/plugins/mailgw_auth.py", names)
        # Twisted's own plugin package must not be shadowed by ours.
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertTrue([n for n in names if n.endswith(".dist-info/licenses/LICENSE")], names)
        shipped = [p.relative_to(ROOT / "etc").as_posix() for p in (ROOT / "etc").rglob("*")]
        for example in [p for p in shipped if (ROOT / "etc" / p).is_file()]:
            self.assertIn(f"mailgw-{version}.data/data/share/mailgw/{example}", names)
        with tarfile.open(sdist) as t:
            members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
        for path in ("LICENSE", "etc/mailgw.toml", "etc/fail2ban/mailgw.conf", "CHANGELOG.md"):
            self.assertIn(path, members)

    @inlineCallbacks
    def test_wheelInAFreshVenv(self) -> Any:
        wheel, sdist = yield self.build()
        self.checkContents(wheel, sdist)

        venv = self.work / "venv"
        yield self.runChecked(sys.executable, "-m", "venv", str(venv), timeout=300)
        env = self.environ(venv)
        bindir = venv / "bin"
        # The wheel's declared dependencies must resolve from the index.
        yield self.runChecked(
            str(bindir / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            str(wheel),
            cwd=str(self.work),
            env=env,
            timeout=800,
        )
        result = yield self.runChecked(
            str(bindir / "python"),
            "-c",
            "import mailgw, mailgw.limits, twisted.plugins.mailgw_tap; print(mailgw.__file__)",
            cwd=str(self.work),
            env=env,
        )
        self.assertTrue(result.stdout.strip().startswith(str(venv)), result.stdout)
        self.assertTrue((venv / "share" / "mailgw" / "mailgw.toml").is_file())
        result = yield self.runChecked(str(bindir / "mailgw"), "--version", env=env)
        self.assertTrue(result.stdout.startswith("mailgw "), result.stdout)

        files = self.work / "etc"
        files.mkdir()
        makeSelfSigned(str(files / "cert.pem"), str(files / "key.pem"), "localhost")
        yield self.runChecked(
            str(bindir / "mailgw"),
            "passwd",
            "add",
            USER,
            "--file",
            str(files / "passwd"),
            "--password-stdin",
            input=PASSWORD + "\n",
            env=env,
        )
        submission, submissions = freePort(), freePort()
        spool = self.work / "spool"
        config = files / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["tcp:port={submission}:interface=127.0.0.1"]
submissions = ["tcp:port={submissions}:interface=127.0.0.1"]
[tls]
certificate = "{files}/cert.pem"
key = "{files}/key.pem"
[auth]
backends = ["passwd:{files}/passwd"]
[spool]
directory = "{spool}"
"""
        )
        result = yield self.runChecked(
            str(bindir / "mailgw"), "check-config", "--config", str(config), env=env
        )
        self.assertIn(": ok (2 listener(s)", result.stdout)

        log = self.work / "twistd.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    str(bindir / "twistd"),
                    "--nodaemon",
                    "--pidfile=",
                    "--logfile=-",
                    "mailgw",
                    "--config",
                    str(config),
                ],
                cwd=str(self.work),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        self.addCleanup(stopProcess, process)
        yield deferToThread(waitForPort, submission, process, str(log), 60)
        yield deferToThread(waitForPort, submissions, process, str(log), 60)

        def submit() -> None:
            context = clientContext(str(files / "cert.pem"))
            with smtplib.SMTP("localhost", submission, timeout=30) as smtp:
                smtp.starttls(context=context)
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.org"], b"Subject: 1\r\n\r\nvia 587\r\n")
            with smtplib.SMTP_SSL("localhost", submissions, context=context, timeout=30) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["carol@example.org"], b"Subject: 2\r\n\r\nvia 465\r\n")

        yield deferToThread(submit)
        result = yield self.runChecked(
            str(bindir / "mailgw"), "queue", "list", "--json", "--spool", str(spool), env=env
        )
        listed = json.loads(result.stdout)
        recipients = sorted(r["address"] for m in listed for r in m["recipients"])
        self.assertEqual(recipients, ["bob@example.org", "carol@example.org"], log.read_text())
