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

`sweep_orphan_shm(directory)` removes the files in /dev/shm the package does not make but its engines leave (named
in `SHM_QUEUE`): vLLM's shared-memory queues (Python `multiprocessing.shared_memory`, `psm_<8 hex digits>`), and
vLLM-CPU's tensor-parallel communicator files, which only their creator unlinks, so they stay when an engine's
processes are killed. Those carry no lock, so an orphan is told by this rule: such a regular file of this user,
older than `ORPHAN_GRACE_S`, that no process of this user maps or holds open (`held_paths` reads every readable
/proc/<pid>/maps and /proc/<pid>/fd; a process of another user cannot open a 0600 file of ours unless it is root;
processes of ours are readable unless made non-dumpable, which vLLM's are not). A queue is held from its creation
(its maker keeps the descriptor and the mapping until it unlinks it), and the grace covers a name handed to another
process after its maker let go. If /proc cannot be read, nothing is removed.
An engine also knows its own queues (`queues_held_by` its process tree once vLLM is up) and removes those no
process holds when it closes, or when the engine that replaces a killed one is up (`remove_unheld_queues`):
that needs no grace, so a queue written just before the kill goes too.
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
import time
import uuid
from typing import Optional

PREFIX = "luffy-"
SHM_DIR = "/dev/shm"
KINDS = {  # every kind of scratch entry the package makes (the sweeper removes no other name)
    "bucket": "a weight bucket in /dev/shm (sync.shm_buffer.ShmBuffer), while its sender or engine lives",
    "pg": "the temp-dir FileStore directory of a private world of one (models.parallel), until its shutdown",
    "rpc": "the temp-dir directory of a vLLM engine's ZMQ sockets (VLLM_RPC_BASE_PATH), while its engine lives",
}
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?:{'|'.join(KINDS)})-\d+-(?:[A-Za-z0-9_.-]+-)?[0-9a-f]{{12}}$")
_CREATE_TRIES = 5
# What vLLM's processes leave in /dev/shm when they are killed: multiprocessing.shared_memory's `psm_<hex>` (vLLM's
# shm_broadcast queues) and vLLM-CPU's tensor-parallel communicator `vllm_dist_<hex>-<group>-cpushm_<rank>`
# (cpu_communicator.py names it, its C++ side maps it). Not multiprocessing's named semaphores (`sem.mp-*`, 32
# bytes): Python's resource tracker unlinks those when their program ends, and would warn about one gone.
SHM_QUEUE = re.compile(r"^(?:psm_[0-9a-f]+|vllm_dist_[0-9a-f]+-[\w:.\[\]-]*-cpushm_\d+)$")
ORPHAN_GRACE_S = 10.0  # a shared-memory queue file younger than this is never an orphan

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


RPC_PATH_MAX = 70  # a socket path is <dir>/<36-char uuid>, and Linux allows 107 bytes


def engine_socket_dir() -> Optional[str]:
    """A directory of this process for the ZMQ sockets of the vLLM engine it starts (`VLLM_RPC_BASE_PATH`, by
    default the temp directory itself, where a killed engine's sockets stay for good): made by
    `make_dir` (kind "rpc"), so its engine removes it at close and a killed engine's is swept by the next one
    started on the node. None (vLLM's default kept) where the path would be too long for a socket name."""
    sweep(temp_dir())  # the socket directories of engines that were killed
    if "VLLM_RPC_BASE_PATH" in os.environ and not os.environ["VLLM_RPC_BASE_PATH"].startswith(
        os.path.join(temp_dir(), PREFIX + "rpc-")
    ):
        return None  # the user's own choice
    path = make_dir(temp_dir(), "rpc")
    if len(path) > RPC_PATH_MAX:
        remove(path)
        return None
    os.environ["VLLM_RPC_BASE_PATH"] = path  # read by vLLM (envs.py) when it makes each socket path
    return path


# ----------------------------------------------------------------------- vLLM's shared-memory queues of dead engines


def orphan_candidates(
    directory: str, *, grace_s: float, now: Optional[float] = None
) -> list[tuple[str, os.stat_result]]:
    """The `SHM_QUEUE` regular files of this user in `directory` (not links) last written more than `grace_s` ago
    (a queue in use is written at every message), with their lstat: what `sweep_orphan_shm` removes unless a
    process holds it."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    now = time.time() if now is None else now
    found = []
    for name in sorted(names):
        if not SHM_QUEUE.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and now - st.st_mtime >= grace_s:
            found.append((path, st))
    return found


def held_paths(proc: str = "/proc", pids: Optional[set[int]] = None) -> Optional[set[str]]:
    """The paths of the files that processes map (/proc/<pid>/maps) or hold open (/proc/<pid>/fd): every
    process this user can read, or only `pids`. A process that cannot be read (another user's; in a container
    also its init, which even root may not trace) or that ends meanwhile is skipped. None when `proc` cannot
    be listed: nothing is known then."""
    held: set[str] = set()
    try:
        names = [p for p in os.listdir(proc) if p.isdigit() and (pids is None or int(p) in pids)]
    except OSError:
        return None
    for pid in names:
        base = os.path.join(proc, pid)
        try:
            with open(os.path.join(base, "maps"), encoding="utf-8", errors="replace") as fh:
                held.update(line.split(None, 5)[5].rstrip("\n") for line in fh if len(line.split(None, 5)) == 6)
            fds = os.path.join(base, "fd")
            for fd in os.listdir(fds):
                try:
                    held.add(os.readlink(os.path.join(fds, fd)))
                except OSError:  # closed meanwhile
                    pass
        except OSError:
            continue
    return held


def process_tree(root: int, proc: str = "/proc") -> set[int]:
    """`root` and its descendants (from each process's parent in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    try:
        names = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return {root}
    for pid in names:
        try:
            with open(os.path.join(proc, pid, "stat"), encoding="utf-8", errors="replace") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(pid))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree


def queues_held_by(pids: set[int], directory: str = SHM_DIR, proc: str = "/proc") -> list[str]:
    """The shared-memory queue files (`SHM_QUEUE`) in `directory` that processes `pids` map or hold open."""
    held = held_paths(proc, pids) or set()
    real = os.path.realpath(directory)
    return sorted(
        os.path.join(directory, os.path.basename(p))
        for p in held
        if os.path.dirname(p) == real and SHM_QUEUE.match(os.path.basename(p))
    )


def sweep_orphan_shm(
    directory: str = SHM_DIR, *, grace_s: float = ORPHAN_GRACE_S, held: Optional[set[str]] = None
) -> list[tuple[str, int]]:
    """Removes the orphaned shared-memory queues in `directory` (the rule is in the module docstring) and
    returns (path, bytes in use) of each. `held`: the paths processes hold (default `held_paths()`). Logs what
    it removed; no error escapes."""
    candidates = [path for path, _ in orphan_candidates(directory, grace_s=grace_s)]
    return remove_unheld_queues(candidates, held=held) if candidates else []


def remove_unheld_queues(paths: list[str], *, held: Optional[set[str]] = None) -> list[tuple[str, int]]:
    """Removes those of `paths` that are shared-memory queue files (`SHM_QUEUE`, regular, of this user) which no
    process maps or holds open (`held`, default `held_paths()`), e.g. the queues of an engine whose processes
    were killed; returns (path, bytes in use) of each and logs them. No error escapes."""
    if not paths:
        return []
    if held is None:
        held = held_paths()
        if held is None:
            log.info("shared-memory queues %s kept: the processes holding files cannot be listed", paths)
            return []
    removed = []
    for path in paths:
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if not SHM_QUEUE.match(os.path.basename(path)) or real in held or path in held:
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append((path, st.st_blocks * 512))
    if removed:
        log.info(
            "removed %d shared-memory queue file(s) of dead vLLM processes (%.1f MiB): %s",
            len(removed),
            sum(size for _, size in removed) / 2**20,
            ", ".join(f"{os.path.basename(p)} ({size} bytes)" for p, size in removed),
        )
    return removed
