"""POSIX shared memory for weight buckets: a file in /dev/shm mapped as a uint8 tensor (MAP_SHARED).

One process creates it and writes into the mapping (the exporter writes the bucket there directly); others map
the same file by path with `map_shm` and read it in place: no copy between processes. Space is reserved when the
file is made (`posix_fallocate`), so a full /dev/shm (Docker's default is 64 MiB) is an error naming the sizes,
not a SIGBUS on first touch. The files are the package's scratch files (`utils.scratch`: named `luffy-bucket-...`,
locked by their creator while they exist): a new buffer first sweeps away this user's files whose creator is
gone, so a killed process does not leak them for long, and never touches a live or another user's file.
"""

from __future__ import annotations

import collections
import os
import weakref

import torch

from luffy_megatron.utils.scratch import SHM_DIR, make_file, remove, sweep


class ShmBuffer:
    """`nbytes` of shared memory as `self.tensor` (uint8), backed by `self.path`. Unlinked by `close()`, when
    garbage collected, or at exit."""

    def __init__(self, nbytes: int, tag: str = "buf", directory: str = SHM_DIR):
        if nbytes <= 0:
            raise ValueError(f"shared-memory buffer of {nbytes} bytes")
        sweep(directory)
        self.nbytes = int(nbytes)
        self.path, fd = make_file(directory, "bucket", tag)
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
            self.tensor = torch.from_file(self.path, shared=True, size=self.nbytes, dtype=torch.uint8)
        except BaseException:
            remove(self.path)
            raise
        self._finalizer = weakref.finalize(self, remove, self.path)

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
