"""mailgw: an authenticated mail submission gateway (RFC 6409) built on Twisted."""

#: The release; setup.cfg reads it from here (``version = attr: ...``).
__version__ = "0.1.0.dev0"
