#!/usr/bin/env python
"""Benchmark: a full weight sync from a TP=2 Megatron actor into two running vLLM engines, per transport.

    python tools/bench/sync.py [--hidden 512 --layers 8 --vocab 16384 --bucket-mb <rollout.weight_sync_bucket_mb>
                               --repeat 5 --engines 2]

A random Qwen2 of the given shape (fp32; ~156 MB at the defaults) is written as HF files; a local Ray cluster
holds 2 Megatron rank actors (TP=2, gloo) built from it and `--engines` vLLM-CPU engines (TP=1) started from it.
Per transport (object_store, shared_memory, collective) one untimed sync sets it up (process groups, shared
buffers), then `--repeat` full syncs are timed on the driver: export, transfer, every engine's load and the
close of the update session, until the engines can generate with the new weights. In the same run, rank 0
copies the same bytes once, memory to memory (the same tensor sizes, each into a new tensor): the baseline.

The last output line is one JSON object: `<transport>_vs_copy_ratio` = copy seconds / sync seconds (larger is
better), `<transport>_s`, `bytes`, `copies` (what each transport does to every byte, counted in the code) and
`<transport>_engine_side_s`: how long, in the last sync, the busiest engine spent in the calls that bring buckets
in and load them (for collective that includes receiving), so sync time minus it is what the transport adds on
the critical path. The engines load directly into vLLM's kernel format (rollout/direct_load.py, `engine_load`);
`--layerwise` also times `shared_memory` with vLLM's own layerwise reload (`shared_memory_layerwise_*`, and
`direct_vs_layerwise_ratio` = layerwise seconds / direct seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TRANSPORTS = ("object_store", "shared_memory", "collective")
# Per byte of the model, before the engine's load (the direct load packs each linear weight from the received
# buffer in place: one more copy per engine; embeddings, lm_head and norms are also copied into their parameters).
COPIES = {
    "shared_memory": "1 write per byte into the sender's /dev/shm bucket (each TP rank writes its own shards into "
    "the mapped file), then each engine worker reads the mapping in place",
    "collective": "1 write into the sender's bucket, then per engine worker 1 gloo broadcast into its receive "
    "buffer (socket write + read), read in place",
    "object_store": "1 write into the sender's bucket, 1 copy into Ray's object store, per engine 1 copy into "
    "its /dev/shm handoff file, read in place by the worker",
}


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    from luffy_megatron.config import RolloutConfig

    p.add_argument(
        "--bucket-mb",
        type=float,
        default=RolloutConfig.weight_sync_bucket_mb,
        help="bucket size (default: the trainer's, rollout.weight_sync_bucket_mb)",
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--transports", default=",".join(TRANSPORTS))
    p.add_argument("--timeline", action="store_true", help="print each engine's calls during the last sync")
    p.add_argument(
        "--layerwise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time shared_memory with vLLM's layerwise reload instead of the direct load",
    )
    return p.parse_args()


def make_model(args, out: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    return out


def run_sync(actor, fleet, bucket_bytes: int, transport: str) -> dict:
    from luffy_megatron.sync.weights import sync_actor_to_engines

    return sync_actor_to_engines(actor, fleet, bucket_bytes=bucket_bytes, transport=transport, timeout_s=600).as_dict()


def plain_copy(actor, sizes: list, repeat: int) -> float:
    """Seconds of the best of `repeat` copies of tensors of `sizes` (bytes) into new tensors."""
    import torch

    sources = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in sizes]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for src in sources:
            dst = torch.empty_like(src)
            dst.copy_(src)
            del dst
        best = min(best, time.perf_counter() - t0)
    return best


def tensor_sizes(hf: Path) -> tuple[list, list[int]]:
    """The shapes of the HF checkpoint's tensors and their sizes in bytes (the model is fp32)."""
    import torch  # lazy: the driver loads torch and safetensors only once it runs (not for --help)
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        dtype_bytes = 4
    return sizes, [int(torch.Size(s).numel()) * dtype_bytes for s in sizes]


def actor_overrides(hf: Path) -> list[str]:
    """Config overrides for the TP=2 fp32 Megatron actor built from the HF files in `hf`."""
    return [
        f"model.path={hf}",
        "parallel.n_gpus_per_node=2",
        "parallel.tensor_model_parallel_size=2",
        "parallel.use_distributed_optimizer=false",
        "model.dtype=fp32",
        "model.transformer_impl=local",
        "rollout.tensor_model_parallel_size=1",
    ]


def engine_options(args) -> dict:
    """`EngineFleet.start` options: `args.engines` vLLM-CPU engines (TP=1, fp32, eager)."""
    return dict(
        num_engines=args.engines,
        max_model_len=256,
        dtype="float32",
        max_num_seqs=4,
        seed=0,
        enforce_eager=True,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"},
    )


def sync_runs(args) -> list[tuple[str, bool]]:
    """(transport, direct load) pairs to time: each transport's direct load, then shared_memory's layerwise one."""
    runs = [(t, True) for t in args.transports.split(",")]
    if args.layerwise and "shared_memory" in args.transports.split(","):
        runs.append(("shared_memory", False))
    return runs


def time_transport(args, actors, fleet, bucket: int, transport: str, direct: bool, copy_s: float, result: dict):
    """One untimed set-up sync, then `args.repeat` timed syncs over `transport`; adds their numbers to `result`."""
    import ray  # lazy: the tool loads Ray only when it runs (main)

    ray.get([e.call.remote("set_direct_load", direct) for e in fleet.engines])
    key = transport if direct else f"{transport}_layerwise"
    stats = actors.run(run_sync, fleet, bucket, transport)  # set-up: groups, shared buffers
    assert stats["engine_load"] == ("direct" if direct else "layerwise"), stats["engine_load"]
    assert stats["bytes"] == result["bytes"], (stats["bytes"], result["bytes"])
    times = []
    for _ in range(args.repeat):
        t0, wall0 = time.perf_counter(), time.time()
        actors.run(run_sync, fleet, bucket, transport)
        times.append(time.perf_counter() - t0)
    t0 = wall0
    # the engines' own side of the last sync: their calls that receive and load buckets (vLLM's reload)
    busy = [
        sum(b - a for name, a, b in events if a >= t0 and name in ("load_weights_rpc", "load_flat_bucket"))
        for events in ray.get([e.get_calls.remote() for e in fleet.engines])
    ]
    result[f"{key}_engine_side_s"] = round(max(busy), 4)
    best = min(times)
    result[f"{key}_s"] = round(best, 4)
    result[f"{key}_vs_copy_ratio"] = round(copy_s / best, 3)
    result[f"{key}_buckets"] = stats["buckets"]
    result["engine_load"] = stats["engine_load"] if direct else result.get("engine_load", "")
    print(json.dumps({"transport": key, "seconds": [round(t, 4) for t in times]}), flush=True)
    if args.timeline:
        print_timeline(fleet, transport, t0)


def print_timeline(fleet, transport: str, t0: float) -> None:
    """Print each engine's calls since `t0` (wall clock), relative to it."""
    import ray  # lazy: the tool loads Ray only when it runs (main)

    for i, events in enumerate(ray.get([e.get_calls.remote() for e in fleet.engines])):
        last = [ev for ev in events if ev[1] >= t0]
        print(
            json.dumps(
                {
                    "transport": transport,
                    "engine": i,
                    "calls": [(name, round(a - t0, 4), round(b - t0, 4)) for name, a, b in last],
                }
            ),
            flush=True,
        )


def summarize(args, result: dict) -> None:
    """Add the best transport, the direct/layerwise ratio and each transport's copies to `result`."""
    ratios = {t: result[f"{t}_vs_copy_ratio"] for t in args.transports.split(",")}
    result["best_transport"] = max(ratios, key=ratios.get)
    if "shared_memory_layerwise_s" in result:
        result["direct_vs_layerwise_ratio"] = round(result["shared_memory_layerwise_s"] / result["shared_memory_s"], 3)
    result["copies"] = {t: COPIES[t] for t in ratios}


def main() -> int:
    args = parse()
    import ray

    from luffy_megatron.cluster.actor_group import ActorGroup
    from luffy_megatron.cluster.placement import reserve
    from luffy_megatron.config import load_config
    from luffy_megatron.rollout.ray_engine import EngineFleet
    from luffy_megatron.utils.ray_auth import private_token_for_local_cluster

    work = Path(tempfile.mkdtemp(prefix="luffy-bench-sync-"))
    hf = make_model(args, work / "hf")
    sizes, tensor_bytes = tensor_sizes(hf)
    private_token_for_local_cluster("local")  # token auth, with a token of this run's own
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=1024**3,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    cfg = load_config(None, actor_overrides(hf))
    actors = fleet = None
    try:
        fleet = EngineFleet.start(str(hf), **engine_options(args))
        actors = ActorGroup(reserve(cfg))
        actors.build(cfg, str(hf), 0)
        bucket = int(args.bucket_mb * 2**20)
        result = {
            "bench": "sync",
            "tp": 2,
            "pp": 1,
            "engines": args.engines,
            "bucket_bytes": bucket,
            "bytes": sum(tensor_bytes),
            "num_tensors": len(sizes),
        }
        copy_s = actors.run(plain_copy, tensor_bytes, max(3, args.repeat))
        result["copy_s"] = round(copy_s, 4)
        for transport, direct in sync_runs(args):
            time_transport(args, actors, fleet, bucket, transport, direct, copy_s, result)
        summarize(args, result)
        print(json.dumps(result), flush=True)
    finally:
        if fleet is not None:
            fleet.close()
        if actors is not None:
            actors.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
