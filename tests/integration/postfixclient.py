"""
Postfix as a relay client of the gateway: the most common way servers send
through a submission service (``relayhost = [gateway]:587`` with SASL, or
port 465 with ``smtp_tls_wrappermode``). It runs from a configuration
directory of its own under a temp directory (never the system's instance or
files), takes mail from the test on a free port of 127.0.0.1, and relays it
to the gateway with its own defaults for the SASL mechanism. Its master runs
in the foreground as the test's child, stopped by its pid.

Needs root (Postfix drops to its ``postfix`` user), the Debian packages
postfix and libsasl2-modules (the client side of PLAIN, LOGIN and CRAM-MD5).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.postfix import DAEMONS, SERVICES


def unavailable() -> str | None:
    """Why Postfix cannot run here as a relay client, or None when it can."""
    missing = postfixMissing()
    if missing is not None:
        return missing
    if not any(Path("/usr/lib").glob("*/sasl2/libplain.so*")):
        return "the SASL client modules are not installed (Debian: libsasl2-modules)"
    return None


def postfixMissing() -> str | None:
    """Why no Postfix can run here at all (not installed, not root), or None."""
    if not (DAEMONS / "master").exists() or shutil.which("postfix") is None:
        return "Postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "Postfix needs root to start"
    return None


class PostfixInstance:
    """
    A private Postfix: a configuration directory and queue under a temp
    directory, its master in the foreground as the test's child, stopped by
    its pid. A subclass writes main.cf and master.cf, then calls L{prepared}.
    """

    def __init__(self, prefix: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        os.chmod(self.directory, 0o711)
        self.process: subprocess.Popen[bytes] | None = None

    def prepared(self) -> None:
        """The queue and data directories; C{postfix check} of the configuration."""
        d = self.directory
        (d / "queue").mkdir(mode=0o755)
        (d / "data").mkdir(mode=0o700)
        shutil.chown(d / "data", user="postfix", group="postfix")
        subprocess.run(["postfix", "-c", str(d), "check"], check=True, capture_output=True)

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

    def waitFor(self, predicate: Callable[[], bool], limit: float) -> bool:
        """Poll ``predicate`` every 0.2 s for at most ``limit`` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.2)
        return False


class PostfixRelayClient(PostfixInstance):
    """
    A private Postfix that relays everything it takes on ``inPort`` to the
    gateway at ``localhost:gatewayPort`` with SASL ``user``/``password``,
    trusting the gateway's certificate ``caFile``; ``implicitTLS`` for a
    port-465 listener.
    """

    def __init__(
        self,
        gatewayPort: int,
        caFile: str,
        user: str,
        password: str,
        inPort: int,
        implicitTLS: bool = False,
    ) -> None:
        super().__init__("mailgw-postfix-")
        self.inPort = inPort
        d = self.directory
        shutil.copy(caFile, d / "ca.pem")
        os.chmod(d / "ca.pem", 0o644)
        wrapper = "yes" if implicitTLS else "no"
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
myhostname = relayclient.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [localhost]:{gatewayPort}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{d}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = secure
smtp_tls_secure_cert_match = nexthop
smtp_tls_CAfile = {d}/ca.pem
smtp_tls_wrappermode = {wrapper}
smtp_tls_session_cache_database =
smtp_host_lookup = native
minimal_backoff_time = 300s
maximal_backoff_time = 600s
queue_run_delay = 300s
biff = no
"""
        )
        (d / "master.cf").write_text(f"127.0.0.1:{inPort} inet n - n - - smtpd\n{SERVICES}")
        (d / "sasl_passwd").write_text(f"[localhost]:{gatewayPort} {user}:{password}\n")
        shutil.chown(d / "sasl_passwd", group="postfix")
        os.chmod(d / "sasl_passwd", 0o640)
        self.prepared()
