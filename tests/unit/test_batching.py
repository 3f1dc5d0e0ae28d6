"""Micro-batch planning, DP balancing and model-input construction for the actor."""

import pytest
import torch

from luffy_megatron.actor.batching import (
    RolloutBatch,
    balance_rows,
    build_micro_batch,
    padded_cost,
    plan_micro_batches,
    split_mini_batches,
)


def test_balance_rows_equal_counts_and_similar_tokens():
    lengths = [100, 10, 90, 20, 80, 30, 70, 40]
    parts = balance_rows(lengths, 2)
    assert sorted(sum(parts, [])) == list(range(8)) and all(len(p) == 4 for p in parts)
    totals = [sum(lengths[i] for i in p) for p in parts]
    assert abs(totals[0] - totals[1]) <= 20
    assert balance_rows(lengths, 2) == parts  # deterministic: every rank computes the same split
    with pytest.raises(ValueError, match="evenly"):
        balance_rows(lengths[:7], 2)


def test_token_budget_micro_batches_fit_and_cover():
    lengths = [500, 40, 480, 30, 35, 510, 45, 20]
    rows = list(range(8))
    plan = plan_micro_batches(lengths, rows, max_tokens=1024, packed=False)
    assert sorted(sum(plan, [])) == rows
    for mb in plan:
        assert len(mb) * max(lengths[i] for i in mb) <= 1024 or len(mb) == 1
    # long rows go together, short rows go together: little padding
    assert padded_cost(lengths, plan, packed=False) / sum(lengths) < 1.1
    naive = split_mini_batches(rows, 2)
    assert padded_cost(lengths, naive, packed=False) / sum(lengths) > 1.5


def test_packed_plan_is_first_fit_decreasing():
    lengths = [600, 500, 400, 300, 200, 100]
    plan = plan_micro_batches(lengths, list(range(6)), max_tokens=1000, packed=True)
    assert all(sum(lengths[i] for i in mb) <= 1000 for mb in plan)
    assert len(plan) == 3 and padded_cost(lengths, plan, packed=True) == sum(lengths)


def test_oversized_row_gets_its_own_micro_batch():
    plan = plan_micro_batches([5000, 10, 10], [0, 1, 2], max_tokens=100, packed=False)
    assert plan[0] == [0] and sorted(plan[1]) == [1, 2]


def test_micro_batch_positions_and_targets():
    batch = RolloutBatch(
        prompts=[[11, 12, 13], [21]],
        responses=torch.tensor([[31, 32, 9, 0], [41, 42, 43, 44]]),
        response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        prefix_mask=torch.zeros(2, 4, dtype=torch.bool),
        group_ids=[0, 0],
    )
    mb = build_micro_batch(batch, [0, 1], pad_token_id=0, pad_multiple=4)
    assert mb.input_ids.tolist() == [[11, 12, 13, 31, 32, 9, 0, 0], [21, 41, 42, 43, 44, 0, 0, 0]]
    assert mb.num_tokens == 6 + 5
    # logits at resp_index (flat positions) predict the response tokens
    for b in range(2):
        for j in range(4):
            if mb.resp_mask[b, j]:
                assert mb.targets.view(-1)[mb.resp_index[b, j]] == batch.responses[b, j]
    assert mb.resp_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert mb.cu_seqlens is None


def test_packed_micro_batch_thd_layout():
    from luffy_megatron.actor.batching import build_packed_micro_batch

    batch = RolloutBatch(
        prompts=[[11, 12, 13], [21]],
        responses=torch.tensor([[31, 32, 9, 0], [41, 42, 43, 44]]),
        response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        prefix_mask=torch.zeros(2, 4, dtype=torch.bool),
        group_ids=[0, 0],
    )
    mb = build_packed_micro_batch(batch, [0, 1], pad_token_id=0, pad_multiple=2)
    assert mb.input_ids.tolist() == [[11, 12, 13, 31, 32, 9, 21, 41, 42, 43, 44, 0]]
    assert mb.cu_seqlens.tolist() == [0, 6, 12] and mb.max_seqlen == 6  # row 2: 5 tokens -> 6
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    assert mb.targets[0, 5] == 0  # the last token of row 1 does not predict row 2's first token
    flat = mb.targets.view(-1)
    for b in range(2):
        for j in range(4):
            if mb.resp_mask[b, j]:
                assert flat[mb.resp_index[b, j]] == batch.responses[b, j]


def test_rollout_batch_validates_shapes():
    with pytest.raises(ValueError, match="responses must be"):
        RolloutBatch(
            prompts=[[1]],
            responses=torch.zeros(2, 3),
            response_mask=torch.zeros(1, 3),
            prefix_mask=torch.zeros(1, 3),
            group_ids=[0],
        )
    with pytest.raises(ValueError, match="empty prompt"):
        RolloutBatch(
            prompts=[[]],
            responses=torch.zeros(1, 3),
            response_mask=torch.zeros(1, 3),
            prefix_mask=torch.zeros(1, 3),
            group_ids=[0],
        )


# ----- FP8 / sequence-parallel / context-parallel padding, equal micro-batch counts (GPU readiness 4, 7) -----

from luffy_megatron.actor.batching import (  # noqa: E402
    build_packed_micro_batch,
    empty_micro_batch,
    micro_batch_counts,
    padding_multiples,
)


def _batch(lengths_prompt_resp):
    prompts = [list(range(1, p + 1)) for p, _ in lengths_prompt_resp]
    width = max(r for _, r in lengths_prompt_resp)
    resp = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(resp)
    for i, (_, r) in enumerate(lengths_prompt_resp):
        resp[i, :r] = torch.arange(100, 100 + r)
        mask[i, :r] = 1
    return RolloutBatch(
        prompts=prompts,
        responses=resp,
        response_mask=mask,
        prefix_mask=torch.zeros_like(mask, dtype=torch.bool),
        group_ids=list(range(len(prompts))),
    )


@pytest.mark.parametrize("tp,sp,cp", [(1, False, 1), (2, True, 1), (4, True, 2), (1, False, 4), (8, True, 1)])
def test_fp8_padding_makes_every_local_token_count_divisible_by_16(tp, sp, cp):
    """TE's FP8 GEMMs assert the token dimension divisible by 16 (`assert_dim_for_fp8_exec`): after the
    CP shard and the sequence-parallel split, the local token count of every micro-batch must be."""
    batch = _batch([(5, 7), (3, 30), (11, 2)])
    row, total = padding_multiples(tp=tp, sequence_parallel=sp, cp=cp, fp8=True, packed=False)
    assert total == 1
    mb = build_micro_batch(batch, [0, 1, 2], pad_token_id=0, pad_multiple=row)
    s = mb.input_ids.shape[1]
    assert s % (2 * cp if cp > 1 else 1) == 0
    local_tokens = s // cp // (tp if sp else 1)
    assert local_tokens % 16 == 0 and s >= 33
    # without FP8 only CP and SP shape the padding
    row_no_fp8, _ = padding_multiples(tp=tp, sequence_parallel=sp, cp=cp, fp8=False, packed=False)
    assert row_no_fp8 == max(2 * cp if cp > 1 else 1, cp * (tp if sp else 1))


@pytest.mark.parametrize("tp,sp,cp", [(1, False, 1), (2, True, 1), (2, True, 2), (1, False, 4)])
def test_fp8_packed_rows_get_a_final_padding_segment(tp, sp, cp):
    batch = _batch([(5, 7), (3, 30), (11, 2)])
    row, total = padding_multiples(tp=tp, sequence_parallel=sp, cp=cp, fp8=True, packed=True)
    assert row == (2 * cp if cp > 1 else 1)  # each sequence only for CP: no per-row FP8 padding
    mb = build_packed_micro_batch(batch, [0, 1, 2], pad_token_id=0, pad_multiple=row, total_multiple=total)
    cu = mb.cu_seqlens.tolist()
    seq_lens = [12, 33, 13]
    padded = [-(-n // row) * row for n in seq_lens]
    assert cu[:4] == [0, padded[0], padded[0] + padded[1], sum(padded)]
    t = mb.input_ids.shape[1]
    assert t == cu[-1] and (t // cp // (tp if sp else 1)) % 16 == 0
    if t != sum(padded):  # the final segment: padding only, its own sequence, CP-divisible
        assert len(cu) == 5 and (cu[4] - cu[3]) % row == 0
        assert (mb.input_ids[0, cu[3] :] == 0).all()
        assert mb.position_ids[0, cu[3] :].tolist() == list(range(cu[4] - cu[3]))
    # the response layout still points at the real rows' tokens
    assert mb.input_ids.view(-1)[mb.resp_index[1, :30] + 1].tolist() == list(range(100, 130))


def test_empty_micro_batch_has_tokens_and_no_rows():
    mb = empty_micro_batch(pad_token_id=7, length=32, packed=True)
    assert mb.rows == [] and mb.num_tokens == 0 and mb.input_ids.shape == (1, 32)
    assert (mb.input_ids == 7).all() and mb.cu_seqlens.tolist() == [0, 32] and mb.max_seqlen == 32
    assert empty_micro_batch(pad_token_id=0, length=16, packed=False).cu_seqlens is None


def test_micro_batch_counts_equal_across_ranks_and_multiple_of_pp():
    assert micro_batch_counts([3, 1, 2, 0], equal_across_ranks=True) == [3, 3, 3, 3]
    assert micro_batch_counts([3, 1, 2, 0], equal_across_ranks=False) == [3, 1, 2, 0]
    assert micro_batch_counts([3, 1, 2, 0], equal_across_ranks=False, multiple=2) == [4, 2, 2, 0]
    assert micro_batch_counts([3, 1], equal_across_ranks=True, multiple=4) == [4, 4]


class _PlanOnly:
    """The attributes `MegatronActor._micro_batches` reads, without building a model."""

    def __init__(self, dp_size, dp_rank, *, equal, multiple=1):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(
            actor=SimpleNamespace(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=64, ppo_micro_batch_size=2)
        )
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.equal_micro_batches, self.micro_batch_multiple = equal, multiple
        self.packed, self.pad_token_id = False, 0
        self.row_multiple, self.total_multiple = 16, 1

    from luffy_megatron.actor.megatron_actor import MegatronActor

    _plan = MegatronActor._plan


@pytest.mark.parametrize("equal", [True, False])
def test_actor_pads_every_dp_rank_to_the_same_micro_batch_count(equal):
    """Rank 0 gets long rows (many micro-batches), rank 1 short ones (one): under FP8 both must run the
    same number; the extra ones are empty (no rows) and padded to the FP8 multiple."""
    from luffy_megatron.actor.megatron_actor import MegatronActor

    batch = _batch([(20, 30), (20, 28), (20, 25), (2, 3), (2, 2), (2, 4)])
    rows_by_rank = [[0, 1, 2], [3, 4, 5]]
    counts = []
    for rank in range(2):
        stub = _PlanOnly(2, rank, equal=equal)
        micro = MegatronActor._micro_batches(stub, batch, rows_by_rank)
        counts.append(len(micro))
        real = [m for m in micro if m.rows]
        assert sorted(r for m in real for r in m.rows) == rows_by_rank[rank]
        for m in micro:
            assert m.input_ids.shape[1] % 16 == 0
    assert counts == ([3, 3] if equal else [3, 1])
