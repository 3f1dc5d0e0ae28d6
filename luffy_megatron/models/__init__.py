"""HF config -> megatron-core TransformerConfig / GPTModel, layer spec choice."""

from luffy_megatron.models.hf_to_mcore import (  # noqa: F401
    SUPPORTED_MODEL_TYPES,
    HFArch,
    build_gpt_model,
    build_model_chunks,
    build_transformer_config,
    padded_vocab_size,
    read_hf_arch,
)
