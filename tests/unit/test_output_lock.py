"""One run per output directory: the driver holds an flock on `<trainer.output_dir>/.lock` for `train()`'s
lifetime (train/setup.py `lock_output_dir`, utils/fs.py `FileLock`); a second run on the same directory is
refused in one `luffy-train: error:` line naming the holder's host and pid, and the lock is released when
`train()` returns or raises."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.train import loop
from luffy_megatron.train.setup import lock_output_dir
from luffy_megatron.utils.fs import FileLock, LockHeld

HOLDER = f"pid {os.getpid()} on host {socket.gethostname()}"


def test_a_second_lock_on_the_same_directory_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = lock_output_dir(out)
    assert HOLDER in (out / ".lock").read_text()
    with pytest.raises(ConfigError) as refused:
        lock_output_dir(out)
    assert f"trainer.output_dir={out} is in use by another run" in str(refused.value)
    assert HOLDER in str(refused.value)
    lock_output_dir(tmp_path / "other").release()  # another directory is free
    first.release()
    lock_output_dir(out).release()  # released: the next run takes it


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / ".lock"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys
                fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)  # what FileLock.acquire does, without importing torch (slow)
                os.write(fd, b"the other driver\\n")
                print("held", flush=True)
                sys.stdin.read()  # until the test closes stdin
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as refused:
            FileLock(path).acquire("this test")
        assert refused.value.holder == "the other driver"
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    mine = FileLock(path)
    mine.acquire("this test")  # the holder exited: the kernel dropped its lock
    mine.release()


def _cfg(out, *more):
    return load_config(None, [f"trainer.output_dir={out}", "model.path=", *more])


def test_train_refuses_a_held_output_dir_and_releases_its_lock_when_it_raises(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "check_megatron_settings", lambda cfg: None)
    out = tmp_path / "run"
    held = lock_output_dir(out)
    with pytest.raises(ConfigError, match=HOLDER):
        loop.train(_cfg(out, "data.train_files=[]"))
    assert loop._main(["--set", f"trainer.output_dir={out}", "--set", "model.path="]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("luffy-train: error: trainer.output_dir=") and HOLDER in err and "\n" not in err
    held.release()
    with pytest.raises(ConfigError, match="data.train_files is empty"):  # raised after the lock was taken
        loop.train(_cfg(out, "data.train_files=[]"))
    lock_output_dir(out).release()  # ... and released by train() on the way out
