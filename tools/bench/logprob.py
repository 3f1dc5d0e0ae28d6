#!/usr/bin/env python
"""Peak extra memory and time of per-token log-prob + entropy (forward and backward) at a real vocabulary.

Ours: `luffy_megatron.algo.logprob.vocab_parallel_logprob_entropy` (chunked, own backward, gradient written
over the logits buffer). Baseline: the naive full-logits path (log_softmax + gather + softmax entropy,
autograd). Both start from the same logits, produced by an output-layer matmul as in a real model, and
backpropagate into that layer. In bf16 (the GPU training dtype) a second comparison: ours on the bf16 logits
as the actor hands them over (`Float16Module(..., fp32_output=False)`) against ours after megatron-core's
default fp32 upcast of the whole logits tensor (`fp32_output=True`), which is what the actor avoids.
Each method runs in its own child process, so its peak resident memory
(ru_maxrss) minus the peak once the inputs and one logits-sized buffer existed is its peak extra memory
(what the log-prob computation adds on top of the logits); the time is the
median of a few repetitions in the same child. Last line: JSON, ratios = naive / ours.

    python tools/bench/logprob.py [--tokens 2048] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, tokens: int, vocab: int, hidden: int, chunk: int, reps: int) -> dict:
    import torch

    from luffy_megatron.algo.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy

    torch.manual_seed(0)
    torch.set_num_threads(2)
    dtype = torch.bfloat16 if method.startswith("bf16") else torch.float32
    h = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, dtype=dtype) * 0.05).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens,))
    g_logp, g_ent = torch.randn(tokens), torch.randn(tokens) * 1e-3

    def step():
        logits = h @ w.t()  # [T, V], the output layer
        if method == "naive":
            logp, ent = naive_logprob_entropy(logits, target)
        elif method == "bf16_fp32_output":  # megatron-core's default: the whole logits tensor upcast
            logp, ent = vocab_parallel_logprob_entropy(logits.float(), target, chunk_tokens=chunk)
        else:  # "ours", "bf16_ours": the logits in their own dtype, upcast one chunk at a time
            logp, ent = vocab_parallel_logprob_entropy(logits, target, chunk_tokens=chunk)
        (logp * g_logp + ent * g_ent).sum().backward()
        h.grad = w.grad = None

    with torch.no_grad():
        logits_bytes = tokens * vocab * torch.empty((), dtype=dtype).element_size()
        probe = h @ w.t()  # allocate once so the baseline includes one logits-sized buffer, like the run
        del probe
    baseline = _maxrss_bytes()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    # Memory beyond the logits themselves (which the model produces either way): the baseline already
    # held one logits-sized buffer at its peak.
    peak_extra = max(_maxrss_bytes() - baseline, 1)
    return {"peak_extra_bytes": peak_extra, "time_s": statistics.median(times), "logits_bytes": logits_bytes}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", choices=["naive", "ours", "bf16_ours", "bf16_fp32_output"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.hidden, args.chunk, args.reps)))
        return 0
    results = {}
    for method in ("ours", "naive", "bf16_ours", "bf16_fp32_output"):
        print(f"[logprob] {method}: {args.tokens} tokens x vocab {args.vocab} ...", flush=True)
        cmd = [sys.executable, __file__, "--child", method] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "vocab", "hidden", "chunk", "reps")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[method] = json.loads(out)
        r = results[method]
        print(
            f"[logprob] {method}: peak extra {r['peak_extra_bytes'] / 2**30:.2f} GiB, {r['time_s']:.3f} s/step",
            flush=True,
        )
    ours, naive = results["ours"], results["naive"]
    print(
        json.dumps(
            {
                "tokens": args.tokens,
                "vocab": args.vocab,
                "logits_gib": round(ours["logits_bytes"] / 2**30, 3),
                "naive_peak_extra_gib": round(naive["peak_extra_bytes"] / 2**30, 3),
                "ours_peak_extra_gib": round(ours["peak_extra_bytes"] / 2**30, 3),
                "naive_time_s": round(naive["time_s"], 4),
                "ours_time_s": round(ours["time_s"], 4),
                "peak_mem_ratio": round(naive["peak_extra_bytes"] / ours["peak_extra_bytes"], 2),
                "time_ratio": round(naive["time_s"] / ours["time_s"], 2),
                "bf16_logits_gib": round(results["bf16_ours"]["logits_bytes"] / 2**30, 3),
                "bf16_ours_peak_extra_gib": round(results["bf16_ours"]["peak_extra_bytes"] / 2**30, 3),
                "bf16_fp32_output_peak_extra_gib": round(results["bf16_fp32_output"]["peak_extra_bytes"] / 2**30, 3),
                "bf16_peak_mem_ratio": round(
                    results["bf16_fp32_output"]["peak_extra_bytes"] / results["bf16_ours"]["peak_extra_bytes"], 2
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
