"""Crash-safe file system helpers: write under a temporary name, rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a text file through a temporary name and `os.replace`."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, final)
