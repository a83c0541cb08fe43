"""
The PROXY protocol (HAProxy, versions 1 and 2), accepted from trusted
proxies only: the header's parser (header.py) and the wrapper that goes
outermost around a listener's factory (wrapper.py). docs/proxy.md.
"""

from mailgw.proxy.header import (
    V1_MAX_LENGTH,
    V1_SIGNATURE,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parseProxyHeader,
)
from mailgw.proxy.wrapper import ProxyFactory, ProxyProtocol

__all__ = [
    "V1_MAX_LENGTH",
    "V1_SIGNATURE",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyFactory",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyProtocol",
    "parseProxyHeader",
]
