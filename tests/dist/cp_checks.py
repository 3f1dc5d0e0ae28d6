"""torchrun script (world = CP size): the actor's context-parallel path on a toy position-wise model.

Each CP rank shards the micro-batch (padded and packed), runs the toy model on its tokens, computes per-token
log-probs with the actor's own `_token_logprobs` (which gathers every rank's tokens back), the LUFFY loss on
whole rows, and backward with megatron-core's CP loss factor; gradients are then averaged over the CP group
as megatron's DDP averages over DP x CP. Rank 0 compares everything with the same computation unsharded on
one process and reports the largest differences. (The toy model has no attention: its logits at a position
depend on that token only, so sharding changes nothing but the layout; CP attention itself is TE's.)"""

from types import SimpleNamespace

import torch
import torch.distributed as dist

from luffy_megatron.actor.batching import build_micro_batch, build_packed_micro_batch
from luffy_megatron.actor.context_parallel import shard_micro_batch
from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.algo.loss import microbatch_policy_loss
from luffy_megatron.models.parallel import (
    bind_local_device,
    ensure_process_group,
    init_model_parallel,
    shutdown_distributed,
)
from tests.dist.actor_fixtures import make_batch, reference_advantages
from tests.dist.launcher import report

VOCAB, HIDDEN = 500, 16
ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
DEVICE = bind_local_device() or torch.device("cpu")
cp = dist.get_world_size()
init_model_parallel(1, 1, None, cp)
from megatron.core import parallel_state as ps  # noqa: E402

cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
batch = make_batch(vocab=VOCAB)
adv = reference_advantages(batch)
old_lp = torch.randn(batch.num_rows, batch.response_width, generator=torch.Generator().manual_seed(1)) * 0.1 - 3.0  # same on every rank


def actor_view(group):
    return SimpleNamespace(cfg=SimpleNamespace(rollout=SimpleNamespace(temperature=0.7), actor=SimpleNamespace(log_prob_chunk_tokens=5)),
                           tp_rank=0, vocab_local=VOCAB, arch=SimpleNamespace(vocab_size=VOCAB), tp_group=None, cp_group=group)


def run(mb, shard, group):
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(VOCAB, HIDDEN).to(DEVICE), torch.nn.Linear(HIDDEN, VOCAB).to(DEVICE)
    ids = (mb.input_ids if shard is None else shard.input_ids).to(DEVICE)
    logits = head(emb(ids))
    lp, ent = MegatronActor._token_logprobs(actor_view(group), mb, shard, logits)
    rows, width = mb.rows, lp.shape[1]
    on = {"old_log_prob_BT": old_lp[rows, :width], "advantages_BT": adv[rows, :width],
          "response_mask_BT": mb.resp_mask, "prefix_mask_BT": batch.prefix_mask[rows, :width]}
    loss, _ = microbatch_policy_loss(log_prob_BT=lp, entropy_BT=ent, max_response_length=batch.response_width,
                                     entropy_coeff=0.01, **{k: v.to(DEVICE) for k, v in on.items()})
    scale = 1 if shard is None else cp  # megatron-core's schedule multiplies each micro-batch loss by the CP size
    (loss * scale).backward()
    grads = [emb.weight.grad, head.weight.grad, head.bias.grad]
    if shard is not None:  # DDP: average over the DP x CP group (DP = 1 here)
        for g in grads:
            dist.all_reduce(g, group=group)
            g /= cp
    return lp.detach(), ent.detach(), loss.detach(), grads


out = {}
rows = list(range(batch.num_rows))
for layout, mb in (("bshd", build_micro_batch(batch, rows, pad_token_id=0, pad_multiple=2 * cp)),
                   ("thd", build_packed_micro_batch(batch, rows, pad_token_id=0, pad_multiple=2 * cp))):
    shard = shard_micro_batch(mb.input_ids, mb.position_ids, mb.targets, cp_size=cp, cp_rank=cp_rank, cu_seqlens=mb.cu_seqlens)
    assert shard.input_ids.shape[1] == mb.input_ids.shape[1] // cp
    lp, ent, loss, grads = run(mb, shard, cp_group)
    ref_lp, ref_ent, ref_loss, ref_grads = run(mb, None, None)
    out[layout] = {
        "lp": (lp - ref_lp).abs().max().item(),
        "ent": (ent - ref_ent).abs().max().item(),
        "loss": abs(loss.item() - ref_loss.item()),
        "grad": max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)),
        "local_tokens": int(shard.input_ids.numel()),
        "tokens": int(mb.input_ids.numel()),
        "lp_nonzero": int((ref_lp != 0).sum()),
    }
if dist.get_rank() == 0:
    report(out)
shutdown_distributed()  # barrier, then megatron's groups and the world, workers joined or idle
