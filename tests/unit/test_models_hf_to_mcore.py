"""HF config -> megatron-core config: what is read, what is refused."""

import json

import pytest
import torch

from luffy_megatron.models.hf_to_mcore import (
    SUPPORTED_MODEL_TYPES,
    build_transformer_config,
    padded_vocab_size,
    read_hf_arch,
    validate_parallelism,
)

QWEN2 = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    hidden_act="silu",
    torch_dtype="bfloat16",
    use_sliding_window=False,
    sliding_window=131072,
)


def test_qwen2_7b_config_v4_spelling():
    arch = read_hf_arch(QWEN2)
    assert (arch.qkv_bias, arch.qk_norm, arch.tie_word_embeddings) == (True, False, False)
    assert (arch.num_query_groups, arch.head_dim, arch.rope_theta) == (4, 128, 1e6)
    assert arch.dtype == "bfloat16" and arch.rope_scaling_factor is None
    cfg = build_transformer_config(arch, tp=4, pp=2, params_dtype=torch.bfloat16)
    assert cfg.add_qkv_bias and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.normalization) == (4, 128, "RMSNorm")
    assert cfg.layernorm_epsilon == 1e-6 and cfg.bf16 and cfg.hidden_dropout == 0.0


def test_transformers_v5_rope_parameters_and_qwen3_head_dim(tmp_path):
    cfg = dict(QWEN2, model_type="qwen3", head_dim=256, dtype="float32", tie_word_embeddings=True)
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = read_hf_arch(tmp_path)
    assert arch.qk_norm and not arch.qkv_bias and arch.head_dim == 256
    assert arch.rope_theta == 5e6 and arch.tie_word_embeddings and arch.dtype == "float32"
    assert build_transformer_config(arch).qk_layernorm


def test_unsupported_model_type_names_it_and_lists_supported():
    with pytest.raises(ValueError) as e:
        read_hf_arch(dict(QWEN2, model_type="gemma2"))
    msg = str(e.value)
    assert "gemma2" in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_rope_scaling_llama3_accepted_others_refused():
    llama = dict(
        QWEN2,
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert read_hf_arch(llama).rope_scaling_factor == 32.0
    with pytest.raises(ValueError, match="yarn"):
        read_hf_arch(dict(llama, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="rope scaling"):
        read_hf_arch(dict(llama, rope_scaling=dict(llama["rope_scaling"], high_freq_factor=8.0)))


def test_refusals_that_would_change_the_model():
    with pytest.raises(ValueError, match="hidden_act"):
        read_hf_arch(dict(QWEN2, hidden_act="gelu"))
    with pytest.raises(ValueError, match="use_sliding_window"):
        read_hf_arch(dict(QWEN2, use_sliding_window=True))
    with pytest.raises(ValueError, match="sliding_window"):
        read_hf_arch(dict(QWEN2, model_type="mistral", sliding_window=4096))
    with pytest.raises(ValueError, match="attention_bias"):
        read_hf_arch(dict(QWEN2, model_type="llama", attention_bias=True))


def test_vocab_padding_and_parallel_layout_checks():
    assert padded_vocab_size(151936, 1) == 151936
    assert padded_vocab_size(151936, 2) == 152064
    assert padded_vocab_size(49152, 8) == 49152
    assert padded_vocab_size(500, 2) == 512
    arch = read_hf_arch(QWEN2)
    validate_parallelism(arch, tp=4, pp=4)
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        validate_parallelism(arch, tp=8, pp=1)
    with pytest.raises(ValueError, match="num_hidden_layers=28"):
        validate_parallelism(arch, tp=1, pp=3)
