"""
Postfix as a third server in the benchmark: the submission gateway operators
compare mailgw with. It runs from a configuration directory of its own in the
run's temp directory (never the system's instance or its files), listens on
two free ports of 127.0.0.1 (STARTTLS with required TLS and SASL AUTH, as a
submission service on 587; and implicit TLS, as on 465), queues with its
usual fsync before 250, and relays everything to the counting sink, as the
gateway does. AUTH is Cyrus SASL against a sasldb file of the run (PLAIN and
LOGIN; sasldb keeps the password in clear, so Postfix's AUTH costs no hash).

The master daemon runs in the foreground (C{master -d}) as a child of the
driver, which stops it with SIGTERM by its pid; the master stops its own
children. Needs root (Postfix drops to its C{postfix} user) and the Debian
packages postfix and sasl2-bin (for C{saslpasswd2}).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

DAEMONS = Path("/usr/lib/postfix/sbin")

#: The services of master.cf besides the two listeners: Postfix's defaults,
#: none chrooted (the config directory is not in a chroot).
SERVICES = """\
pickup    unix  n  -  n  60    1  pickup
cleanup   unix  n  -  n  -     0  cleanup
qmgr      unix  n  -  n  300   1  qmgr
tlsmgr    unix  -  -  n  1000? 1  tlsmgr
rewrite   unix  -  -  n  -     -  trivial-rewrite
bounce    unix  -  -  n  -     0  bounce
defer     unix  -  -  n  -     0  bounce
trace     unix  -  -  n  -     0  bounce
verify    unix  -  -  n  -     1  verify
flush     unix  n  -  n  1000? 0  flush
proxymap  unix  -  -  n  -     -  proxymap
proxywrite unix -  -  n  -     1  proxymap
smtp      unix  -  -  n  -     -  smtp
relay     unix  -  -  n  -     -  smtp
showq     unix  n  -  n  -     -  showq
error     unix  -  -  n  -     -  error
retry     unix  -  -  n  -     -  error
discard   unix  -  -  n  -     -  discard
local     unix  -  n  n  -     -  local
virtual   unix  -  n  n  -     -  virtual
lmtp      unix  -  -  n  -     -  lmtp
anvil     unix  -  -  n  -     1  anvil
scache    unix  -  -  n  -     1  scache
postlog   unix-dgram n - n -   1  postlogd
"""


def unavailable() -> str | None:
    """Why Postfix cannot run here, or None when it can."""
    if not (DAEMONS / "master").exists() or shutil.which("postfix") is None:
        return "Postfix is not installed (Debian: apt-get install postfix)"
    if shutil.which("saslpasswd2") is None:
        return "saslpasswd2 is not installed (Debian: apt-get install sasl2-bin)"
    if os.geteuid() != 0:
        return "Postfix needs root to start"
    return None


def mainCF(directory: Path, certificate: str, key: str, sinkPort: int) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {directory}/queue
data_directory = {directory}/data
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = {DAEMONS}
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {directory}
maillog_file = {directory}/postfix.log
myhostname = postfix.bench.invalid
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = [127.0.0.1]:{sinkPort}
smtp_tls_security_level = none
smtpd_tls_cert_file = {certificate}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_session_cache_database = btree:${{data_directory}}/smtpd_scache
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {directory}/sasl
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
biff = no
"""


def masterCF(starttls: int, implicit: int) -> str:
    return f"""\
127.0.0.1:{starttls} inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
127.0.0.1:{implicit} inet n - n - - smtpd
  -o smtpd_tls_wrappermode=yes
{SERVICES}"""


def configure(
    directory: Path,
    certificate: str,
    key: str,
    sinkPort: int,
    ports: tuple[int, int],
    user: str,
    password: str,
) -> None:
    """Write the configuration, the SASL database and the queue directories."""
    directory.mkdir()
    # Postfix's processes run as its own user: the run's temp directory
    # (0700) must let it through. The key stays private: smtpd reads it
    # as root, before it drops its privileges.
    for path in (directory.parent, directory):
        os.chmod(path, 0o711)
    (directory / "main.cf").write_text(mainCF(directory, certificate, key, sinkPort))
    (directory / "master.cf").write_text(masterCF(*ports))
    sasl = directory / "sasl"
    sasl.mkdir()
    sasldb = directory / "sasldb2"
    (sasl / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
        f"sasldb_path: {sasldb}\n"
    )
    name, _, realm = user.partition("@")
    subprocess.run(
        ["saslpasswd2", "-c", "-p", "-f", str(sasldb), "-u", realm, name],
        input=password.encode(),
        check=True,
        capture_output=True,
    )
    shutil.chown(sasldb, group="postfix")
    os.chmod(sasldb, 0o640)
    (directory / "queue").mkdir(mode=0o755)
    (directory / "data").mkdir(mode=0o700)
    shutil.chown(directory / "data", user="postfix", group="postfix")
    # Creates the queue's subdirectories with their owners, checks the rest.
    subprocess.run(
        ["postfix", "-c", str(directory), "check"], check=True, capture_output=True, timeout=60
    )


def masterCommand(directory: Path) -> list[str]:
    """The master daemon in the foreground: a child the driver stops by pid."""
    return [str(DAEMONS / "master"), "-c", str(directory), "-d"]
