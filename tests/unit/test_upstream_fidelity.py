"""Scaling, schedule, prompt order and validation details against upstream LUFFY's own formulas
(luffy/verl/verl/mix_src/*, reproduced here from its source)."""

import json

import pytest
import torch

from luffy_megatron.actor.batching import contiguous_rows, gradient_accumulation, micro_batch_prompts, rows_per_rank
from luffy_megatron.actor.schedule import lr_warmup_steps, make_lr_scheduler, upstream_lr_factor
from luffy_megatron.algo.options import dp_loss_factor
from luffy_megatron.config import ConfigError, load_config, parse_overrides_from_argv
from luffy_megatron.data.sampler import PromptSampler
from luffy_megatron.train.progress import resume_path
from luffy_megatron.train.validation import validation_metrics

# ------------------------------------------------------------------ prompt order


class UpstreamResumableRandomSampler(torch.utils.data.Sampler):
    """rl_dataset_with_target.py ResumableRandomSampler, as upstream wrote it (seed 47 hard-coded there)."""

    def __init__(self, data_source, seed=47):
        self.data_source = data_source
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.perm_index = 0
        self.perm = torch.randperm(self.num_samples, generator=self.generator)

    @property
    def num_samples(self):
        return len(self.data_source)

    def __iter__(self):
        if self.perm_index >= len(self.perm):
            self.perm_index = 0
            self.perm = torch.randperm(self.num_samples, generator=self.generator)
        while self.perm_index < len(self.perm):
            self.perm_index += 1
            yield self.perm[self.perm_index - 1].item()

    def __len__(self):
        return self.num_samples


def upstream_batches(size: int, batch_size: int, epochs: int) -> list[list[int]]:
    """mix_trainer._create_dataloader: DataLoader(batch_size=train_batch_size, drop_last=True, sampler=...),
    iterated once per epoch."""
    data = list(range(size))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, drop_last=True, sampler=UpstreamResumableRandomSampler(data), collate_fn=list
    )
    return [[int(i) for i in batch] for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("size,batch", [(10, 3), (37, 8), (12, 4)])
def test_prompt_order_is_upstreams_sampler(size, batch):
    expected = upstream_batches(size, batch, epochs=3)
    ours = PromptSampler(size, batch, seed=47)
    got = [ours.next_batch() for _ in range(len(expected))]
    assert got[:3] == expected[:3]  # the first 3 batches, as the issue asks
    assert got == expected  # and the whole of three epochs (new permutation each epoch, last partial dropped)


def test_prompt_order_resumes_at_a_saved_position():
    full = PromptSampler(37, 8, seed=47)
    batches = [full.next_batch() for _ in range(10)]
    resumed = PromptSampler(37, 8, seed=47, position=8 * 6)  # position counts prompts, as the checkpoint saves it
    assert [resumed.next_batch() for _ in range(4)] == batches[6:]


def test_unshuffled_order_is_the_dataset_order():
    s = PromptSampler(7, 3, shuffle=False)
    assert [s.next_batch() for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


# ------------------------------------------------------------------ batch sizes and the loss divisor


def _cfg(*overrides):
    return load_config(None, ["data.train_batch_size=128", "rollout.n=8"] + list(overrides))


def upstream_normalised(mini: int, micro: int, n: int, dp: int) -> tuple[int, int, int]:
    """mix_fsdp_worker.__init__ normalisation and mix_actor.update_policy's gradient_accumulation."""
    mini, micro = mini * n // dp, micro * n // dp
    assert mini % micro == 0
    return mini, micro, mini // micro


@pytest.mark.parametrize("mini,micro,n,dp", [(64, 64, 8, 8), (64, 16, 8, 8), (32, 4, 8, 16), (64, 8, 4, 2)])
def test_accumulation_divisor_and_rows_per_rank_match_upstream(mini, micro, n, dp):
    up_mini, up_micro, up_acc = upstream_normalised(mini, micro, n, dp)
    cfg = _cfg(f"actor.ppo_mini_batch_size={mini}", f"actor.ppo_micro_batch_size={micro}", f"rollout.n={n}")
    assert rows_per_rank(cfg.actor.ppo_mini_batch_size, n, dp) == up_mini
    assert rows_per_rank(micro_batch_prompts(cfg.actor), n, dp) == up_micro
    assert gradient_accumulation(cfg) == up_acc
    # the divisor does not depend on dynamic batch sizes (upstream divides by it either way)
    assert (
        gradient_accumulation(
            _cfg(
                f"actor.ppo_mini_batch_size={mini}",
                f"actor.ppo_micro_batch_size={micro}",
                "actor.use_dynamic_bsz=false",
            )
        )
        == up_acc
    )


def test_default_micro_batch_is_the_mini_batch():
    cfg = _cfg("actor.ppo_mini_batch_size=32")
    assert micro_batch_prompts(cfg.actor) == 32 and gradient_accumulation(cfg) == 1


def test_micro_batch_must_divide_mini_batch():
    with pytest.raises(
        ConfigError, match=r"actor.ppo_mini_batch_size=64 is not a multiple of actor.ppo_micro_batch_size=48"
    ):
        _cfg("actor.ppo_mini_batch_size=64", "actor.ppo_micro_batch_size=48")


def test_rows_that_do_not_split_over_dp_are_refused():
    with pytest.raises(ValueError, match="do not split over 3 data-parallel ranks"):
        rows_per_rank(2, 4, 3)


def test_contiguous_rows_when_not_balancing():
    assert contiguous_rows(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        contiguous_rows(7, 2)


@pytest.mark.parametrize("dp", [1, 2, 4, 8, 16, 32])
def test_reference_dp_gives_upstreams_gradient_scale_at_any_dp(dp):
    """Each rank's loss (its token sum / L) times dp_loss_factor, averaged over DP by megatron: upstream's FSDP
    on R ranks averages over R, so the mini-batch's summed loss enters the gradient with weight 1 / R."""
    mean = load_config(None).algo
    summed = load_config(None, ["algo.dp_gradient_reduction=sum"]).algo
    assert dp_loss_factor(mean, dp) / dp == pytest.approx(1 / dp)  # the cluster's own DP (upstream on DP ranks)
    assert dp_loss_factor(summed, dp) / dp == pytest.approx(1.0)  # DP-invariant: one process on every row
    for reference in (1, 2, 8):
        algo = load_config(None, [f"algo.reference_dp={reference}"]).algo
        assert dp_loss_factor(algo, dp) / dp == pytest.approx(1 / reference)
    # on upstream's own DP the setting changes nothing
    assert dp_loss_factor(load_config(None, [f"algo.reference_dp={dp}"]).algo, dp) == dp_loss_factor(mean, dp) == 1.0


# ------------------------------------------------------------------ LR warmup


def upstream_lambda_lr(base_lr: float, warmup: int, steps: int) -> list[float]:
    """get_constant_schedule_with_warmup (verl/utils/torch_functional.py) stepped once per update_actor."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, float(s) / float(max(1, warmup))))
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr update_policy runs at
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("ratio,total", [(0.1, 30), (0.3, 10), (0.5, 7)])
def test_warmup_matches_upstream_in_trainer_steps(ratio, total):
    warmup = lr_warmup_steps(ratio, total)
    assert warmup == int(ratio * total)
    cfg = load_config(None, [f"actor.lr_warmup_steps_ratio={ratio}", "actor.lr=0.001"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_lr_scheduler(opt, cfg.actor, total)
    ours = []
    for _ in range(total + 3):
        ours.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    assert ours == pytest.approx(upstream_lambda_lr(0.001, warmup, total + 3), abs=1e-12)
    assert ours == pytest.approx([0.001 * upstream_lr_factor(s, warmup) for s in range(total + 3)], abs=1e-12)


def test_no_warmup_full_lr_from_the_first_step_unless_upstreams_quirk_is_asked():
    for zero_first, first in ((False, 0.001), (True, 0.0)):
        cfg = load_config(None, ["actor.lr=0.001", f"actor.zero_lr_first_step={str(zero_first).lower()}"])
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1.0)
        sched = make_lr_scheduler(opt, cfg.actor, 10)
        lrs = []
        for _ in range(3):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step(increment=1)
        assert lrs == pytest.approx([first, 0.001, 0.001])
    assert upstream_lambda_lr(0.001, 0, 3) == pytest.approx([0.0, 0.001, 0.001])  # what the quirk reproduces


# ------------------------------------------------------------------ validation, resume


def test_validation_metrics_per_source_unknown_and_avg():
    m = validation_metrics([1.0, 0.0, 1.0, 1.0, 0.0], ["math", "math", "aime", None, ""])
    assert m == {
        "val/test_score/math": 0.5,
        "val/test_score/aime": 1.0,
        "val/test_score/unknown": 0.5,
        "val/test_score/avg": pytest.approx((0.5 + 1.0 + 0.5) / 3),
    }


def test_resume_flag_and_paths(tmp_path):
    recipe, overrides = parse_overrides_from_argv(["--config", "r.yaml", "--resume", str(tmp_path / "ckpt")])
    assert recipe == "r.yaml" and overrides == [f"trainer.resume_from={tmp_path / 'ckpt'}"]
    assert load_config(None, overrides).trainer.resume_from == str(tmp_path / "ckpt")
    step = tmp_path / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    assert resume_path(str(step)) == step
    assert resume_path(str(tmp_path / "checkpoints")) == step  # a checkpoints dir: its newest complete one
    with pytest.raises(ConfigError, match="does not exist"):
        resume_path(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        resume_path(str(tmp_path / "empty"))


# ------------------------------------------------------------------ upstream's optional advantage edits


def test_disable_truncation_advantage_zeroes_cut_off_rows_as_upstream():
    from luffy_megatron.actor.batching import RolloutBatch
    from luffy_megatron.train.step_parts import apply_upstream_advantage_edits

    eos, pad, L = 2, 0, 4
    responses = torch.tensor(
        [
            [5, 6, 7, 8],  # full length, no EOS: truncated
            [5, 6, eos, pad],  # ended
            [5, 6, 7, eos],  # full length but ended with EOS: kept
            [5, pad, pad, pad],
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([[0.5] * 4, [-0.5] * 3 + [0.0], [0.25] * 4, [1.0, 0, 0, 0]])
    batch = RolloutBatch(
        prompts=[[1]] * 4,
        responses=responses,
        response_mask=mask,
        prefix_mask=torch.zeros(4, L, dtype=torch.bool),
        group_ids=[0, 0, 1, 1],
    )
    # upstream (mix_trainer.py): responses != pad -> length; length >= max_len and no EOS -> advantage 0
    up = adv.clone()
    truncated = ((responses != pad).sum(-1) >= L) & ~((responses == eos).any(-1))
    up[truncated] = 0
    on = load_config(None, [f"data.max_response_length={L}", "algo.disable_truncation_advantage=true"])
    assert torch.equal(apply_upstream_advantage_edits(on, batch, adv, eos), up)
    assert up[0].abs().sum() == 0 and not torch.equal(up, adv)
    off = load_config(None, [f"data.max_response_length={L}"])
    assert torch.equal(apply_upstream_advantage_edits(off, batch, adv, eos), adv)


def test_sft_prefix_reward_sets_demonstration_tokens_to_weight_over_n():
    from luffy_megatron.actor.batching import RolloutBatch
    from luffy_megatron.train.step_parts import apply_upstream_advantage_edits

    prefix = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    batch = RolloutBatch(
        prompts=[[1]] * 2,
        responses=torch.ones(2, 3, dtype=torch.long),
        response_mask=torch.ones(2, 3, dtype=torch.long),
        prefix_mask=prefix,
        group_ids=[0, 0],
    )
    adv = torch.full((2, 3), -0.3)
    cfg = load_config(
        None,
        [
            "rollout.n=2",
            "rollout.n_off_policy=-1",
            "data.train_batch_size=2",
            "actor.ppo_mini_batch_size=2",
            "algo.use_sft_prefix_reward=true",
            "algo.sft_prefix_reward_weight=0.5",
        ],
    )
    got = apply_upstream_advantage_edits(cfg, batch, adv, eos_token_id=2)
    assert torch.equal(got[prefix], torch.full((3,), 0.25)) and torch.equal(got[~prefix], torch.full((3,), -0.3))
    with pytest.raises(ConfigError, match="use_sft_prefix_reward=true needs rollout.n_off_policy=-1"):
        load_config(None, ["algo.use_sft_prefix_reward=true"])


def test_sample_target_ratio_drops_demonstrations_deterministically():
    from types import SimpleNamespace

    from luffy_megatron.train.step_parts import sampled_demonstrations

    prompts = [SimpleNamespace(demo_ids=[i + 1, i + 2]) for i in range(200)]
    keep_all = load_config(None, [])
    assert sampled_demonstrations(keep_all, prompts, 3) == [p.demo_ids for p in prompts]
    half = load_config(None, ["data.sample_target_ratio=0.5"])
    got = sampled_demonstrations(half, prompts, 3)
    kept = sum(1 for g, p in zip(got, prompts) if g == p.demo_ids)
    assert 70 < kept < 130 and all(g in ([], p.demo_ids) for g, p in zip(got, prompts))
    assert sampled_demonstrations(half, prompts, 3) == got  # same seed and step: same draws (resume)
    assert sampled_demonstrations(half, prompts, 4) != got
    assert all(g == [] for g in sampled_demonstrations(load_config(None, ["data.sample_target_ratio=0"]), prompts, 1))
    with pytest.raises(ConfigError, match="sample_target_ratio=1.5 must be in"):
        load_config(None, ["data.sample_target_ratio=1.5"])
