"""`utils.fs.collective_atomic_dir`: the collective save-into-a-temporary-directory of both checkpoint writers
(a one-rank gloo group here; the multi-rank saves are in tests/dist/test_actor_checkpoint.py and
test_convert_dist.py)."""

from __future__ import annotations

import os

import pytest

from luffy_megatron.utils.fs import collective_atomic_dir


def test_written_under_a_temporary_name_then_swapped_for_the_old_directory(one_rank, tmp_path):
    final = tmp_path / "ckpts" / "step_000002"
    final.mkdir(parents=True)
    (final / "old").write_text("old")
    with collective_atomic_dir(final, subdirs=("model_optim", "rng")) as tmp:
        assert tmp == final.with_name(f"step_000002.tmp-{os.getpid()}")
        assert sorted(p.name for p in tmp.iterdir()) == ["model_optim", "rng"]
        assert (final / "old").exists()  # untouched until the block ends
        (tmp / "rng" / "rank_00000.pt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["model_optim", "rng"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_000002"]  # no tmp-, no old- left


def test_a_failed_write_removes_the_temporary_directory_and_keeps_the_old_one(one_rank, tmp_path):
    final = tmp_path / "step_000003"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with collective_atomic_dir(final) as tmp:
            (tmp / "part").write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "store") == ["step_000003"]
    assert (final / "old").read_text() == "old"
