"""
Tests for L{mailgw.cli.app}, driving L{main} with replaced standard streams.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
from typing import Any

from argon2 import PasswordHasher
from twisted.trial.unittest import SynchronousTestCase

from mailgw.auth import passwd
from mailgw.auth.passwd import readUsers
from mailgw.cli import app as cli

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class CLITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        # Cheap hashes keep the suite fast; test_passwd checks the defaults.
        self.patch(passwd, "PasswordHasher", lambda: CHEAP)
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.patch(sys, "stdin", io.StringIO())
        self.prompts: list[str] = []
        self.answers: list[str] = []
        self.patch(cli, "getpass", self.fakeGetpass)
        self.path = self.mktemp()

    def fakeGetpass(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        if not self.answers:
            raise EOFError()
        return self.answers.pop(0)

    def mailgw(self, *argv: str, stdin: str = "") -> int:
        sys.stdin = io.StringIO(stdin)
        return cli.main(list(argv))

    def runFile(self, *argv: str, stdin: str = "") -> int:
        return self.mailgw(*argv, "--file", self.path, stdin=stdin)

    def assertError(self, message: str) -> None:
        """
        stderr holds exactly one line: mailgw: MESSAGE.
        """
        self.assertEqual(self.stderr.getvalue(), f"mailgw: {message}\n")

    def verifies(self, login: str, password: str) -> bool:
        return bool(CHEAP.verify(readUsers(self.path)[login].passwordHash, password))


class PasswdAddTests(CLITestCase):
    def test_addStdin(self) -> None:
        """
        --password-stdin reads one line; only the line ending is removed.
        """
        self.assertEqual(
            self.runFile("passwd", "add", "alice", "--password-stdin", stdin=" pw \r\nx\n"), 0
        )
        self.assertTrue(self.verifies("alice", " pw "))
        self.assertIsNone(readUsers(self.path)["alice"].cramSecret)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual((self.stdout.getvalue(), self.stderr.getvalue()), ("", ""))
        self.assertEqual(self.prompts, [])

    def test_addGetpass(self) -> None:
        """
        Without --password-stdin the password is asked twice.
        """
        self.answers = ["sesame", "sesame"]
        self.assertEqual(self.runFile("passwd", "add", "alice"), 0)
        self.assertEqual(len(self.prompts), 2)
        self.assertIn("alice", self.prompts[0])
        self.assertTrue(self.verifies("alice", "sesame"))

    def test_addMismatch(self) -> None:
        self.answers = ["sesame", "sesamE"]
        self.assertEqual(self.runFile("passwd", "add", "alice"), 1)
        self.assertError("passwords do not match")
        self.assertFalse(os.path.exists(self.path))

    def test_addNoPassword(self) -> None:
        self.assertEqual(self.runFile("passwd", "add", "alice"), 1)
        self.assertError("no password given")
        self.assertFalse(os.path.exists(self.path))

    def test_addEmptyPassword(self) -> None:
        self.assertEqual(self.runFile("passwd", "add", "alice", "--password-stdin", stdin="\n"), 1)
        self.assertError("password must not be empty")
        self.assertFalse(os.path.exists(self.path))

    def test_addCram(self) -> None:
        self.assertEqual(
            self.runFile("passwd", "add", "rené", "--cram", "--password-stdin", stdin="pässwörd\n"),
            0,
        )
        self.assertEqual(readUsers(self.path)["rené"].cramSecret, "pässwörd".encode())
        self.assertIn("0600", self.stderr.getvalue())

    def test_addExisting(self) -> None:
        """
        Adding an existing user fails before asking for a password.
        """
        self.runFile("passwd", "add", "alice", "--password-stdin", stdin="one\n")
        self.answers = ["two", "two"]
        self.assertEqual(self.runFile("passwd", "add", "alice"), 1)
        self.assertError(f"{self.path}: user 'alice' already exists")
        self.assertEqual(self.prompts, [])
        self.assertTrue(self.verifies("alice", "one"))

    def test_addBadLogin(self) -> None:
        self.assertEqual(self.runFile("passwd", "add", "a:b", "--password-stdin", stdin="x\n"), 1)
        self.assertTrue(self.stderr.getvalue().startswith(f"mailgw: {self.path}: login 'a:b'"))
        self.assertEqual(self.stderr.getvalue().count("\n"), 1)

    def test_addNoDirectory(self) -> None:
        path = os.path.join(self.mktemp(), "passwd")
        code = self.mailgw(
            "passwd", "add", "alice", "--file", path, "--password-stdin", stdin="x\n"
        )
        self.assertEqual(code, 1)
        self.assertError(f"{path}: No such file or directory")


class PasswdChangeRemoveListTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.runFile("passwd", "add", "alice", "--password-stdin", stdin="a-old\n")
        self.runFile("passwd", "add", "bob", "--cram", "--password-stdin", stdin="b-old\n")
        self.stderr.truncate(0)
        self.stderr.seek(0)

    def test_change(self) -> None:
        """
        change sets a new password and, by default, keeps whether a CRAM
        secret is stored.
        """
        self.answers = ["a-new", "a-new"]
        self.assertEqual(self.runFile("passwd", "change", "alice"), 0)
        self.assertEqual(
            self.runFile("passwd", "change", "bob", "--password-stdin", stdin="b-new"), 0
        )
        self.assertTrue(self.verifies("alice", "a-new"))
        self.assertTrue(self.verifies("bob", "b-new"))
        users = readUsers(self.path)
        self.assertIsNone(users["alice"].cramSecret)
        self.assertEqual(users["bob"].cramSecret, b"b-new")

    def test_changeCram(self) -> None:
        self.runFile("passwd", "change", "alice", "--cram", "--password-stdin", stdin="a2\n")
        self.runFile("passwd", "change", "bob", "--no-cram", "--password-stdin", stdin="b2\n")
        users = readUsers(self.path)
        self.assertEqual(users["alice"].cramSecret, b"a2")
        self.assertIsNone(users["bob"].cramSecret)

    def test_changeUnknown(self) -> None:
        self.answers = ["x", "x"]
        self.assertEqual(self.runFile("passwd", "change", "carol"), 1)
        self.assertError(f"{self.path}: no user 'carol'")
        self.assertEqual(self.prompts, [])

    def test_changeMismatchKeepsOld(self) -> None:
        self.answers = ["new", "wen"]
        self.assertEqual(self.runFile("passwd", "change", "alice"), 1)
        self.assertTrue(self.verifies("alice", "a-old"))

    def test_remove(self) -> None:
        self.assertEqual(self.runFile("passwd", "remove", "alice"), 0)
        self.assertEqual(list(readUsers(self.path)), ["bob"])
        self.assertEqual(self.runFile("passwd", "remove", "alice"), 1)
        self.assertError(f"{self.path}: no user 'alice'")

    def test_list(self) -> None:
        """
        list shows logins and whether a CRAM secret is stored, never a hash
        or a secret.
        """
        self.assertEqual(self.runFile("passwd", "list"), 0)
        self.assertEqual(self.stdout.getvalue(), "alice\t-\nbob\tcram-md5\n")
        self.assertNotIn("argon2", self.stdout.getvalue())

    def test_scram(self) -> None:
        """
        --scram stores SCRAM-SHA-256 keys (not the password); change keeps
        them (new ones) unless --no-scram; list shows them in a third column.
        """
        self.assertEqual(
            self.runFile("passwd", "add", "carol", "--scram", "--password-stdin", stdin="c\n"), 0
        )
        keys = readUsers(self.path)["carol"].scramKeys
        self.assertIsNotNone(keys)
        with open(self.path) as f:
            self.assertNotIn(":c:", f.read())
        self.assertEqual(
            self.runFile("passwd", "change", "carol", "--password-stdin", stdin="d\n"), 0
        )
        changed = readUsers(self.path)["carol"].scramKeys
        self.assertIsNotNone(changed)
        self.assertNotEqual(changed, keys)
        self.assertEqual(self.runFile("passwd", "list"), 0)
        self.assertIn("carol\t-\tscram-sha-256\n", self.stdout.getvalue())
        self.assertEqual(
            self.runFile(
                "passwd", "change", "carol", "--no-scram", "--password-stdin", stdin="d\n"
            ),
            0,
        )
        self.assertIsNone(readUsers(self.path)["carol"].scramKeys)
        self.assertEqual(
            self.runFile("passwd", "change", "alice", "--scram", "--password-stdin", stdin="e\n"), 0
        )
        self.assertIsNotNone(readUsers(self.path)["alice"].scramKeys)

    def test_missingFile(self) -> None:
        self.path = self.mktemp()
        for action in ["list", "remove alice", "change alice --password-stdin"]:
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(self.runFile("passwd", *action.split(), stdin="x\n"), 1)
            self.assertError(f"{self.path}: no such file")

    def test_badFile(self) -> None:
        with open(self.path, "a") as f:
            f.write("carol\n")
        self.assertEqual(self.runFile("passwd", "list"), 1)
        self.assertTrue(self.stderr.getvalue().startswith(f"mailgw: {self.path}, line 5: "))
        self.assertEqual(self.stdout.getvalue(), "")


class MainTests(CLITestCase):
    def test_usage(self) -> None:
        for argv in [[], ["passwd"], ["passwd", "frob"], ["passwd", "add"], ["nonsense"]]:
            self.assertEqual(self.mailgw(*argv), 2, argv)
        self.assertIn("usage: mailgw", self.stderr.getvalue())

    def test_help(self) -> None:
        self.assertEqual(self.mailgw("--help"), 0)
        self.assertIn("passwd", self.stdout.getvalue())
        self.assertEqual(self.mailgw("passwd", "add", "--help"), 0)
        self.assertIn("--password-stdin", self.stdout.getvalue())

    def test_defaultFile(self) -> None:
        args = cli.makeParser().parse_args(["passwd", "list"])
        self.assertEqual(args.file, "/etc/mailgw/passwd")
        self.assertEqual(cli.DEFAULT_PASSWD_FILE, "/etc/mailgw/passwd")

    def test_argvDefault(self) -> None:
        self.patch(sys, "argv", ["mailgw", "passwd", "list", "--file", self.path])
        self.assertEqual(cli.main(), 1)
        self.assertError(f"{self.path}: no such file")

    def test_interrupted(self) -> None:
        def interrupted(prompt: str = "") -> str:
            raise KeyboardInterrupt()

        self.patch(cli, "getpass", interrupted)
        self.assertEqual(self.runFile("passwd", "add", "alice"), 1)
        self.assertError("interrupted")

    def test_registration(self) -> None:
        """
        A subcommand added by an add<Name>Parser function runs through main,
        and its CommandError becomes one line and exit code 1.
        """
        seen: list[argparse.Namespace] = []

        def handler(args: argparse.Namespace) -> int:
            seen.append(args)
            if args.fail:
                raise cli.CommandError("/var/spool/mailgw: broken")
            print("done")
            return 0

        def addFrobParser(subparsers: Any) -> None:
            parser = subparsers.add_parser("frob")
            parser.add_argument("--fail", action="store_true")
            parser.set_defaults(func=handler)

        adders = cli._parserAdders()
        self.assertIn(cli.addPasswdParser, adders)
        self.patch(cli, "_parserAdders", lambda: adders + [addFrobParser])
        self.assertEqual(self.mailgw("frob"), 0)
        self.assertEqual(self.stdout.getvalue(), "done\n")
        self.assertEqual(self.mailgw("frob", "--fail"), 1)
        self.assertError("/var/spool/mailgw: broken")
        self.assertEqual(len(seen), 2)


class VersionTests(CLITestCase):
    def test_version(self) -> None:
        """
        ``mailgw --version`` prints the installed distribution's version,
        which setup.cfg reads from mailgw.__version__.
        """
        from importlib.metadata import version

        self.assertEqual(self.mailgw("--version"), 0)
        self.assertEqual(self.stdout.getvalue(), f"mailgw {version('mailgw')}\n")
