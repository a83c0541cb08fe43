"""
``twistd mailgw`` as an operator runs it: the demo, a third-party auth
plugin installed as a separate package, and configuration errors.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailgw.auth.passwd import addUser
from mailgw.tls import makeSelfSigned
from tests.integration.support import (
    ROOT,
    clientContext,
    freePort,
    run,
    shortDirectory,
    stopProcess,
    waitForPort,
)

FIXTURES = ROOT / "tests" / "fixtures"


def twistdCommand(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "--logfile=-",
        "mailgw",
        *args,
    ]


def environment(*paths: str) -> dict[str, str]:
    """
    The environment of a twistd child: mailgw is found where it is
    installed (the dev venv's editable install), never through PYTHONPATH;
    ``paths`` are extra directories such as a third-party plugin's.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class TwistdTests(TestCase):
    timeout = 120

    def start(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, int]:
        submission, submissions = freePort(), freePort()
        log = open(self.mktemp(), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            twistdCommand(
                *args,
                "--submission",
                f"tcp:port={submission}:interface=127.0.0.1",
                "--submissions",
                f"tcp:port={submissions}:interface=127.0.0.1",
            ),
            env=env or environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.logPath = log.name

        self.addCleanup(stopProcess, process)
        waitForPort(submission, process, log.name)
        waitForPort(submissions, process, log.name)
        self.process = process
        return submission, submissions

    def shortTemp(self) -> Path:
        """A directory with a short path: a UNIX socket path has ~107 octets."""
        path = Path(tempfile.mkdtemp(prefix="mailgw-"))
        self.addCleanup(shutil.rmtree, path, True)
        return path / "demo"

    def log(self) -> str:
        return Path(self.logPath).read_text(errors="replace")

    @inlineCallbacks
    def test_demo(self) -> Any:
        demo = self.shortTemp()
        submission, submissions = yield deferToThread(self.start, "--demo", "--demo-dir", str(demo))
        password = (demo / "demo-password").read_text().strip()
        self.assertIn(password, self.log())

        def submit() -> None:
            context = clientContext(str(demo / "cert.pem"))
            with smtplib.SMTP("localhost", submission, timeout=30) as smtp:
                smtp.starttls(context=context)
                smtp.login("demo@localhost", password)
                smtp.sendmail("demo@localhost", ["bob@example.org"], b"Subject: demo\r\n\r\nhi\r\n")
            with smtplib.SMTP_SSL("localhost", submissions, context=context, timeout=30) as smtp:
                smtp.user, smtp.password = "demo@localhost", password
                smtp.ehlo()
                smtp.auth("CRAM-MD5", smtp.auth_cram_md5)
                smtp.sendmail("demo@localhost", ["carol@example.org"], b"Subject: 2\r\n\r\nhi\r\n")

        yield deferToThread(submit)
        queued = sorted((demo / "spool" / "queue").glob("*.json"))
        self.assertEqual(len(queued), 2, self.log())
        self.assertIn("queued", self.log())
        # The password is shown in the banner, never in the log lines.
        logLines = [line for line in self.log().splitlines() if line[:4].isdigit()]
        self.assertTrue(logLines)
        self.assertNotIn(password, "\n".join(logLines))
        self.assertIn(f"127.0.0.1:{submission}", self.log())

    @inlineCallbacks
    def test_thirdPartyAuthPlugin(self) -> Any:
        """
        A separately installed package that ships twisted/plugins/acme_auth.py
        adds the ``acme:`` backend; ``--auth acme:...`` logs in through it.
        """
        target = Path(self.mktemp()).absolute()
        source = Path(self.mktemp()).absolute()
        shutil.copytree(FIXTURES / "acme-auth", source)  # pip builds in the source tree
        result = yield run(
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
            timeout=180,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue((target / "twisted" / "plugins" / "acme_auth.py").exists())
        demo = self.shortTemp()
        submission, _ = yield deferToThread(
            self.start,
            "--demo",
            "--demo-dir",
            str(demo),
            "--auth",
            "acme:bob@acme.test:s3cret",
            env=environment(str(target)),
        )

        def login(user: str, password: str) -> int:
            with smtplib.SMTP("localhost", submission, timeout=30) as smtp:
                smtp.starttls(context=clientContext(str(demo / "cert.pem")))
                try:
                    code, _ = smtp.login(user, password)
                except smtplib.SMTPAuthenticationError as e:
                    return int(e.smtp_code)
                return int(code)

        code = yield deferToThread(login, "bob@acme.test", "s3cret")
        self.assertEqual(code, 235)
        # --auth replaced the demo's passwd backend.
        demoPassword = (demo / "demo-password").read_text().strip()
        code = yield deferToThread(login, "demo@localhost", demoPassword)
        self.assertEqual(code, 535)

    @inlineCallbacks
    def test_configErrorNamesFileAndKey(self) -> Any:
        config = Path(self.mktemp())
        config.write_text('[server]\nmax_recipients = "ten"\n')
        result = yield run(*twistdCommand("--config", str(config)), env=environment())
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{config}: server.max_recipients:", result.stderr + result.stdout)

    @inlineCallbacks
    def test_refusesToStartWithoutListener(self) -> Any:
        config = Path(self.mktemp())
        config.write_text('[auth]\nbackends = ["memory:a:b"]\n')
        result = yield run(*twistdCommand("--config", str(config)), env=environment())
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("server.submission: no listener", result.stderr + result.stdout)

    def writeConfig(self, spool: str, port: int) -> Path:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        makeSelfSigned(str(base / "cert.pem"), str(base / "key.pem"), "localhost")
        addUser(str(base / "passwd"), "a@b.c", "pw")
        config = base / "mailgw.toml"
        config.write_text(
            f"""
[server]
hostname = "localhost"
submission = ["tcp:port={port}:interface=127.0.0.1"]
[tls]
certificate = "{base}/cert.pem"
key = "{base}/key.pem"
[auth]
backends = ["passwd:{base}/passwd"]
[spool]
directory = "{spool}"
"""
        )
        return config

    @inlineCallbacks
    def test_unwritableSpoolIsOneLine(self) -> Any:
        """A spool that cannot be created ends start-up with one line, no traceback."""
        if not os.path.isdir("/proc/self"):
            raise SkipTest("no /proc here")
        config = self.writeConfig("/proc/mailgw-spool", freePort())
        result = yield run(*twistdCommand("--config", str(config)), env=environment())
        output = result.stderr + result.stdout
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(
            [line for line in output.splitlines() if "spool.directory" in line],
            [
                f"mailgw: {config}: spool.directory: cannot open spool /proc/mailgw-spool: "
                "[Errno 2] No such file or directory: '/proc/mailgw-spool'"
            ],
        )

    @inlineCallbacks
    def test_raisesFileLimit(self) -> Any:
        """Started with a soft limit of 256 open files, twistd mailgw raises it to the hard one."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 256:
            raise SkipTest(f"the hard limit is {hard}")
        port = freePort()
        config = self.writeConfig(str(shortDirectory(self) / "spool"), port)

        def lowered() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

        log = open(self.mktemp(), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            twistdCommand("--config", str(config)),
            env=environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lowered,
        )
        self.addCleanup(lambda: (process.terminate(), process.wait(20)))
        yield deferToThread(waitForPort, port, process, log.name)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        expected = str(1 << 20) if hard == resource.RLIM_INFINITY else str(hard)
        self.assertEqual(line.split()[3], expected)  # Max open files SOFT HARD files
        self.assertIn("soft limit raised from 256", Path(log.name).read_text())

    @inlineCallbacks
    def test_jsonLog(self) -> Any:
        """--log-format json: every log line is one JSON object, the story included."""
        demo = self.shortTemp()
        submission, _ = yield deferToThread(
            self.start, "--demo", "--demo-dir", str(demo), "--log-format", "json"
        )
        password = (demo / "demo-password").read_text().strip()

        def submit() -> None:
            with smtplib.SMTP("localhost", submission, timeout=30) as smtp:
                smtp.starttls(context=clientContext(str(demo / "cert.pem")))
                smtp.login("demo@localhost", password)
                smtp.sendmail("demo@localhost", ["bob@example.org"], b"Subject: j\r\n\r\nhi\r\n")

        yield deferToThread(submit)
        self.process.terminate()
        self.process.wait(20)
        lines = self.log().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        # The rest is the demo's banner (on stderr), never a text log line.
        self.assertFalse([line for line in lines if line[:4].isdigit()], self.log())
        self.assertTrue(any("queued" in r["text"] for r in records), self.log())
        for record in records:
            self.assertEqual(
                sorted(set(record) & {"time", "level", "namespace", "system", "text"}),
                ["level", "namespace", "system", "text", "time"],
            )

    @inlineCallbacks
    def test_logFileReopenedOnSIGUSR1(self) -> Any:
        """
        As logrotate does: rename the log file, send SIGUSR1; the next lines
        go to a new file by the old name.
        """
        port = freePort()
        config = self.writeConfig(str(shortDirectory(self) / "spool"), port)
        logPath = Path(self.mktemp()).absolute()
        command = twistdCommand("--config", str(config))
        command[command.index("--logfile=-")] = f"--logfile={logPath}"
        process = subprocess.Popen(command, env=environment())
        self.addCleanup(lambda: (process.terminate(), process.wait(20)))
        yield deferToThread(waitForPort, port, process, str(logPath))
        rotated = Path(str(logPath) + ".1")
        logPath.rename(rotated)
        process.send_signal(signal.SIGUSR1)

        def waitFor(path: Path, text: str) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and process.poll() is None:
                if path.exists() and text in path.read_text():
                    return
                # SIGHUP makes the gateway log a line ("Reloaded ...").
                process.send_signal(signal.SIGHUP)
                time.sleep(0.2)
            self.fail(f"no {text!r} in {path}: {process.poll()}")

        yield deferToThread(waitFor, logPath, "Reloaded the configuration")
        self.assertIn("listening on", rotated.read_text())
        self.assertNotIn("listening on", logPath.read_text())
