"""Scratch files in /dev/shm and the temp dir (`utils.scratch`, `sync.shm_buffer`, the private world's FileStore)
and the mode of the logs: only this user's leftovers whose maker is gone are swept, liveness is the maker's
lock (not a pid), nothing is left behind by a normal exit, and logs are not world-readable."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from luffy_megatron.sync.shm_buffer import ShmBuffer
from luffy_megatron.utils import scratch
from luffy_megatron.utils.fs import LOG_MODE, open_log, write_log

REPO = Path(__file__).resolve().parents[2]
OTHER_UID = 12345


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def leftover(directory: Path, pid: int, kind: str = "bucket") -> Path:
    path = directory / f"{scratch.PREFIX}{kind}-{pid}-slot0-0123456789ab"
    path.write_bytes(b"x")
    return path


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_another_users_file_is_neither_removed_nor_fails_a_buffer(tmp_path):
    theirs = leftover(tmp_path, dead_pid())
    os.chown(theirs, OTHER_UID, OTHER_UID)
    buf = ShmBuffer(4096, tag="slot0", directory=str(tmp_path))
    assert theirs.exists() and scratch.sweep(str(tmp_path)) == []
    buf.close()
    assert theirs.exists() and not Path(buf.path).exists()


def test_a_file_that_cannot_be_removed_does_not_fail_a_buffer(tmp_path, monkeypatch):
    stuck = leftover(tmp_path, dead_pid())

    def refuse(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(os, "unlink", refuse)
    buf = ShmBuffer(4096, directory=str(tmp_path))
    monkeypatch.undo()
    assert stuck.exists()
    buf.close()


def test_a_file_whose_maker_holds_its_lock_is_kept_whatever_its_pid_says(tmp_path):
    held = leftover(tmp_path, dead_pid())  # its pid is gone (or, in another PID namespace, never was ours)
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        buf = ShmBuffer(4096, directory=str(tmp_path))
        assert held.exists() and scratch.sweep(str(tmp_path)) == []
        buf.close()
    finally:
        os.close(fd)
    assert scratch.sweep(str(tmp_path)) == [str(held)]  # the lock went with its holder


def test_a_file_of_this_user_that_nobody_holds_is_removed_even_if_its_pid_lives(tmp_path):
    orphan = leftover(tmp_path, os.getpid())  # a live pid: in a shared /dev/shm, maybe another container's
    stale_dir = tmp_path / f"{scratch.PREFIX}pg-{os.getpid()}-0123456789ab"
    stale_dir.mkdir()
    (stale_dir / "store").write_bytes(b"x")
    others = [
        tmp_path / "luffy-demo",
        tmp_path / "luffy-bucket-notes.txt",
        tmp_path / f"luffy-sync-{os.getpid()}-slot0-0123456789ab",  # an older version's live buffer, unlocked
        tmp_path / "other-sync-1-0123456789ab",
    ]
    for path in others:
        path.write_bytes(b"x")
    buf = ShmBuffer(4096, directory=str(tmp_path))
    assert not orphan.exists() and not stale_dir.exists()
    assert all(path.exists() for path in others)  # names the package does not make are never touched
    assert Path(buf.path).exists() and stat.S_IMODE(os.stat(buf.path).st_mode) == 0o600
    buf.close()


def test_a_killed_makers_file_is_kept_while_it_lives_and_swept_after(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = (
        "import sys, time; from luffy_megatron.utils import scratch; "
        "print(scratch.make_file(sys.argv[1], 'bucket', 'slot0')[0], flush=True); time.sleep(300)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        path = child.stdout.readline().strip()
        assert scratch.sweep(str(tmp_path)) == [] and os.path.exists(path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert scratch.sweep(str(tmp_path)) == [path]


def ours(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(scratch.PREFIX))


def test_the_private_worlds_store_goes_at_shutdown_and_a_killed_processs_is_swept(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))

    def run(code: str) -> subprocess.CompletedProcess:
        code = "import os, signal; from luffy_megatron.models import parallel; parallel.ensure_process_group(); " + code
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)

    orderly = run("print(os.path.isdir(parallel._store_dir), flush=True); parallel.shutdown_distributed()")
    assert orderly.returncode == 0 and orderly.stdout.strip() == "True", orderly.stderr[-2000:]
    assert ours(tmp_path) == []
    killed = run("os.kill(os.getpid(), signal.SIGKILL)")  # no destructor, no atexit: the store stays
    assert killed.returncode == -signal.SIGKILL and len(ours(tmp_path)) == 1
    assert ours(tmp_path)[0].startswith(f"{scratch.PREFIX}pg-")
    assert run("").returncode == 0  # the next private world sweeps it, and its own goes at exit
    assert ours(tmp_path) == []


def test_engine_logs_are_not_world_readable(tmp_path):
    log = tmp_path / "workers" / "engine_0.log"
    code = (
        "import sys; from luffy_megatron.rollout.ray_engine import _log_to_file; "
        "_log_to_file(sys.argv[1]); print('to the log')"
    )
    old = os.umask(0)  # the mode comes from the code, not from a umask
    try:
        subprocess.run([sys.executable, "-c", code, str(log)], env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    finally:
        os.umask(old)
    assert log.read_text().strip().endswith("to the log")
    assert stat.S_IMODE(log.stat().st_mode) == LOG_MODE == 0o640


def test_logs_are_made_0640_and_an_older_world_readable_log_loses_its_world_bits(tmp_path):
    old = os.umask(0)
    try:
        write_log(tmp_path / "model_load_error.log", "traceback")
        older = tmp_path / "engine_1.log"
        older.write_text("before\n")
        older.chmod(0o644)
        os.close(open_log(older))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model_load_error.log").stat().st_mode) == 0o640
    assert (tmp_path / "model_load_error.log").read_text() == "traceback"
    assert stat.S_IMODE(older.stat().st_mode) == 0o640 and older.read_text() == "before\n"


def test_an_engines_socket_directory_goes_at_close_and_a_killed_engines_is_swept():
    """vLLM makes its ZMQ sockets in VLLM_RPC_BASE_PATH (default: the temp dir itself, where a killed engine's
    stay for good); each engine gets a scratch directory of its own there instead."""
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # pytest's tmp_path is too long for a socket path
        check_engine_socket_dirs(Path(short))
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="x" * 60) as long:  # vLLM's default kept
        code = "from luffy_megatron.utils import scratch; print(scratch.engine_socket_dir())"
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": long},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.stdout.strip() == "None" and ours(Path(long)) == []


def check_engine_socket_dirs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    env.pop("VLLM_RPC_BASE_PATH", None)
    code = (
        "import os, signal, sys; from luffy_megatron.utils import scratch; d = scratch.engine_socket_dir(); "
        "print(d, os.environ['VLLM_RPC_BASE_PATH'], flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL) if sys.argv[1] == 'kill' else scratch.remove(d)"
    )

    def engine(how: str, **extra) -> list[str]:
        run = subprocess.run(
            [sys.executable, "-c", code, how], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )
        return run.stdout.split()

    made, told = engine("kill")
    assert made == told and Path(made).parent == tmp_path and Path(made).name.startswith(f"{scratch.PREFIX}rpc-")
    assert ours(tmp_path) == [Path(made).name]  # a kill runs no close
    made2, _ = engine("close")  # the next engine sweeps the killed one's, and removes its own at close
    assert made2 != made and ours(tmp_path) == []
    mine = str(tmp_path / "my-sockets")
    assert engine("close", VLLM_RPC_BASE_PATH=mine) == ["None", mine]  # a path the user set is kept
