"""
Whether a client address is in a list of configured networks (the
reinjection listener's and ETRN's), IPv4-mapped IPv6 addresses included.
"""

from __future__ import annotations

import ipaddress

from mailgw._configparse import Network

__all__ = ["inNetworks"]


def inNetworks(host: str, networks: tuple[Network, ...]) -> bool:
    """Whether the client address ``host`` is in one of ``networks``."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False  # a UNIX socket, or no address at all: not listed
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return any(address in network for network in networks)
