"""Turning a rollout batch into model inputs: data-parallel balancing, mini-batches, token-budget
micro-batches and padding. Pure Python/tensor code, decided once per step and tested on its own.

Row i of a step is `prompt_i + response_i[:n_i]`, where n_i counts its valid response tokens (up to and
including the first EOS). Only valid tokens are computed: what a micro-batch costs is its padded size
(rows x longest row) on the padding path, or the sum of its lengths when sequences are packed (THD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch


@dataclass
class RolloutBatch:
    """The rows of one training step, as produced by rollout composition (`algo.composition`).

    `responses`, `response_mask` and `prefix_mask` are [B, L] with L = max_response_length.
    `group_ids[i]` identifies row i's prompt group (upstream `uid`). `target_probs` (only with
    `algo.use_off_policy_probs`): [B, L] float32 teacher probabilities on the demonstration-prefix tokens,
    -1 elsewhere (`algo.composition.prefix_target_probs`)."""

    prompts: list[list[int]]
    responses: torch.Tensor
    response_mask: torch.Tensor
    prefix_mask: torch.Tensor
    group_ids: list[Hashable]
    target_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B = len(self.prompts)
        for name in ("responses", "response_mask", "prefix_mask"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[0] != B:
                raise ValueError(f"RolloutBatch.{name} must be [B={B}, L], got {tuple(t.shape)}")
        if self.target_probs is not None and tuple(self.target_probs.shape) != tuple(self.responses.shape):
            raise ValueError(
                f"RolloutBatch.target_probs must be [B, L] = {tuple(self.responses.shape)} like responses, "
                f"got {tuple(self.target_probs.shape)}"
            )
        if len(self.group_ids) != B:
            raise ValueError(f"RolloutBatch has {B} rows but {len(self.group_ids)} group ids")
        if any(len(p) == 0 for p in self.prompts):
            raise ValueError("RolloutBatch has an empty prompt: every row needs at least one prompt token")

    @property
    def num_rows(self) -> int:
        return len(self.prompts)

    @property
    def response_width(self) -> int:
        return self.responses.shape[1]

    def response_lengths(self) -> list[int]:
        return self.response_mask.sum(-1).tolist()

    def sequence_lengths(self) -> list[int]:
        return [len(p) + n for p, n in zip(self.prompts, self.response_lengths())]

    def check_target_probs(self, *, enabled: bool) -> None:
        """With `enabled` (`algo.options.uses_target_probs`), refuse a batch without teacher probabilities,
        so the option can never be ignored silently. Every rank calls it before any forward."""
        if enabled and self.target_probs is None:
            raise ValueError(
                "algo.use_off_policy_probs=true but this RolloutBatch has no target_probs: build it with "
                "the teacher probabilities (trainer.generate_and_mix does, from data.target_probs_key)"
            )

    def loss_target_probs(
        self, rows: Sequence[int], width: int, *, enabled: bool, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """`target_probs_BT` of the loss for `rows`, cut to `width` response tokens, when the off-policy ratio
        uses teacher probabilities (`enabled`), else None."""
        if not enabled:
            return None
        self.check_target_probs(enabled=True)
        return self.target_probs[list(rows), :width].to(device)

    def check_behaviour_log_probs(self, behaviour_log_probs: torch.Tensor | None, *, mode: str) -> None:
        """With algo.rollout_is other than none, refuse an update without the engines' log-probs (float [B, L],
        NaN where no engine sampled the token), so the setting can never be ignored silently."""
        if mode == "none":
            return
        if behaviour_log_probs is None:
            raise ValueError(
                f"algo.rollout_is={mode} but the update got no behaviour_log_probs: pass the engines' log-probs "
                "(train/step_parts.rollout_correction builds them from the rollout record)"
            )
        if tuple(behaviour_log_probs.shape) != tuple(self.responses.shape):
            raise ValueError(
                f"behaviour_log_probs must be [B, L] = {tuple(self.responses.shape)} like responses, "
                f"got {tuple(behaviour_log_probs.shape)}"
            )


def balance_rows(lengths: Sequence[int], num_parts: int) -> list[list[int]]:
    """Split row indices into `num_parts` equal-count parts with similar token totals (upstream's
    `_balance_batch` goal): longest rows first, each to the part with the fewest tokens that still
    has room. Deterministic, so every rank computes the same assignment. Parts keep ascending order."""
    if len(lengths) % num_parts:
        raise ValueError(f"{len(lengths)} rows cannot be split evenly over {num_parts} data-parallel ranks")
    per_part = len(lengths) // num_parts
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    totals = [0] * num_parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min((k for k in range(num_parts) if len(parts[k]) < per_part), key=lambda k: (totals[k], k))
        parts[k].append(i)
        totals[k] += lengths[i]
    return [sorted(p) for p in parts]


def contiguous_rows(num_rows: int, num_parts: int) -> list[list[int]]:
    """The rows cut into `num_parts` equal consecutive parts, in batch order (actor.balance_batch=false:
    upstream's data-parallel dispatch without `_balance_batch`)."""
    if num_rows % num_parts:
        raise ValueError(f"{num_rows} rows cannot be split evenly over {num_parts} data-parallel ranks")
    per_part = num_rows // num_parts
    return [list(range(k * per_part, (k + 1) * per_part)) for k in range(num_parts)]


def rows_per_rank(prompts: int, n: int, dp_size: int) -> int:
    """Upstream's batch-size normalisation (mix_fsdp_worker): a size in prompts becomes rows per data-parallel
    rank, `prompts * n // dp`; used for ppo_mini_batch_size and ppo_micro_batch_size."""
    rows = prompts * n
    if rows % dp_size:
        raise ValueError(
            f"{prompts} prompts x rollout.n={n} = {rows} rows do not split over {dp_size} data-parallel ranks"
        )
    return rows // dp_size


def gradient_accumulation(cfg) -> int:
    """The divisor upstream applies to every micro-batch loss: ppo_mini_batch_size // ppo_micro_batch_size
    (both in prompts, so n and the DP size cancel), also under dynamic batch sizes."""
    a = cfg.actor
    return max(a.ppo_mini_batch_size // micro_batch_prompts(a), 1)


def micro_batch_prompts(actor_cfg) -> int:
    """actor.ppo_micro_batch_size in prompts (None: the whole mini-batch)."""
    a = actor_cfg
    return a.ppo_micro_batch_size if a.ppo_micro_batch_size is not None else a.ppo_mini_batch_size


def split_mini_batches(rows: Sequence[int], rows_per_mini_batch: int) -> list[list[int]]:
    """Consecutive mini-batches of a rank's rows (upstream `batch.split(ppo_mini_batch_size)`)."""
    if rows_per_mini_batch <= 0:
        raise ValueError(f"rows_per_mini_batch={rows_per_mini_batch} must be positive")
    return [list(rows[i : i + rows_per_mini_batch]) for i in range(0, len(rows), rows_per_mini_batch)]


def plan_micro_batches(
    lengths: dict[int, int] | Sequence[int], rows: Sequence[int], *, max_tokens: int, packed: bool
) -> list[list[int]]:
    """Group `rows` into micro-batches whose cost fits `max_tokens` (dynamic batch size).

    Padding path: rows sorted by length, longest first, cut into the fewest contiguous micro-batches
    (then the least padding), so each holds rows of similar length and its cost `rows x longest`
    wastes little. Packed path: first-fit decreasing on the sum of lengths. A single row longer than
    the budget gets a micro-batch of its own."""
    length = lengths.__getitem__
    order = sorted(rows, key=lambda i: (-length(i), i))
    if packed:
        bins: list[list[int]] = []
        loads: list[int] = []
        for i in order:
            for b, load in enumerate(loads):
                if load + length(i) <= max_tokens:
                    bins[b].append(i)
                    loads[b] += length(i)
                    break
            else:
                bins.append([i])
                loads.append(length(i))
        return bins
    return _fewest_padded_segments(order, [length(i) for i in order], max_tokens)


def _fewest_padded_segments(order: list[int], lens: list[int], max_tokens: int) -> list[list[int]]:
    """Cut rows sorted by decreasing length into contiguous micro-batches: as few as possible, and
    among those the least padding (exact dynamic programme, O(n^2); n is a rank's mini-batch)."""
    n = len(order)
    INF = (n + 1, 0)
    best: list[tuple[int, int]] = [(0, 0)] + [INF] * n  # (micro-batches, padded tokens) for order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            rows, longest = j - i, lens[i]
            if rows > 1 and rows * longest > max_tokens:
                break  # earlier starts are longer still
            cand = (best[i][0] + 1, best[i][1] + rows * longest)
            if cand < best[j]:
                best[j], cut[j] = cand, i
    segments, j = [], n
    while j > 0:
        segments.append(order[cut[j] : j])
        j = cut[j]
    return segments[::-1]


def micro_batch_counts(counts: Sequence[int], *, equal_across_ranks: bool, multiple: int = 1) -> list[int]:
    """How many micro-batches each data-parallel rank runs this step, given the counts it planned.

    `equal_across_ranks`: every DP rank runs the same number (FP8 delayed scaling all-reduces amax over
    TP x DP at every autocast exit, so a rank with fewer micro-batches would leave the others waiting in
    that collective forever). `multiple`: the interleaved (virtual) pipeline schedule of megatron-core
    0.16 needs the count to be a multiple of the pipeline size (`microbatch_group_size_per_vp_stage`
    defaults to it). Ranks with fewer real micro-batches run empty ones (`empty_micro_batch`)."""
    target = max(counts) if equal_across_ranks else None
    return [-(-(c if target is None else target) // multiple) * multiple for c in counts]


def padding_multiples(*, tp: int, sequence_parallel: bool, cp: int, fp8: bool, packed: bool) -> tuple[int, int]:
    """(per-row multiple, per-micro-batch total multiple) for the token layout of a micro-batch.

    Context parallelism cuts every sequence into 2 x CP chunks; sequence parallelism splits the (local)
    tokens over TP ranks; Transformer Engine's FP8 GEMMs need the local token count divisible by 16
    (`assert_dim_for_fp8_exec`). Padded rows (BSHD) put all of it on the row length s; packed rows (THD)
    pad each sequence only for CP and the packed total for the rest (a final padding segment)."""
    chunks = 2 * cp if cp > 1 else 1
    local = (tp if sequence_parallel else 1) * (16 if fp8 else 1)  # what the per-CP-rank token count needs
    if packed:
        return chunks, math.lcm(chunks, cp * local)
    return math.lcm(chunks, cp * local), 1


def padded_cost(
    lengths: Sequence[int], micro_batches: Sequence[Sequence[int]], *, packed: bool, multiple: int = 1
) -> int:
    """Tokens actually computed for a micro-batch plan (to compare with sum of real lengths)."""
    total = 0
    for mb in micro_batches:
        if packed:
            total += sum(-(-lengths[i] // multiple) * multiple for i in mb)
        else:
            longest = max(lengths[i] for i in mb)
            total += len(mb) * (-(-longest // multiple) * multiple)
    return total


@dataclass
class MicroBatch:
    """Model inputs for some rows: right-padded to a common length [b, s], or packed into one row
    [1, sum of lengths] with `cu_seqlens` (THD layout, Transformer Engine attention).

    `targets` (shape of `input_ids`) holds at each position the token that position predicts (the next
    one in the same sequence). `resp_index[k, j]` is the FLAT position (into `input_ids.view(-1)`) whose
    logits predict row k's response token j; only meaningful where `resp_mask` is 1. Per-token training
    tensors are cut to this micro-batch's longest response."""

    rows: list[int]
    input_ids: torch.Tensor  # [b, s] or [1, t]
    position_ids: torch.Tensor
    targets: torch.Tensor
    resp_index: torch.Tensor  # [rows, l]
    resp_mask: torch.Tensor  # [rows, l]
    num_tokens: int  # real tokens (prompt + valid response) in the micro-batch
    cu_seqlens: torch.Tensor | None = None  # [rows + 1] int32 start offsets when packed
    max_seqlen: int = 0


def _sequences(batch: RolloutBatch, rows: Sequence[int]) -> tuple[list[list[int]], list[int]]:
    lengths = batch.response_lengths()
    return [list(batch.prompts[i]) + batch.responses[i, : lengths[i]].tolist() for i in rows], [
        lengths[i] for i in rows
    ]


def _response_layout(
    starts: torch.Tensor, prompt_lens: torch.Tensor, resp_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat index of the logits predicting response token j of each row, and the valid-token mask."""
    l_mb = max(int(resp_lens.max()), 1)
    j = torch.arange(l_mb)
    resp_mask = (j.unsqueeze(0) < resp_lens.unsqueeze(1)).long()
    last = (starts + prompt_lens + resp_lens - 1).unsqueeze(1)  # keep masked columns in range
    resp_index = torch.minimum((starts + prompt_lens - 1).unsqueeze(1) + j.unsqueeze(0), last)
    return resp_index, resp_mask


def build_micro_batch(
    batch: RolloutBatch, rows: Sequence[int], *, pad_token_id: int, pad_multiple: int = 1
) -> MicroBatch:
    seqs, resp_lens = _sequences(batch, rows)
    s = max(len(x) for x in seqs)
    s = -(-s // pad_multiple) * pad_multiple
    b = len(rows)
    input_ids = torch.full((b, s), pad_token_id, dtype=torch.long)
    for k, seq in enumerate(seqs):
        input_ids[k, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    targets = torch.full_like(input_ids, pad_token_id)
    targets[:, :-1] = input_ids[:, 1:]
    prompt_lens = torch.tensor([len(batch.prompts[i]) for i in rows])
    resp_index, resp_mask = _response_layout(torch.arange(b) * s, prompt_lens, torch.tensor(resp_lens))
    return MicroBatch(
        rows=list(rows),
        input_ids=input_ids,
        position_ids=torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        targets=targets,
        resp_index=resp_index,
        resp_mask=resp_mask,
        num_tokens=sum(len(x) for x in seqs),
    )


def build_packed_micro_batch(
    batch: RolloutBatch, rows: Sequence[int], *, pad_token_id: int, pad_multiple: int = 1, total_multiple: int = 1
) -> MicroBatch:
    """Rows concatenated into one sequence of length sum(len_i) (each length rounded up to
    `pad_multiple`, e.g. 2 x context-parallel size), positions restarting at 0 per row, and
    `cu_seqlens` for THD attention: no token attends across rows and no padding is computed.
    When the packed total is not a multiple of `total_multiple` (FP8, sequence parallel), a final
    segment of padding tokens (a sequence of its own, a multiple of `pad_multiple`) is appended."""
    seqs, resp_lens = _sequences(batch, rows)
    padded = [-(-len(x) // pad_multiple) * pad_multiple for x in seqs]
    tail = -sum(padded) % total_multiple
    if tail % pad_multiple:
        raise ValueError(f"total_multiple={total_multiple} must be a multiple of pad_multiple={pad_multiple}")
    starts = torch.tensor([0] + padded + ([tail] if tail else [])).cumsum(0)
    total = int(starts[-1])
    input_ids = torch.full((1, total), pad_token_id, dtype=torch.long)
    targets = torch.full_like(input_ids, pad_token_id)
    position_ids = torch.zeros_like(input_ids)
    for k, seq in enumerate(seqs):
        a = int(starts[k])
        input_ids[0, a : a + len(seq)] = torch.tensor(seq, dtype=torch.long)
        targets[0, a : a + len(seq) - 1] = input_ids[0, a + 1 : a + len(seq)]  # never the next row's token
        position_ids[0, a : a + padded[k]] = torch.arange(padded[k])
    if tail:
        position_ids[0, total - tail :] = torch.arange(tail)
    prompt_lens = torch.tensor([len(batch.prompts[i]) for i in rows])
    resp_index, resp_mask = _response_layout(starts[: len(rows)], prompt_lens, torch.tensor(resp_lens))
    return MicroBatch(
        rows=list(rows),
        input_ids=input_ids,
        position_ids=position_ids,
        targets=targets,
        resp_index=resp_index,
        resp_mask=resp_mask,
        num_tokens=sum(len(x) for x in seqs),
        cu_seqlens=starts.to(torch.int32),
        max_seqlen=max(padded + [tail]),
    )


def empty_micro_batch(*, pad_token_id: int, length: int, packed: bool) -> MicroBatch:
    """A micro-batch of `length` padding tokens and no rows: it runs forward and backward (so every rank
    takes part in the same collectives) and contributes nothing to the loss or the log-probs."""
    input_ids = torch.full((1, length), pad_token_id, dtype=torch.long)
    return MicroBatch(
        rows=[],
        input_ids=input_ids,
        position_ids=torch.arange(length).unsqueeze(0),
        targets=input_ids.clone(),
        resp_index=torch.zeros(0, 1, dtype=torch.long),
        resp_mask=torch.zeros(0, 1, dtype=torch.long),
        num_tokens=0,
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32) if packed else None,
        max_seqlen=length if packed else 0,
    )
