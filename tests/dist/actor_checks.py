"""torchrun script: one MegatronActor at a given TP x PP x DP on a fixed tiny model and batch.

Writes (rank 0) old log-probs, entropies, the loss metrics of an update, the HF-named gradient of the
batch, and the HF-named weights after one optimizer step to OUT (torch.save), and reports their path.
Also records the dtypes that crossed pipeline stages (megatron-core's P2PCommunicator), the model's
precision settings, and (bf16) the optimizer's fp32 main params right after construction.
Usage: actor_checks.py HF_DIR OUT TP PP [key=value config overrides...]
"""

import sys

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import p2p_communication

from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.config import load_config
from luffy_megatron.models.parallel import ensure_process_group, shutdown_distributed
from tests.dist.actor_fixtures import actor_overrides, make_batch, reference_advantages
from tests.dist.launcher import report

hf_dir, out, tp, pp, *extra = sys.argv[1:]
ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
cfg = load_config(None, actor_overrides(world=dist.get_world_size(), tp=int(tp), pp=int(pp)) + extra)
p2p_dtypes = set()
_communicate = p2p_communication.P2PCommunicator._communicate


def recording_communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, **kwargs):
    for t in (tensor_send_next, tensor_send_prev):
        if t is not None:
            p2p_dtypes.add(("send", str(t.dtype)))
    received = _communicate(self, tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev,
                            recv_prev=recv_prev, recv_next=recv_next, **kwargs)
    for t in received[:2]:
        if t is not None:
            p2p_dtypes.add(("recv", str(t.dtype)))
    return received


p2p_communication.P2PCommunicator._communicate = recording_communicate
logits_dtypes = set()
_token_logprobs = MegatronActor._token_logprobs


def recording_token_logprobs(self, mb, shard, logits):
    logits_dtypes.add(str(logits.dtype))  # what the model hands the log-prob path
    return _token_logprobs(self, mb, shard, logits)


MegatronActor._token_logprobs = recording_token_logprobs
actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)
precision = {"bf16": actor.config.bf16, "pipeline_dtype": str(actor.config.pipeline_dtype),
             "params_dtype": str(actor.config.params_dtype),
             "param_dtypes": sorted({str(p.dtype) for m in actor.model for p in m.parameters()})}
full_main_params = actor.half and not actor.ddp_config.use_distributed_optimizer  # else main params are shards
main_params = ({k: v.clone() for k, v in actor.export_hf_weights(tensor_of=lambda p: p.main_param)}
               if full_main_params else None)
batch = make_batch(with_target_probs=cfg.algo.use_off_policy_probs)
old_lp, entropy = actor.compute_log_probs(batch)
adv = reference_advantages(batch)
# gradients() refuses under the distributed optimizer (its grad buffers hold reduced shards only)
grads = None if actor.ddp_config.use_distributed_optimizer else actor.gradients(batch, advantages=adv, old_log_probs=old_lp)
rollout_is_checks = None
if dist.get_world_size() == 1 and not cfg.algo.use_off_policy_probs:
    # tp1 (test_actor.py): algo.rollout_is=token_tis on the real actor, before its update. Engine log-probs equal to
    # the old ones (weights exactly 1), different ones on the generated tokens, and different ones on the
    # demonstration tokens only (which must keep weight 1); and the update refuses to run without them
    from luffy_megatron.algo.rollout_correction import behaviour_log_probs

    actor.rollout_is = {"mode": "token_tis", "cap": 2.0}
    generated = batch.response_mask.bool() & ~batch.prefix_mask
    shift = torch.linspace(-1.0, 1.0, old_lp.numel()).view_as(old_lp)
    behaviours = {"same": behaviour_log_probs(old_lp, generated),
                  "perturbed": behaviour_log_probs(old_lp + shift, generated),
                  "on_demos": torch.where(batch.prefix_mask, old_lp + 3.0, behaviour_log_probs(old_lp, generated))}
    rollout_is_checks = {name: actor.gradients(batch, advantages=adv, old_log_probs=old_lp, behaviour_log_probs=b)
                         for name, b in behaviours.items()}
    try:
        actor.gradients(batch, advantages=adv, old_log_probs=old_lp)
    except ValueError as refused:
        rollout_is_checks["refused"] = str(refused)
    actor.rollout_is = {"mode": "none", "cap": 2.0}
metrics = actor.update(batch, advantages=adv, old_log_probs=old_lp)
weights = {k: v.clone() for k, v in actor.export_hf_weights()}
main_after = ({k: v.clone() for k, v in actor.export_hf_weights(tensor_of=lambda p: p.main_param)}
              if full_main_params else None)
if dist.get_rank() == 0:
    torch.save({"old_lp": old_lp, "entropy": entropy, "metrics": metrics, "grads": grads, "weights": weights,
                "precision": precision, "main_params": main_params, "main_params_after": main_after,
                "rollout_is": rollout_is_checks}, out)
    report({"out": out, "metrics": metrics})
kl_checks = None
if actor.reference is not None:
    # algo.use_ref=true (test_actor.py): the frozen reference after the update has moved the policy; the actor's
    # KL loss (its loss options as built with algo.use_kl_loss=true) against the same actor without it; and the
    # trainer's KL reward penalty (algo.kl_ctrl_coef > 0) on these log-probs
    from dataclasses import replace

    from luffy_megatron.algo.kl import make_kl_controller
    from luffy_megatron.algo.options import kl_controller_options, loss_options
    from luffy_megatron.train.step_parts import rewards_and_advantages
    from tests.dist.actor_fixtures import KL_LOSS_COEF, reference_token_scores

    ref_lp = actor.compute_ref_log_probs(batch)
    new_lp, _ = actor.compute_log_probs(batch)
    grads_plain = actor.gradients(batch, advantages=adv, old_log_probs=new_lp)
    actor.loss_opts.update(loss_options(replace(cfg.algo, use_kl_loss=True, kl_loss_coef=KL_LOSS_COEF)))
    grads_kl = actor.gradients(batch, advantages=adv, old_log_probs=new_lp, ref_log_probs=ref_lp)
    metrics_kl = actor.update(batch, advantages=adv, old_log_probs=new_lp, ref_log_probs=ref_lp)
    penalty_cfg = replace(cfg, algo=replace(cfg.algo, kl_ctrl_coef=0.5))
    kl_ctrl = make_kl_controller(**kl_controller_options(penalty_cfg.algo))
    scores = reference_token_scores(batch)
    rewards, advantages, kl_metrics, kl_now = rewards_and_advantages(penalty_cfg, kl_ctrl, batch, scores, new_lp, ref_lp, eos_token_id=0)
    kl_checks = {"ref_lp": ref_lp, "new_lp": new_lp, "grads_plain": grads_plain, "grads_kl": grads_kl,
                 "metrics_kl": metrics_kl, "scores": scores, "rewards": rewards, "advantages": advantages,
                 "kl_metrics": kl_metrics, "kl_now": kl_now}
p2p_all = [None] * dist.get_world_size()
dist.all_gather_object(p2p_all, sorted(p2p_dtypes))
logits_all = [None] * dist.get_world_size()
dist.all_gather_object(logits_all, sorted(logits_dtypes))
logits_dtypes = {x for rank in logits_all for x in rank}
if dist.get_rank() == 0:
    saved = torch.load(out)
    saved["p2p_dtypes"] = sorted({x for rank in p2p_all for x in rank})
    saved["logits_dtypes"] = sorted(logits_dtypes)
    saved["kl"] = kl_checks

    torch.save(saved, out)
shutdown_distributed()  # barrier, then megatron's groups and the world, workers joined or idle
