"""
The queue API on the metrics listener (docs/api.md): L{makeApi} builds its
resource from the configuration, or None when no token file is set.
"""

from __future__ import annotations

from typing import Any

from mailgw.api.resource import ApiResource
from mailgw.apiconfig import readSecret
from mailgw.config import Config, ConfigError

__all__ = ["MIN_TOKEN", "ApiResource", "checkSecrets", "makeApi"]

#: The shortest token taken, in characters.
MIN_TOKEN = 16


def makeApi(config: Config, queue: Any, quota: Any = None) -> ApiResource | None:
    """
    The API over ``queue`` per ``config.api`` (None: no ``token_file``).

    @raise ConfigError: the token file cannot be read, or its token is short.
    """
    if not config.api.tokenFile:
        return None
    token = readSecret(config.source, "api.token_file", config.api.tokenFile)
    if len(token) < MIN_TOKEN:
        raise ConfigError(
            config.source,
            "api.token_file",
            f"{config.api.tokenFile}: the token must be at least {MIN_TOKEN} characters",
        )
    return ApiResource(token, queue, allowChanges=config.api.allowChanges, quota=quota)


def checkSecrets(config: Config) -> None:
    """
    Read the API token and the webhook secret as a start would
    (``mailgw check-config``).

    @raise ConfigError: the first problem.
    """
    makeApi(config, None)
    if config.webhooks.urls:
        readSecret(config.source, "webhooks.secret_file", config.webhooks.secretFile)
