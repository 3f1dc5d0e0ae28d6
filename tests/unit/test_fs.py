"""`utils.fs`: the one atomic directory writer behind actor checkpoints, converted models and HF exports:
durable before it takes its name, the old version renamed aside (never deleted first), and what an interrupted
writer left swept before the next write."""

from __future__ import annotations

import logging
import os

import pytest

from luffy_megatron.utils import fs


def test_contents_and_the_rename_are_fsynced_before_the_old_version_goes(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("old")
    events = []
    real_fsync, real_rmtree = os.fsync, fs.shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fs.os, "fsync", fsync)
    monkeypatch.setattr(fs.shutil, "rmtree", rmtree)
    with fs.atomic_dir(final, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_text("new")
    tmp_file = str(tmp / "sub" / "weights")
    synced = [path for kind, path in events if kind == "fsync"]
    assert tmp_file in synced and str(tmp / "sub") in synced and str(tmp) in synced  # before the rename
    assert str(tmp_path) in synced  # the directory entry of the rename
    old = f"{final}.old-{os.getpid()}"
    assert ("rmtree", old) in events  # the old version was renamed aside, removed only after the swap
    assert events.index(("fsync", str(tmp_path))) < events.index(("rmtree", old))
    assert (final / "sub" / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]


def test_a_crash_between_the_aside_rename_and_the_swap_leaves_the_old_version_complete(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("old")
    real_rename = fs.Path.rename

    def rename(self, target):
        if str(self).endswith(f".tmp-{os.getpid()}"):
            raise KeyboardInterrupt("killed between the two renames")
        return real_rename(self, target)

    monkeypatch.setattr(fs.Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt), fs.atomic_dir(final, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    aside = tmp_path / f"model.old-{os.getpid()}"
    assert (aside / "weights").read_text() == "old"  # still complete, under its aside name
    assert not final.exists()
    monkeypatch.setattr(fs.os, "getpid", lambda: 4242)  # the next writer is another process
    monkeypatch.setattr(fs.Path, "rename", real_rename)
    fs.sweep_abandoned(tmp_path, only="model")
    assert (final / "weights").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]  # restored


def test_leftovers_of_interrupted_writes_are_swept_before_the_next_write(tmp_path, caplog):
    (tmp_path / "model.tmp-999999").mkdir()
    (tmp_path / "model.tmp-999999" / "shard").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "model.old-999998").mkdir()
    (tmp_path / "other.tmp-999997").mkdir()  # another target's: not this writer's to sweep
    (tmp_path / "notes.tmp-backup").mkdir()  # not a pid suffix: not ours
    with caplog.at_level(logging.WARNING), fs.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["model", "notes.tmp-backup", "other.tmp-999997"]
    assert "removed" in caplog.text and "model.tmp-999999 (3.0 MiB)" in caplog.text
    removed = fs.sweep_abandoned(tmp_path)  # every name: what a checkpoint root's writer does
    assert [(p.name, size) for p, size in removed] == [("other.tmp-999997", 0)]
    mine = tmp_path / f"step_000001.tmp-{os.getpid()}"
    mine.mkdir()
    assert fs.sweep_abandoned(tmp_path) == [] and mine.exists()  # this process's own write is left alone


def test_atomic_write_text_is_durable_and_leaves_no_temporary(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    fs.atomic_write_text(tmp_path / "latest", "step_000002")
    assert (tmp_path / "latest").read_text() == "step_000002" and os.listdir(tmp_path) == ["latest"]
    assert str(tmp_path / f"latest.tmp-{os.getpid()}") in synced and str(tmp_path) in synced
