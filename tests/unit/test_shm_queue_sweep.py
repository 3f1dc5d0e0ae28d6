"""vLLM's shared-memory queues (/dev/shm/psm_*, Python multiprocessing.shared_memory) that killed engine
processes leave (`utils.scratch.sweep_orphan_shm`, `remove_unheld_queues`): a file is removed only when it is
this user's, named psm_*, held (mapped or open) by no process and, for the general sweep, older than the grace.
A temp dir stands in for /dev/shm, except where a real SharedMemory segment of the test's own is needed."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path
from types import SimpleNamespace

import pytest

from luffy_megatron.utils import scratch

OLD_S = 600  # seconds since the "old" files were last written
HOLD = (  # a child that maps (map) or only holds open (fd) the file argv[2] and waits
    "import mmap, os, sys, time; fd = os.open(sys.argv[2], os.O_RDWR); "
    "m = mmap.mmap(fd, 4096) if sys.argv[1] == 'map' else None; "
    "os.close(fd) if m is not None else None; print('ready', flush=True); time.sleep(300)"
)


def queue_file(directory: Path, name: str, age_s: float = OLD_S) -> Path:
    path = directory / name
    path.write_bytes(b"\0" * 4096)
    os.chmod(path, 0o600)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def holder(how: str, path: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, how, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_only_an_old_queue_file_that_no_process_holds_is_removed(tmp_path, caplog):
    orphan = queue_file(tmp_path, "psm_0badc0de")
    mapped_here = queue_file(tmp_path, "psm_1badc0de")  # mapped by this process (descriptor closed)
    mapped_by_child = queue_file(tmp_path, "psm_2badc0de")
    open_in_child = queue_file(tmp_path, "psm_3badc0de")  # open, not mapped yet (a queue being made)
    fresh = queue_file(tmp_path, "psm_4badc0de", age_s=0)
    others = [queue_file(tmp_path, name) for name in ("vllm_offload_1.mmap", "psm_notours", "luffy-bucket-1-x")]
    os.symlink(orphan, tmp_path / "psm_5badc0de")
    fd = os.open(mapped_here, os.O_RDWR)
    here = mmap.mmap(fd, 4096)
    os.close(fd)
    children = [holder("map", mapped_by_child), holder("fd", open_in_child)]
    try:
        with caplog.at_level("INFO", logger=scratch.__name__):
            removed = scratch.sweep_orphan_shm(str(tmp_path), grace_s=60)
    finally:
        for child in children:
            child.kill()
            child.wait()
        here.close()
    assert removed == [(str(orphan), os.stat(mapped_here).st_blocks * 512)]
    assert "psm_0badc0de (4096 bytes)" in caplog.text
    assert all(p.exists() for p in (mapped_here, mapped_by_child, open_in_child, fresh, *others))
    assert os.path.islink(tmp_path / "psm_5badc0de")  # a link is never followed or removed
    # once their holders are gone, the old ones go too; the fresh one waits for the grace
    removed = {Path(p).name for p, _ in scratch.sweep_orphan_shm(str(tmp_path), grace_s=60)}
    assert removed == {"psm_1badc0de", "psm_2badc0de", "psm_3badc0de"} and fresh.exists()


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_another_users_queue_file_is_never_removed(tmp_path):
    theirs = queue_file(tmp_path, "psm_0badc0de")
    os.chown(theirs, 12345, 12345)
    assert scratch.sweep_orphan_shm(str(tmp_path), grace_s=60, held=set()) == [] and theirs.exists()
    assert scratch.remove_unheld_queues([str(theirs)], held=set()) == [] and theirs.exists()


def test_held_paths_reads_maps_and_descriptors_and_nothing_goes_without_proc(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    (proc / "100" / "fd").mkdir(parents=True)
    (proc / "100" / "maps").write_text("7f00-7f01 rw-s 00000000 00:1a 42    /dev/shm/psm_1badc0de\n")
    (proc / "101" / "fd").mkdir(parents=True)
    os.symlink("/dev/shm/psm_2badc0de", proc / "101" / "fd" / "7")
    (proc / "101" / "maps").write_text("")
    (proc / "102" / "maps").mkdir(parents=True)  # cannot be read: skipped
    assert scratch.held_paths(str(proc)) == {"/dev/shm/psm_1badc0de", "/dev/shm/psm_2badc0de"}
    assert scratch.held_paths(str(proc), pids={101}) == {"/dev/shm/psm_2badc0de"}
    orphan = queue_file(tmp_path, "psm_0badc0de")
    monkeypatch.setattr(scratch, "held_paths", lambda *a: None)  # /proc cannot be listed
    assert scratch.sweep_orphan_shm(str(tmp_path), grace_s=60) == [] and orphan.exists()


def test_the_queues_a_killed_process_made_are_found_while_it_lives_and_removed_after(tmp_path):
    """As an engine does: its processes' queues are listed once they are up (`queues_held_by` its process
    tree), and those a SIGKILL left behind are removed at once, whatever their age. The child unregisters its
    segment from multiprocessing's resource tracker, as the tracker is gone with a killed engine."""
    code = (
        "import time; from multiprocessing import shared_memory, resource_tracker; "
        "s = shared_memory.SharedMemory(create=True, size=1 << 20); s.buf[:4] = b'luff'; "
        "resource_tracker.unregister(s._name, 'shared_memory'); print(s.name, flush=True); time.sleep(300)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = os.path.join(scratch.SHM_DIR, child.stdout.readline().strip().lstrip("/"))
    try:
        queues = scratch.queues_held_by(scratch.process_tree(os.getpid()))
        assert path in queues
        assert scratch.remove_unheld_queues(queues) == [] and os.path.exists(path)  # held by the child
        own = shared_memory.SharedMemory(create=True, size=4096)  # held by this process
        try:
            own_path = os.path.join(scratch.SHM_DIR, own.name.lstrip("/"))
            assert own_path in scratch.queues_held_by({os.getpid()})
            assert scratch.remove_unheld_queues([own_path]) == [] and os.path.exists(own_path)
        finally:
            own.close()
            own.unlink()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    try:
        assert os.path.exists(path)  # nobody unlinks it: the leak
        removed = scratch.remove_unheld_queues([path])
        assert [p for p, _ in removed] == [path] and not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_closing_an_engine_removes_the_queues_its_killed_processes_left_and_its_handoff_buffer(tmp_path):
    from luffy_megatron.rollout.engine import VLLMEngine
    from luffy_megatron.sync.shm_buffer import ShmBuffer

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM: a stand-in whose engine core is already dead
    engine._llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: None)))
    engine._handoff_shm = ShmBuffer(4096, tag="engine-handoff", directory=str(tmp_path))
    engine.shm_queues = [str(queue_file(tmp_path, "psm_0badc0de", age_s=0))]  # just written: no grace here
    kept = queue_file(tmp_path, "psm_1badc0de", age_s=0)  # another engine's
    engine.close()
    assert os.listdir(tmp_path) == [kept.name]


def test_vllm_cpu_communicator_files_are_swept_by_the_same_rule(tmp_path):
    """vLLM-CPU's tensor-parallel communicator (`<VLLM_DIST_IDENT>-<group>-cpushm_<rank>`, 8 MiB each) stays in
    /dev/shm when a TP=2 CPU engine is killed. Named semaphores are left to Python's resource tracker."""
    comm = queue_file(tmp_path, "vllm_dist_0f3a9be2c1d04e5f8a7b6c5d4e3f2a1b-tp:0-[0-1]-cpushm_1")
    held = queue_file(tmp_path, "vllm_dist_1f3a9be2c1d04e5f8a7b6c5d4e3f2a1b-tp:0-[0-1]-cpushm_0")
    unlike = [queue_file(tmp_path, n) for n in ("vllm_dist_0f3a", "sem.mp-443xfr0v", "vllm_dist_x-cpushm_0")]
    child = holder("map", held)
    try:
        removed = {Path(p).name for p, _ in scratch.sweep_orphan_shm(str(tmp_path), grace_s=60)}
    finally:
        child.kill()
        child.wait()
    assert removed == {comm.name}
    assert held.exists() and all(p.exists() for p in unlike)
