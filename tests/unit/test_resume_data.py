"""A checkpoint records its training data (train/progress.py `data_fingerprint`: data.train_files' names and
sizes, the number of usable rows) and a resume checks it: other data would continue at the saved data position
in another order of prompts, so it is refused naming both and the override (trainer.allow_data_change), which
continues with a warning. RunProgress runs here with stand-ins for the Megatron ranks and the engines; the
ranks' save and load write and read trainer_state.json as actor/checkpoint.py does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from luffy_megatron.actor.checkpoint import LATEST, step_dir_name
from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.data.sampler import PromptSampler
from luffy_megatron.train.progress import RunProgress

ROWS, BATCH = 12, 4


class Ranks:
    """Stands in for GuardedRanks: `run(fn, ...)` of actor/remote.py's save_checkpoint / load_checkpoint."""

    def __init__(self):
        self.called: list[str] = []

    def run(self, fn, *args):
        self.called.append(fn.__name__)
        if fn.__name__ == "save_checkpoint":
            root, step, trainer_state, _keep = args
            final = Path(root) / step_dir_name(step)
            final.mkdir(parents=True)
            (final / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
            (Path(root) / LATEST).write_text(final.name)
            return str(final)
        assert fn.__name__ == "load_checkpoint"
        return json.loads((Path(args[0]) / "trainer_state.json").read_text())


def engines():
    return SimpleNamespace(fleet=SimpleNamespace(synced_version=0), sync=lambda version: None, version=0)


def data_file(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return str(path)


def resume(out: Path, files: list[str], *more: str, rows: int = ROWS) -> tuple[RunProgress, Ranks]:
    cfg = load_config(None, [f"trainer.output_dir={out}", f"data.train_files=[{','.join(files)}]", *more])
    ranks = Ranks()
    sampler = PromptSampler(rows, BATCH, seed=1)
    return RunProgress.resume(cfg, ranks, engines(), sampler, out), ranks


def trained_two_steps(out: Path, files: list[str]) -> None:
    """A run that trained two steps and checkpointed after the second."""
    progress, _ = resume(out, files)
    for step in (1, 2):
        progress.sampler.next_batch()
        progress.trained(step)
    progress.save()


def test_the_checkpoint_records_the_data_and_the_same_data_resumes(tmp_path):
    files = [data_file(tmp_path / "data" / "a.parquet", 100), data_file(tmp_path / "data" / "b.parquet", 50)]
    trained_two_steps(tmp_path / "run", files)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    saved = state["data_fingerprint"]
    assert saved["files"] == [{"name": "a.parquet", "bytes": 100}, {"name": "b.parquet", "bytes": 50}]
    assert saved["rows"] == ROWS and len(saved["sha256"]) == 16
    copies = [data_file(tmp_path / "elsewhere" / "a.parquet", 100), data_file(tmp_path / "elsewhere" / "b.parquet", 50)]
    progress, _ = resume(tmp_path / "run", copies)  # the same files copied elsewhere are the same data
    assert (progress.step, progress.sampler.position) == (2, 2 * BATCH)


@pytest.mark.parametrize(
    "change",
    ["a file changed", "a file added", "other rows"],
)
def test_other_data_is_refused_naming_both_and_the_setting_that_allows_it(tmp_path, change):
    a = data_file(tmp_path / "data" / "a.parquet", 100)
    trained_two_steps(tmp_path / "run", [a])
    files, rows = [a], ROWS
    if change == "a file changed":
        files = [data_file(tmp_path / "data" / "a.parquet", 120)]
    elif change == "a file added":
        files = [a, data_file(tmp_path / "data" / "b.parquet", 10)]
    else:
        rows = ROWS + 4  # e.g. another data.max_prompt_length keeps other prompts
    with pytest.raises(ConfigError) as refused:
        resume(tmp_path / "run", files, rows=rows)
    message = str(refused.value)
    assert "the training data (data.train_files, and their usable rows after tokenization) differ" in message
    assert f"from those of checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_000002'}" in message
    assert f"it was trained on a.parquet (100 bytes): {ROWS} rows" in message
    now = ", ".join(f"{Path(f).name} ({Path(f).stat().st_size} bytes)" for f in files)
    assert f"this run has {now}: {rows} rows" in message
    assert "trainer.allow_data_change=true" in message


def test_allow_data_change_continues_with_a_warning_and_records_the_new_data(tmp_path, caplog):
    a = data_file(tmp_path / "data" / "a.parquet", 100)
    trained_two_steps(tmp_path / "run", [a])
    changed = data_file(tmp_path / "data" / "a.parquet", 120)
    with caplog.at_level("WARNING", logger="luffy.trainer"):
        progress, ranks = resume(tmp_path / "run", [changed], "trainer.allow_data_change=true")
    assert "continuing anyway (trainer.allow_data_change=true)" in caplog.text
    assert ranks.called == ["load_checkpoint"] and progress.step == 2
    progress.sampler.next_batch()
    progress.trained(3)
    progress.save()
    progress, _ = resume(tmp_path / "run", [changed])  # the new checkpoint holds the data it was trained on
    assert progress.step == 3


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(tmp_path, caplog):
    a = data_file(tmp_path / "data" / "a.parquet", 100)
    old = tmp_path / "run" / "checkpoints" / "step_000002"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"step": 2, "data_position": 2 * BATCH}))  # an older one
    with caplog.at_level("WARNING", logger="luffy.trainer"):
        progress, _ = resume(tmp_path / "run", [a])
    assert "does not record its training data" in caplog.text
    assert (progress.step, progress.sampler.position) == (2, 2 * BATCH)
