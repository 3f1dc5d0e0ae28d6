"""A tiny real training job for the tests that run `luffy-train` as a program (signal handling, Slurm):
a random 2-layer Llama with SmolLM2's real tokenizer (vocab 49,152, hidden 64: ~3.2M parameters, so
a checkpoint with optimizer state is ~50 MB and a step takes seconds), and synthetic LUFFY data made by
tools/prepare_data.py. Both are built on the machine, once, under the temp dir."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import REPO, without_ray_auth

CACHE = Path(tempfile.gettempdir()) / "luffy-test-cache"
STEP_LINE = re.compile(r"\[step (\d+)/(\d+)\]")


def tiny_llama_dir() -> Path:
    """HF directory of a random tiny Llama (2 layers, hidden 64, 2 heads of 32 as vLLM-CPU supports)
    carrying SmolLM2-135M-Instruct's tokenizer and chat template."""
    out = CACHE / "tiny-llama-smollm2-tokenizer"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from luffy_megatron.utils.fs import atomic_dir
    from tests.dist.tiny_models import smollm2_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(out, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:  # another test process finished first
        pass
    return out


def synthetic_data(out_dir: Path, num_train: int = 8, num_val: int = 0) -> Path:
    """train.parquet (with demonstrations) and, with `num_val`, val.parquet (without) in `out_dir`: one-digit
    additions as tools/demo.py writes them."""
    if not (out_dir / "train.parquet").exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "prepare_data.py"),
                "synthetic",
                "--out",
                str(out_dir),
                "--num-train",
                str(num_train),
                "--num-val",
                str(num_val),
                "--digits",
                "1",
                "--operands",
                "2",
                "--ops",
                "+",
                "--system-prompt",
                "short",
                "--seed",
                "0",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    return out_dir


def tiny_overrides(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    """Overrides that turn recipes/slurm_cpu_test.yaml (or cpu_demo.yaml) into the tiny job."""
    return [
        f"model.path={model}",
        f"data.train_files=[{data}/train.parquet]",
        "data.val_files=[]",
        f"trainer.output_dir={out}",
        f"trainer.total_training_steps={steps}",
    ]


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints under <out>/checkpoints (a `.tmp-` one is never complete)."""
    from luffy_megatron.actor.checkpoint import complete_checkpoints

    return [int(p.name.split("_")[1]) for p in complete_checkpoints(out / "checkpoints")]


def metrics_steps(out: Path) -> list[int]:
    import json

    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def env_for_runs() -> dict[str, str]:
    env = {**without_ray_auth(os.environ), "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
