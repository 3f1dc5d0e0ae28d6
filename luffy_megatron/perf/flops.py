"""Model shapes, parameter counts and model FLOPs, from the architecture alone (no torch.cuda, no Ray).

The runtime MFU (`monitoring.ModelFlops`) and the offline plan (`perf.memory_plan`) count the same way:
matmul params = every linear weight including the output layer (the embedding lookup does no math); the
causal attention forward of one sequence of S tokens = 2 x heads x head_dim x layers x S^2.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from luffy_megatron.models.hf_to_mcore import HFArch, padded_vocab_size, read_hf_arch

__all__ = [
    "BUILTIN_HF_CONFIGS",
    "ParamCounts",
    "PlanError",
    "TrainerStateBytes",
    "attention_coefficient",
    "forward_flops",
    "layer_params",
    "load_hf_config",
    "param_counts",
    "resolve_arch",
    "trainer_state_bytes",
    "update_flops",
]


class PlanError(ValueError):
    """A recipe that cannot be planned (unknown model, impossible layout); the message names the setting."""


# --------------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------------

# The published Hugging Face config.json of each model (only the keys that decide shapes). Sources:
#   Qwen/Qwen2.5-Math-7B  hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab 152064,
#                         untied embeddings (also the shapes of LUFFY's Elliott/Qwen2.5-Math-7B-16k-think,
#                         whose longer RoPE context changes no tensor size)
#   Qwen/Qwen2.5-14B      hidden 5120, 48 layers, 40 heads, 8 KV heads, intermediate 13824, vocab 152064, untied
#   Qwen/Qwen2.5-32B      hidden 5120, 64 layers, 40 heads, 8 KV heads, intermediate 27648, vocab 152064, untied
#   Qwen/Qwen3-8B-Base    hidden 4096, 36 layers, 32 heads of 128, 8 KV heads, q/k RMSNorm, intermediate 12288,
#                         vocab 151936, untied
_QWEN25_COMMON = dict(
    model_type="qwen2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    torch_dtype="bfloat16",
    use_sliding_window=False,
    tie_word_embeddings=False,
    vocab_size=152064,
)
BUILTIN_HF_CONFIGS: dict[str, dict] = {
    "Qwen2.5-Math-7B": dict(
        _QWEN25_COMMON,
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "Qwen2.5-14B": dict(
        _QWEN25_COMMON,
        hidden_size=5120,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=13824,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
    ),
    "Qwen2.5-32B": dict(
        _QWEN25_COMMON,
        hidden_size=5120,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=27648,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
    ),
    "Qwen3-8B-Base": dict(
        _QWEN25_COMMON,
        model_type="qwen3",
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
}
_BUILTIN_ALIASES = {"Qwen2.5-Math-7B-16k-think": "Qwen2.5-Math-7B"}


def resolve_arch(model_path: str) -> tuple[HFArch, str]:
    """The model's shapes and where they came from: `model_path`/config.json when it exists, else the
    built-in table keyed by the path's basename."""
    hf_config, source = load_hf_config(model_path)
    try:
        return read_hf_arch(hf_config), source
    except (ValueError, KeyError) as err:
        raise PlanError(f"model.path={model_path!r}: {source}: {err}") from None


def load_hf_config(model_path: str) -> tuple[dict, str]:
    """(the HF config.json of `model_path` or its built-in stand-in, a phrase saying which it is)."""
    config_json = Path(model_path) / "config.json" if model_path else None
    if config_json is not None and config_json.is_file():
        try:
            return json.loads(config_json.read_text()), f"read from {config_json}"
        except json.JSONDecodeError as err:
            raise PlanError(f"model.path={model_path!r}: {config_json} is not valid JSON: {err}") from None
    name = os.path.basename(os.path.normpath(model_path)) if model_path else ""
    key = _BUILTIN_ALIASES.get(name, name)
    if key in BUILTIN_HF_CONFIGS:
        alias = f"; {name} has the same shapes" if key != name else ""
        return dict(BUILTIN_HF_CONFIGS[key]), (
            f"built-in table (the published config of Qwen/{key}{alias}), as {config_json} does not exist"
        )
    known = ", ".join([*BUILTIN_HF_CONFIGS, *_BUILTIN_ALIASES])
    raise PlanError(
        f"model.path={model_path!r}: no config.json there and {name or '(empty)'!r} is not in the built-in "
        f"table ({known}); point model.path at the Hugging Face model directory"
    )


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------


def layer_params(arch: HFArch, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank (norms are replicated, everything else split)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_out = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    split = h * qkv_out + (qkv_out if arch.qkv_bias else 0) + arch.num_attention_heads * d * h + 3 * h * f
    replicated = 2 * h + (2 * d if arch.qk_norm else 0)
    return split // tp + replicated


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts at one layout. `vocab_padded` is megatron's padded vocabulary at this TP."""

    total: int  # the whole model, every parameter once
    per_stage_rank: tuple[int, ...]  # params on one TP rank of each pipeline stage
    matmul: int  # linear weights doing math per token (the output layer included, the embedding lookup not)
    vocab_padded: int

    @property
    def per_rank_max(self) -> int:
        return max(self.per_stage_rank)


def param_counts(arch: HFArch, *, tp: int = 1, pp: int = 1, vocab_divisible_by: int = 128) -> ParamCounts:
    """Megatron's parameters: embedding and output layer of the padded vocabulary (split over TP), the
    final norm on the last stage; with tied embeddings and PP > 1 the last stage holds its own copy of the
    embedding as output weight (megatron's shared embedding)."""
    h, num_layers = arch.hidden_size, arch.num_layers
    vocab = padded_vocab_size(arch.vocab_size, tp, vocab_divisible_by)
    embedding = vocab * h
    per_layer = layer_params(arch, tp)
    stages = []
    for stage in range(pp):
        n = (num_layers // pp) * per_layer
        if stage == 0:
            n += embedding // tp
        if stage == pp - 1:
            n += h
            if not arch.tie_word_embeddings or pp > 1:
                n += embedding // tp
        stages.append(n)
    total = num_layers * layer_params(arch, 1) + h + embedding * (1 if arch.tie_word_embeddings else 2)
    d = arch.head_dim
    layer_matmul = (
        h * (arch.num_attention_heads + 2 * arch.num_query_groups) * d
        + arch.num_attention_heads * d * h
        + 3 * h * arch.ffn_hidden_size
    )
    return ParamCounts(
        total=total, per_stage_rank=tuple(stages), matmul=num_layers * layer_matmul + embedding, vocab_padded=vocab
    )


@dataclass(frozen=True)
class TrainerStateBytes:
    """Bytes of one trainer rank's persistent state."""

    weights: int
    grads: int  # the fp32 grad buffer, never sharded over data parallel
    main_params: int  # fp32 copies of bf16 params (0 for fp32 runs)
    moments: int  # Adam's exp_avg + exp_avg_sq, fp32


def trainer_state_bytes(num_params: int, *, bf16: bool, distributed_optimizer: bool, dp_cp: int) -> TrainerStateBytes:
    """Bytes of one trainer rank's persistent state for `num_params` parameters: weights, the fp32 grad
    buffer, the optimizer's fp32 main params (bf16 only) and Adam's two fp32 moments (sharded over DP x CP by
    the distributed optimizer)."""
    shards = dp_cp if distributed_optimizer else 1
    return TrainerStateBytes(
        weights=num_params * (2 if bf16 else 4),
        grads=num_params * 4,
        main_params=(num_params * 4 // shards) if bf16 else 0,
        moments=num_params * 8 // shards,
    )


# --------------------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------------------


def attention_coefficient(arch: HFArch) -> int:
    """heads x head_dim x layers: the causal attention forward of one sequence of S tokens is
    2 x this x S^2 FLOPs (QK^T and attention x V over the lower triangle), every layer together."""
    return arch.num_attention_heads * arch.head_dim * arch.num_layers


def forward_flops(matmul_params: int, attention_coef: int, *, tokens: float, squared_lengths: float) -> float:
    """Model FLOPs of one forward over sequences holding `tokens` tokens in all, whose lengths squared sum
    to `squared_lengths`: 2 x matmul params x tokens + causal attention (`attention_coefficient`)."""
    return 2 * matmul_params * tokens + 2 * attention_coef * squared_lengths


def update_flops(
    matmul_params: int, attention_coef: int, *, tokens: float, squared_lengths: float, epochs: int = 1
) -> float:
    """Model FLOPs of training on those sequences `epochs` times: forward + backward = 3 forwards
    (6 x params x tokens + 3 x attention); full recompute's extra forward is not counted."""
    return epochs * 3 * forward_flops(matmul_params, attention_coef, tokens=tokens, squared_lengths=squared_lengths)
