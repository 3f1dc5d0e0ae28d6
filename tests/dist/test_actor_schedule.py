"""actor.ppo_epochs, the gradient-accumulation divisor and the LR warmup, through the real Megatron actor
(gloo, one torchrun rank; the numbers come from tests/dist/actor_schedule.py)."""

from pathlib import Path

import pytest

from luffy_megatron.actor.schedule import upstream_lr_factor
from tests.dist.actor_fixtures import LR
from tests.dist.launcher import run_torchrun
from tests.dist.tiny_models import make_tiny_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    hf_dir = make_tiny_model("qwen2", tmp_path_factory.mktemp("sched") / "qwen2")
    return run_torchrun(HERE / "actor_schedule.py", str(hf_dir), nproc=1)


def test_ppo_epochs_two_passes_over_the_batch(result):
    e = result["epochs"]
    assert e["steps_one"] == 1 and e["steps_two"] == 2  # one mini-batch per pass
    assert e["moved"] > 1e-4  # the updates changed the weights...
    assert e["two_updates_vs_two_epochs"] < 1e-6  # ...exactly as two updates of one epoch each


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_micro_batch_losses_divided_by_mini_over_micro(result, mode):
    acc = result["accumulation"][mode]
    assert acc["divisor"] == 2  # ppo_mini_batch_size=2 prompts // ppo_micro_batch_size=1 prompt
    assert acc["rel_err_vs_half"] < 1e-5


def test_lr_warmup_counts_trainer_steps_from_the_total(result):
    # ratio 0.3 of 10 trainer steps = 3 warmup steps; two optimizer steps per update share one lr
    warm = int(0.3 * 10)
    assert result["warmup3"]["steps"] == [2.0] * 5
    assert result["warmup3"]["lrs"] == pytest.approx([LR * upstream_lr_factor(s, warm) for s in range(5)], rel=1e-6)
    assert result["warmup3"]["lrs"][:4] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR], rel=1e-6, abs=1e-12)
    # upstream's LambdaLR: lr 0 on the first trainer step even without warmup (opt-in)
    assert result["zero_first"]["lrs"] == pytest.approx([0.0] + [LR] * 4, abs=1e-12)
    assert result["none"]["lrs"] == pytest.approx([LR] * 5)
