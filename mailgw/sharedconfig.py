"""
The shared-limits keys of the ``[limits]`` section (docs/configuration.md,
docs/cluster.md): where the counts shared by every node live, and how the
nodes keep in step with it. Values only; the password file is read when
the gateway is built.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs

from mailgw._configparse import _duration, _Invalid, _string, _Table

#: Schemes of ``backend``: Redis over TCP, or over a UNIX socket.
BACKEND_SCHEMES = ("redis", "unix")


@attrs.frozen
class RedisAddress:
    """Where Redis listens: ``host`` and ``port``, or the UNIX socket ``path``; and ``db``."""

    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0

    def describe(self) -> str:
        """For the log: no password is ever part of it."""
        where = f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}"
        return f"{where}/{self.db}" if not self.path else f"{where}?db={self.db}"


def parseBackend(text: str) -> RedisAddress:
    """
    ``redis://HOST[:PORT][/DB]`` or ``unix:///PATH[?db=DB]``.

    @raise _Invalid: anything else, or a password (or user) in the URL.
    """
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as e:
        raise _Invalid(f"{text!r} is not a URL ({e})") from None
    if url.scheme not in BACKEND_SCHEMES:
        raise _Invalid("must start with redis:// or unix://")
    if url.username is not None or url.password is not None:
        raise _Invalid("no user or password in the URL: write the password in password_file")
    if url.fragment:
        raise _Invalid("a URL without a #fragment")
    if url.scheme == "unix":
        if url.netloc or not url.path.startswith("/"):
            raise _Invalid("unix:///absolute/path/of/the/socket")
        query = parse_qs(url.query, strict_parsing=False)
        if set(query) - {"db"}:
            raise _Invalid("the only parameter of a unix:// URL is db")
        return RedisAddress(path=url.path, db=_db(query.get("db", ["0"])[-1]))
    if not url.hostname:
        raise _Invalid("redis://HOST:PORT/DB: the host is missing")
    if url.query:
        raise _Invalid("no parameters in a redis:// URL")
    return RedisAddress(host=url.hostname, port=port or 6379, db=_db(url.path.strip("/") or "0"))


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise _Invalid(f"the database is a number, got {text!r}")
    return int(text)


def _backend(value: Any) -> str:
    text = _string(value).strip()
    if text:
        parseBackend(text)
    return text


def _namespace(value: Any) -> str:
    text = _string(value)
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_.:") for c in text):
        raise _Invalid("letters, digits and - _ . : only, not empty")
    return text


def sharedLimits(t: _Table) -> dict[str, Any]:
    """
    The shared-limits keys of ``[limits]`` (``t``), as the keyword
    arguments of L{mailgw.config.LimitsConfig}: ``backend`` (empty: every
    count stays in this process), the key ``namespace``, the backend's
    password file, and the timing of the sync
    (L{mailgw.limits.shared.SyncedCounters}).
    """
    values = {
        "backend": t.get("backend", _backend, ""),
        "namespace": t.get("namespace", _namespace, "mailgw"),
        "backendPasswordFile": t.get("backend_password_file", _string, ""),
        "backendSyncInterval": t.get("backend_sync_interval", _duration(), 0.05),
        "backendStaleness": t.get("backend_staleness", _duration(), 1.0),
        "backendTimeout": t.get("backend_timeout", _duration(), 2.0),
        "backendRetry": t.get("backend_retry", _duration(), 5.0),
    }
    if values["backendPasswordFile"] and not values["backend"]:
        raise t.error("backend_password_file", "only used with a backend")
    return values
