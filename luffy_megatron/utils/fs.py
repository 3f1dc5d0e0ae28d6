"""Crash-safe file system helpers: write under a temporary name, rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch.distributed as dist


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
