"""Tiny random HF causal LMs (hidden 64, 4 layers) of each supported architecture, tied and untied."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (transformers config class name, model class name, extra config)
SPECS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=600, tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=500, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=600, tie_word_embeddings=False,
                                                      rope_theta=500000.0)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=500, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=600, tie_word_embeddings=False, head_dim=32)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=500, tie_word_embeddings=True,
                                                           head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=500, tie_word_embeddings=False,
                                                            sliding_window=None)),
}


def make_tiny_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a random model whose every tensor (norms and biases too) is random, so a transform
    that drops or swaps anything shows up."""
    import transformers

    cfg_cls, model_cls, extra = SPECS[name]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory with tokenizer (luffy_megatron.models.demo_models),
    built once per machine (~15 s) under the temp dir and reused by later tests."""
    import tempfile

    from luffy_megatron.models.demo_models import build_smollm2_hf

    cache = Path(tempfile.gettempdir()) / "luffy-test-cache" / "smollm2-135m-instruct-f32"
    if (cache / "config.json").exists():
        return cache
    try:
        build_smollm2_hf(cache)
    except FileExistsError:  # another test process finished first
        pass
    return cache
