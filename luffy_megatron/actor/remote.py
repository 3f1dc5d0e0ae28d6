"""Functions the driver runs on every Megatron rank (collectives: each rank must take part), through
`GuardedRanks.run(fn, ...)`: `fn(actor, ...)` is called with the rank's `MegatronActor`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from luffy_megatron.actor import checkpoint
from luffy_megatron.convert.hf_io import copy_side_files, write_hf_safetensors
from luffy_megatron.sync.weights import sync_actor_to_engines
from luffy_megatron.utils.fs import atomic_dir


def export_hf(actor, out_dir, record: dict | None = None) -> str:
    """The actor's current weights as an HF model directory (safetensors in the model's dtype, config and
    tokenizer from model.path), written by global rank 0 into a temporary directory renamed into place;
    `record` goes to metrics.json beside it."""
    weights = actor.export_hf_weights()
    if dist.get_rank() != 0:
        for _ in weights:  # every rank takes part in the gathers
            pass
        dist.barrier()
        return str(out_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtypes: set = set()

    def on_host():
        for name, t in weights:
            dtypes.add(t.dtype)
            yield name, t.detach().to("cpu")

    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_hf_safetensors(tmp, on_host())
        dtype = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None
        copy_side_files(actor.hf_dir, tmp, dtype=dtype)
        if record is not None:
            (tmp / "metrics.json").write_text(json.dumps(record) + "\n")
    dist.barrier()
    return str(out_dir)


def sync_weights(
    actor,
    fleet,
    bucket_bytes: int,
    *,
    transport: str = "object_store",
    timeout_s: float = 1800.0,
    fallback: str | None = None,
) -> float:
    """Stream HF-named weights into the engines through `transport` (sync/weights.py). The driver runs it
    through `EngineSupervisor.sync`, which bounds it, handles engine failures and labels the weights."""
    t0 = time.time()
    sync_actor_to_engines(
        actor, fleet, bucket_bytes=bucket_bytes, transport=transport, timeout_s=timeout_s, fallback=fallback
    )
    return time.time() - t0


def save_checkpoint(actor, root, step: int, trainer_state: dict, keep: int) -> str:
    return str(checkpoint.save_checkpoint(actor, root, step=step, trainer_state=trainer_state, keep=keep))


def load_checkpoint(actor, path) -> dict:
    return checkpoint.load_checkpoint(actor, path)
