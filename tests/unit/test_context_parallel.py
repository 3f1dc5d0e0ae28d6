"""Context-parallel sharding of micro-batches (GPU readiness item 3): 2 x CP load-balanced chunks for padded
(BSHD, megatron-core's slicing) and packed (THD, Transformer Engine's layout) rows; unshard(shard(x)) == x.
The collective gather and the loss from shards are checked across real CP ranks in
tests/dist/test_context_parallel.py."""

import pytest
import torch

from luffy_megatron.actor.batching import RolloutBatch, build_micro_batch, build_packed_micro_batch
from luffy_megatron.actor.context_parallel import shard_micro_batch, thd_partitioned_indices, unshard
from luffy_megatron.models.parallel import ensure_process_group


@pytest.fixture(scope="module", autouse=True)
def process_group():
    ensure_process_group()  # megatron-core's slicing reads group sizes only once torch.distributed is up


def _batch():
    g = torch.Generator().manual_seed(0)
    lens = [(5, 9), (3, 17), (8, 2), (4, 6)]
    prompts = [torch.randint(1, 99, (p,), generator=g).tolist() for p, _ in lens]
    resp = torch.randint(1, 99, (4, 17), generator=g)
    mask = (torch.arange(17).unsqueeze(0) < torch.tensor([r for _, r in lens]).unsqueeze(1)).long()
    return RolloutBatch(
        prompts=prompts,
        responses=resp * mask,
        response_mask=mask,
        prefix_mask=torch.zeros_like(mask, dtype=torch.bool),
        group_ids=[0, 0, 1, 1],
    )


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_bshd_chunks_are_load_balanced_and_unshard_inverts_shard(cp):
    mb = build_micro_batch(_batch(), [0, 1, 2, 3], pad_token_id=0, pad_multiple=2 * cp)
    b, s = mb.input_ids.shape
    chunk = s // (2 * cp)
    mask = (mb.input_ids != 0).long()  # a per-position mask travels like the tokens
    shards = [shard_micro_batch(mb.input_ids, mb.position_ids, mb.targets, cp_size=cp, cp_rank=r) for r in range(cp)]
    for r, sh in enumerate(shards):
        assert sh.input_ids.shape == (b, 2 * chunk)
        # rank r holds chunks r and 2cp-1-r of every row (the causal work is balanced)
        want = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))
        assert sh.position_ids[0].tolist() == want
        assert torch.equal(sh.input_ids, mb.input_ids[:, want]) and torch.equal(sh.targets, mb.targets[:, want])
        assert torch.equal(sh.flat_positions[r], (torch.arange(b).unsqueeze(1) * s + torch.tensor(want)).reshape(-1))
    for name in ("input_ids", "targets", "position_ids"):
        full = unshard([getattr(sh, name).reshape(-1) for sh in shards], shards[0].flat_positions, b * s)
        assert torch.equal(full.view(b, s), getattr(mb, name))
    local_masks = [mask.view(-1)[shards[0].flat_positions[r]] for r in range(cp)]
    assert torch.equal(unshard(local_masks, shards[0].flat_positions, b * s).view(b, s), mask)


@pytest.mark.parametrize("cp", [2, 3])
def test_thd_partition_matches_te_layout_and_unshard_inverts_shard(cp):
    mb = build_packed_micro_batch(_batch(), [0, 1, 2, 3], pad_token_id=0, pad_multiple=2 * cp)
    cu = mb.cu_seqlens.tolist()
    total = mb.input_ids.shape[1]
    shards = [
        shard_micro_batch(mb.input_ids, mb.position_ids, mb.targets, cp_size=cp, cp_rank=r, cu_seqlens=mb.cu_seqlens)
        for r in range(cp)
    ]
    seen = []
    for r, sh in enumerate(shards):
        want = []
        for a, e in zip(cu[:-1], cu[1:]):  # per sequence: chunks r and 2cp-1-r of its padded length
            c = (e - a) // (2 * cp)
            want += list(range(a + r * c, a + (r + 1) * c)) + list(
                range(a + (2 * cp - 1 - r) * c, a + (2 * cp - r) * c)
            )
        assert thd_partitioned_indices(mb.cu_seqlens, cp, r).tolist() == want
        assert torch.equal(sh.input_ids[0], mb.input_ids[0, want]) and sh.input_ids.shape[1] == total // cp
        seen += want
    assert sorted(seen) == list(range(total))  # every token on exactly one rank
    for name in ("input_ids", "targets", "position_ids"):
        full = unshard([getattr(sh, name).reshape(-1) for sh in shards], shards[0].flat_positions, total)
        assert torch.equal(full.view(1, total), getattr(mb, name))


def test_sequences_not_divisible_by_2cp_are_refused():
    mb = build_micro_batch(_batch(), [0], pad_token_id=0, pad_multiple=1)  # 14 tokens
    with pytest.raises(ValueError, match="not divisible by 2 x CP = 4"):
        shard_micro_batch(mb.input_ids, mb.position_ids, mb.targets, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="padded length 19 is not divisible by 2 x CP = 4"):
        thd_partitioned_indices(torch.tensor([0, 19]), 2, 0)


def test_packed_rows_on_the_host_never_reach_te_kernel(monkeypatch):
    """B1: the actor shards its micro-batch while its tensors are on the host. Transformer Engine's partitioned-index
    kernel reads `cu_seqlens` on the GPU and returns a CUDA tensor, so a host tensor must never reach it; with TE
    importable (stubbed here) the shard is still TE's layout, on the micro-batch's device."""
    import sys
    import types

    handed = []

    def kernel(cu_seqlens, total, cp_size, cp_rank):
        handed.append(cu_seqlens.device.type)
        if cu_seqlens.device.type != "cuda":
            raise RuntimeError("thd_get_partitioned_indices: cu_seqlens is not a CUDA tensor")
        return thd_partitioned_indices(cu_seqlens, cp_size, cp_rank)

    monkeypatch.setitem(
        sys.modules, "transformer_engine_torch", types.SimpleNamespace(thd_get_partitioned_indices=kernel)
    )
    mb = build_packed_micro_batch(_batch(), [0, 1, 2, 3], pad_token_id=0, pad_multiple=4)
    cu = mb.cu_seqlens.tolist()
    for r in range(2):
        sh = shard_micro_batch(
            mb.input_ids, mb.position_ids, mb.targets, cp_size=2, cp_rank=r, cu_seqlens=mb.cu_seqlens
        )
        want = [
            i
            for a, e in zip(cu[:-1], cu[1:])
            for c in (r, 3 - r)
            for i in range(a + c * (e - a) // 4, a + (c + 1) * (e - a) // 4)
        ]
        assert sh.input_ids.device.type == "cpu" and sh.flat_positions.device.type == "cpu"
        assert sh.position_ids[0].tolist() == mb.position_ids[0, want].tolist()
        assert torch.equal(sh.input_ids[0], mb.input_ids[0, want]) and torch.equal(sh.targets[0], mb.targets[0, want])
    assert "cpu" not in handed
