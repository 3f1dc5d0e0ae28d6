"""Micro-batch planning, DP balancing and model-input construction for the actor."""

import torch
import pytest

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
        RolloutBatch(prompts=[[1]], responses=torch.zeros(2, 3), response_mask=torch.zeros(1, 3), prefix_mask=torch.zeros(1, 3), group_ids=[0])
    with pytest.raises(ValueError, match="empty prompt"):
        RolloutBatch(prompts=[[]], responses=torch.zeros(1, 3), response_mask=torch.zeros(1, 3), prefix_mask=torch.zeros(1, 3), group_ids=[0])
