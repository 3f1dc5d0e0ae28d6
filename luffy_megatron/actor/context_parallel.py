"""Context parallelism (CP) for the actor's micro-batches: shard the sequence, gather per-token results back.

Causal attention makes the end of a sequence costlier than its start, so every sequence is cut into 2 x CP
chunks and CP rank r holds chunks r and 2*CP-1-r (Megatron-LM's and Transformer Engine's load-balanced
layout). Padded rows (BSHD, [b, s]) are sharded by megatron-core's own `get_batch_on_this_cp_rank`; packed
rows (THD, one row of concatenated sequences with `cu_seqlens`) by `thd_partitioned_indices` below: Transformer
Engine's `thd_get_partitioned_indices` layout, computed in torch on the host (tested equal to TE's kernel in
tests/gpu). TE's kernel is not called: it reads `cu_seqlens` on the GPU and writes a CUDA tensor, while the
micro-batch tensors it indexes live on the host here; a few hundred integers per micro-batch need no kernel.

Per-token results are then gathered back to the full micro-batch (`gather_tokens`) so that the LUFFY loss
sees whole rows: its token-mean and sequence terms are not sums over tokens, so they cannot be computed
per shard. Every CP rank computes the same full loss; the backward of the gather hands each rank the
gradient of its own tokens only. megatron-core's schedule multiplies each micro-batch loss by the CP size and
DDP averages gradients over DP x CP, so the weight gradient is (sum over CP ranks of their share) / DP: the
same step as without CP (checked in tests/dist/test_context_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class _FixedGroup:
    """The two methods of a process group that megatron-core's batch slicing reads (`size`, `rank`), for
    computing the layout of any CP rank without being that rank."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def bshd_shard(tensors: dict[str, Tensor], cp_size: int, cp_rank: int) -> dict[str, Tensor]:
    """CP rank `cp_rank`'s part of [b, s, ...] tensors (s divisible by 2 x cp_size): megatron-core's
    `get_batch_on_this_cp_rank`, asked for that rank."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp_size == 1:
        return dict(tensors)
    for key, t in tensors.items():
        if t.shape[1] % (2 * cp_size):
            raise ValueError(f"{key}: sequence length {t.shape[1]} is not divisible by 2 x CP = {2 * cp_size}")
    if not dist.is_initialized():
        raise RuntimeError("context-parallel sharding needs torch.distributed initialized")
    return get_batch_on_this_cp_rank(dict(tensors), cp_group=_FixedGroup(cp_size, cp_rank))


def thd_partitioned_indices(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Token indices of a packed row that CP rank `cp_rank` holds, in its local order: for each sequence
    (padded length divisible by 2 x cp_size), its chunks `cp_rank` and `2*cp_size-1-cp_rank`. The layout of
    Transformer Engine's `thd_get_partitioned_indices` (transformer_engine/common/fused_attn)."""
    cu = [int(x) for x in cu_seqlens_padded.tolist()]
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"packed sequence of padded length {length} is not divisible by 2 x CP = {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass
class CPShard:
    """One CP rank's view of a micro-batch: its tokens, positions and targets, and where every rank's
    tokens sit in the flattened full micro-batch (`flat_positions[r]`, the same length for every rank)."""

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    flat_positions: Tensor  # [cp, n_local] long: index into input_ids.view(-1) of the full micro-batch
    total_tokens: int  # numel of the full micro-batch


def shard_micro_batch(
    input_ids: Tensor,
    position_ids: Tensor,
    targets: Tensor,
    *,
    cp_size: int,
    cp_rank: int,
    cu_seqlens: Optional[Tensor] = None,
) -> CPShard:
    """This CP rank's part of a micro-batch. `cu_seqlens` (padded offsets) marks a packed (THD) row."""
    b, s = input_ids.shape
    flat = torch.arange(b * s, device=input_ids.device).view(b, s)
    tensors = {"tokens": input_ids, "position_ids": position_ids, "targets": targets, "flat": flat}
    if cu_seqlens is None:
        local = bshd_shard(tensors, cp_size, cp_rank)
        positions = torch.stack([bshd_shard({"flat": flat}, cp_size, r)["flat"].reshape(-1) for r in range(cp_size)])
    else:
        if b != 1:
            raise ValueError(f"a packed (THD) micro-batch is one row, got {b}")
        index = [thd_partitioned_indices(cu_seqlens, cp_size, r).to(input_ids.device) for r in range(cp_size)]
        local = {k: v.index_select(1, index[cp_rank]) for k, v in tensors.items()}
        positions = torch.stack(index)
    return CPShard(local["tokens"], local["position_ids"], local["targets"], positions, b * s)


def unshard(local_by_rank: list[Tensor], flat_positions: Tensor, total_tokens: int) -> Tensor:
    """The full flat [total_tokens, ...] tensor from every rank's local flat part (inverse of the shard)."""
    first = local_by_rank[0]
    full = first.new_zeros((total_tokens, *first.shape[1:]))
    for r, part in enumerate(local_by_rank):
        full[flat_positions[r].to(part.device)] = part
    return full


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, flat_positions, total_tokens, group):
        cp = dist.get_world_size(group)
        flat = torch.empty(cp * local.shape[0], *local.shape[1:], dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(flat, local.contiguous(), group=group)
        ctx.save_for_backward(flat_positions[dist.get_rank(group)].to(local.device))
        return unshard(list(flat.view(cp, *local.shape).unbind(0)), flat_positions, total_tokens)

    @staticmethod
    def backward(ctx, grad_full):
        (mine,) = ctx.saved_tensors
        # Every CP rank computed the same loss from the full tensor: its tokens' share is its gradient.
        return grad_full[mine], None, None, None


def gather_tokens(local: Tensor, shard: CPShard, group) -> Tensor:
    """Per-token values of this rank's tokens ([n_local, ...], local order) -> the full micro-batch's
    ([total_tokens, ...], flat order) on every CP rank; differentiable."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return _GatherTokens.apply(local, shard.flat_positions, shard.total_tokens, group)
