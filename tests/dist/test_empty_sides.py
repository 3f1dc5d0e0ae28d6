"""Empty sides of a batch on the real actor (torchrun, gloo): a mini-batch, a micro-batch, a data-parallel shard
(DP=2) and a pipeline micro-batch (PP=2) with no off-policy rows, no on-policy rows or no valid response tokens
give finite log-probs, loss metrics, gradient norms and weights, and report 0 for the empty side's metrics
(upstream LUFFY issue #24: a micro-batch without off-policy rows made its loss 0/0 = NaN). See empty_sides.py for
the rows of each unit."""

import math
from pathlib import Path

import pytest

from tests.dist.actor_fixtures import LR
from tests.dist.launcher import run_torchrun
from tests.dist.tiny_models import make_tiny_model

HERE = Path(__file__).parent
LEVELS = {"dp2": ("mini", "micro", "shard"), "pp2": ("mini", "micro")}
CASES = [
    (layout, f"{unit}_{side}")
    for layout, units in LEVELS.items()
    for unit in units
    for side in ("no_off", "no_on", "no_tokens")
]
OFF_METRICS = ("off_pg_loss", "off_policy_prob", "off_ratio_mean")
ON_METRICS = ("on_pg_loss", "on_policy_prob")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    hf_dir = make_tiny_model("qwen2", tmp_path_factory.mktemp("empty_sides") / "qwen2")
    return {layout: run_torchrun(HERE / "empty_sides.py", str(hf_dir), layout, nproc=2) for layout in LEVELS}


def _case(runs, layout, case):
    got = runs[layout]["cases"][case]
    unit, side = case.split("_", 1)
    return got, set(runs[layout]["units"][unit]), unit, side


def _micro_batches(got):
    return [(rank, mb) for rank, r in enumerate(got["ranks"]) for mb in r["micro"]]


@pytest.mark.parametrize("layout,case", CASES)
def test_log_probs_metrics_gradients_and_weights_stay_finite(runs, layout, case):
    got, _, _, _ = _case(runs, layout, case)
    assert got["log_probs"] == {"finite": True, "zero_where_masked": True, "valid_nonzero": True}
    assert not {k: v for k, v in got["metrics"].items() if not math.isfinite(v)}
    assert got["metrics"]["actor/optimizer_steps"] == 2  # two mini-batches
    for rank in got["ranks"]:
        assert rank["weights_finite"]
        assert rank["moved"] > 0.5 * LR  # the steps did move the weights (Adam: ~lr per element)
        assert len(rank["steps"]) == 2
        for ok, norm in rank["steps"]:
            assert ok and norm is not None and math.isfinite(norm), rank["steps"]
    assert _micro_batches(got)
    for rank, mb in _micro_batches(got):
        assert not {k: v for k, v in mb["metrics"].items() if not math.isfinite(v)}, (rank, mb)


@pytest.mark.parametrize("layout,case", CASES)
def test_the_unit_is_what_the_case_says(runs, layout, case):
    """The case really ran the level it names: the unit's rows formed one micro-batch, the second mini-batch,
    or data-parallel rank 1's shard; and only the unit lost its side."""
    got, unit_rows, unit, side = _case(runs, layout, case)
    mbs = _micro_batches(got)
    if unit == "micro":
        assert unit_rows in [set(mb["rows"]) for _, mb in mbs]
    elif unit == "mini":
        assert {r for _, mb in mbs if mb["mini"] == 1 for r in mb["rows"]} == unit_rows
    else:
        assert {r for rank, mb in mbs if rank == 1 for r in mb["rows"]} == unit_rows
    prefix, tokens = set(got["prefix_rows"]), set(got["token_rows"])
    if side == "no_off":
        assert not prefix & unit_rows and prefix
    elif side == "no_on":
        assert unit_rows <= prefix and tokens - prefix
    else:
        assert not tokens & unit_rows and tokens


@pytest.mark.parametrize("layout,case", CASES)
def test_an_empty_side_reports_zero_and_a_present_side_does_not(runs, layout, case):
    got, _, _, _ = _case(runs, layout, case)
    prefix, tokens = set(got["prefix_rows"]), set(got["token_rows"])
    seen = set()
    for _, mb in _micro_batches(got):
        rows, m = set(mb["rows"]), mb["metrics"]
        has_off, has_on = bool(rows & prefix), bool(rows & tokens - prefix)
        seen.add((has_off, has_on))
        for key in OFF_METRICS:
            assert (m[f"{key}"] != 0) == has_off, (key, mb)
        for key in ON_METRICS:
            assert (m[key] != 0) == has_on, (key, mb)
        if not rows & tokens:  # nothing to learn from: every number of the micro-batch is 0
            assert not {k: v for k, v in m.items() if v != 0}, mb
    assert len(seen) > 1  # the batch mixes micro-batches with and without the side


@pytest.mark.parametrize("layout", list(LEVELS))
def test_a_mini_batch_without_tokens_steps_with_a_zero_gradient(runs, layout):
    """Its gradient is exactly 0, not NaN: a zero grad norm, after a first mini-batch that had one. (The loss's
    means over empty masks and the actor's zeroing of padded positions each keep it so.)"""
    got = runs[layout]["cases"]["mini_no_tokens"]
    for rank in got["ranks"]:
        (_, first), (_, second) = rank["steps"]
        assert first > 0 and second == 0.0
