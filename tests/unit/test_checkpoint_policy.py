"""What the driver does when a checkpoint cannot be read or written (train/progress.py): a resume skips a newest
checkpoint that cannot be loaded, with a warning naming it, and loads the previous complete one; a save that
fails on the ranks (disk full, permissions) is one CheckpointError naming the path, the free space and what the
run can resume from. RunProgress runs with stand-ins for the Megatron ranks and the engines."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from luffy_megatron.actor.checkpoint import LATEST, step_dir_name
from luffy_megatron.cluster.supervision import RunError
from luffy_megatron.config import load_config
from luffy_megatron.data.sampler import PromptSampler
from luffy_megatron.train import loop
from luffy_megatron.train.progress import CheckpointError, RunProgress


class Ranks:
    """GuardedRanks' `run` of actor/remote.py's save/load, reading and writing trainer_state.json; `fail_load`
    names checkpoints whose load raises on the ranks, `fail_save` an OSError every save raises there."""

    def __init__(self, fail_load=(), fail_save=None):
        self.fail_load, self.fail_save, self.loaded = set(fail_load), fail_save, []

    def run(self, fn, *args):
        if fn.__name__ == "save_checkpoint":
            if self.fail_save is not None:
                raise ray.exceptions.RayTaskError("save_checkpoint", "Traceback ...", self.fail_save)
            root, step, trainer_state, _keep = args
            write_checkpoint(Path(root), step, trainer_state)
            return str(Path(root) / step_dir_name(step))
        path = Path(args[0])
        self.loaded.append(path.name)
        if path.name in self.fail_load:
            raise ray.exceptions.RayTaskError("load_checkpoint", "Traceback ...", ValueError("shard 3 is unreadable"))
        return json.loads((path / "trainer_state.json").read_text())


def write_checkpoint(root: Path, step: int, trainer_state: dict) -> Path:
    final = root / step_dir_name(step)
    final.mkdir(parents=True)
    (final / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
    (root / LATEST).write_text(final.name)
    return final


def resume(out: Path, ranks: Ranks) -> RunProgress:
    cfg = load_config(None, [f"trainer.output_dir={out}", "data.train_files=[]"])
    engines = SimpleNamespace(fleet=SimpleNamespace(synced_version=0), sync=lambda version: None, version=0)
    return RunProgress.resume(cfg, ranks, engines, PromptSampler(12, 4, seed=1), out)


def test_a_newest_checkpoint_that_cannot_be_read_is_skipped_for_the_previous_one(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        write_checkpoint(root, step, {"data_position": 4 * step})
    (root / "step_000003" / "trainer_state.json").write_text('{"step": 3, "data_po')  # torn by a crash
    ranks = Ranks(fail_load={"step_000002"})  # and an unreadable shard in the one before
    with caplog.at_level(logging.WARNING):
        progress = resume(tmp_path, ranks)
    assert (progress.step, progress.sampler.position) == (1, 4)
    assert ranks.loaded == ["step_000002", "step_000001"]  # the torn one is found before the ranks load it
    assert "step_000003 cannot be loaded (JSONDecodeError" in caplog.text
    assert "step_000002 cannot be loaded (ValueError: shard 3 is unreadable)" in caplog.text


def test_when_no_checkpoint_can_be_loaded_the_resume_stops_and_says_so(tmp_path):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, {"data_position": 4})
    with pytest.raises(RunError, match=f"no checkpoint under {root} could be loaded"):
        resume(tmp_path, Ranks(fail_load={"step_000001"}))
    assert resume(tmp_path / "fresh", Ranks()).step == 0  # no checkpoint at all: a fresh start


def test_a_failed_save_is_one_error_naming_the_path_the_free_space_and_the_checkpoint_to_resume_from(tmp_path):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 2, {"data_position": 8})
    full = OSError(errno.ENOSPC, "No space left on device", str(root / "step_000004.tmp-77" / "model_optim"))
    progress = resume(tmp_path, Ranks(fail_save=full))
    progress.trained(4)
    with pytest.raises(CheckpointError) as failed:
        progress.save()
    text = str(failed.value)
    assert text.startswith(f"writing the checkpoint of step 4 under {root} failed: No space left on device (")
    assert "GiB free there" in text and f"the newest complete checkpoint is {root / 'step_000002'}" in text
    assert "\n" not in text and progress.saved_step == 2
    with pytest.raises(ray.exceptions.RayTaskError):  # anything else is not a disk problem: raised as it is
        resume(tmp_path, Ranks(fail_save=ValueError("a bug"))).save()


def test_a_writer_error_on_a_full_disk_is_a_checkpoint_error_too(tmp_path, monkeypatch):
    """megatron-core's checkpoint writer reports a disk that filled mid-write as a CheckpointException ("Worker
    failure: ... unexpected pos"), not an OSError: with less space free than the newest checkpoint takes, that
    is the one-line error too; with room to spare it is raised as it is."""
    import luffy_megatron.train.progress as progress_module

    root = tmp_path / "checkpoints"
    (write_checkpoint(root, 2, {"data_position": 8}) / "shard").write_bytes(b"x" * 4096)
    worker = RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(progress_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    progress = resume(tmp_path, Ranks(fail_save=worker))
    progress.trained(4)
    with pytest.raises(CheckpointError) as failed:
        progress.save()
    text = str(failed.value)
    assert text.startswith(f"writing the checkpoint of step 4 under {root} failed: RuntimeError: Worker failure:")
    assert "less than the newest checkpoint takes: the disk is full" in text and "\n" not in text
    assert f"the newest complete checkpoint is {root / 'step_000002'}" in text
    monkeypatch.setattr(progress_module.shutil, "disk_usage", lambda path: usage._replace(free=10**12))
    with pytest.raises(ray.exceptions.RayTaskError):
        progress.save()


def test_luffy_train_prints_a_failed_save_as_one_line(monkeypatch, capsys):
    def failing_train(cfg):
        raise CheckpointError("writing the checkpoint of step 4 under /x failed: No space left on device")

    monkeypatch.setattr(loop, "train", failing_train)
    assert loop.main([]) == 1
    assert capsys.readouterr().err == (
        "luffy-train: error: writing the checkpoint of step 4 under /x failed: No space left on device\n"
    )


def test_saves_cut_short_are_removed_at_resume_naming_each_and_its_size(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, {"data_position": 4})
    torn = root / "step_000002.tmp-424242" / "model_optim"
    torn.mkdir(parents=True)
    (torn / "shard").write_bytes(b"x" * 2**21)
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path, Ranks()).step == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert f"removed {root / 'step_000002.tmp-424242'} (2.0 MiB), left by an interrupted write" in caplog.text


def test_a_roll_back_sets_the_later_checkpoints_aside_instead_of_letting_them_outrank_the_new_run(tmp_path, caplog):
    """R5: --resume an older checkpoint into the same output directory (recovering from a divergence): the
    diverged steps move into superseded-<time>/, kept, and `latest` with them, so the new run's step 3 is the
    newest checkpoint and a later resume finds it, not the diverged step 5."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 5):
        write_checkpoint(root, step, {"data_position": 4 * step})
    cfg = load_config(
        None, [f"trainer.output_dir={tmp_path}", "data.train_files=[]", f"trainer.resume_from={root / 'step_000002'}"]
    )
    engines = SimpleNamespace(fleet=SimpleNamespace(synced_version=0), sync=lambda version: None, version=0)
    with caplog.at_level(logging.WARNING):
        progress = RunProgress.resume(cfg, Ranks(), engines, PromptSampler(12, 4, seed=1), tmp_path)
    assert progress.step == 2
    (aside,) = root.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert (aside / "step_000005" / "trainer_state.json").exists()  # kept whole
    assert "later checkpoints step_000004, step_000005" in caplog.text
    progress.step, progress.data_position = 3, 12
    progress.save()
    assert resume(tmp_path, Ranks()).step == 3  # the new run's newest, not the diverged step 5


def test_a_fresh_start_over_an_old_run_sets_all_its_checkpoints_aside(tmp_path):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 7, {"data_position": 4})
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "data.train_files=[]", "trainer.resume=disable"])
    engines = SimpleNamespace(fleet=SimpleNamespace(synced_version=0), sync=lambda version: None, version=0)
    assert RunProgress.resume(cfg, Ranks(), engines, PromptSampler(12, 4, seed=1), tmp_path).step == 0
    assert not list(root.glob("step_*")) and len(list(root.glob("superseded-*/step_000007"))) == 1
