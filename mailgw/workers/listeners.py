"""
The listeners of the workers: the supervisor opens each endpoint once
(``tcp:``, ``systemd:``, ``unix:``: whatever ``serverFromString`` makes a
listening port of) and never accepts on it; each worker adopts the socket
(``adoptStreamPort``) and accepts on it, so the kernel hands every new
connection to one of the workers that wait on the same socket.

The worker's metrics listener is the configured one with the port raised
by the worker's index (``tcp:9466`` is worker 0's, ``tcp:9467`` worker 1's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory


@attrs.frozen
class Inherited:
    """A listening socket handed to a worker: its endpoint, descriptor and family."""

    description: str
    fd: int
    family: int


class _NeverAccepts(Factory):
    # The supervisor stops reading its listening ports at once: nothing is
    # ever accepted with this factory.
    noisy = False


#: The first descriptor number of the listening sockets in a worker.
FIRST_FD = 3


@inlineCallbacks
def openListeners(reactor: Any, descriptions: Sequence[str]) -> Any:
    """
    Listen on each endpoint of ``descriptions`` without accepting.

    @return: a Deferred firing with the listening ports, in order.
    """
    ports: list[IListeningPort] = []
    for description in descriptions:
        port = yield serverFromString(reactor, description).listen(_NeverAccepts())
        port.stopReading()  # type: ignore[attr-defined]
        ports.append(port)
    return ports


def inherited(ports: Sequence[Any], descriptions: Sequence[str]) -> list[Inherited]:
    """What a worker adopts: listener ``i`` at descriptor ``FIRST_FD + i``."""
    return [
        Inherited(description, FIRST_FD + i, port.addressFamily)
        for i, (port, description) in enumerate(zip(ports, descriptions, strict=True))
    ]


def childFDs(ports: Sequence[Any]) -> dict[int, Any]:
    """``spawnProcess``'s childFDs: a pipe each way, then the listening sockets."""
    fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
    for i, port in enumerate(ports):
        fds[FIRST_FD + i] = port.fileno()
    return fds


@attrs.define
class Adopter:
    """The worker's way to listen: ``GatewayService.listenOn``."""

    reactor: Any
    sockets: dict[str, Inherited]

    def __call__(self, description: str, factory: Any) -> Deferred[IListeningPort]:
        inherit = self.sockets.pop(description)
        port = self.reactor.adoptStreamPort(inherit.fd, inherit.family, factory)
        os.close(inherit.fd)  # adoptStreamPort listens on a duplicate
        return succeed(port)


_TCP = re.compile(r"\A(tcp6?:)(port=)?([0-9]+)(.*)\Z")


def metricsEndpoint(description: str, index: int) -> str:
    """
    Worker ``index``'s metrics listener: ``description`` with its port plus
    ``index`` (port 0 stays 0).

    @raise ValueError: ``description`` is not a ``tcp:`` endpoint with a port first.
    """
    if not description:
        return description
    match = _TCP.match(description)
    if match is None:
        raise ValueError(
            "with workers, the metrics listener must be a tcp: endpoint whose port comes "
            "first (each worker listens on that port plus its index)"
        )
    prefix, keyword, port, rest = match.groups()
    number = int(port)
    if number:
        number += index
    if number > 65535:
        raise ValueError(f"worker {index}'s metrics port would be {number}")
    return f"{prefix}{keyword or ''}{number}{rest}"
