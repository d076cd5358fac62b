"""
``[auth] locked_users``: accounts locked out at once, sessions included.

A file of user names, one per line (``#`` comments, blank lines).  A
locked user's AUTH gets ``535`` even with the right password, and a
session that authenticated before the lock is closed (``421``) at its
next ``MAIL`` or end of ``DATA``, its message not stored: for an account
whose password was phished, what the credential store's own lock cannot
do to sessions already open (Postfix's ``check_sasl_access``).

The file is looked at (``stat``) at most once a second when a check needs
it and read again when it changed, so an edit reaches every session of
every worker within a second, without a reload.  Both on the reactor
thread: it is a local file of a few names (a regular file, at most
:data:`MAX_SIZE`; a FIFO put there is refused, not waited on).  Names compare as the
throttles and limits key users: SASLprep'd and case-folded
(:func:`kumoauth.stores.fold_user`).
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

from kumoauth.ops.loglimit import StateLog
from kumoauth.stores import fold_user

#: seconds between looks at the file
CHECK_EVERY = 1.0
#: the largest file read (it is read on the reactor thread; a million
#: names is already far more than a list of locked accounts)
MAX_SIZE = 16 * 1024 * 1024


class LockedFileError(ValueError):
    """The file cannot be read, or a line names no user a client could be."""


def user_key(name: str) -> str:
    """*name* as it is compared: SASLprep'd (``ValueError`` if it cannot be), folded."""
    from kumoauth.auth.sasl import SASLError, prepare_name

    try:
        return fold_user(prepare_name(name, "authcid"))
    except SASLError as e:
        raise ValueError(str(e)) from None


def parse(text: str, source: str) -> frozenset[str]:
    """The names in *text*; :class:`LockedFileError` naming the bad line."""
    names = set()
    for number, line in enumerate(text.splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        try:
            names.add(user_key(name))
        except ValueError as e:
            raise LockedFileError(f"{source}:{number}: not a user name ({e})") from None
    return frozenset(names)


def read(path: Path) -> tuple[tuple[int, int, int], frozenset[str]]:
    """The file's names and the stat they were read under (blocking)."""
    try:
        # Non-blocking: a FIFO put there must not hold the reactor thread;
        # anything but a regular file is refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise LockedFileError(f"{path}: not a regular file")
            data = f.read(MAX_SIZE + 1)
    except OSError as e:
        raise LockedFileError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_SIZE:
        raise LockedFileError(f"{path}: larger than {MAX_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LockedFileError(f"{path}: not UTF-8") from None
    return (st.st_ino, st.st_size, st.st_mtime_ns), parse(text, str(path))


class LockedUsers:
    """
    The locked users of one process, across reloads (:meth:`configure`).
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.path: Path | None = None
        self._names: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self._looked = -math.inf
        #: the file's state, logged once per change
        self.state = StateLog("locked_users file")

    def use(self, path: Path | None, read_now: tuple[Any, frozenset[str]] | None) -> None:
        """
        Use the file at *path*, as :func:`read` just read it (start-up
        and reload read it first, where a failure is the operator's one
        line); None: nobody is locked.
        """
        if path is None or read_now is None:
            self.path, self._names, self._stamp = None, frozenset(), None
            return
        self.path, (self._stamp, self._names) = path, read_now
        self._looked = self.clock.seconds()

    def locked(self, user: str | None) -> bool:
        """Whether *user* (an ``authn_id``) is locked now."""
        if self.path is None or user is None:
            return False
        now = self.clock.seconds()
        if now - self._looked >= CHECK_EVERY:
            self._looked = now
            self._refresh(self.path)
        try:
            return user_key(user) in self._names
        except ValueError:
            # a name a store gave that SASLprep refuses: compared folded
            # as it is, rather than never locked
            return fold_user(user) in self._names

    def which(self, *names: str | None) -> str | None:
        """
        The first of *names* that is locked now, or None: a session's
        account as the store named it and the name it logged in with, so
        a lock written before a store named accounts holds.
        """
        if self.path is None:
            return None
        for name in dict.fromkeys(names):
            if name and self.locked(name):
                return name
        return None

    def _refresh(self, path: Path) -> None:
        try:
            st = os.stat(path)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
                self._stamp, self._names = read(path)
        except (OSError, LockedFileError) as e:
            why = str(e) if isinstance(e, LockedFileError) else f"{path}: {e.strerror or e}"
            self.state.failed(why, f"the {len(self._names)} user(s) read before stay locked")
            return
        self.state.succeeded()
