"""Load HF weights straight into this rank's shards of a TP x PP megatron-core model."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from luffy_megatron.convert.hf_io import HFWeightReader
from luffy_megatron.convert.names import ParamRule, from_hf, global_layer_numbers, rule_for
from luffy_megatron.models.hf_to_mcore import HFArch


def load_hf_weights(
    model_chunks,
    arch: HFArch,
    hf_dir: str | os.PathLike | HFWeightReader,
    *,
    progress: Optional[Callable[[str], None]] = None,
) -> int:
    """Copies HF tensors into every parameter of this rank's chunks (each rank reads only the
    HF tensors it needs, one at a time). Not collective. Returns the number of parameters set.
    Raises ValueError naming the tensor on a shape mismatch and KeyError for a missing one."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps

    reader = hf_dir if isinstance(hf_dir, HFWeightReader) else HFWeightReader(hf_dir)
    tp = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    count = 0
    for chunk in chunks:
        layer_map = global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            rule = rule_for(name, layer_map)
            if rule is None:
                continue
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                # the last stage's copy of the tied embedding (PP > 1)
                rule = ParamRule(name, "vocab", ("model.embed_tokens.weight",), 0, None)
            shard = from_hf(rule, reader.get, arch, tp=tp, tp_rank=tp_rank, local_shape=param.shape)
            with torch.no_grad():
                param.copy_(shard)
            count += 1
            if progress is not None:
                progress(name)
    return count
