#!/usr/bin/env python
"""Benchmark: streaming HF-weight export from a sharded megatron-core model (TP=2, gloo, CPU).

    python tools/bench/export.py [--hidden 512 --layers 8 --vocab 16384 --bucket-mb 64 --repeat 3]

Run plainly it relaunches itself under `torchrun --nproc_per_node=2` (TP=2). It measures bytes of
HF tensors produced per second by `iter_hf_weight_buckets` and, in the same run, a plain
memory-to-memory copy of the same bytes (the same tensor sizes). The last output line is one
JSON object; `copy_over_export_ratio` = baseline (plain copy) throughput / export throughput.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    return p.parse_args()


def launch(args) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, LUFFY_BENCH_CHILD="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={port}", "--master_addr=127.0.0.1", os.path.abspath(__file__), *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode or 1
    print(lines[-1])
    return 0


def child(args) -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from luffy_megatron.convert.export import ExportStats, iter_hf_weight_buckets
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
    from luffy_megatron.models.parallel import init_model_parallel

    tp = dist.get_world_size()
    init_model_parallel(tp, 1)
    arch = read_hf_arch(dict(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                             num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                             tie_word_embeddings=False, max_position_embeddings=1024))
    torch.manual_seed(0)
    chunks = build_model_chunks(arch)
    bucket_bytes = int(args.bucket_mb * 1024**2)

    export_s, sizes = [], []
    for _ in range(args.repeat):
        dist.barrier()
        t0 = time.perf_counter()
        stats = ExportStats()
        sizes = []
        for bucket in iter_hf_weight_buckets(chunks, arch, bucket_bytes=bucket_bytes, stats=stats):
            sizes.extend(t.shape for _, t in bucket)
            del bucket
        export_s.append(time.perf_counter() - t0)
    total = stats.exported_bytes

    # baseline: allocate and copy the same tensors' bytes, memory to memory, in this process
    sources = [torch.randn(s) for s in sizes]
    copy_s = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for src in sources:
            dst = torch.empty_like(src)
            dst.copy_(src)
            del dst
        copy_s.append(time.perf_counter() - t0)

    export_bps, copy_bps = total / min(export_s), total / min(copy_s)
    if dist.get_rank() == 0:
        print(json.dumps({
            "bench": "export", "tp": tp, "pp": 1, "hf_bytes": total, "num_tensors": len(sizes),
            "bucket_bytes": bucket_bytes, "peak_tracked_bytes": stats.peak_bytes,
            "export_bytes_per_s": round(export_bps), "copy_bytes_per_s": round(copy_bps),
            "export_s": round(min(export_s), 4), "copy_s": round(min(copy_s), 4),
            "copy_over_export_ratio": round(copy_bps / export_bps, 3),
        }))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    a = parse()
    sys.exit(child(a) if os.environ.get("LUFFY_BENCH_CHILD") == "1" else launch(a))
