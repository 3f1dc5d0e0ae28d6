"""Rollout composition: prefix strategies, EOS and mask rules, upstream's rollout_example."""

import json
import random

import pytest
import torch

from luffy_megatron.algo import assemble_responses, plan_rows, prefix_ratios, response_mask_from_eos
from tests.helpers import SHARED


def ratios(**kw):
    base = dict(num_prompts=3, n=8, n_off_policy=1, rng=random.Random(0))
    base.update(kw)
    return prefix_ratios(**base)


# ----------------------------------------------------------------------------- strategies


def test_main_run_one_full_trace_slot_per_group():
    r = ratios(strategy="random", min_prefix_ratio=1.0, max_prefix_ratio=1.0)
    assert r == ([1.0] + [0.0] * 7) * 3


def test_random_draws_within_bounds_for_guided_slots_only():
    r = ratios(strategy="random", n_off_policy=3, min_prefix_ratio=0.2, max_prefix_ratio=0.6, num_prompts=50)
    for g in range(50):
        group = r[g * 8 : (g + 1) * 8]
        assert all(0.2 <= x <= 0.6 for x in group[:3])
        assert group[3:] == [0.0] * 5
    assert len(set(r)) > 100  # independent draws per slot


def test_all_slots_guided_with_minus_one_and_none_with_zero():
    r = ratios(strategy="random", n_off_policy=-1, min_prefix_ratio=0.5, max_prefix_ratio=0.5)
    assert r == [0.5] * 24
    assert ratios(strategy="random", n_off_policy=0) == [0.0] * 24


def test_shared_random_one_ratio_per_prompt():
    r = ratios(strategy="random", n_off_policy=2, min_prefix_ratio=0.0, max_prefix_ratio=1.0, share_across_samples=True)
    for g in range(3):
        group = r[g * 8 : (g + 1) * 8]
        assert group[0] == group[1] and group[2:] == [0.0] * 6
    assert len({r[0], r[8], r[16]}) == 3


def test_linear_decays_with_step_and_needs_sharing():
    kw = dict(strategy="linear", n_off_policy=1, share_across_samples=True, prefix_steps=100, linear_max_ratio=0.8)
    assert ratios(global_step=1, **kw)[0] == pytest.approx(0.8)
    assert ratios(global_step=51, **kw)[0] == pytest.approx(0.4)
    assert ratios(global_step=101, **kw)[0] == pytest.approx(0.0)
    assert ratios(global_step=500, **kw)[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="share"):
        ratios(strategy="linear", share_across_samples=False)


@pytest.mark.parametrize(
    "strategy,step,upper",
    [
        ("reverse_linear", 1, 0.08),  # window 0: (0, 1*0.8/10)
        ("reverse_linear", 56, 0.48),  # step-1 = 55 -> window 5: (0, 6*0.8/10)
        ("reverse_linear", 5000, 0.8),  # past the last window: the last one
        ("linear_max", 1, 0.8),  # window 0: (0, 10*0.8/10)
        ("linear_max", 56, 0.4),  # window 5: (0, 5*0.8/10)
        ("linear_max", 5000, 0.08),
    ],
)
def test_windowed_strategies(strategy, step, upper):
    r = ratios(
        strategy=strategy, n_off_policy=4, global_step=step, prefix_steps=100, linear_max_ratio=0.8, num_prompts=200
    )
    guided = [x for g in range(200) for x in r[g * 8 : g * 8 + 4]]
    assert max(guided) <= upper + 1e-12
    assert max(guided) > upper * 0.9  # draws reach near the window's top
    assert all(x == 0.0 for g in range(200) for x in r[g * 8 + 4 : (g + 1) * 8])


def test_fixed_evenly_spaced():
    r = ratios(strategy="fixed", n_off_policy=3, min_prefix_ratio=0.2, max_prefix_ratio=0.8, num_prompts=2)
    assert r[:8] == pytest.approx([0.2, 0.5, 0.8, 0, 0, 0, 0, 0])
    assert r[8:] == r[:8]
    r = ratios(strategy="fixed", n_off_policy=-1, n=5, min_prefix_ratio=0.0, max_prefix_ratio=1.0, num_prompts=1)
    assert r == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="fixed"):
        ratios(strategy="fixed", share_across_samples=True)


def test_bad_strategy_and_slot_count():
    with pytest.raises(ValueError, match="linear_variance"):
        ratios(strategy="linear_variance")
    with pytest.raises(ValueError, match="n_off_policy=9"):
        ratios(strategy="random", n_off_policy=9)


def test_seeded_rng_is_reproducible():
    a = prefix_ratios(
        strategy="random",
        num_prompts=4,
        n=4,
        n_off_policy=2,
        min_prefix_ratio=0,
        max_prefix_ratio=1,
        rng=random.Random(7),
    )
    b = prefix_ratios(
        strategy="random",
        num_prompts=4,
        n=4,
        n_off_policy=2,
        min_prefix_ratio=0,
        max_prefix_ratio=1,
        rng=random.Random(7),
    )
    assert a == b


# ----------------------------------------------------------------------------- EOS and masks


def test_response_mask_up_to_and_including_first_eos():
    resp = torch.tensor([[4, 4, 9, 9, 0], [6, 6, 6, 6, 6], [9, 1, 9, 2, 2], [0, 0, 0, 0, 0]])
    assert response_mask_from_eos(resp, 9).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


def test_pad_equal_to_eos_keeps_first_eos_only():
    """Qwen2.5-Math: pad == eos. The first EOS is in the mask, the padding after it is not."""
    plan = plan_rows(prompts=[[1]], demonstrations=[[5, 6]], ratios=[1.0, 0.0], n=2, eos_token_id=7, response_length=6)
    responses, prefix_mask, mask = assemble_responses(
        prefixes=plan.prefixes, generations=[[], [3, 7]], eos_token_id=7, pad_token_id=7, response_length=6
    )
    assert responses.tolist() == [[5, 6, 7, 7, 7, 7], [3, 7, 7, 7, 7, 7]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert prefix_mask.tolist()[0] == [True, True, True, False, False, False]


def test_plan_appends_eos_to_demo_and_skips_full_traces():
    plan = plan_rows(
        prompts=[[1, 2], [3]],
        demonstrations=[[5, 6, 7], []],
        ratios=[1.0, 0.5, 0.0, 1.0, 0.0, 0.0],
        n=3,
        eos_token_id=9,
        response_length=8,
    )
    assert plan.prefixes == [[5, 6, 7, 9], [5, 6], [], [], [], []]  # 0.5 * 4 tokens; empty demo -> no EOS
    assert plan.engine_inputs[0] == [1, 2, 5, 6, 7, 9] and plan.engine_inputs[1] == [1, 2, 5, 6]
    assert plan.group_index == [0, 0, 0, 1, 1, 1]
    assert plan.needs_generation == [False, True, True, True, True, True]  # an empty demo is an on-policy slot
    assert plan.max_new_tokens == [4, 6, 8, 8, 8, 8]


def test_prefix_longer_than_response_is_cut_and_masked_to_width():
    plan = plan_rows(
        prompts=[[1]], demonstrations=[list(range(10, 20))], ratios=[1.0], n=1, eos_token_id=9, response_length=4
    )
    responses, prefix_mask, mask = assemble_responses(
        prefixes=plan.prefixes, generations=[[]], eos_token_id=9, pad_token_id=0, response_length=4
    )
    assert responses.tolist() == [[10, 11, 12, 13]]
    assert prefix_mask.all() and mask.all()  # truncated trace: no EOS, the whole width counts
    assert plan.needs_generation == [False]


def test_upstream_rollout_example():
    ex = json.loads((SHARED / "reference" / "luffy_test_vectors.json").read_text())["rollout_example"]
    n, eos, pad = 4, 9, 0
    inputs = ex["vllm_inputs"]
    prompts = [inputs[0][:2], inputs[4][:1]]  # rows 1-3 / 5-7 are the bare prompts
    assert all(inputs[r] == prompts[r // n] for r in (1, 2, 3, 5, 6, 7))
    demos = [inputs[0][2:-1], inputs[4][1:-1]]  # the engine input ends with the appended EOS
    plan = plan_rows(
        prompts=prompts, demonstrations=demos, ratios=[1.0, 0, 0, 0] * 2, n=n, eos_token_id=eos, response_length=5
    )
    assert plan.engine_inputs == inputs
    # what the engine produced after each input: the response minus the prefix, trailing pads dropped
    generations = []
    for prefix, resp in zip(plan.prefixes, ex["responses"]):
        gen = resp[len(prefix) :]
        while gen and gen[-1] == pad:
            gen = gen[:-1]
        generations.append(gen)
    responses, prefix_mask, mask = assemble_responses(
        prefixes=plan.prefixes, generations=generations, eos_token_id=eos, pad_token_id=pad, response_length=5
    )
    assert responses.tolist() == ex["responses"]
    assert prefix_mask.long().tolist() == ex["prefix_mask"]
    assert mask.tolist() == ex["attention_mask"]
    # skipping generation for full-trace rows changes nothing under the mask
    skipped = [[] if not need else g for need, g in zip(plan.needs_generation, generations)]
    responses2, prefix_mask2, mask2 = assemble_responses(
        prefixes=plan.prefixes, generations=skipped, eos_token_id=eos, pad_token_id=pad, response_length=5
    )
    assert torch.equal(mask2, mask) and torch.equal(prefix_mask2, prefix_mask)
    assert torch.equal(responses2 * mask2, responses * mask)
