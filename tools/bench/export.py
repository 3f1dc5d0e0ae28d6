#!/usr/bin/env python
"""Benchmark: streaming HF-weight export from a sharded megatron-core model (TP=2, gloo, CPU).

    python tools/bench/export.py [--hidden 512 --layers 8 --vocab 16384 --bucket-mb 64 --repeat 3]

Run plainly it relaunches itself under `torchrun --nproc_per_node=2` (TP=2). In the same run it times
a plain memory-to-memory copy of the same bytes (the same tensor sizes, each copied into a new tensor) and
two uses of the exporter (`luffy_megatron/convert/export.py`):

* `export_vs_copy_ratio` (copy seconds / export seconds, larger is better): the export the weight sync runs
  every step (`plan_flat_buckets(all_stages=False)` + `export_flat_buckets(everywhere=False)`): HF-named flat
  buckets assembled on TP rank 0, the other rank's shards received straight into their place in the bucket,
  into the transport's two reused bucket buffers.
* `iter_export_vs_copy_ratio`: `iter_hf_weight_buckets`, where every rank ends with every bucket (both ranks
  exchange shards) in buckets it allocates per call (conversion, tests).

The last output line is one JSON object.
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
    env = dict(
        os.environ,
        LUFFY_BENCH_CHILD="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        f"--master_port={port}",
        "--master_addr=127.0.0.1",
        os.path.abspath(__file__),
        *sys.argv[1:],
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode or 1
    print(lines[-1])
    return 0


def build_model(args):
    """This rank's chunks of a random Qwen2 of the given shape, sharded TP over the whole world, and its arch."""
    import torch  # lazy: only the torchrun child (not the launcher) loads torch and the model code
    import torch.distributed as dist

    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
    from luffy_megatron.models.parallel import init_model_parallel

    init_model_parallel(dist.get_world_size(), 1)
    arch = read_hf_arch(
        dict(
            model_type="qwen2",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
        )
    )
    torch.manual_seed(0)
    return build_model_chunks(arch), arch


def time_iter_export(chunks, arch, bucket_bytes: int, repeat: int):
    """Seconds of each of `repeat` `iter_hf_weight_buckets` passes, the exported tensors' shapes, the last stats."""
    import torch.distributed as dist  # lazy: only the torchrun child loads torch and the exporter

    from luffy_megatron.convert.export import ExportStats, iter_hf_weight_buckets

    export_s, sizes = [], []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        stats = ExportStats()
        sizes = []
        for bucket in iter_hf_weight_buckets(chunks, arch, bucket_bytes=bucket_bytes, stats=stats):
            sizes.extend(t.shape for _, t in bucket)
            del bucket
        export_s.append(time.perf_counter() - t0)
    return export_s, sizes, stats


def time_sync_export(chunks, arch, bucket_bytes: int, repeat: int):
    """Seconds of each of `repeat` weight-sync exports (after one untimed pass), the plan and the last stats.

    The weight sync's export: this stage's buckets, assembled on TP rank 0 into two reused buffers."""
    import torch  # lazy: only the torchrun child loads torch and the exporter
    import torch.distributed as dist

    from luffy_megatron.convert.export import ExportStats, export_flat_buckets, plan_flat_buckets

    plan = plan_flat_buckets(chunks, arch, bucket_bytes=bucket_bytes, all_stages=False)
    size = max(b.nbytes for b in plan)
    slots = [torch.empty(size, dtype=torch.uint8) for _ in range(2)] if dist.get_rank() == 0 else None
    sync_s = []
    for _ in range(repeat + 1):  # the first pass touches the buffers' pages (a sync reuses them every step)
        dist.barrier()
        t0 = time.perf_counter()
        k = [0]

        def buffer_for(bucket):
            k[0] += 1
            return slots[k[0] % 2]

        sync_stats = ExportStats()
        for bucket, buf in export_flat_buckets(plan, arch, buffer_for, everywhere=False, stats=sync_stats):
            pass
        dist.barrier()
        sync_s.append(time.perf_counter() - t0)
    return sync_s[1:], plan, sync_stats


def time_copy(sizes: list, repeat: int) -> list:
    """Baseline: seconds of each of `repeat` allocations and copies of tensors of `sizes`, memory to memory."""
    import torch  # lazy: only the torchrun child loads torch

    sources = [torch.randn(s) for s in sizes]
    copy_s = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for src in sources:
            dst = torch.empty_like(src)
            dst.copy_(src)
            del dst
        copy_s.append(time.perf_counter() - t0)
    return copy_s


def child(args) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from luffy_megatron.models.parallel import shutdown_distributed

    tp = dist.get_world_size()
    chunks, arch = build_model(args)
    bucket_bytes = int(args.bucket_mb * 1024**2)

    export_s, sizes, stats = time_iter_export(chunks, arch, bucket_bytes, args.repeat)
    total = stats.exported_bytes
    iter_peak = stats.peak_bytes

    sync_s, plan, sync_stats = time_sync_export(chunks, arch, bucket_bytes, args.repeat)
    assert sync_stats.exported_bytes == total

    copy_s = time_copy(sizes, args.repeat)

    best_copy, best_sync, best_iter = min(copy_s), min(sync_s), min(export_s)
    if dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    "bench": "export",
                    "tp": tp,
                    "pp": 1,
                    "hf_bytes": total,
                    "num_tensors": len(sizes),
                    "num_buckets": len(plan),
                    "bucket_bytes": bucket_bytes,
                    "copy_s": round(best_copy, 4),
                    "export_s": round(best_sync, 4),
                    "iter_export_s": round(best_iter, 4),
                    "copy_bytes_per_s": round(total / best_copy),
                    "export_bytes_per_s": round(total / best_sync),
                    "iter_export_bytes_per_s": round(total / best_iter),
                    "peak_tracked_bytes": sync_stats.peak_bytes,
                    "iter_peak_tracked_bytes": iter_peak,
                    "export_vs_copy_ratio": round(best_copy / best_sync, 3),
                    "iter_export_vs_copy_ratio": round(best_copy / best_iter, 3),
                }
            )
        )
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    a = parse()
    sys.exit(child(a) if os.environ.get("LUFFY_BENCH_CHILD") == "1" else launch(a))
