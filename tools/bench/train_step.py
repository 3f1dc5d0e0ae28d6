#!/usr/bin/env python
"""Update-step throughput and padding overhead of the Megatron actor on CPU, LUFFY-like batch.

The batch mimics LUFFY's length spread: each group of n rows has one long demonstration (the
off-policy trace) and n-1 short generations. Two runs of the same update in one process:
  baseline: fixed-size micro-batches in row order (no token budget; every micro-batch padded to its
            longest row, so short generations sit next to long traces);
  ours:     token-budgeted micro-batches of similar-length rows (actor.use_dynamic_bsz).
Padding overhead = tokens computed / real tokens, for both, and for the packed (THD) plan the GPU path
uses with Transformer Engine. Last line: JSON; ratios are baseline / ours.

    python tools/bench/train_step.py [--prompts 8] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def make_model(out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def make_batch(prompts: int, n: int, width: int, seed: int = 0):
    from luffy_megatron.actor.batching import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    rows, lengths, prefix = [], [], torch.zeros(prompts * n, width, dtype=torch.bool)
    for p in range(prompts):
        prompt = torch.randint(1, 1000, (int(torch.randint(40, 100, (1,), generator=g)),), generator=g).tolist()
        for k in range(n):
            rows.append(prompt)
            if k == 0:
                lengths.append(int(torch.randint(width * 3 // 4, width + 1, (1,), generator=g)))  # demonstration
                prefix[p * n, : lengths[-1]] = True
            else:
                lengths.append(int(torch.randint(16, width // 4, (1,), generator=g)))  # short generation
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    responses = torch.randint(1, 1000, (prompts * n, width), generator=g) * mask
    return RolloutBatch(
        prompts=rows,
        responses=responses,
        response_mask=mask,
        prefix_mask=prefix,
        group_ids=[i // n for i in range(prompts * n)],
    )


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    return ap.parse_args()


def micro_batch_prompts(args) -> int:
    """Prompts per fixed micro-batch: whole prompts (actor.ppo_micro_batch_size is in prompts, as upstream), as many
    rows as fit the token budget at the longest length, and dividing the mini-batch."""
    fit = max(1, args.budget // (args.width + 100) // args.n)
    return max(d for d in range(1, fit + 1) if args.prompts % d == 0)


def padding_overheads(args, batch, lengths: list, real: int, micro_prompts: int) -> dict:
    """Tokens computed / real tokens of the baseline, token-budgeted (ours) and packed micro-batch plans; printed."""
    from luffy_megatron.actor.batching import (  # lazy: Megatron's modules load only once the bench runs
        padded_cost,
        plan_micro_batches,
        split_mini_batches,
    )

    rows = list(range(batch.num_rows))
    plans = {
        "baseline": split_mini_batches(rows, micro_prompts * args.n),
        "ours": plan_micro_batches(lengths, rows, max_tokens=args.budget, packed=False),
        "packed": plan_micro_batches(lengths, rows, max_tokens=args.budget, packed=True),
    }
    overhead = {k: padded_cost(lengths, v, packed=k == "packed") / real for k, v in plans.items()}
    print(
        f"[train_step] {batch.num_rows} rows, {real} real tokens; padding overhead: "
        + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items()),
        flush=True,
    )
    return overhead


def config_overrides(args, micro_prompts: int) -> list[str]:
    """Config overrides shared by both runs (they differ in actor.use_dynamic_bsz)."""
    return [
        "parallel.n_gpus_per_node=1",
        "parallel.use_distributed_optimizer=false",
        "model.dtype=fp32",
        "model.transformer_impl=local",
        f"rollout.n={args.n}",
        "rollout.tensor_model_parallel_size=1",
        f"data.train_batch_size={args.prompts}",
        "data.max_prompt_length=128",
        f"data.max_response_length={args.width}",
        f"actor.ppo_mini_batch_size={args.prompts}",
        f"actor.ppo_max_token_len_per_gpu={args.budget}",
        f"actor.ppo_micro_batch_size={micro_prompts}",
        "trainer.total_training_steps=100",
    ]


def make_advantages(batch, width: int):
    """Advantages of the batch with a 0/1 reward (every third row rewarded) on each row's last response token."""
    from luffy_megatron.algo import compute_advantages  # lazy: Megatron's modules load only once the bench runs

    rewards = torch.zeros(batch.num_rows, width)
    for i, n in enumerate(batch.response_lengths()):
        rewards[i, n - 1] = float(i % 3 == 0)
    return compute_advantages(
        token_level_rewards_BT=rewards,
        response_mask_BT=batch.response_mask,
        prefix_mask_BT=batch.prefix_mask,
        group_ids=batch.group_ids,
    )


def time_updates(args, common: list[str], hf_dir: Path, batch, adv, real: int) -> dict:
    """Best seconds per update of `args.reps` (after a warm-up) for baseline then ours, one actor for both; printed."""
    from luffy_megatron.actor.megatron_actor import MegatronActor  # lazy: Megatron's modules load only once it runs
    from luffy_megatron.config import load_config

    times = {}
    actor = None
    for name, dynamic in (("baseline", "false"), ("ours", "true")):
        cfg = load_config(None, common + [f"actor.use_dynamic_bsz={dynamic}"])
        if actor is None:
            actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)
        actor.cfg = cfg
        old_lp, _ = actor.compute_log_probs(batch)
        actor.update(batch, advantages=adv, old_log_probs=old_lp)  # warm-up
        samples = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            actor.update(batch, advantages=adv, old_log_probs=old_lp)
            samples.append(time.perf_counter() - t0)
        times[name] = min(samples)
        print(f"[train_step] {name}: {times[name]:.2f} s/update, {real / times[name]:.0f} real tokens/s", flush=True)
    return times


def main() -> int:
    args = parse()

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    hf_dir = make_model(tmp / "model")
    batch = make_batch(args.prompts, args.n, args.width)
    lengths = batch.sequence_lengths()
    real = sum(lengths)
    micro_prompts = micro_batch_prompts(args)
    overhead = padding_overheads(args, batch, lengths, real, micro_prompts)

    common = config_overrides(args, micro_prompts)
    adv = make_advantages(batch, args.width)
    times = time_updates(args, common, hf_dir, batch, adv, real)
    print(
        json.dumps(
            {
                "rows": batch.num_rows,
                "real_tokens": real,
                "tokens_per_s_baseline": round(real / times["baseline"], 1),
                "tokens_per_s_ours": round(real / times["ours"], 1),
                "time_ratio": round(times["baseline"] / times["ours"], 2),
                "padding_overhead_baseline": round(overhead["baseline"], 3),
                "padding_overhead_ours": round(overhead["ours"], 3),
                "padding_overhead_packed": round(overhead["packed"], 3),
                "padding_ratio": round(overhead["baseline"] / overhead["ours"], 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
