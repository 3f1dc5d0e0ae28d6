"""Hugging Face `config.json` -> megatron-core `TransformerConfig` and `GPTModel`.

Supported: Qwen2/Qwen2.5 (QKV bias), Llama 3 and Llama-architecture models (SmolLM2, ...),
Qwen3 (q/k RMSNorm per head), Mistral (without a sliding window). Everything that would make the
Megatron model compute something different from the HF model is refused with a message naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from luffy_megatron.compat.megatron_cpu import apply_cpu_shim

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_VOCAB_DIVISIBLE_BY = 128
# megatron-core 0.16.1's llama3 RoPE scaling (RotaryEmbedding._apply_scaling) takes only `factor`
# from GPTModel; these three are fixed at Llama 3.1's values.
_MCORE_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HFArch:
    """The facts of an HF causal-LM config that decide the Megatron model (one spelling each)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: Optional[float]  # llama3-style scaling factor, None when absent
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: str  # "float32" | "bfloat16" | "float16" (the checkpoint's torch dtype)
    initializer_range: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_params(cfg: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """transformers >= 5 writes `rope_parameters` {rope_type, rope_theta, ...}; 4.x wrote
    `rope_theta` + `rope_scaling`. Accept both."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
    return theta, scaling


def read_hf_arch(config: str | os.PathLike | Mapping[str, Any]) -> HFArch:
    """Reads an HF config (a model dir, a config.json path, or the parsed dict) into an HFArch."""
    if isinstance(config, Mapping):
        cfg = dict(config)
    else:
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no HF config at {path}")
        cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type}: hidden_act={act!r} is not supported (only SwiGLU with 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if model_type in ("llama", "mistral", "qwen3") and cfg.get(flag):
            raise ValueError(f"{model_type}: {flag}=true is not supported")
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ValueError(f"{model_type}: use_sliding_window=true is not supported")
    if model_type == "mistral" and cfg.get("sliding_window") not in (None, 0):
        window, max_pos = cfg["sliding_window"], cfg.get("max_position_embeddings", 0)
        if window < max_pos:
            raise ValueError(
                f"mistral: sliding_window={window} < max_position_embeddings={max_pos} is not "
                "supported (megatron-core's local attention has no sliding window)"
            )
    theta, scaling = _rope_params(cfg)
    scaling_factor = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        fixed_ok = all(float(scaling.get(k, v)) == v for k, v in _MCORE_LLAMA3_ROPE_FIXED.items())
        if kind != "llama3" or not fixed_ok:
            raise ValueError(
                f"{model_type}: rope scaling {scaling} is not supported; supported: none, or "
                f"rope_type='llama3' with {_MCORE_LLAMA3_ROPE_FIXED}"
            )
        scaling_factor = float(scaling["factor"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // heads
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"{model_type}: dtype {dtype!r} is not supported ({', '.join(_DTYPES)})")
    tie = cfg.get("tie_word_embeddings")
    if tie is None:  # transformers' PretrainedConfig default
        tie = True
    return HFArch(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=scaling_factor,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(tie),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        dtype=dtype,
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of `divisible_by * tp` so every TP rank
    holds an equal, aligned slice. The padding rows are zeros and never exported."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_engine_available() -> bool:
    try:
        # lazy: Transformer Engine exists only on GPU nodes
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use the local spec"
        return False
    return True


def validate_parallelism(arch: HFArch, tp: int, pp: int, vpp: Optional[int] = None) -> None:
    """User errors for parallel layouts megatron-core cannot build for this model."""
    if arch.num_query_groups % tp:
        raise ValueError(
            f"tensor parallel size {tp} must divide num_key_value_heads={arch.num_query_groups} "
            f"(megatron-core requires num_query_groups % TP == 0)"
        )
    if arch.num_attention_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide num_attention_heads={arch.num_attention_heads}")
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"tensor parallel size {tp} must divide intermediate_size={arch.ffn_hidden_size}")
    stages = pp * (vpp or 1)
    if arch.num_layers % stages:
        raise ValueError(
            f"num_hidden_layers={arch.num_layers} must be divisible by pipeline stages pp={pp} x vpp={vpp or 1}"
        )


def build_transformer_config(
    arch: HFArch,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """megatron-core TransformerConfig that computes exactly what the HF model computes.

    Dropout is 0 (RL fine-tuning default); fusions that need CUDA kernels are off on CPU.
    `overrides` go straight to TransformerConfig (e.g. recompute settings from the trainer)."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_parallelism(arch, tp, pp, vpp)
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(arch: HFArch, use_te: Optional[bool] = None):
    """The Transformer Engine layer spec when TE imports, megatron-core's local spec otherwise.
    Both give the same checkpoint keys (the local spec maps its norms onto TE's names)."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def build_gpt_model(
    arch: HFArch,
    config=None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    use_te: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    vocab_size_padded: Optional[int] = None,
):
    """One GPTModel (one pipeline chunk). Requires megatron-core's parallel_state to be initialized
    (see luffy_megatron.models.parallel). `config` defaults to `build_transformer_config` at the
    current parallel_state sizes."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    apply_cpu_shim()
    tp = ps.get_tensor_model_parallel_world_size()
    if config is None:
        config = build_transformer_config(
            arch,
            tp=tp,
            pp=ps.get_pipeline_model_parallel_world_size(),
            vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
            params_dtype=params_dtype,
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te),
        vocab_size=vocab_size_padded or padded_vocab_size(arch.vocab_size, tp, vocab_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def build_model_chunks(
    arch: HFArch,
    *,
    params_dtype: torch.dtype = torch.float32,
    construct_dtype: Optional[torch.dtype] = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    use_te: Optional[bool] = None,
    **config_overrides: Any,
) -> list:
    """This rank's model chunks: one GPTModel per virtual pipeline stage (a single one without
    virtual PP), with pre/post processing set from parallel_state.

    `params_dtype` is the model's compute dtype (bf16: `bf16=True`, `pipeline_dtype=bf16` in the config, as
    megatron's own bf16 training). `construct_dtype` (e.g. fp32) makes the parameters in another dtype for
    the time of loading weights; the caller then casts them (megatron's `Float16Module`). Every module
    built reads the dtype switches (softmax upcast, p2p buffers) from the one shared config."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    config = build_transformer_config(arch, tp=tp, pp=pp, vpp=vpp, params_dtype=params_dtype, **config_overrides)
    chunks = []
    if construct_dtype is not None:
        config.params_dtype = construct_dtype  # read only while the parameters are allocated
    try:
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            chunks.append(
                build_gpt_model(
                    arch,
                    config,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                    vp_stage=stage,
                    vocab_divisible_by=vocab_divisible_by,
                    use_te=use_te,
                    params_dtype=params_dtype,
                )
            )
    finally:
        config.params_dtype = params_dtype
    return chunks
