"""
The C{mailgw} administration command: C{main} in L{mailgw.cli.app}, one
module per group of subcommands (C{passwd} in app, C{check-config} in
check, C{queue} in queue, C{show-config} in show), and the error they share
in errors.
"""

from mailgw.cli.app import main
from mailgw.cli.errors import CommandError

__all__ = ["CommandError", "main"]
