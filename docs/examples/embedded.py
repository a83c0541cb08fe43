"""
mailgw inside your own Twisted application.

Run it from the checkout with ``python docs/examples/embedded.py DIR``: it
makes a self-signed certificate in DIR, then accepts mail on
127.0.0.1:2587 (STARTTLS) for the user ``app@example.com`` with password
``app-secret``, spooling it in DIR/spool, until interrupted.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task

from mailgw.config import configFromDict
from mailgw.service import GatewayService
from mailgw.tls import makeSelfSigned


def buildGateway(reactor: Any, directory: str, port: int = 2587) -> GatewayService:
    """The gateway, configured in code rather than from a file."""
    os.makedirs(directory, exist_ok=True)
    certificate = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    makeSelfSigned(certificate, key, "localhost")  # does nothing if both exist
    config = configFromDict(
        {
            "server": {
                "hostname": "localhost",
                "submission": [f"tcp:port={port}:interface=127.0.0.1"],
            },
            "tls": {"certificate": certificate, "key": key},
            "spool": {"directory": os.path.join(directory, "spool")},
        },
        source="embedded.py",
    )
    # Any twisted.cred checker will do: your application's own user database.
    users = InMemoryUsernamePasswordDatabaseDontUse(**{"app@example.com": b"app-secret"})
    return GatewayService(config, reactor, checkers=[users])


def main(reactor: Any, directory: str = "embedded-demo") -> defer.Deferred[None]:
    application = MultiService()  # stands for your application's service tree
    buildGateway(reactor, directory).setServiceParent(application)
    application.startService()
    reactor.addSystemEventTrigger("before", "shutdown", application.stopService)
    return defer.Deferred()  # serve until the process is stopped


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
