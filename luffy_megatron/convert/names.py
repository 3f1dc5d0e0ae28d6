"""HF <-> megatron-core parameter names and the tensor transforms between them.

Layout (the same as Megatron-Bridge, mbridge and slime, so checkpoints cross-check on GPU):

    model.embed_tokens.weight              embedding.word_embeddings.weight    vocab rows, padded, TP dim 0
    model.layers.i.input_layernorm         decoder.layers.i.input_layernorm (local spec)
                                           decoder.layers.i.self_attention.linear_qkv.layer_norm_weight (TE)
    model.layers.i.self_attn.{q,k,v}_proj  decoder.layers.i.self_attention.linear_qkv   interleaved per query
                                           group [q_g0.., k_g0, v_g0, q_g1.., ...], weights and biases, TP dim 0
    model.layers.i.self_attn.{q,k}_norm    ...self_attention.{q,k}_layernorm (Qwen3)
    model.layers.i.self_attn.o_proj        ...self_attention.linear_proj        TP dim 1
    model.layers.i.post_attention_layernorm  ...pre_mlp_layernorm (local) / mlp.linear_fc1.layer_norm_weight (TE)
    model.layers.i.mlp.{gate,up}_proj      ...mlp.linear_fc1 = [gate; up]; under TP rank r holds [gate_r; up_r]
    model.layers.i.mlp.down_proj           ...mlp.linear_fc2                   TP dim 1
    model.norm                             decoder.final_layernorm
    lm_head                                output_layer (absent when embeddings are tied)

Megatron layer numbers here are *global* (0-based); callers map a chunk's local module index to the
global one (PP and virtual PP renumbering) with `global_layer_numbers`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from luffy_megatron.models.hf_to_mcore import HFArch

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron suffix inside a layer -> (kind, HF suffixes inside `model.layers.{i}.`, TP partition dim)
_LAYER_RULES: dict[str, tuple[str, tuple[str, ...], Optional[int]]] = {
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",), None),
    "self_attention.linear_qkv.layer_norm_weight": ("copy", ("input_layernorm.weight",), None),
    "self_attention.linear_qkv.weight": (
        "qkv",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        0,
    ),
    "self_attention.linear_qkv.bias": (
        "qkv",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        0,
    ),
    "self_attention.q_layernorm.weight": ("copy", ("self_attn.q_norm.weight",), None),
    "self_attention.k_layernorm.weight": ("copy", ("self_attn.k_norm.weight",), None),
    "self_attention.linear_proj.weight": ("copy", ("self_attn.o_proj.weight",), 1),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",), None),
    "mlp.linear_fc1.layer_norm_weight": ("copy", ("post_attention_layernorm.weight",), None),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0),
    "mlp.linear_fc2.weight": ("copy", ("mlp.down_proj.weight",), 1),
}
_TOP_RULES: dict[str, tuple[str, tuple[str, ...], Optional[int]]] = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",), 0),
    "decoder.final_layernorm.weight": ("copy", ("model.norm.weight",), None),
    "output_layer.weight": ("vocab", ("lm_head.weight",), 0),
}


@dataclass(frozen=True)
class ParamRule:
    """How one megatron parameter relates to HF tensors."""

    mcore_name: str  # local (module) name
    kind: str  # "copy" | "qkv" | "fc1" | "vocab"
    hf_names: tuple[str, ...]
    tp_dim: Optional[int]  # partition dim under TP, None when replicated
    layer: Optional[int]  # global 0-based layer number, None outside the decoder layers

    @property
    def order_key(self) -> tuple:
        """HF checkpoint order: embeddings, layers in order, final norm, lm_head."""
        if self.layer is not None:
            return (1, self.layer, self.hf_names[0])
        top = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}
        return (top[self.hf_names[0]], 0, self.hf_names[0])


def rule_for(mcore_name: str, layer_map: Optional[dict[int, int]] = None) -> Optional[ParamRule]:
    """The rule for a local megatron parameter name; `layer_map` maps the chunk's module index to
    the global layer number. Returns None for names that have no HF counterpart (TE extra state)."""
    m = _LAYER_RE.match(mcore_name)
    if m:
        local, suffix = int(m.group(1)), m.group(2)
        if suffix not in _LAYER_RULES:
            if suffix.endswith("_extra_state"):
                return None
            raise KeyError(f"no HF name for megatron parameter {mcore_name!r}")
        layer = layer_map[local] if layer_map is not None else local
        kind, hf_suffixes, tp_dim = _LAYER_RULES[suffix]
        return ParamRule(mcore_name, kind, tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes), tp_dim, layer)
    if mcore_name in _TOP_RULES:
        kind, hf_names, tp_dim = _TOP_RULES[mcore_name]
        return ParamRule(mcore_name, kind, hf_names, tp_dim, None)
    if mcore_name.endswith("_extra_state"):
        return None
    raise KeyError(f"no HF name for megatron parameter {mcore_name!r}")


def global_layer_numbers(model) -> dict[int, int]:
    """{module index in this chunk's decoder.layers -> global 0-based layer number} (PP/VPP aware:
    megatron-core stores the 1-based global number on each TransformerLayer)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return {}
    return {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}


# ---------------------------------------------------------------- expected HF shapes


def expected_hf_shape(hf_name: str, arch: HFArch) -> tuple[int, ...]:
    h, d = arch.hidden_size, arch.head_dim
    suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    table = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.q_proj.bias": (arch.num_attention_heads * d,),
        "self_attn.k_proj.bias": (arch.num_query_groups * d,),
        "self_attn.v_proj.bias": (arch.num_query_groups * d,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
    }
    if suffix not in table:
        raise KeyError(f"unknown HF tensor {hf_name!r}")
    return table[suffix]


def hf_param_names(arch: HFArch) -> list[str]:
    """Every HF tensor name of this architecture, in checkpoint order (lm_head only when untied)."""
    names = ["model.embed_tokens.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if arch.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if arch.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [
            p + "self_attn.o_proj.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def check_hf_shape(hf_name: str, tensor: torch.Tensor, arch: HFArch) -> None:
    want = expected_hf_shape(hf_name, arch)
    if tuple(tensor.shape) != want:
        raise ValueError(
            f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, but the config ({arch.model_type}) needs {want}"
        )


# ---------------------------------------------------------------- QKV and gate/up transforms


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: HFArch) -> torch.Tensor:
    """[q; k; v] (HF) -> megatron's per-query-group interleave. Works for weights and biases."""
    groups, d = arch.num_query_groups, arch.head_dim
    q_per_group = arch.num_attention_heads // groups
    rest = q.shape[1:]
    qg = q.reshape(groups, q_per_group * d, *rest)
    kg = k.reshape(groups, d, *rest)
    vg = v.reshape(groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, arch: HFArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv` on the full (TP-gathered) tensor."""
    groups, d = arch.num_query_groups, arch.head_dim
    q_per_group = arch.num_attention_heads // groups
    rest = qkv.shape[1:]
    per = qkv.reshape(groups, (q_per_group + 2) * d, *rest)
    q = per[:, : q_per_group * d].reshape(-1, *rest)
    k = per[:, q_per_group * d : (q_per_group + 1) * d].reshape(-1, *rest)
    v = per[:, (q_per_group + 1) * d :].reshape(-1, *rest)
    return q, k, v


def split_gathered_fc1(fc1: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TP-gathered linear_fc1 [gate_0; up_0; gate_1; up_1; ...] -> (gate, up)."""
    rest = fc1.shape[1:]
    per = fc1.reshape(tp, 2, fc1.shape[0] // (2 * tp), *rest)
    return per[:, 0].reshape(-1, *rest), per[:, 1].reshape(-1, *rest)


# ---------------------------------------------------------------- megatron -> HF


def to_hf(rule: ParamRule, full: torch.Tensor, arch: HFArch, tp: int) -> list[tuple[str, torch.Tensor]]:
    """HF tensors from a TP-gathered megatron tensor (shards concatenated along `rule.tp_dim`)."""
    if rule.kind == "qkv":
        return list(zip(rule.hf_names, split_qkv(full, arch)))
    if rule.kind == "fc1":
        return list(zip(rule.hf_names, split_gathered_fc1(full, tp)))
    if rule.kind == "vocab":
        return [(rule.hf_names[0], full[: arch.vocab_size])]
    return [(rule.hf_names[0], full)]


def hf_shapes(rule: ParamRule, arch: HFArch) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, expected_hf_shape(n, arch)) for n in rule.hf_names]


# ---------------------------------------------------------------- HF -> megatron (one TP shard)


def from_hf(
    rule: ParamRule,
    get_hf: Callable[[str], torch.Tensor],
    arch: HFArch,
    *,
    tp: int,
    tp_rank: int,
    local_shape: Sequence[int],
) -> torch.Tensor:
    """This TP rank's shard of a megatron parameter, built from HF tensors (`get_hf(name)`)."""
    tensors = []
    for name in rule.hf_names:
        t = get_hf(name)
        check_hf_shape(name, t, arch)
        tensors.append(t)
    if rule.kind == "qkv":
        shard = merge_qkv(*tensors, arch).chunk(tp, 0)[tp_rank]
    elif rule.kind == "fc1":
        gate, up = tensors
        shard = torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], 0)
    elif rule.kind == "vocab":
        full = tensors[0]
        rows = local_shape[0] * tp
        if rows < full.shape[0]:
            raise ValueError(f"{rule.mcore_name}: padded vocabulary {rows} < HF vocabulary {full.shape[0]}")
        shard_rows = slice(tp_rank * local_shape[0], (tp_rank + 1) * local_shape[0])
        shard = torch.zeros(tuple(local_shape), dtype=full.dtype)
        real = full[shard_rows]
        shard[: real.shape[0]] = real
    else:
        shard = tensors[0] if rule.tp_dim is None else tensors[0].chunk(tp, rule.tp_dim)[tp_rank]
    if tuple(shard.shape) != tuple(local_shape):
        raise ValueError(
            f"megatron parameter {rule.mcore_name!r} has local shape {tuple(local_shape)} but HF "
            f"{', '.join(rule.hf_names)} give {tuple(shard.shape)} (TP={tp})"
        )
    return shard
