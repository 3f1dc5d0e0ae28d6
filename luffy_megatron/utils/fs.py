"""Crash-safe file system helpers: write under a temporary name, rename into place."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch.distributed as dist

log = logging.getLogger("luffy.fs")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields `path.tmp-<pid>` to write into; on success renames it to `path`.

    On an exception the temporary directory is removed and `path` is untouched, so an interrupted
    writer never leaves a half-written directory that looks complete.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; remove it or pass overwrite=True")
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


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
    """Writes a text file through a temporary name and `os.replace`."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, final)


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
