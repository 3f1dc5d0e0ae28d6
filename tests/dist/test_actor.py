"""The Megatron actor: log-probs, loss and update against an independent HF + torch reference, and
invariance of all of them across TP, PP and DP layouts (gloo, torchrun)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist.actor_fixtures import LR, hf_token_logprobs, make_batch, reference_advantages, reference_update
from tests.dist.launcher import REPO, run_torchrun
from tests.dist.tiny_models import make_tiny_model

HERE = Path(__file__).parent
# name: (world, tp, pp, extra overrides)
LAYOUTS = {
    "tp1": (1, 1, 1, []),
    "tp2": (2, 2, 1, []),
    "pp2": (2, 1, 2, []),
    "dp2": (2, 1, 1, []),
    # interleaved pipeline: 2 stages x 2 virtual chunks of one layer each; the one-micro-batch plan is padded
    # with an empty micro-batch (the schedule runs micro-batches in groups of PP). With the frozen reference
    # model (algo.use_ref, which changes nothing of the update): actor_checks.py then runs the KL checks
    "vpp2": (2, 1, 2, ["parallel.virtual_pipeline_model_parallel_size=2", "algo.use_ref=true"]),
    # entropy off: its token mean per micro-batch depends on how rows are split (an upstream artefact)
    "dp2sum": (2, 1, 1, ["algo.dp_gradient_reduction=sum", "algo.entropy_coeff=0"]),
    # upstream's gradient on 2 DP ranks, from 4 (entropy off, as dp2sum). On its own DP the setting's factor is
    # exactly 1 (tests/unit/test_upstream_fidelity.py), so no DP=2 run of it here
    "dp4ref2": (4, 1, 1, ["algo.reference_dp=2", "algo.entropy_coeff=0"]),
    # the batch carries teacher probabilities (make_batch(with_target_probs=True)) and the loss uses them
    "probs": (1, 1, 1, ["algo.use_off_policy_probs=true"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("actor")
    hf_dir = make_tiny_model("qwen2", root / "qwen2")  # untied, vocab 600 (padded by Megatron)
    out = {}
    for name, (world, tp, pp, extra) in LAYOUTS.items():
        path = root / f"{name}.pt"
        run_torchrun(HERE / "actor_checks.py", str(hf_dir), str(path), str(tp), str(pp), *extra, nproc=world)
        out[name] = torch.load(path)
    # the actor started from a converted Megatron checkpoint (written as TP=1, loaded at TP=2)
    ckpt = root / "mcore"
    subprocess.run([sys.executable, "-c", f"from luffy_megatron.convert.tools import hf_to_megatron; hf_to_megatron({str(hf_dir)!r}, {str(ckpt)!r}, quiet=True)"], check=True, cwd=REPO)
    path = root / "from_ckpt.pt"
    run_torchrun(HERE / "actor_checks.py", str(hf_dir), str(path), "2", "1", f"model.load_checkpoint={ckpt}", "algo.use_ref=true", nproc=2)
    out["from_ckpt"] = torch.load(path)
    return hf_dir, out


def _max_rel(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item() for k in b)


def test_log_probs_match_transformers(runs):
    hf_dir, out = runs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        lps, ents = hf_token_logprobs(model, make_batch())
    got = out["tp1"]
    for (i, n, lp), ent in zip(lps, ents):
        assert torch.allclose(got["old_lp"][i, :n], lp, atol=1e-5), i
        assert torch.allclose(got["entropy"][i, :n], ent, atol=1e-4), i
        assert got["old_lp"][i, n:].abs().sum() == 0  # nothing past the first EOS


def test_update_equals_reference_adamw_step(runs):
    hf_dir, out = runs
    batch = make_batch()
    ref = reference_update(hf_dir, batch, reference_advantages(batch), out["tp1"]["old_lp"])
    got = out["tp1"]
    assert got["metrics"]["actor/loss_backward"] == pytest.approx(ref["loss"], rel=1e-5)
    assert _max_rel(got["grads"], ref["grads"]) < 1e-4
    # Adam's first step is ~lr * sign(g): compare against the step size, not the weights' scale
    for k, w in ref["weights"].items():
        assert (got["weights"][k] - w).abs().max() < 0.01 * LR, k
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    moved = max((got["weights"][k] - before[k]).abs().max().item() for k in ref["weights"])
    assert moved > 0.5 * LR  # the step did move the weights (Adam's first step is ~lr per element)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "vpp2"])
def test_model_parallel_layouts_agree_with_tp1(runs, layout):
    _, out = runs
    base, other = out["tp1"], out[layout]
    assert torch.allclose(other["old_lp"], base["old_lp"], atol=1e-5)
    for key in ("actor/pg_loss", "actor/loss_backward", "actor/entropy_loss"):
        assert other["metrics"][key] == pytest.approx(base["metrics"][key], rel=1e-5), key
    assert _max_rel(other["grads"], base["grads"]) < 1e-4
    for k, w in base["weights"].items():
        assert (other["weights"][k] - w).abs().max() < 0.01 * LR, k


def test_dp2_follows_upstream_data_parallel_semantics(runs):
    """Upstream scales the loss per rank (token sum / L) and AVERAGES gradients over ranks, so at DP=2
    the step follows half the sum of the two ranks' losses (luffy_algorithm.md 1.4). Checked against
    that reference computed with transformers on the same row split, and against DP=1 (whose single
    rank sums everything): the policy-gradient loss metric is exactly half."""
    from luffy_megatron.actor.batching import balance_rows

    hf_dir, out = runs
    batch = make_batch()
    parts = balance_rows(batch.sequence_lengths(), 2)
    ref = reference_update(hf_dir, batch, reference_advantages(batch), out["dp2"]["old_lp"], dp_parts=parts)
    got = out["dp2"]
    assert torch.allclose(got["old_lp"], out["tp1"]["old_lp"], atol=1e-5)
    assert got["metrics"]["actor/pg_loss"] == pytest.approx(ref["pg_loss"], rel=1e-5)
    assert got["metrics"]["actor/pg_loss"] == pytest.approx(out["tp1"]["metrics"]["actor/pg_loss"] / 2, rel=1e-5)
    assert _max_rel(got["grads"], ref["grads"]) < 1e-4
    for k, w in ref["weights"].items():
        assert (got["weights"][k] - w).abs().max() < 0.01 * LR, k


def test_dp2_with_sum_reduction_equals_single_process_reference(runs):
    """`algo.dp_gradient_reduction=sum`: at DP=2 the step is the one a single process takes on all rows."""
    hf_dir, out = runs
    batch = make_batch()
    got = out["dp2sum"]
    ref = reference_update(hf_dir, batch, reference_advantages(batch), got["old_lp"], entropy_coeff=0.0)
    assert _max_rel(got["grads"], ref["grads"]) < 1e-4
    for k, w in ref["weights"].items():
        assert (got["weights"][k] - w).abs().max() < 0.01 * LR, k


def _norm(grads: dict) -> float:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()


def test_reference_dp_gives_upstreams_gradient_at_another_dp(runs):
    """`algo.reference_dp=2` at DP=4: the gradient upstream's mean over 2 ranks gives on the same global batch
    (transformers reference on a 2-rank split; megatron at DP=2 with the sum, halved), pre-clip grad norm too.
    Without the setting, DP=4 would give half of it."""
    from luffy_megatron.actor.batching import balance_rows

    hf_dir, out = runs
    batch = make_batch()
    got = out["dp4ref2"]
    parts = balance_rows(batch.sequence_lengths(), 2)
    ref = reference_update(hf_dir, batch, reference_advantages(batch), got["old_lp"], entropy_coeff=0.0, dp_parts=parts)
    assert _max_rel(got["grads"], ref["grads"]) < 1e-4
    assert got["metrics"]["actor/grad_norm"] == pytest.approx(_norm(ref["grads"]), rel=1e-4)
    half_sum = {k: g / 2 for k, g in out["dp2sum"]["grads"].items()}
    assert _max_rel(got["grads"], half_sum) < 1e-4
    assert got["metrics"]["actor/grad_norm"] == pytest.approx(out["dp2sum"]["metrics"]["actor/grad_norm"] / 2, rel=1e-4)


def test_actor_starts_from_a_converted_megatron_checkpoint(runs):
    """`model.load_checkpoint`: the weights come from `luffy-convert hf-to-megatron` output (TP=1) loaded
    at TP=2, and the actor computes what it computes from the HF weights."""
    _, out = runs
    assert torch.allclose(out["from_ckpt"]["old_lp"], out["tp1"]["old_lp"], atol=1e-5)
    assert out["from_ckpt"]["metrics"]["actor/pg_loss"] == pytest.approx(out["tp1"]["metrics"]["actor/pg_loss"], rel=1e-5)


def test_off_policy_probs_reach_the_actor_loss(runs):
    """algo.use_off_policy_probs=true: the actor's step follows upstream's loss with the batch's teacher
    probabilities (off ratio p / (teacher p + 1e-6) on demonstration tokens), and differs from the step on the
    same batch without the option (tp1), which follows the shaped p / (p + 0.1)."""
    hf_dir, out = runs
    batch = make_batch(with_target_probs=True)
    got, plain = out["probs"], out["tp1"]
    assert torch.allclose(got["old_lp"], plain["old_lp"], atol=1e-6)  # same model, same rows
    ref = reference_update(hf_dir, batch, reference_advantages(batch), got["old_lp"], use_target_probs=True)
    assert got["metrics"]["actor/loss_backward"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["metrics"]["actor/pg_loss"] == pytest.approx(ref["pg_loss"], rel=1e-5)
    assert _max_rel(got["grads"], ref["grads"]) < 1e-4
    for k, w in ref["weights"].items():
        assert (got["weights"][k] - w).abs().max() < 0.01 * LR, k
    # the option is not ignored: another loss, another off-policy ratio, another gradient
    for key in ("actor/pg_loss", "actor/off_pg_loss", "actor/off_ratio_mean", "actor/loss_backward"):
        assert got["metrics"][key] != pytest.approx(plain["metrics"][key], rel=0.1), key
    assert _max_rel(got["grads"], plain["grads"]) > 0.1


def test_rollout_is_weights_reach_the_actor_update(runs):
    """algo.rollout_is=token_tis on tp1 (actor_checks.py): engine log-probs equal to the old ones give weights of 1
    and the gradient of rollout_is=none bit for bit; different ones on the generated tokens change the gradient;
    different ones on the demonstration tokens alone do not; none at all is refused. Without the actor passing the
    weights to the loss, "perturbed" gives the same gradient too."""
    _, out = runs
    got = out["tp1"]
    checks = got["rollout_is"]
    for name in ("same", "on_demos"):
        assert all(torch.equal(checks[name][k], g) for k, g in got["grads"].items()), name
    assert _max_rel(checks["perturbed"], got["grads"]) > 1e-2
    assert "algo.rollout_is=token_tis" in checks["refused"]


# ----- the frozen reference model and the KL terms (algo.use_ref on vpp2 and from_ckpt; actor_checks.py)


@pytest.mark.parametrize("run", ["vpp2", "from_ckpt"])
def test_reference_log_probs_stay_the_initial_models_after_an_update(runs, run):
    """The reference (built from model.path on vpp2, from model.load_checkpoint on from_ckpt) gives the initial
    policy's log-probs after the update has moved the policy; those equal transformers' (tp1 old_lp)."""
    _, out = runs
    kl = out[run]["kl"]
    initial = out[run]["old_lp"]  # the policy before its update
    assert torch.allclose(initial, out["tp1"]["old_lp"], atol=1e-5)
    assert torch.allclose(kl["ref_lp"], initial, atol=1e-6, rtol=0)
    moved = (kl["new_lp"] - initial).abs().max().item()
    assert moved > 1e-3, moved  # the policy did change, so a reference that followed it would fail above


def test_kl_loss_adds_coef_times_kl_to_the_update(runs):
    """algo.use_kl_loss: the loss gains kl_loss_coef x token-mean low_var_kl(policy, reference) (upstream
    mix_actor.py): `actor/kl_loss` is that KL, the logged loss identity holds, and the gradient differs from the
    same actor's without the KL loss by exactly the gradient of the KL term (transformers + autograd)."""
    from transformers import AutoModelForCausalLM

    from luffy_megatron.algo import masked_mean
    from luffy_megatron.algo.kl import kl_penalty
    from tests.dist.actor_fixtures import KL_LOSS_COEF

    hf_dir, out = runs
    got, kl = out["vpp2"], out["vpp2"]["kl"]
    batch = make_batch()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.load_state_dict(got["weights"])  # the policy after its update, where the KL checks ran
    lps, _ = hf_token_logprobs(model, batch)
    width = batch.response_width
    lp = torch.stack([torch.cat([x, x.new_zeros(width - n)]) for _, n, x in lps])
    assert torch.allclose(lp.detach(), kl["new_lp"], atol=1e-5)
    kl_loss = masked_mean(kl_penalty(lp, kl["ref_lp"], "low_var_kl"), batch.response_mask.float())
    (KL_LOSS_COEF * kl_loss).backward()
    expected = {k: p.grad for k, p in model.named_parameters()}

    m = kl["metrics_kl"]
    assert m["actor/kl_loss"] > 1e-6 and m["actor/kl_coef"] == KL_LOSS_COEF
    assert m["actor/kl_loss"] == pytest.approx(kl_loss.item(), rel=1e-3)
    assert m["actor/policy_loss"] == pytest.approx(
        m["actor/pg_loss"] - 0.01 * m["actor/entropy_loss"] + KL_LOSS_COEF * m["actor/kl_loss"], rel=1e-5)
    difference = {k: kl["grads_kl"][k] - kl["grads_plain"][k] for k in expected}
    assert max(v.abs().max().item() for v in difference.values()) > 1e-6  # the KL loss changed the gradient
    assert _max_rel(difference, expected) < 1e-3


def test_kl_reward_penalty_reaches_the_advantages(runs):
    """algo.kl_ctrl_coef > 0: the trainer's rewards_and_advantages penalises the token rewards by
    beta x (old - reference log-prob) on valid tokens (upstream apply_kl_penalty, kl estimator) and computes the
    advantages from them, so they differ from those of the raw scores."""
    from luffy_megatron.algo import compute_advantages

    _, out = runs
    kl = out["vpp2"]["kl"]
    batch = make_batch()
    mask = batch.response_mask.float()
    expected = kl["scores"] - 0.5 * (kl["new_lp"] - kl["ref_lp"]) * mask
    assert torch.allclose(kl["rewards"], expected, atol=1e-7)
    assert (kl["rewards"] - kl["scores"]).abs().max() > 1e-4
    per_row = ((kl["new_lp"] - kl["ref_lp"]) * mask).sum(-1) / mask.sum(-1)
    assert kl["kl_metrics"] == {"critic/kl": pytest.approx(per_row.mean().item(), rel=1e-5), "critic/kl_coeff": 0.5}
    assert kl["kl_now"] == pytest.approx(kl["kl_metrics"]["critic/kl"])
    assert torch.allclose(kl["advantages"], compute_advantages(
        token_level_rewards_BT=expected, response_mask_BT=batch.response_mask, prefix_mask_BT=batch.prefix_mask,
        group_ids=batch.group_ids), atol=1e-6)
    assert (kl["advantages"] - reference_advantages(batch)).abs().max() > 1e-4
