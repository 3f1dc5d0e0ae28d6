"""model.recompute_granularity reaches megatron-core and recomputes what it says, with the same gradients
(GPU readiness item 11): full recompute runs every layer forward twice in a training step, selective only
the core attention; forward-only passes (log-probs) recompute nothing."""

from pathlib import Path

import pytest

from tests.dist.launcher import run_torchrun
from tests.dist.tiny_models import make_tiny_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    hf_dir = make_tiny_model("qwen2", tmp_path_factory.mktemp("recompute") / "qwen2")
    return run_torchrun(HERE / "recompute_checks.py", str(hf_dir), nproc=1)


def test_settings_reach_the_megatron_config(out):
    assert out["none"]["config"] == [None, None, None]
    assert out["full"]["config"] == ["full", "uniform", 2]
    assert out["selective"]["config"] == ["selective", None, None]


def test_recomputation_reruns_what_it_says(out):
    layers = out["none"]["layers"]
    one_pass = {"layer": layers, "core_attention": layers}  # one micro-batch
    for name in ("none", "full", "selective"):
        assert out[name]["forward_only"] == one_pass, name
    assert out["none"]["train"] == one_pass
    assert out["full"]["train"] == {"layer": 2 * layers, "core_attention": 2 * layers}
    assert out["selective"]["train"] == {"layer": layers, "core_attention": 2 * layers}


def test_recomputation_keeps_the_gradients(out):
    for name in ("full", "selective"):
        assert out[name]["grad_diff"] <= 1e-6 * out[name]["grad_scale"], name
