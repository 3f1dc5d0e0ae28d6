"""torchrun script (1 rank): the update's schedule options against their definitions, on the tiny actor.

- actor.ppo_epochs=2: one update = two passes over the same mini-batches = two updates with ppo_epochs=1
  (constant LR, same batch and old log-probs);
- the gradient-accumulation divisor ppo_mini_batch_size // ppo_micro_batch_size (upstream's units), with
  and without dynamic batch sizes: the gradient of the batch is the plain one divided by it;
- LR warmup in trainer steps from the real total: actor/lr of successive update() calls (each of several
  optimizer steps) against upstream's min(1, s / max(1, warmup)).
Usage: actor_schedule.py HF_DIR
"""

import sys

import torch

from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.config import load_config
from luffy_megatron.models.parallel import ensure_process_group, shutdown_distributed
from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages
from tests.dist.launcher import report

hf_dir = sys.argv[1]
ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
base = actor_overrides(world=1)


def make(*extra: str) -> MegatronActor:
    return MegatronActor(load_config(None, base + list(extra)), hf_dir=hf_dir, pad_token_id=0)


def weights(actor) -> dict:
    return {k: v.clone() for k, v in actor.export_hf_weights()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


batch = make_batch()
adv = reference_advantages(batch)
result = {}

# ppo_epochs
one = make()
old_lp, _ = one.compute_log_probs(batch)
start = weights(one)
m_a = one.update(batch, advantages=adv, old_log_probs=old_lp)
one.update(batch, advantages=adv, old_log_probs=old_lp)
two = make("actor.ppo_epochs=2")
m_b = two.update(batch, advantages=adv, old_log_probs=old_lp)
result["epochs"] = {"two_updates_vs_two_epochs": max_diff(weights(one), weights(two)),
                    "moved": max_diff(weights(two), start), "steps_one": m_a["actor/optimizer_steps"],
                    "steps_two": m_b["actor/optimizer_steps"]}

# gradient accumulation divisor (entropy off: its token mean per micro-batch depends on the split, an upstream
# artefact; the policy-gradient token sums add up over any split)
plain = make("algo.entropy_coeff=0").gradients(batch, advantages=adv, old_log_probs=old_lp)
result["accumulation"] = {}
for name, extra in {"dynamic": ["actor.ppo_micro_batch_size=1"],
                    "fixed": ["actor.ppo_micro_batch_size=1", "actor.use_dynamic_bsz=false"]}.items():
    actor = make("algo.entropy_coeff=0", *extra)
    grads = actor.gradients(batch, advantages=adv, old_log_probs=old_lp)
    result["accumulation"][name] = {
        "divisor": actor.loss_opts["gradient_accumulation"],
        "rel_err_vs_half": max(((grads[k] - plain[k] / 2).abs().max() / plain[k].abs().max().clamp(min=1e-12)).item() for k in plain),
    }

# LR warmup in trainer steps: 2 mini-batches (optimizer steps) per update
for name, extra in {"warmup3": ["actor.lr_warmup_steps_ratio=0.3"], "zero_first": ["actor.zero_lr_first_step=true"],
                    "none": []}.items():
    actor = make("actor.ppo_mini_batch_size=1", "trainer.total_training_steps=10", *extra)
    lrs, steps = [], []
    for _ in range(5):
        m = actor.update(batch, advantages=adv, old_log_probs=old_lp)
        lrs.append(m["actor/lr"])
        steps.append(m["actor/optimizer_steps"])
    result[name] = {"lrs": lrs, "steps": steps}

report(result)
shutdown_distributed()  # barrier, then megatron's groups and the world, workers joined or idle
