"""Reading and writing HF safetensors checkpoints tensor by tensor."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files besides the weights that make an HF model directory usable (config, generation, tokenizer).
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class HFWeightReader:
    """Lazy access to the tensors of an HF model directory (single file or sharded with an index).
    Only the requested tensor is read (safetensors memory-maps the file)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_NAME).exists():
            with safe_open(str(self.dir / SINGLE_NAME), framework="pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}")
        self.weight_map: dict[str, str] = weight_map
        self._open = {}
        self._safe_open = safe_open

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = self._safe_open(str(self.dir / fname), framework="pt")
        return self._open[fname]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {self.dir}")
        return self._file(name).get_tensor(name)

    def dtype(self) -> Optional[torch.dtype]:
        """The dtype of the stored weights (read from the header, no data)."""
        codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        for name in self.weight_map:
            return codes.get(self._file(name).get_slice(name).get_dtype())
        return None

    def close(self) -> None:
        self._open.clear()


def write_hf_safetensors(
    out_dir: str | os.PathLike,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress=None,
) -> dict[str, str]:
    """Writes tensors as it receives them into safetensors shards of at most `max_shard_bytes`
    (a larger single tensor gets its own shard). One shard -> `model.safetensors`; more ->
    `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`. Only the current
    shard is held in memory. Returns the weight map."""
    out = Path(out_dir)
    shard_files: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        tmp_name = f"shard-{len(shard_files):05d}.partial"
        save_file({k: v.contiguous() for k, v in pending.items()}, str(out / tmp_name), metadata={"format": "pt"})
        shard_files.append([tmp_name, *pending.keys()])
        pending, pending_bytes = {}, 0

    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += nbytes
        total += nbytes
        if progress is not None:
            progress(name, nbytes)
    flush()

    weight_map: dict[str, str] = {}
    n = len(shard_files)
    for i, (tmp_name, *names) in enumerate(shard_files):
        final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp_name, out / final)
        weight_map.update({k: final for k in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return weight_map


def copy_side_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: Optional[str] = None) -> list[str]:
    """Copies config/generation/tokenizer files; with `dtype` the config's dtype is rewritten to
    the dtype the weights were written in."""
    src, out = Path(src_dir), Path(out_dir)
    copied = []
    for name in HF_SIDE_FILES:
        if not (src / name).exists():
            continue
        if name == "config.json" and dtype is not None:
            cfg = json.loads((src / name).read_text())
            cfg.pop("quantization_config", None)
            for key in ("dtype", "torch_dtype"):
                if key in cfg or key == "dtype":
                    cfg[key] = dtype
            (out / name).write_text(json.dumps(cfg, indent=2))
        else:
            shutil.copyfile(src / name, out / name)
        copied.append(name)
    return copied
