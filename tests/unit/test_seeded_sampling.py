"""rollout.seeded_sampling: the vLLM seed of every generated row is a function of trainer.seed, the step and the
row only; validation uses the same seeds every time; off, no seed reaches vLLM. (That vLLM samples the same tokens
for the same seed and weights: tests/e2e/test_rollout_engine.py and the fault matrix.)"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from luffy_megatron.config import load_config
from luffy_megatron.rollout.engine import Generation, row_seeds
from luffy_megatron.train.step_parts import VALIDATION_STEP, generate_and_mix, sampling_seed
from luffy_megatron.train.validation import validate


def config(*extra: str):
    return load_config(None, ["data.train_batch_size=2", "rollout.n=4", "actor.ppo_mini_batch_size=2", *extra])


def test_off_by_default_and_then_no_seed():
    cfg = config()
    assert cfg.rollout.seeded_sampling is False
    assert sampling_seed(cfg, 3) is None and sampling_seed(cfg, VALIDATION_STEP) is None


def test_no_two_steps_seeds_or_validations_share_a_row_seed():
    rows = 4096  # a 512-prompt x 8 step
    seen: dict[int, tuple] = {}
    for seed in (0, 1, 2, 12345):
        for step in (*range(0, 40), 1000, VALIDATION_STEP):
            base = sampling_seed(config("rollout.seeded_sampling=true", f"trainer.seed={seed}"), step)
            assert 0 <= base and base + rows < 2**63  # what torch.Generator.manual_seed takes
            for r in (0, rows - 1):
                assert seen.setdefault(base + r, (seed, step, r)) == (seed, step, r)
    cfg = config("rollout.seeded_sampling=true", "trainer.seed=5")
    assert sampling_seed(cfg, 7) == sampling_seed(cfg, 7)  # a function of the settings and the step only
    with pytest.raises(ValueError, match="outside"):
        sampling_seed(cfg, VALIDATION_STEP + 1)


class RecordingEngines:
    """Records the sampling settings of every call; every generated row is 2 tokens + EOS."""

    restarts = 0

    def __init__(self, eos: int = 0):
        self.eos, self.calls = eos, []

    def generate_rollouts(self, inputs, max_new_tokens, **sampling):
        self.calls.append(sampling)
        return [Generation([5, 6, self.eos], [-0.5] * 3, (0,) * 3) for _ in inputs]

    def generate(self, prompts, max_new_tokens, **sampling):
        self.calls.append({**sampling, "rows": len(prompts)})
        return [[5, 6] for _ in prompts]


def test_generate_and_mix_passes_the_steps_seed(qwen_tokenizer):
    prompts = [SimpleNamespace(prompt_ids=[11, 12, 13 + i], demo_ids=[21, 22], demo_probs=None) for i in range(2)]
    cfg = config("rollout.seeded_sampling=true", "trainer.seed=3", "data.max_response_length=16")
    for step in (1, 2):
        engines = RecordingEngines(qwen_tokenizer.eos_token_id)
        batch, *_ = generate_and_mix(cfg, engines, qwen_tokenizer, prompts, step, random.Random(0))
        assert batch.num_rows == 8 and engines.calls[0]["seed"] == sampling_seed(cfg, step)
    off = RecordingEngines(qwen_tokenizer.eos_token_id)
    generate_and_mix(config("data.max_response_length=16"), off, qwen_tokenizer, prompts, 1, random.Random(0))
    assert off.calls[0]["seed"] is None


def test_validation_seeds_rows_the_same_whatever_the_chunking():
    class Example:
        def __init__(self, i):
            self.prompt_ids, self.ground_truth, self.data_source = [1, 2, i], "4", "s"

    class Rewards:
        def grade(self, pairs):
            return [0.0 for _ in pairs]

    val_set = [Example(i) for i in range(5)]
    seeds_by_chunking = []
    for chunk in (2, 5):
        cfg = config("rollout.seeded_sampling=true", "rollout.n_val=2", f"data.val_batch_size={chunk}")
        engines = RecordingEngines()
        validate(cfg, engines, Rewards(), type("T", (), {"decode": staticmethod(str)}), val_set)
        seeds_by_chunking.append([s for c in engines.calls for s in row_seeds(c["seed"], c["rows"])])
        assert seeds_by_chunking[-1][0] == sampling_seed(cfg, VALIDATION_STEP)
    assert seeds_by_chunking[0] == seeds_by_chunking[1] and len(set(seeds_by_chunking[0])) == 10
