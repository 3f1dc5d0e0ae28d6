"""torchrun script (one process): the actor with model.recompute_granularity none / full / selective.

Counts how often each transformer layer and each core attention runs forward during one training step
(activation recomputation runs them again in backward), and reports the gradients' largest difference from
the run without recomputation. Usage: recompute_checks.py HF_DIR"""

import sys

import torch

from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.config import load_config
from luffy_megatron.models.parallel import ensure_process_group, shutdown_distributed
from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages
from tests.dist.launcher import report

hf_dir = sys.argv[1]
ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
batch = make_batch()
adv = reference_advantages(batch)
out, base = {}, None
for name, extra in (("none", []), ("full", ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=2"]),
                    ("selective", ["model.recompute_granularity=selective"])):
    cfg = load_config(None, actor_overrides(world=1) + extra)
    actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)
    gpt = actor._unwrapped()[0]
    counts = {"layer": 0, "core_attention": 0}
    hooks = []
    for layer in gpt.decoder.layers:
        hooks.append(layer.register_forward_hook(lambda *a: counts.__setitem__("layer", counts["layer"] + 1)))
        hooks.append(layer.self_attention.core_attention.register_forward_hook(
            lambda *a: counts.__setitem__("core_attention", counts["core_attention"] + 1)))
    old_lp, _ = actor.compute_log_probs(batch)
    forward_counts = dict(counts)
    grads = actor.gradients(batch, advantages=adv, old_log_probs=old_lp)
    for h in hooks:
        h.remove()
    base = base or grads
    out[name] = {
        "config": [actor.config.recompute_granularity, actor.config.recompute_method, actor.config.recompute_num_layers],
        "forward_only": forward_counts,
        "train": {k: counts[k] - forward_counts[k] for k in counts},
        "layers": len(gpt.decoder.layers),
        "grad_diff": max((grads[k] - base[k]).abs().max().item() for k in base),
        "grad_scale": max(base[k].abs().max().item() for k in base),
    }
report(out)
shutdown_distributed()  # barrier, then megatron's groups and the world, workers joined or idle
