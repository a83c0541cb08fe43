"""
What every C{mailgw} subcommand shares: the error it raises for an
operational problem, and the type of the argparse object subcommands are
added to.
"""

from __future__ import annotations

from typing import Any

Subparsers = Any  # argparse's _SubParsersAction, which is private


class CommandError(Exception):
    """
    An operational error: L{mailgw.cli.app.main} prints C{mailgw: MESSAGE}
    on stderr and exits 1. Start the message with the file concerned, if
    there is one.
    """
