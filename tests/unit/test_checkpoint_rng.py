"""The actor checkpoint's RNG files: plain values and tensors, restored exactly, and loaded without unpickling
arbitrary objects (a checkpoint given with --resume may come from a shared location)."""

import logging
import random
from pathlib import Path

import numpy as np
import torch

from luffy_megatron.actor.checkpoint import _rng_state, load_rng_state


def _draws():
    return random.random(), float(np.random.standard_normal()), float(np.random.rand()), torch.rand(3)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves numpy's cached second gaussian in the state
    torch.save(_rng_state(), tmp_path / "rank_00000.pt")
    expected = _draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert load_rng_state(tmp_path / "rank_00000.pt")
    got = _draws()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


class _Planted:
    """What a hostile checkpoint could hold: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_file_with_other_objects_is_not_unpickled_and_says_so(tmp_path, caplog):
    marker = tmp_path / "code_ran"
    torch.save({"python": random.getstate(), "planted": _Planted(marker)}, tmp_path / "rank_00000.pt")
    random.seed(5)
    before = random.getstate()
    with caplog.at_level(logging.WARNING):
        assert not load_rng_state(tmp_path / "rank_00000.pt")
    assert not marker.exists()
    assert random.getstate() == before  # nothing was restored
    assert "RNG state not restored from" in caplog.text and "rank_00000.pt" in caplog.text


def test_an_older_checkpoints_numpy_state_is_restored_where_numpy_arrays_are_allow_listed(tmp_path):
    """Files written before the RNG state became plain tensors hold numpy's key array: megatron-core allow-lists
    numpy's array types for weights-only loads on the ranks, so those still restore (no arbitrary objects)."""
    np.random.seed(4)
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        tmp_path / "rank_00000.pt",
    )
    expected = _draws()
    np.random.seed(9)
    random.seed(9)
    with torch.serialization.safe_globals(
        [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.core.multiarray._reconstruct]
    ):
        assert load_rng_state(tmp_path / "rank_00000.pt")
    got = _draws()
    assert got[:3] == expected[:3]
