"""Crash-safe file system helpers: write under a temporary name, make it durable, rename into place.

Every writer of a directory (actor checkpoints, converted models, HF exports) goes through `atomic_dir` (or its
collective form): the contents are written to `<name>.tmp-<pid>`, fsynced, and renamed into place; an existing
`<name>` is first renamed aside to `<name>.old-<pid>` and removed only after the swap, so at every instant either
the old or the new version is complete under its name. What an interrupted writer leaves behind (`.tmp-` and
`.old-` siblings) is removed by `sweep_abandoned` before the next write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch.distributed as dist

log = logging.getLogger(__name__)

_ABANDONED = re.compile(r"^(?P<name>.+)\.(tmp|old)-\d+$")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields `path.tmp-<pid>` to write into; on success fsyncs it and renames it to `path`.

    On an exception the temporary directory is removed and `path` is untouched, so an interrupted
    writer never leaves a half-written directory that looks complete. An existing `path` is renamed
    aside before the new one takes its name, and removed only after that.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; remove it or pass overwrite=True")
    sweep_abandoned(final.parent, only=final.name)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
        fsync_dir(final.parent)


@contextlib.contextmanager
def collective_atomic_dir(path: str | os.PathLike, *, subdirs: Sequence[str] = ()) -> Iterator[Path]:
    """`atomic_dir(path, overwrite=True)` that every rank of torch.distributed's default group writes into.

    Rank 0 makes `path.tmp-<its pid>` (and `subdirs` in it); every rank then gets that path to write into. Once
    every rank left the block, rank 0 swaps it into place (an existing `path` is renamed aside first, then
    removed), and every rank returns only after that. An exception on rank 0 removes the temporary directory."""
    final = Path(path)
    first = dist.get_rank() == 0
    with atomic_dir(final, overwrite=True) if first else contextlib.nullcontext() as mine:
        if first:
            for sub in subdirs:
                (mine / sub).mkdir()
        name = [mine.name if first else None]
        dist.broadcast_object_list(name, src=0)
        dist.barrier()
        yield final.with_name(name[0])
        dist.barrier()  # every rank finished writing
    dist.barrier()  # the directory is in place


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a text file through a temporary name, fsync and `os.replace` (then fsyncs the directory)."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes a directory's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsyncs every file and directory under `root` (what is already on disk costs little)."""
    for here, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(here)


def sweep_abandoned(parent: str | os.PathLike, *, only: str | None = None) -> list[tuple[Path, int]]:
    """Removes what interrupted atomic writes left in `parent`: `<name>.tmp-<pid>` (a write that never finished)
    and `<name>.old-<pid>` (a previous version renamed aside whose removal was cut short; renamed back instead
    when nothing took its name), for every name or `only` that one; this process's own are kept. Each removal is
    logged with its size. Returns [(path, bytes)]. Only the one writer of `parent` may call it (the run's output
    directory is locked by its driver)."""
    parent = Path(parent)
    removed = []
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = _ABANDONED.match(entry.name)
        if not match or entry.name.endswith(f"-{os.getpid()}") or (only is not None and match["name"] != only):
            continue
        if entry.name.startswith(f"{match['name']}.old-") and not (parent / match["name"]).exists():
            entry.rename(parent / match["name"])  # cut short between the two renames: the old version is whole
            log.warning("restored %s from %s, left by an interrupted write", parent / match["name"], entry.name)
            continue
        size = tree_bytes(entry)
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:
            log.warning("could not remove %s, left by an interrupted write: %s", entry, err)
            continue
        log.warning("removed %s (%.1f MiB), left by an interrupted write", entry, size / 2**20)
        removed.append((entry, size))
    return removed


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (a file: its size); what cannot be read counts 0."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    total = 0
    for here, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(here, name)).st_size
    return total


class LockHeld(Exception):
    """The lock file is held by another process; `holder` is what that process wrote into it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process (it has not written its name yet)'}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive `fcntl.flock` on `path`, taken without waiting (`acquire`) and held until `release` or
    the holder's exit (the kernel drops it even when the process is killed). The holder writes `owner` into
    the file, which a refused process reads back in `LockHeld`. On a file system without flock (some Lustre
    mounts) the lock is skipped with a warning."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, owner: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's name stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(self.path, holder) from None
            log.warning("%s: this file system refuses flock (%s): the lock is skipped", self.path, err)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, (owner + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)  # a reader between here and the unlock sees no stale holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


LOG_MODE = 0o640  # logs may quote prompts, responses and tracebacks: the owner and its group read them, no one else


def open_log(path: str | os.PathLike, *, append: bool = True) -> int:
    """A descriptor open for writing on the log file `path` (appended to, or emptied with `append=False`),
    created with mode `LOG_MODE`. A log of this user's that a world could read (an older run's) loses the
    world's bits."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, LOG_MODE)
    st = os.fstat(fd)
    if st.st_uid == os.getuid() and st.st_mode & 0o007:
        os.fchmod(fd, st.st_mode & 0o7770)
    return fd


def write_log(path: str | os.PathLike, text: str) -> None:
    """Writes `text` as the whole of the log file `path` (mode `LOG_MODE`, see `open_log`)."""
    with os.fdopen(open_log(path, append=False), "w") as f:
        f.write(text)
