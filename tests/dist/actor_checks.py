"""torchrun script: one MegatronActor at a given TP x PP x DP on a fixed tiny model and batch.

Writes (rank 0) old log-probs, entropies, the loss metrics of an update, the HF-named gradient of the
batch, and the HF-named weights after one optimizer step to OUT (torch.save), and reports their path.
Usage: actor_checks.py HF_DIR OUT TP PP [key=value config overrides...]
"""

import sys

import torch
import torch.distributed as dist

from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.config import load_config
from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages
from tests.dist.launcher import report

hf_dir, out, tp, pp, *extra = sys.argv[1:]
dist.init_process_group("gloo")
cfg = load_config(None, actor_overrides(world=dist.get_world_size(), tp=int(tp), pp=int(pp)) + extra)
actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)
batch = make_batch()
old_lp, entropy = actor.compute_log_probs(batch)
adv = reference_advantages(batch)
grads = actor.gradients(batch, advantages=adv, old_log_probs=old_lp)
metrics = actor.update(batch, advantages=adv, old_log_probs=old_lp)
weights = {k: v.clone() for k, v in actor.export_hf_weights()}
if dist.get_rank() == 0:
    torch.save({"old_lp": old_lp, "entropy": entropy, "metrics": metrics, "grads": grads, "weights": weights}, out)
    report({"out": out, "metrics": metrics})
dist.destroy_process_group()
