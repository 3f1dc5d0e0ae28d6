"""torchrun script for checkpoint/resume checks of the actor.

    actor_resume.py HF_DIR CKPT_ROOT OUT MODE [TP PP [key=value overrides...]]
MODE=straight: train 3 steps, save, train 2 more; report the 5 losses and save final weights to OUT.
MODE=resume: load the newest checkpoint under CKPT_ROOT, train 2 steps; report losses, save weights.
MODE=torn: train 1 step, save; then save step 2 with the writer stalled after its tensors are
written (the test kills this process there).
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from luffy_megatron.actor import checkpoint as ckpt
from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.config import load_config
from luffy_megatron.models.parallel import ensure_process_group, shutdown_distributed
from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages
from tests.dist.launcher import report

hf_dir, root, out, mode, *layout = sys.argv[1:]
tp, pp = (int(layout[0]), int(layout[1])) if layout else (1, 1)
extra = layout[2:]
ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
cfg = load_config(None, actor_overrides(world=dist.get_world_size(), tp=tp, pp=pp) + ["actor.lr_warmup_steps_ratio=0.5"] + extra)
actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)


def train(step: int) -> float:
    batch = make_batch(seed=step)
    old_lp, _ = actor.compute_log_probs(batch)
    # algo.use_kl_loss: the KL to the frozen reference, which stays the initial model across a resume
    ref_lp = actor.compute_ref_log_probs(batch) if actor.reference is not None else None
    # dropout-free model: add a draw from the torch RNG so resuming must restore it too
    noise = torch.rand(()).item() * 1e-3
    metrics = actor.update(batch, advantages=reference_advantages(batch) + noise, old_log_probs=old_lp, ref_log_probs=ref_lp)
    return metrics["actor/pg_loss"]


losses = []
if mode == "straight":
    for step in range(1, 4):
        losses.append(train(step))
    ckpt.save_checkpoint(actor, root, step=3, trainer_state={"data_position": 3 * 2}, keep=2)
    for step in range(4, 6):
        losses.append(train(step))
elif mode == "resume":
    latest = ckpt.find_latest(root)
    state = ckpt.load_checkpoint(actor, latest)
    assert state["data_position"] == 6 and state["step"] == 3, state
    for step in range(4, 6):
        losses.append(train(step))
elif mode == "torn":
    losses.append(train(1))
    ckpt.save_checkpoint(actor, root, step=1)
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def stalled_save(*args, **kwargs):
        real_save(*args, **kwargs)
        if dist.get_rank() == 0:
            print(f"STALLED {os.getpid()}", flush=True)
        time.sleep(600)

    dist_checkpointing.save = stalled_save
    losses.append(train(2))
    ckpt.save_checkpoint(actor, root, step=2)
weights = {k: v.clone() for k, v in actor.export_hf_weights()}
if dist.get_rank() == 0:
    torch.save(weights, out)
    report({"losses": losses, "lr": actor.optimizer.param_groups[0]["lr"], "step": actor.step})
shutdown_distributed()  # barrier, then megatron's groups and the world, workers joined or idle
