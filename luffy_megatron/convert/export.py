"""Streaming export of HF-named full tensors from a TP x PP (x DP) megatron-core model.

Every rank of the model calls the same generator and receives the same sequence of buckets:
the pipeline stage that owns a parameter gathers its TP shards, converts them to HF tensors and
broadcasts them to the other stages of its pipeline group. Buckets hold at most `bucket_bytes`
of HF tensors (a single larger tensor forms its own bucket), and the generator drops its
references to a bucket before building the next, so the extra memory is about one bucket plus
one parameter's TP-gather buffer.

Tied embeddings: `lm_head.weight` is never yielded when `tie_word_embeddings` is true (HF and
vLLM tie it to `model.embed_tokens.weight` themselves; vLLM's loaders skip `lm_head.*` for tied
models).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from luffy_megatron.convert.names import ParamRule, global_layer_numbers, hf_shapes, rule_for, to_hf
from luffy_megatron.models.hf_to_mcore import HFArch

DEFAULT_BUCKET_BYTES = 512 * 1024**2
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class ExportStats:
    """Bytes the exporter itself holds (bucket tensors + TP-gather buffers), and the peak."""

    live_bytes: int = 0
    peak_bytes: int = 0
    exported_bytes: int = 0
    num_tensors: int = 0
    num_buckets: int = 0

    def hold(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes


def _as_chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def local_export_rules(model_chunks, arch: HFArch) -> list[tuple[ParamRule, int, torch.nn.Parameter]]:
    """(rule, chunk index, parameter) for every parameter of this rank that has HF tensors."""
    out = []
    for ci, chunk in enumerate(_as_chunks(model_chunks)):
        layer_map = global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            if arch.tie_word_embeddings and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            rule = rule_for(name, layer_map)
            if rule is not None:
                out.append((rule, ci, param))
    return out


def _tp_gather(param: torch.Tensor, rule: ParamRule, tp: int, group,
               stats: ExportStats) -> tuple[torch.Tensor, int]:
    """The TP-gathered parameter and the bytes of the buffer this allocated (held in `stats`
    until the caller releases them)."""
    local = param.detach()
    if rule.tp_dim is None or tp == 1:
        return local, 0
    local = local.contiguous()
    if rule.tp_dim == 0:
        full = torch.empty((tp * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        nbytes = full.numel() * full.element_size()
        stats.hold(nbytes)
        dist.all_gather(list(full.chunk(tp, 0)), local, group=group)
        return full, nbytes
    parts = torch.empty((tp, *local.shape), dtype=local.dtype, device=local.device)
    nbytes = parts.numel() * parts.element_size()
    stats.hold(nbytes)
    dist.all_gather(list(parts.unbind(0)), local, group=group)
    stats.hold(nbytes)
    full = torch.cat(list(parts.unbind(0)), dim=rule.tp_dim)
    del parts
    stats.release(nbytes)
    return full, nbytes


def iter_hf_weight_buckets(
    model_chunks,
    arch: HFArch,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: Optional[torch.dtype] = None,
    stats: Optional[ExportStats] = None,
    tensor_of=None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yields lists of `(hf_name, full_tensor)` in HF checkpoint order, on every rank.

    Collective: every rank of the TP x PP model group (all DP replicas independently) must drain
    the generator. `model_chunks` is this rank's GPTModel or its list of virtual-PP chunks.
    `dtype` casts on the owning stage (before the broadcast). Tensors may alias parameters
    (TP=1, no cast): copy them if they must outlive the next step of the model.
    `tensor_of(param)` exports another tensor of each parameter's shape instead of its value (e.g. its
    reduced gradient `param.main_grad`, in fp32 even when the parameter is bf16)."""
    from megatron.core import parallel_state as ps

    stats = stats if stats is not None else ExportStats()
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()

    value = tensor_of or (lambda p: p)
    local = {rule.order_key: (rule, value(param)) for rule, _, param in local_export_rules(model_chunks, arch)}
    mine = [(key, pp_rank, hf_shapes(rule, arch), _DTYPE_NAMES[dtype or param.dtype])
            for key, (rule, param) in local.items()]
    if pp > 1:
        gathered: list = [None] * pp
        dist.all_gather_object(gathered, mine, group=pp_group)
        plan = sorted((e for stage in gathered for e in stage), key=lambda e: e[0])
        pp_ranks = dist.get_process_group_ranks(pp_group)
    else:
        plan = sorted(mine, key=lambda e: e[0])
        pp_ranks = None
    device = next(iter(local.values()))[1].device if local else torch.device("cpu")

    bucket: list[tuple[str, torch.Tensor]] = []
    held = 0
    for key, owner, shapes, dtype_name in plan:
        item_bytes = torch.empty((), dtype=_NAME_DTYPES[dtype_name]).element_size()
        nbytes = sum(prod(shape) for _, shape in shapes) * item_bytes
        if bucket and held + nbytes > bucket_bytes:
            stats.num_buckets += 1
            yield bucket
            bucket = []
            stats.release(held)
            held = 0
        if owner == pp_rank:
            rule, param = local[key]
            full, gather_bytes = _tp_gather(param, rule, tp, tp_group, stats)
            tensors = []
            for name, t in to_hf(rule, full, arch, tp):
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                tensors.append((name, t.contiguous()))
            stats.hold(nbytes)
            del full
            stats.release(gather_bytes)
        else:
            tensors = [(name, torch.empty(shape, dtype=_NAME_DTYPES[dtype_name], device=device))
                       for name, shape in shapes]
            stats.hold(nbytes)
        if pp_ranks is not None:
            for _, t in tensors:
                dist.broadcast(t, src=pp_ranks[owner], group=pp_group)
        bucket.extend(tensors)
        held += nbytes
        stats.exported_bytes += nbytes
        stats.num_tensors += len(tensors)
    if bucket:
        stats.num_buckets += 1
        yield bucket
        stats.release(held)


def iter_hf_weights(model_chunks, arch: HFArch, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, full_tensor)` pairs, one at a time (buckets flattened)."""
    for bucket in iter_hf_weight_buckets(model_chunks, arch, **kwargs):
        yield from bucket
