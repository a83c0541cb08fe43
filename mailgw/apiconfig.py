"""
The ``[api]`` and ``[webhooks]`` sections (docs/configuration.md,
docs/api.md): the queue API on the metrics listener and the outgoing
webhooks. Values only; the secrets are read by L{readSecret} when the
gateway is built.
"""

from __future__ import annotations

import os
import stat
from typing import Any
from urllib.parse import urlsplit

import attrs

from mailgw._configparse import (
    ConfigError,
    _boolean,
    _duration,
    _integer,
    _Invalid,
    _string,
    _stringList,
    _Table,
)


@attrs.frozen
class ApiConfig:
    """The HTTP API: off without a token file; read-only unless ``allowChanges``."""

    tokenFile: str = ""
    allowChanges: bool = False


@attrs.frozen
class WebhooksConfig:
    """Where and how message and account events are POSTed; off without ``urls``."""

    urls: tuple[str, ...] = ()
    secretFile: str = ""
    timeout: float = 10.0
    retries: int = 3
    retryDelay: float = 5.0
    backlog: int = 1000


def _urls(value: Any) -> tuple[str, ...]:
    urls = _stringList(value)
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError:
            raise _Invalid(f"not a URL: {url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Invalid(f"must be http:// or https:// URLs with a host, got {url!r}")
        if any(c.isspace() or not c.isprintable() for c in url):
            raise _Invalid(f"a URL must not contain spaces or control characters: {url!r}")
    return urls


def apiSection(t: _Table) -> ApiConfig:
    return ApiConfig(
        tokenFile=t.get("token_file", _string, ""),
        allowChanges=t.get("allow_changes", _boolean, False),
    )


def webhooksSection(t: _Table) -> WebhooksConfig:
    config = WebhooksConfig(
        urls=t.get("urls", _urls, ()),
        secretFile=t.get("secret_file", _string, ""),
        timeout=t.get("timeout", _duration(), 10.0),
        retries=t.get("retries", _integer(0), 3),
        retryDelay=t.get("retry_delay", _duration(), 5.0),
        backlog=t.get("backlog", _integer(1), 1000),
    )
    if config.urls and not config.secretFile:
        raise t.error("secret_file", "webhooks need a secret_file: receivers verify the signature")
    return config


def readSecret(source: str, key: str, path: str) -> bytes:
    """
    The first line of ``path`` (a token or webhook secret), read now.

    @raise ConfigError: naming ``source`` and ``key``, when the file cannot
        be read, is readable by others, or its first line is empty (the
        secret itself is never shown).
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_mode & stat.S_IROTH:
                raise ConfigError(source, key, f"{path} must not be readable by others")
            secret = f.readline(4096).rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(source, key, f"cannot read {path}: {e.strerror or e}") from None
    if not secret:
        raise ConfigError(source, key, f"{path}: the first line is empty")
    return secret
