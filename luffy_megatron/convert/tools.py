"""The two single-process converters behind `luffy-convert`.

Both run as one ordinary process (a private world-size-1 process group; no torchrun) whatever
the target TP/PP, because a megatron-core distributed checkpoint stores *global* tensors: the
checkpoint written here loads under any TP/PP. The target TP only decides the vocabulary padding
(a multiple of `make_vocab_size_divisible_by * TP`), and TP/PP are checked against the model
(`num_key_value_heads % TP`, `num_layers % PP`) so a bad layout fails here, not on the cluster.

Memory: HF tensors are read one at a time (safetensors memory-maps the files) into a single
megatron model in the checkpoint dtype, then saved; exporting writes one safetensors shard at a
time. Peak is one copy of the model plus one shard, never two copies.
Output is written under `<out>.tmp-<pid>` and renamed into place when complete.

Both build on the host with gloo, on a GPU node too (`HOST_BUILD`): a whole model on one GPU does not fit for
the larger models, and a world of one has nothing for NCCL to do. The checkpoint has megatron-core's local
layers, which load into Transformer Engine models (`convert.checkpoint.load_sharded`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from luffy_megatron.convert.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from luffy_megatron.convert.export import iter_hf_weights
from luffy_megatron.convert.hf_io import DEFAULT_MAX_SHARD_BYTES, HFWeightReader, copy_side_files, write_hf_safetensors
from luffy_megatron.convert.weights import load_hf_weights
from luffy_megatron.models.hf_to_mcore import (
    DEFAULT_VOCAB_DIVISIBLE_BY,
    build_model_chunks,
    padded_vocab_size,
    read_hf_arch,
    torch_dtype,
    validate_parallelism,
)
from luffy_megatron.models.parallel import init_model_parallel
from luffy_megatron.utils.fs import atomic_dir

# megatron-core's local layers with their parameters made on the host, whatever the machine
HOST_BUILD = dict(use_te=False, use_cpu_initialization=True)


class _Progress:
    """One line per ~2 s on stderr: items, MB, MB/s."""

    def __init__(self, what: str, total: Optional[int] = None, quiet: bool = False):
        self.what, self.total, self.quiet = what, total, quiet
        self.n, self.bytes, self.t0, self.last = 0, 0, time.time(), 0.0

    def __call__(self, name: str, nbytes: int = 0) -> None:
        self.n += 1
        self.bytes += nbytes
        now = time.time()
        if not self.quiet and (now - self.last > 2 or self.n == self.total):
            self.last = now
            total = f"/{self.total}" if self.total else ""
            rate = self.bytes / max(now - self.t0, 1e-9) / 1e6
            print(
                f"[{self.what}] {self.n}{total} tensors, {self.bytes / 1e6:.1f} MB, {rate:.1f} MB/s  ({name})",
                file=sys.stderr,
                flush=True,
            )


def _single_process_guard() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("the converters run as one process; call them outside torchrun")


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    dtype: Optional[str] = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """HF model directory -> megatron-core distributed checkpoint for a TP x PP actor."""
    _single_process_guard()
    arch = read_hf_arch(hf_dir)
    validate_parallelism(arch, tp, pp, vpp)
    reader = HFWeightReader(hf_dir)
    params_dtype = torch_dtype(dtype) if dtype else (reader.dtype() or torch_dtype(arch.dtype))
    init_model_parallel(1, 1, cpu=True)
    chunks = build_model_chunks(
        arch,
        params_dtype=params_dtype,
        perform_initialization=False,
        vocab_divisible_by=vocab_divisible_by * tp,
        **HOST_BUILD,
    )
    progress = _Progress("hf-to-megatron load", sum(1 for _ in chunks[0].parameters()), quiet)
    load_hf_weights(chunks, arch, reader, progress=progress)
    reader.close()
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; remove it or pass --overwrite")
    t0 = time.time()
    save_checkpoint(
        chunks,
        final,
        arch,
        extra_meta={
            "tp": tp,
            "pp": pp,
            "vpp": vpp,
            "source_hf_dir": str(Path(hf_dir).resolve()),
            "vocab_size_padded": padded_vocab_size(arch.vocab_size, tp, vocab_divisible_by),
        },
    )
    if not quiet:
        print(
            f"[hf-to-megatron] wrote {final} in {time.time() - t0:.1f}s (loads under any TP/PP; padded for TP={tp})",
            file=sys.stderr,
        )
    return final


def megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    hf_config_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """megatron-core distributed checkpoint -> HF safetensors (+ config and tokenizer files)."""
    _single_process_guard()
    arch = read_hf_arch(hf_config_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    stored = meta.get("hf_arch", {})
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "vocab_size"):
        if key in stored and stored[key] != getattr(arch, key):
            raise ValueError(
                f"checkpoint {ckpt_dir} has {key}={stored[key]} but {hf_config_dir} has {getattr(arch, key)}"
            )
    params_dtype = torch_dtype(meta.get("dtype", arch.dtype))
    init_model_parallel(1, 1, cpu=True)
    chunks = build_model_chunks(arch, params_dtype=params_dtype, perform_initialization=False, **HOST_BUILD)
    load_checkpoint(chunks, ckpt_dir)
    out_dtype = torch_dtype(dtype) if dtype else params_dtype
    progress = _Progress("megatron-to-hf", None, quiet)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_safetensors(
            tmp, iter_hf_weights(chunks, arch, dtype=out_dtype), max_shard_bytes=max_shard_bytes, progress=progress
        )
        copy_side_files(hf_config_dir, tmp, dtype=str(out_dtype).replace("torch.", ""))
    if not quiet:
        print(f"[megatron-to-hf] wrote {out_dir}", file=sys.stderr)
    return Path(out_dir)
