"""POSIX shared memory for weight buckets: a file in /dev/shm mapped as a uint8 tensor (MAP_SHARED).

One process creates it and writes into the mapping (the exporter writes the bucket there directly); others map
the same file by path with `map_shm` and read it in place: no copy between processes. Space is reserved when the
file is made (`posix_fallocate`), so a full /dev/shm (Docker's default is 64 MiB) is an error naming the sizes,
not a SIGBUS on first touch. Files carry the creating pid in their name; files of dead pids are removed when the
next buffer is made, so a killed process does not leak them for long.
"""

from __future__ import annotations

import atexit
import collections
import glob
import os
import re
import threading
import uuid
import weakref

import torch

SHM_DIR = "/dev/shm"
PREFIX = "luffy-sync-"
_PID = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_LIVE: set[str] = set()
_LOCK = threading.Lock()


def _unlink(path: str) -> None:
    with _LOCK:
        _LIVE.discard(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@atexit.register
def _unlink_all() -> None:
    for path in list(_LIVE):
        _unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: str = SHM_DIR) -> list[str]:
    """Removes bucket files of processes that no longer exist; returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(directory, PREFIX + "*")):
        m = _PID.match(os.path.basename(path))
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


class ShmBuffer:
    """`nbytes` of shared memory as `self.tensor` (uint8), backed by `self.path`. Unlinked by `close()`, when
    garbage collected, or at exit."""

    def __init__(self, nbytes: int, tag: str = "buf", directory: str = SHM_DIR):
        if nbytes <= 0:
            raise ValueError(f"shared-memory buffer of {nbytes} bytes")
        remove_stale(directory)
        self.nbytes = int(nbytes)
        self.path = os.path.join(directory, f"{PREFIX}{os.getpid()}-{tag}-{uuid.uuid4().hex[:12]}")
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        with _LOCK:
            _LIVE.add(self.path)
        try:
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError as err:
                st = os.statvfs(directory)
                raise OSError(
                    f"cannot reserve {self.nbytes / 2**20:.0f} MiB in {directory} "
                    f"({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free) for a weight bucket: {err}. "
                    f"Enlarge {directory} (e.g. docker --shm-size), lower "
                    "rollout.weight_sync_bucket_mb, or use rollout.weight_sync_transport=collective"
                ) from None
        finally:
            os.close(fd)
        self.tensor = torch.from_file(self.path, shared=True, size=self.nbytes, dtype=torch.uint8)
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def close(self) -> None:
        self._finalizer()


def map_shm(path: str, nbytes: int) -> torch.Tensor:
    """Maps an existing bucket file (another process's `ShmBuffer`) as a uint8 tensor, without a copy."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"shared-memory bucket {path} does not exist: the sender and this process must share "
            "a host (and /dev/shm); use rollout.weight_sync_transport=collective across hosts"
        )
    return torch.from_file(path, shared=True, size=int(nbytes), dtype=torch.uint8)


class MappingCache:
    """The last few mappings by path (a sender reuses its two buffers every bucket and every sync)."""

    def __init__(self, size: int = 16):
        self.size = size
        self.maps: collections.OrderedDict[tuple[str, int], torch.Tensor] = collections.OrderedDict()

    def get(self, path: str, nbytes: int) -> torch.Tensor:
        key = (path, int(nbytes))
        for old in [k for k in self.maps if k != key and not os.path.exists(k[0])]:
            del self.maps[old]  # its sender removed the file: unmap it so its memory goes back
        if key in self.maps:
            self.maps.move_to_end(key)
            return self.maps[key]
        t = map_shm(path, nbytes)
        self.maps[key] = t
        while len(self.maps) > self.size:
            self.maps.popitem(last=False)
        return t
