"""megatron-core distributed checkpoints (`dist_checkpointing`, torch_dist format) of GPT models.

The stored tensors are global (ShardedTensor keys with global layer numbers and TP offsets), so a
checkpoint written under one TP/PP loads under another. Embedding/output rows are stored padded
(Megatron's rule); megatron-core loads them across a different padding (`allow_shape_mismatch`).
A `luffy_meta.json` beside megatron-core's own `metadata.json` records the HF architecture, the
padded vocabulary, dtype and the layout it was written under.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from luffy_megatron.compat.megatron import in_process_results_queue
from luffy_megatron.models.hf_to_mcore import HFArch
from luffy_megatron.utils.fs import collective_atomic_dir

META_NAME = "luffy_meta.json"
FORMAT = "luffy-mcore-dist-v1"


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict:
    p = Path(ckpt_dir) / META_NAME
    if not p.exists():
        raise FileNotFoundError(f"{ckpt_dir} is not a luffy-megatron checkpoint (no {META_NAME})")
    return json.loads(p.read_text())


def save_checkpoint(
    model, ckpt_dir: str | os.PathLike, arch: HFArch, extra_meta: Optional[dict[str, Any]] = None
) -> Path:
    """Collective over all ranks. Writes to `<ckpt_dir>.tmp-<pid of rank 0>`, then rank 0 renames
    it into place (`utils.fs.collective_atomic_dir`), so a crash never leaves a complete-looking checkpoint."""
    from megatron.core import dist_checkpointing  # lazy: the driver imports this module, never megatron
    from megatron.core import parallel_state as ps

    chunks = _chunks(model)
    with collective_atomic_dir(ckpt_dir) as tmp:
        with in_process_results_queue():
            dist_checkpointing.save(_sharded_state_dict(chunks), str(tmp))
        if dist.get_rank() == 0:
            emb = chunks[0].embedding.word_embeddings.weight if hasattr(chunks[0], "embedding") else None
            meta = {
                "format": FORMAT,
                "hf_arch": arch.to_dict(),
                "dtype": str(next(chunks[0].parameters()).dtype).replace("torch.", ""),
                "vocab_size_padded": (
                    emb.shape[0] * ps.get_tensor_model_parallel_world_size() if emb is not None else None
                ),
                "tp": ps.get_tensor_model_parallel_world_size(),
                "pp": ps.get_pipeline_model_parallel_world_size(),
                "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
                **(extra_meta or {}),
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    return Path(ckpt_dir)


def load_sharded(sharded_state_dict: dict, ckpt_dir: str | os.PathLike) -> dict:
    """`dist_checkpointing.load` that tolerates exactly one kind of mismatch: Transformer Engine's
    `_extra_state` entries (FP8 metadata) that the model asks for and the checkpoint lacks, as when a
    checkpoint written with megatron-core's local layers (CPU, `luffy-convert` without TE) is loaded into a
    TE model. Any other tensor the model needs and the checkpoint lacks is an error naming it."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _, unexpected = dist_checkpointing.load(
        sharded_state_dict, str(ckpt_dir), strict=StrictHandling.RETURN_UNEXPECTED
    )
    absent = sorted(k for k in unexpected if not k.endswith("_extra_state"))
    if absent:
        shown = ", ".join(absent[:5]) + (f" (+{len(absent) - 5} more)" if len(absent) > 5 else "")
        raise RuntimeError(
            f"checkpoint {ckpt_dir} lacks {len(absent)} tensor(s) this model needs: {shown}; "
            "was it written for another architecture or model.path?"
        )
    return loaded


def load_checkpoint(model, ckpt_dir: str | os.PathLike, *, strict: bool = True) -> None:
    """Collective. Loads a checkpoint written under any TP/PP (and vocab padding) into this rank's
    chunks."""
    if not (Path(ckpt_dir) / "metadata.json").exists():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-core distributed checkpoint")
    chunks = _chunks(model)
    loaded = load_sharded(_sharded_state_dict(chunks), ckpt_dir)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        state = {k: v for k, v in loaded[key].items() if not k.endswith("_extra_state")}
        missing, unexpected = chunk.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint {ckpt_dir}: missing {missing}, unexpected {unexpected}")
