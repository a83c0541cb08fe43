"""
The embedded demo: everything a first run needs, made on first use and kept
in one directory — a self-signed certificate, a users file with one demo
user (who can use PLAIN, LOGIN and CRAM-MD5), and a spool — with listeners
on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any, TextIO

from mailgw.auth.passwd import addUser, readUsers
from mailgw.config import Config
from mailgw.tls import makeSelfSigned

DEMO_USER = "demo@localhost"
SUBMISSION_PORT = 2587
SUBMISSIONS_PORT = 2465


def prepareDemo(directory: str) -> tuple[dict[str, Any], str]:
    """
    Create what is missing in ``directory``.

    @return: configuration overrides (dotted keys) for the demo, and the
        demo user's password.
    """
    base = Path(directory).absolute()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    certificate, key = base / "cert.pem", base / "key.pem"
    if not certificate.exists() or not key.exists():
        for path in (certificate, key):
            if path.exists():
                path.unlink()
        makeSelfSigned(str(certificate), str(key), "localhost")
    passwd, passwordFile = base / "passwd", base / "demo-password"
    if not passwordFile.exists() or DEMO_USER not in _users(passwd):
        password = secrets.token_urlsafe(12)
        if passwd.exists():
            passwd.unlink()
        addUser(str(passwd), DEMO_USER, password, cram=True)
        fd = os.open(passwordFile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
    overrides = {
        "server.hostname": "localhost",
        "server.submission": [f"tcp:port={SUBMISSION_PORT}:interface=127.0.0.1"],
        "server.submissions": [f"tcp:port={SUBMISSIONS_PORT}:interface=127.0.0.1"],
        "tls.certificate": str(certificate),
        "tls.key": str(key),
        "auth.backends": [f"passwd:{passwd}"],
        "spool.directory": str(base / "spool"),
    }
    return overrides, passwordFile.read_text().strip()


def banner(config: Config, password: str, out: TextIO | None = None) -> None:
    """Tell the user where the demo listens and how to send a message."""
    out = out if out is not None else sys.stderr
    lines = ["", f"mailgw demo: spool in {config.spool.directory}"]
    lines += [f"  submission (STARTTLS)  {e}" for e in config.server.submission]
    lines += [f"  submissions (TLS)      {e}" for e in config.server.submissions]
    lines.append(f"  user {DEMO_USER}  password {password}")
    port = _port(config.server.submission[0]) if config.server.submission else None
    if port:
        lines.append(
            f"  try: swaks --server 127.0.0.1:{port} --tls --auth LOGIN "
            f"--auth-user {DEMO_USER} --auth-password {password} \\\n"
            f"             --from {DEMO_USER} --to someone@example.org"
        )
    out.write("\n".join(lines) + "\n\n")
    out.flush()


def _port(endpoint: str) -> str | None:
    for part in endpoint.split(":")[1:]:
        name, _, value = part.rpartition("=")
        if name in ("", "port") and value.isdigit():
            return value
    return None


def _users(path: Path) -> dict[str, Any]:
    try:
        return readUsers(path)
    except (OSError, ValueError):
        return {}
