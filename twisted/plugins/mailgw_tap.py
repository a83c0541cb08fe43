"""
``twistd mailgw``: the mailgw submission gateway as a twistd plugin.
"""

from twisted.application.service import ServiceMaker

mailgw = ServiceMaker(
    "mailgw",
    "mailgw.tap",
    "Authenticated mail submission gateway (RFC 6409): STARTTLS and implicit TLS, "
    "SMTP AUTH, durable queue, relay to upstream MTAs.",
    "mailgw",
)
