"""
``twistd -u USER -g GROUP``: twistd starts as root, binds the listeners,
then becomes USER. The spool is created (or opened) before that, as root:
L{giveTree} hands the spool tree to the service user at start, so that the
gateway can write its messages and create its control socket once it has
dropped its privileges (docs/operations.md).
"""

from __future__ import annotations

import os
import pwd

from twisted.logger import Logger

_log = Logger()


def targetIds(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """
    The (uid, gid) twistd will switch to (its ``-u``/``-g``; a ``-u``
    alone means that user's own group), or None when it stays who it is.
    """
    if uid is None and gid is None:
        return None
    if uid is None:
        uid = os.getuid()
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def giveTree(path: str, uid: int, gid: int) -> int:
    """
    Make ``path`` and everything under it (symbolic links themselves, never
    what they point to) owned by ``uid``:``gid``.

    @return: how many entries changed owner.
    @raise OSError: an owner cannot be changed (not root).
    """
    changed = 0

    def give(entry: str) -> None:
        nonlocal changed
        st = os.lstat(entry)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(entry, uid, gid)
            changed += 1

    give(path)
    for root, directories, files in os.walk(path):
        for name in directories + files:
            give(os.path.join(root, name))
    return changed


def giveSpool(directory: str, uid: int | None, gid: int | None) -> None:
    """Hand the spool tree to the user twistd will become, if it changes user."""
    target = targetIds(uid, gid)
    if target is None or target == (os.getuid(), os.getgid()):
        return
    changed = giveTree(directory, *target)
    if changed:
        _log.info(
            "spool {directory}: {changed} entries given to uid {uid} gid {gid}",
            directory=directory,
            changed=changed,
            uid=target[0],
            gid=target[1],
        )
