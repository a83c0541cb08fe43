"""
The C{mailgw} administration command.

Each subcommand is added by a function C{add<Name>Parser(subparsers)} that
calls C{subparsers.add_parser(...)} and sets C{func} on it with
C{set_defaults(func=handler)}, where C{handler(args) -> int} writes its
output to C{sys.stdout} and raises L{CommandError} for an operational error.
To add a subcommand, write such a function in a module of this package and
add one line to L{_parserAdders}.

Exit codes: 0 success, 1 operational error (one line on stderr,
C{mailgw: FILE: problem}), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from getpass import getpass

from mailgw import __version__
from mailgw.auth import passwd
from mailgw.cli.account import addAccountParser
from mailgw.cli.check import addCheckConfigParser
from mailgw.cli.dkim import addDKIMParser
from mailgw.cli.errors import CommandError, Subparsers
from mailgw.cli.explain import addExplainParser
from mailgw.cli.queue import addQueueParser
from mailgw.cli.reload import addReloadParser
from mailgw.cli.show import addShowConfigParser

DEFAULT_PASSWD_FILE = "/etc/mailgw/passwd"

ParserAdder = Callable[[Subparsers], None]


def _parserAdders() -> list[ParserAdder]:
    """Every subcommand's adder, in the order of C{mailgw --help}."""
    return [
        addPasswdParser,
        addQueueParser,
        addAccountParser,
        addCheckConfigParser,
        addShowConfigParser,
        addReloadParser,
        addExplainParser,
        addDKIMParser,
    ]


def makeParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgw", description="Administer a mailgw submission gateway."
    )
    parser.add_argument("--version", action="version", version=f"mailgw {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for adder in _parserAdders():
        adder(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run the C{mailgw} command with C{argv} (default C{sys.argv[1:]}).

    @return: the exit code: 0 ok, 1 operational error, 2 usage error.
    """
    parser = makeParser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits 2 on a usage error, 0 after --help.
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except CommandError as e:
        print(f"mailgw: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mailgw: interrupted", file=sys.stderr)
        return 1


# mailgw passwd


def addPasswdParser(subparsers: Subparsers) -> None:
    """Add C{mailgw passwd add|change|remove|list}."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--file",
        default=DEFAULT_PASSWD_FILE,
        metavar="FILE",
        help=f"the users file (default: {DEFAULT_PASSWD_FILE})",
    )
    withPassword = argparse.ArgumentParser(add_help=False)
    withPassword.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from one line of standard input instead of asking twice",
    )

    parser = subparsers.add_parser(
        "passwd",
        help="manage the users file of the passwd: auth backend",
        description="Manage the users file of the passwd: auth backend. Changes apply "
        "to the next login without a restart.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add", parents=[common, withPassword], help="add a user", description="Add a user."
    )
    add.add_argument("login")
    add.add_argument(
        "--cram",
        action="store_true",
        help="also store the password (base64) so the user can use CRAM-MD5; it is "
        "password-equivalent",
    )
    add.add_argument(
        "--scram",
        action="store_true",
        help="also store SCRAM-SHA-256 keys (salted, not the password) so the user can "
        "use SCRAM-SHA-256",
    )
    add.set_defaults(func=passwdAdd)

    change = actions.add_parser(
        "change",
        parents=[common, withPassword],
        help="change a user's password",
        description="Change a user's password.",
    )
    change.add_argument("login")
    change.add_argument(
        "--cram",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store (--cram) or drop (--no-cram) the CRAM-MD5 secret; by default keep "
        "storing one if one was stored",
    )
    change.add_argument(
        "--scram",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store (--scram) or drop (--no-scram) SCRAM-SHA-256 keys; by default keep "
        "storing them if they were stored",
    )
    change.set_defaults(func=passwdChange)

    remove = actions.add_parser(
        "remove", parents=[common], help="remove a user", description="Remove a user."
    )
    remove.add_argument("login")
    remove.set_defaults(func=passwdRemove)

    listUsers = actions.add_parser(
        "list",
        parents=[common],
        help="list the users",
        description="List the users and whether each has a CRAM-MD5 secret "
        "(and, in a third column, SCRAM-SHA-256 keys).",
    )
    listUsers.set_defaults(func=passwdList)


def _readUsers(path: str, missingOk: bool = False) -> dict[str, passwd.UserEntry]:
    try:
        return passwd.readUsers(path)
    except FileNotFoundError:
        if missingOk:
            return {}
        raise CommandError(f"{path}: no such file") from None
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    except passwd.PasswdFileError as e:
        # The message already starts with the file name.
        raise CommandError(str(e)) from None


def _checkLogin(path: str, login: str) -> None:
    try:
        passwd.checkLogin(login)
    except ValueError as e:
        raise CommandError(f"{path}: {e}") from None


def _readPassword(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        try:
            password = getpass(f"Password for {args.login}: ")
            again = getpass("Again: ")
        except EOFError:
            raise CommandError("no password given") from None
        if password != again:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("password must not be empty")
    return password


def _write(path: str, change: Callable[[], None]) -> None:
    try:
        change()
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    except passwd.PasswdFileError as e:
        raise CommandError(str(e)) from None
    except (KeyError, ValueError) as e:
        # Another `mailgw passwd` changed the file while we asked for the
        # password; e.args[0] is the problem (KeyError: the login).
        raise CommandError(f"{path}: {e.args[0] if e.args else e}") from None


def passwdAdd(args: argparse.Namespace) -> int:
    path, login = args.file, args.login
    _checkLogin(path, login)
    if login in _readUsers(path, missingOk=True):
        raise CommandError(f"{path}: user {login!r} already exists")
    password = _readPassword(args)
    _write(path, lambda: passwd.addUser(path, login, password, cram=args.cram, scram=args.scram))
    if args.cram:
        print(
            f"mailgw: note: {path} now holds a CRAM-MD5 secret, which is as good as the "
            "password: keep the file mode 0600",
            file=sys.stderr,
        )
    return 0


def passwdChange(args: argparse.Namespace) -> int:
    path, login = args.file, args.login
    if login not in _readUsers(path):
        raise CommandError(f"{path}: no user {login!r}")
    password = _readPassword(args)
    _write(
        path,
        lambda: passwd.setPassword(path, login, password, cram=args.cram, scram=args.scram),
    )
    return 0


def passwdRemove(args: argparse.Namespace) -> int:
    path, login = args.file, args.login
    if login not in _readUsers(path):
        raise CommandError(f"{path}: no user {login!r}")
    _write(path, lambda: passwd.removeUser(path, login))
    return 0


def passwdList(args: argparse.Namespace) -> int:
    for entry in _readUsers(args.file).values():
        # Never the hash nor the secret: only whether a secret is stored.
        cram = "cram-md5" if entry.cramSecret is not None else "-"
        scram = "\tscram-sha-256" if entry.scramKeys is not None else ""
        print(f"{entry.login}\t{cram}{scram}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
