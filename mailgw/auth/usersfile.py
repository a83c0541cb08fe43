"""
The mailgw users file: its format, and reading and (atomically) writing it.

One user a line, C{#} comments and blank lines ignored::

    login:ARGON2ID-HASH
    login:ARGON2ID-HASH:CRAMSECRET
    login:ARGON2ID-HASH[:CRAMSECRET]:SCRAM-SHA-256$ITER$SALT$STOREDKEY$SERVERKEY

The hash is made by argon2-cffi's L{PasswordHasher} (its default
parameters). CRAMSECRET, present only for users added with C{--cram}, is the
base64 of the UTF-8 password itself: CRAM-MD5 (RFC 2195) needs the password
on the server, so the secret is password-equivalent and the file must be
readable by the server only (L{writeUsers} never leaves secrets readable by
others). The SCRAM-SHA-256 keys, present only for users added with
C{--scram}, are not the password (L{mailgw.auth.scram.ScramKeys}).
"""

from __future__ import annotations

import binascii
import os
import stat
import tempfile
import unicodedata
from collections.abc import Iterable

import argon2
import attrs
from argon2.exceptions import InvalidHashError

from mailgw.auth.scram import ScramKeys

StrPath = str | os.PathLike[str]

_HEADER = (
    "# mailgw users: login:ARGON2ID-HASH[:CRAM-MD5-SECRET][:SCRAM-KEYS]; see `mailgw passwd`.\n"
    "# A CRAM-MD5 secret is the password itself (base64): keep this file mode 0600.\n"
)


class PasswdFileError(ValueError):
    """
    The users file cannot be parsed; the message names the file and line
    (and never quotes a hash or a secret).
    """


def checkLogin(login: str) -> str:
    """
    @return: C{login}, if it can stand in the users file.
    @raise ValueError: C{login} is empty, starts with C{#}, or holds C{:},
        whitespace or a control character.
    """
    if not login:
        raise ValueError("login must not be empty")
    if login.startswith("#"):
        raise ValueError(f"login {login!r} must not start with '#'")
    for c in login:
        if c == ":" or c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            raise ValueError(
                f"login {login!r} must not contain ':', whitespace or control characters"
            )
    return login


@attrs.frozen
class UserEntry:
    """
    One user of the file. ``cramSecret`` is the UTF-8 password (for
    CRAM-MD5) or ``None`` when the user may not use CRAM-MD5. The secret is
    left out of C{repr}, so that it never reaches a log by accident.
    """

    login: str
    passwordHash: str = attrs.field(repr=False)
    cramSecret: bytes | None = attrs.field(default=None, repr=False)
    scramKeys: ScramKeys | None = attrs.field(default=None, repr=False)

    def toLine(self) -> str:
        fields = [checkLogin(self.login), self.passwordHash]
        if self.cramSecret is not None:
            fields.append(binascii.b2a_base64(self.cramSecret, newline=False).decode("ascii"))
        if self.scramKeys is not None:
            fields.append(self.scramKeys.toField())
        return ":".join(fields)


def _parseLine(line: str) -> UserEntry:
    fields = line.split(":")
    scramKeys = None
    if len(fields) in (3, 4) and ScramKeys.isField(fields[-1]):
        try:
            scramKeys = ScramKeys.fromField(fields.pop())
        except ValueError as e:
            raise ValueError(f"user {fields[0]!r}: {e}") from None
    if len(fields) not in (2, 3):
        raise ValueError("expected login:HASH[:CRAMSECRET][:SCRAM-SHA-256$...]")
    login, passwordHash = fields[0], fields[1]
    checkLogin(login)
    try:
        params = argon2.extract_parameters(passwordHash)
    except InvalidHashError:
        raise ValueError(f"user {login!r}: the hash is not an argon2 hash") from None
    if params.type is not argon2.Type.ID:
        raise ValueError(f"user {login!r}: the hash is not an argon2id hash")
    cramSecret = None
    if len(fields) == 3:
        try:
            cramSecret = binascii.a2b_base64(fields[2], strict_mode=True)
        except binascii.Error:
            raise ValueError(f"user {login!r}: the CRAM-MD5 secret is not base64") from None
        if not cramSecret:
            raise ValueError(f"user {login!r}: the CRAM-MD5 secret is empty")
    return UserEntry(login, passwordHash, cramSecret, scramKeys)


def parseUsers(data: bytes, path: StrPath = "<users>") -> dict[str, UserEntry]:
    """
    Parse the bytes of a users file; C{path} only names it in errors.

    @raise PasswdFileError: a line is malformed or a login repeated.
    """
    users: dict[str, UserEntry] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
            if not line or line.startswith("#"):
                continue
            entry = _parseLine(line)
            if entry.login in users:
                raise ValueError(f"user {entry.login!r} appears twice")
        except (UnicodeDecodeError, ValueError) as e:
            problem = "not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
            raise PasswdFileError(f"{os.fspath(path)}, line {number}: {problem}") from None
        users[entry.login] = entry
    return users


def readUsers(path: StrPath) -> dict[str, UserEntry]:
    """
    The users of file C{path}, in file order, by login.

    @raise OSError: the file cannot be read (e.g. L{FileNotFoundError}).
    @raise PasswdFileError: the file is malformed.
    """
    with open(path, "rb") as f:
        return parseUsers(f.read(), path)


def writeUsers(path: StrPath, entries: Iterable[UserEntry]) -> None:
    """
    Replace file C{path} with C{entries}, atomically: a reader sees either
    the old file or the whole new one, also after a crash. A new file has
    mode 0600. One that replaces a file keeps that file's owner, group and
    permission bits (so that root can edit a C{root:mailgw 0640} file the
    server reads through its group), except that a file holding CRAM
    secrets is never left readable or writable by others.

    @raise OSError: the file cannot be written; the old one is untouched.
    """
    path = os.fspath(path)
    entries = list(entries)
    directory = os.path.dirname(os.path.abspath(path))
    text = _HEADER + "".join(entry.toLine() + "\n" for entry in entries)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    # mkstemp creates the file mode 0600 in the same directory (so rename
    # is atomic), under an unpredictable name.
    fd, tempPath = tempfile.mkstemp(dir=directory, prefix=".mailgw-passwd.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # Owner first: chown may clear set-id bits, and must not widen
            # access while the file is being written (it is 0600 until then).
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.fchmod(f.fileno(), _modeFor(old, entries))
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tempPath, path)
    except BaseException:
        try:
            os.unlink(tempPath)
        except FileNotFoundError:
            pass
        raise
    # The rename is durable only once the directory is on disk.
    dirFd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirFd)
    finally:
        os.close(dirFd)


def _modeFor(old: os.stat_result | None, entries: list[UserEntry]) -> int:
    """The permission bits of a users file replacing ``old`` (None: a new file)."""
    if old is None:
        return 0o600
    mode = stat.S_IMODE(old.st_mode) & 0o777
    if any(entry.cramSecret is not None for entry in entries):
        mode &= 0o770  # password-equivalent secrets: never for others
    return mode
