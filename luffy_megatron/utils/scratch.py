"""Scratch files and directories in /dev/shm and the temp directory: one name, one proof of life, one sweeper.

Every one the package makes is named `luffy-<kind>-<pid>-<tag>-<12 hex digits>` (`make_file`, `make_dir`; the
kinds are listed in `KINDS`), is created by this user alone (O_EXCL, mode 0600 / 0700), and its creator holds an
exclusive `flock` on it for as long as it exists. The kernel drops that lock when the creator (and every child
that inherited the descriptor) is gone, whatever PID namespace it ran in, so an entry whose lock can be taken
has nobody left to use it. The pid in the name only says who made it; it proves nothing (a container's pids are
reused by others).

`sweep(directory)` removes such leftovers of this user and nothing else: another user's entries, and names of
any other shape, are never touched, and an entry that cannot be read, locked or removed is skipped (it never
fails the caller). The creator removes its own with `remove`, and whatever it still holds at interpreter exit
goes then.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid

PREFIX = "luffy-"
SHM_DIR = "/dev/shm"
KINDS = {  # every kind of scratch entry the package makes (the sweeper removes no other name)
    "bucket": "a weight bucket in /dev/shm (sync.shm_buffer.ShmBuffer), while its sender or engine lives",
    "pg": "the temp-dir FileStore directory of a private world of one (models.parallel), until its shutdown",
}
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?:{'|'.join(KINDS)})-\d+-(?:[A-Za-z0-9_.-]+-)?[0-9a-f]{{12}}$")
_CREATE_TRIES = 5

log = logging.getLogger(__name__)
_held: dict[str, tuple[int, int]] = {}  # path -> (descriptor holding its lock, pid of the process that made it)
_held_lock = threading.Lock()


def temp_dir() -> str:
    """The temp directory ($TMPDIR, else /tmp), where scratch files that need no shared memory go."""
    return tempfile.gettempdir()


def make_file(directory: str, kind: str, tag: str = "") -> tuple[str, int]:
    """A new empty scratch file in `directory` (mode 0600), locked by this process until `remove(path)`.
    Returns (path, descriptor): the descriptor is open read-write for the caller's use; `remove` closes it."""
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    return _create(directory, kind, tag, lambda path: os.open(path, flags, 0o600))


def make_dir(directory: str, kind: str, tag: str = "") -> str:
    """A new empty scratch directory in `directory` (mode 0700), locked by this process until `remove(path)`
    (which removes it with everything in it)."""

    def create(path: str) -> int:
        os.mkdir(path, 0o700)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    return _create(directory, kind, tag, create)[0]


def _create(directory: str, kind: str, tag: str, create) -> tuple[str, int]:
    if kind not in KINDS or not re.fullmatch(r"[A-Za-z0-9_.-]*", tag):
        raise ValueError(
            f"scratch kind {kind!r} / tag {tag!r}: the kind is one of {sorted(KINDS)}, the tag [A-Za-z0-9_.-]"
        )
    for _ in range(_CREATE_TRIES):
        name = f"{PREFIX}{kind}-{os.getpid()}-{tag + '-' if tag else ''}{uuid.uuid4().hex[:12]}"
        path = os.path.join(directory, name)
        fd = create(path)
        # A sweeper may have taken the lock (and removed the entry) between its creation and ours: the lock
        # then waits for it, and the entry at `path` is no longer this one. Try another name.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: the entry could not be told from a leftover
            _remove_entry(path, os.fstat(fd))
            os.close(fd)
            raise
        if _same_entry(fd, path):
            with _held_lock:
                _held[path] = (fd, os.getpid())
            return path, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, f"could not make a scratch entry in {directory}: removed {_CREATE_TRIES} times")


def _same_entry(fd: int, path: str) -> bool:
    try:
        mine, there = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def remove(path: str) -> None:
    """Removes a scratch entry this process made (a file, or a directory with its contents) and lets its lock
    go. In a forked child that inherited it, only the child's copy of the descriptor is closed. Never raises."""
    with _held_lock:
        fd, pid = _held.pop(path, (None, None))
    if fd is None:
        return
    try:
        if pid == os.getpid():
            _remove_entry(path, os.fstat(fd))
    except OSError as err:
        log.warning("cannot remove scratch %s: %s", path, err)
    finally:
        os.close(fd)


@atexit.register
def remove_all() -> None:
    """Removes every scratch entry this process still holds (run at interpreter exit)."""
    with _held_lock:
        paths = list(_held)
    for path in paths:
        remove(path)


def sweep(directory: str) -> list[str]:
    """Removes the scratch entries in `directory` that belong to this user and whose lock nobody holds (their
    makers are gone); returns their paths. Anything else is left alone, and no error escapes."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(directory, name)
        if _NAME.match(name) and _sweep_one(path):
            removed.append(path)
    return removed


def _sweep_one(path: str) -> bool:
    try:
        before = os.lstat(path)
        if before.st_uid != os.getuid() or not (stat.S_ISREG(before.st_mode) or stat.S_ISDIR(before.st_mode)):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its maker (or a child of it) is alive
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino) or now.st_uid != os.getuid():
            return False
        _remove_entry(path, now)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_entry(path: str, st: os.stat_result) -> None:
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
