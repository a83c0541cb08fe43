"""
Postfix as an SMTP server upstream of the gateway (a test tool, not a test
module): its smtpd listens on a free port of 127.0.0.1 and offers DSN, as
Postfix does by default; whatever it takes it relays on to ``nextHop`` (a
recording upstream of the test), where the DSN parameters Postfix passed on
can be seen. It runs from a configuration directory and queue of its own
under a temp directory (never the system's instance), its master in the
foreground as the test's child, stopped by its pid.

Needs root (Postfix drops to its ``postfix`` user) and the Debian package
postfix.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.postfix import DAEMONS, SERVICES


def unavailable() -> str | None:
    """Why Postfix cannot run here as a server, or None when it can."""
    if not (DAEMONS / "master").exists() or shutil.which("postfix") is None:
        return "Postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "Postfix needs root to start"
    return None


class PostfixServer:
    """A private Postfix taking mail on ``port`` and relaying it to 127.0.0.1:``nextHop``."""

    def __init__(self, port: int, nextHop: int) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mailgw-postfix-server-"))
        self.port = port
        os.chmod(self.directory, 0o711)
        d = self.directory
        (d / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = {DAEMONS}
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {d}
maillog_file = {d}/postfix.log
myhostname = postfix.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{nextHop}
smtp_tls_security_level = none
smtp_host_lookup = native
smtp_address_preference = ipv4
minimal_backoff_time = 300s
maximal_backoff_time = 600s
queue_run_delay = 300s
biff = no
"""
        )
        (d / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n{SERVICES}")
        (d / "queue").mkdir(mode=0o755)
        (d / "data").mkdir(mode=0o700)
        shutil.chown(d / "data", user="postfix", group="postfix")
        subprocess.run(["postfix", "-c", str(d), "check"], check=True, capture_output=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(DAEMONS / "master"), "-c", str(self.directory), "-d"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.directory / "postfix.log").read_text(errors="replace")
        except OSError:
            return ""

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def waitFor(self, predicate: Callable[[], bool], limit: float) -> bool:
        """Poll ``predicate`` (in a thread) every 0.2 s for at most ``limit`` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.2)
        return False
