"""
ETRN (RFC 1985): a client asks the gateway to start delivering the mail
queued for a domain now. ``ETRN example.org`` names one domain,
``ETRN @example.org`` the domain and every domain under it, and
``ETRN #ID`` one queued message by its queue id (the "queue name" of RFC
1985 5, here the gateway's queue ids).

Only an authenticated client, or one in ``[etrn] networks``, may ask; the
replies are RFC 1985's::

    250 2.0.0 Queuing for node example.org started (3 messages)
    251 2.0.0 No messages waiting for node example.org
    252 2.0.0 Pending messages for node example.org started (already being tried)
    458 4.3.0 Unable to queue messages for node example.org (...)
    459 4.7.1 Node example.org not allowed: ...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from mailgw._configparse import Network
from mailgw.networks import inNetworks
from mailgw.replies import SMTPReply, reply

__all__ = ["Etrn", "etrnAnswer"]

log = Logger(namespace="mailgw.server.etrn")

#: ``flushDomain(domain, subdomains)`` -> Deferred of a count object with
#: ``started``, ``inFlight`` and ``held`` (L{mailgw.queue.operator.DomainFlush}).
FlushDomain = Callable[[str, bool], Deferred[Any]]
#: ``flush([queueId])`` -> Deferred of how many were scheduled (KeyError: unknown).
FlushIds = Callable[[list[str]], Deferred[int]]

_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z"
)
_QUEUE_ID = re.compile(r"[A-Za-z0-9]{1,64}\Z")

SYNTAX = reply(501, "5.5.4", "Syntax: ETRN domain, ETRN @domain or ETRN #queue-id")


@attrs.frozen
class Etrn:
    """What a listener that offers ETRN knows: the queue, and who may ask."""

    flushDomain: FlushDomain
    flush: FlushIds
    networks: tuple[Network, ...] = ()

    def allowed(self, user: str | None, clientAddress: str) -> bool:
        return user is not None or inNetworks(clientAddress, self.networks)


def etrnAnswer(
    etrn: Etrn, argument: str, user: str | None, clientAddress: str
) -> SMTPReply | Deferred[SMTPReply]:
    """The reply to ``ETRN argument`` from ``user`` (None: not logged in) at ``clientAddress``."""
    node = argument.strip()
    if not node or " " in node or len(node) > 255:
        return SYNTAX
    if node.startswith("#"):
        if not _QUEUE_ID.match(node[1:]):
            return SYNTAX
    elif not _DOMAIN.match(node.removeprefix("@")):
        return SYNTAX
    if not etrn.allowed(user, clientAddress):
        log.info("ETRN {node} refused: client={client}", node=node, client=clientAddress)
        return reply(459, "4.7.1", f"Node {node} not allowed: authentication required")
    log.info(
        "ETRN {node} from client={client} user={user}", node=node, client=clientAddress, user=user
    )
    if node.startswith("#"):
        d = maybeDeferred(etrn.flush, [node[1:]]).addCallback(_oneMessage, node)
    else:
        domain = node.removeprefix("@").rstrip(".")
        d = maybeDeferred(etrn.flushDomain, domain, node.startswith("@"))
        d.addCallback(_domain, node)
    return d.addErrback(_failed, node)


def _oneMessage(scheduled: int, node: str) -> SMTPReply:
    if scheduled:
        return reply(250, "2.0.0", f"Queuing for node {node} started")
    return reply(458, "4.3.0", f"Unable to queue messages for node {node} (the message is held)")


def _domain(counts: Any, node: str) -> SMTPReply:
    if counts.started:
        plural = "" if counts.started + counts.inFlight == 1 else "s"
        return reply(
            250,
            "2.0.0",
            f"Queuing for node {node} started ({counts.started + counts.inFlight} message{plural})",
        )
    if counts.inFlight:
        return reply(
            252, "2.0.0", f"Pending messages for node {node} started (already being tried)"
        )
    if counts.held:
        return reply(
            458, "4.3.0", f"Unable to queue messages for node {node} (its messages are held)"
        )
    return reply(251, "2.0.0", f"No messages waiting for node {node}")


def _failed(failure: Any, node: str) -> SMTPReply:
    if failure.check(KeyError):
        return reply(459, "4.7.1", f"Node {node} not allowed: no such queue")
    log.failure("ETRN {node} failed", failure, node=node)
    return reply(458, "4.3.0", f"Unable to queue messages for node {node}")
