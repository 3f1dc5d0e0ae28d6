"""torchrun script: vocab-parallel log-prob/entropy at TP = world size vs the full-vocabulary computation."""

import torch
import torch.distributed as dist

from luffy_megatron.algo.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy
from luffy_megatron.models.parallel import bind_local_device, ensure_process_group, shutdown_distributed
from tests.dist.launcher import report

ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
device = bind_local_device() or torch.device("cpu")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
T, V = 45, 1000
logits = (torch.randn(T, V) * 4).to(device)
target = torch.randint(0, V, (T,)).to(device)
g_logp, g_ent = torch.randn(T).to(device), torch.randn(T).to(device)
shard = V // world
checks = {}
for temperature in (1.0, 0.6):
    full = logits.clone().requires_grad_(True)
    lp_ref, ent_ref = naive_logprob_entropy(full, target, temperature=temperature)
    (lp_ref * g_logp + ent_ref * g_ent).sum().backward()

    local = logits[:, rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprob_entropy(local * 1.0, target, temperature=temperature, chunk_tokens=16, vocab_start=rank * shard, tp_group=dist.group.WORLD)
    (lp * g_logp + ent * g_ent).sum().backward()
    grad_parts = [torch.empty_like(local.grad) for _ in range(world)]
    dist.all_gather(grad_parts, local.grad.contiguous())
    grad = torch.cat(grad_parts, dim=-1)
    checks[str(temperature)] = {
        "logp_max_err": (lp - lp_ref).abs().max().item(),
        "entropy_max_err": (ent - ent_ref).abs().max().item(),
        "grad_max_rel_err": ((grad - full.grad).abs().max() / full.grad.abs().max()).item(),
    }
if rank == 0:
    report({"world": world, "checks": checks})
shutdown_distributed()  # barrier, then megatron's groups and the world, workers joined or idle
