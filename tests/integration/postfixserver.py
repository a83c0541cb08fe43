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

import socket

from benchmarks.postfix import DAEMONS, SERVICES
from tests.integration.postfixclient import PostfixInstance, postfixMissing


def unavailable() -> str | None:
    """Why Postfix cannot run here as a server, or None when it can."""
    return postfixMissing()


class PostfixServer(PostfixInstance):
    """A private Postfix taking mail on ``port`` and relaying it to 127.0.0.1:``nextHop``."""

    def __init__(self, port: int, nextHop: int) -> None:
        super().__init__("mailgw-postfix-server-")
        self.port = port
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
        self.prepared()

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False
