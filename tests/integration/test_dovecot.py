"""
The C{dovecot:} backend against a real Dovecot (Debian's dovecot-core):
started by each test in its own directory, with its own configuration
(auth service only, a passwd-file passdb and userdb, a UNIX listener and a
TCP listener on 127.0.0.1), in the foreground, and stopped by its pid. A
real gateway in front; smtplib logs in over STARTTLS.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from mailgw.auth.dovecot import DovecotUnavailable
from tests.integration.support import (
    GatewayTestCase,
    clientContext,
    freePort,
    shortDirectory,
)

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
USER = "carol@example.com"
PASSWORD = "dovecot horse staple"
#: Users whose stored value lets Dovecot serve CRAM-MD5 or SCRAM-SHA-256 too.
CRAM_USER = "cram@example.com"
SCRAM_USER = "scram@example.com"


def _config(base: Path, port: int, extra: str = "") -> str:
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain login cram-md5 scram-sha-256
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
passdb {{
  driver = passwd-file
  args = {base}/users
}}
userdb {{
  driver = passwd-file
  args = {base}/users
}}
service auth {{
  unix_listener auth-client {{
    path = {base}/auth-client
    mode = 0600
  }}
  inet_listener auth-inet {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
{extra}
"""


class Dovecot:
    """
    A Dovecot auth service of our own, in ``base``: ``users`` are
    C{(login, scheme, password)}, each stored by C{doveadm pw} in its
    scheme; ``extra`` is appended to the configuration.
    """

    def __init__(
        self, base: Path, users: list[tuple[str, str, str]] | None = None, extra: str = ""
    ) -> None:
        self.base = base
        self.port = freePort()
        self.socket = str(base / "auth-client")
        self.process: subprocess.Popen[bytes] | None = None
        (base / "run").mkdir()
        (base / "state").mkdir()
        if users is None:
            users = [
                (USER, "SHA512-CRYPT", PASSWORD),
                (CRAM_USER, "CRAM-MD5", PASSWORD),
                (SCRAM_USER, "SCRAM-SHA-256", PASSWORD),
            ]
        lines = [f"{user}:{_hash(scheme, password)}::::::\n" for user, scheme, password in users]
        (base / "users").write_text("".join(lines))
        (base / "dovecot.conf").write_text(_config(base, self.port, extra))

    def start(self) -> None:
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.base / "dovecot.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dovecot exited:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if os.path.exists(self.socket):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"dovecot did not listen:\n{self.log()}")

    def stop(self) -> None:
        """Stop the master by its pid, and wait until its children (auth) are gone too."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        children = _children(process.pid)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Its auth process serves the connections it has until they close:
        # stopped too (by pid), as when Dovecot goes down for good.
        for pid in children:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.05)

    def log(self) -> str:
        path = self.base / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _hash(scheme: str, password: str = PASSWORD) -> str:
    """``password`` stored in ``scheme`` by Dovecot's own doveadm pw."""
    return subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True, check=True, text=True
    ).stdout.strip()


class ScramAuth:
    """A SCRAM-SHA-256 client (scramp's) in the shape smtplib's C{auth()} calls."""

    def __init__(self, user: str, password: str) -> None:
        import scramp

        self.client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
        self.steps = 0
        self.verified = False

    def __call__(self, challenge: bytes | None = None) -> str:
        self.steps += 1
        if challenge is None:  # the initial response
            return str(self.client.get_client_first())
        if self.steps <= 2 and not challenge.startswith(b"v="):
            self.client.set_server_first(challenge.decode())
            return str(self.client.get_client_final())
        self.client.set_server_final(challenge.decode())  # raises unless v= is right
        self.verified = True
        return ""


def smtpAuth(
    port: int, cert: str, mechanism: str, user: str, password: str, waitOffered: bool = True
) -> tuple[int, Any]:
    """
    An SMTP AUTH with smtplib over STARTTLS (scramp for SCRAM-SHA-256):
    its code and text. The mechanisms Dovecot lists are offered once mailgw
    has heard its handshake: with ``waitOffered``, EHLO is asked again
    (a bounded number of times) until ``mechanism`` is offered.
    """
    for _ in range(100):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=clientContext(cert))
            smtp.ehlo("client.test")
            offered = smtp.esmtp_features["auth"].split()
            if mechanism not in offered:
                if not waitOffered:
                    raise AssertionError(f"{mechanism} not offered: {offered}")
                time.sleep(0.1)
                continue
            smtp.user, smtp.password = user, password
            scram = ScramAuth(user, password)
            method = {
                "PLAIN": smtp.auth_plain,
                "LOGIN": smtp.auth_login,
                "CRAM-MD5": smtp.auth_cram_md5,
                "SCRAM-SHA-256": scram,
            }[mechanism]
            try:
                code, text = smtp.auth(mechanism, method)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, e.smtp_error
            if mechanism == "SCRAM-SHA-256" and code == 235 and not scram.verified:
                raise AssertionError("235 without the server's SCRAM signature")
            return code, text
    raise AssertionError(f"{mechanism} never offered")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class _DovecotGateway:
    """A gateway whose only backend is a real Dovecot (mixed into a GatewayTestCase)."""

    service: Any
    files: dict[str, str]
    submissionPort: int

    def backend(self, dovecot: Dovecot) -> str:
        raise NotImplementedError

    def setUp(self) -> Any:
        if not os.access(DOVECOT, os.X_OK) or not os.access(DOVEADM, os.X_OK):
            raise SkipTest("dovecot-core is not installed (apt-get install dovecot-core)")
        self.dovecot = Dovecot(shortDirectory(self))
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)  # type: ignore[attr-defined]
        return super().setUp()  # type: ignore[misc]

    def adjustConfig(self, data: dict[str, Any]) -> dict[str, Any]:
        data["auth"] = {"backends": [self.backend(self.dovecot)]}
        return data

    def tearDown(self) -> None:
        for checker in self.service.checkers:
            getattr(checker, "stop", lambda: None)()

    def authenticate(
        self, mechanism: str, password: str = PASSWORD, user: str = USER
    ) -> tuple[int, Any]:
        return smtpAuth(self.submissionPort, self.files["cert"], mechanism, user, password)

    @inlineCallbacks
    def test_plainAndLogin(self) -> Any:
        for mechanism in ("PLAIN", "LOGIN"):
            code, _ = yield deferToThread(self.authenticate, mechanism)
            self.assertEqual(code, 235, self.dovecot.log())

    @inlineCallbacks
    def test_wrongPassword(self) -> Any:
        code, text = yield deferToThread(self.authenticate, "PLAIN", "wrong")
        self.assertEqual(code, 535)
        self.assertIn(b"5.7.8", text)

    @inlineCallbacks
    def test_cramMD5Relayed(self) -> Any:
        """Dovecot makes the challenge and checks the answer; smtplib is the client."""
        code, text = yield deferToThread(self.authenticate, "CRAM-MD5", PASSWORD, CRAM_USER)
        self.assertEqual(code, 235, self.dovecot.log())
        code, text = yield deferToThread(self.authenticate, "CRAM-MD5", "wrong", CRAM_USER)
        self.assertEqual(code, 535)
        self.assertIn(b"5.7.8", text)

    @inlineCallbacks
    def test_scramRelayed(self) -> Any:
        """SCRAM-SHA-256 against Dovecot's {SCRAM-SHA-256} value; scramp checks Dovecot's v=."""
        code, _ = yield deferToThread(self.authenticate, "SCRAM-SHA-256", PASSWORD, SCRAM_USER)
        self.assertEqual(code, 235, self.dovecot.log())
        code, text = yield deferToThread(self.authenticate, "SCRAM-SHA-256", "wrong", SCRAM_USER)
        self.assertEqual(code, 535)
        self.assertIn(b"5.7.8", text)
        # A user whose stored hash cannot serve SCRAM: Dovecot refuses, 535.
        code, _ = yield deferToThread(self.authenticate, "SCRAM-SHA-256", PASSWORD, USER)
        self.assertEqual(code, 535)

    @inlineCallbacks
    def test_downThenBack(self) -> Any:
        code, _ = yield deferToThread(self.authenticate, "PLAIN")
        self.assertEqual(code, 235)
        yield deferToThread(self.dovecot.stop)
        code, text = yield deferToThread(self.authenticate, "PLAIN")
        self.assertEqual(code, 454, text)
        self.assertIn(b"4.7.0", text)
        yield deferToThread(self.dovecot.start)
        # The gateway reconnects by itself once its back-off has passed.
        for _ in range(100):
            code, _ = yield deferToThread(self.authenticate, "LOGIN")
            if code == 235:
                break
            self.assertEqual(code, 454)
            yield deferToThread(time.sleep, 0.2)
        self.assertEqual(code, 235, self.dovecot.log())
        # Each 454 logged the backend's failure.
        self.assertTrue(self.flushLoggedErrors(DovecotUnavailable))


class DovecotUNIXTests(_DovecotGateway, GatewayTestCase):
    def backend(self, dovecot: Dovecot) -> str:
        return f"dovecot:{dovecot.socket}"


class DovecotTCPTests(_DovecotGateway, GatewayTestCase):
    def backend(self, dovecot: Dovecot) -> str:
        return f"dovecot:tcp:127.0.0.1:{dovecot.port}"
