#!/usr/bin/env python
"""Benchmark: trainer.overlap=one_step against the synchronous loop, a LUFFY job on this machine.

    python tools/bench/overlap.py [--shape long|demo] [--steps 5] [--work DIR] [--set KEY=VALUE ...]

Three runs of `luffy-train --config recipes/cpu_demo.yaml` (one vLLM-CPU engine, one Megatron rank, the demo's
data), the same steps and rows, one after the other, nothing else running. Two shapes of job:

  long  (default) as LUFFY's runs are, generation about as long as the trainer's part of the step (log-probs and
        update) or longer: SmolLM2-135M's architecture with random weights (its rows never end early: every one
        is max_response_length long), 1 prompt x 4 rows (1 demonstration + 3 generated) per step, 512 generated
        tokens;
  demo  `make demo`'s job: the pretrained SmolLM2-135M-Instruct, 4 prompts x 4 rows, up to 128 generated tokens
        (most stop early); on a CPU its fp32 update takes several times its generation.

The three runs:

  one_step   trainer.overlap=one_step (with its default correction, algo.rollout_is=auto: token_tis): the
             engine generates batch k+1 while the rank trains on batch k; the engine on its own cores (vLLM-CPU's
             binding), the rank on the cores it leaves (cluster.cpu_rank_cores=auto -> free);
  sync_same  the synchronous loop at the same placement (cluster.cpu_rank_cores=free);
  sync_best  the synchronous loop as it runs by default: the rank on every core while the engine waits
             (cluster.cpu_rank_cores=all), so no core sits idle in either phase.

`--learn PNG`: instead, the demo job as `make demo` runs it (12 steps or `--learn-steps`, validation every 4 on 16
problems), once per arm (`--learn-runs`: none = synchronous; one_step = one step off without a correction,
algo.rollout_is=none; one_step+token_tis = one step off with algo.rollout_is=token_tis, the default under one_step;
none+token_tis = a diagnostic, the synchronous loop with one_step+token_tis's correction and core placement,
everything but the lag) and seed (`--seeds`; seed i sets trainer.seed=1+i and data.seed=47+i, so seed 0 is
`make demo`'s prompts), every run with rollout.seeded_sampling=true: an arm's run and the synchronous run of the
same seed draw the same prompts, sample step 1 alike and sample every later row with the same random numbers, so
they differ by what the arm changes and by where that leads, and validation uses the same seeds at every step. The
runs' on-policy reward, validation score and entropy are plotted into PNG (each seed thin, the mean over seeds
thick); the JSON then holds every run's curves and, with 2 seeds or more, the verdict of the rule below. A run whose
metrics already reach the last step under --work is not run again.

The rule for "learns within noise of the synchronous run" (paired, written 2026-12-07 before any seeded run):
per run two numbers, `val` = the mean validation score at steps 8 and 12 and `reward` = the mean on-policy reward
over steps 7-12, and their starting points, the validation score at step 0 and the on-policy reward of step 1
(both the untrained model's). For each number, over the seeds: d = the mean of (arm - synchronous run of the same
seed), se = their standard deviation / sqrt(seeds); gain = the mean of (arm - its starting point), se_gain alike.
  below         d < -2 se for either number;
  within noise  |d| <= 2 se and gain > 2 se_gain for both: no difference shown, and the arm itself learned;
  above         d > 2 se for either (and not below);
  not shown     otherwise: no difference shown, but neither that the arm learned.
An earlier, unpaired rule (d of the arm means against the two arms' pooled se, no gain) called 3 seeds of each
"within noise" while every mean favoured the synchronous loop; with the synchronous seeds as spread as they were
(validation 0.59 / 0.38 / 0.03) it would have passed an arm that learned nothing. Its runs sampled without seeds.

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
    ap.add_argument("--set", dest="extra", action="append", default=[], help="a setting for every run (repeatable)")
    ap.add_argument("--learn", type=Path, default=None, help="the learning comparison (see above); plot into this PNG")
    ap.add_argument("--learn-runs", default=",".join(LEARN_RUNS), help="--learn's arms, of " + ", ".join(LEARN_RUNS))
    ap.add_argument("--seeds", default="0", help="--learn's seeds, comma-separated (the rule needs 2 or more)")
    ap.add_argument("--learn-steps", type=int, default=12, help="--learn's steps per run (the rule needs 12 or more)")
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
    return metrics_rows(out)


def metrics_rows(out: Path) -> list[dict]:
    """The metrics rows a run wrote under `out` (none yet: [])."""
    from luffy_megatron.metrics.sinks import read_metrics  # lazy: after REPO is on sys.path

    return read_metrics(out / "metrics.jsonl")


def run(name: str, work: Path, model: Path, data: Path, steps: int, shape: str = "demo", extra=()) -> dict:
    settings = [
        *SHAPES[shape],
        *extra,
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
        "old_log_prob_s": median("timing_s/old_log_prob"),
        "update_s": median("timing_s/update_actor"),
        "sync_s": median("timing_s/sync"),
        "overlap_s": median("perf/overlap_s"),
        "weight_version_lag": max(r.get("rollout/weight_version_lag", 0.0) for r in timed),
        "wall_s": round(time.time() - t0, 1),
    }
    print(f"[overlap bench] {name}: {result}", flush=True)
    return result


LEARN_RUNS = {  # name: settings on top of the demo job
    "none": ["trainer.overlap=none"],
    "one_step": ["trainer.overlap=one_step", "algo.rollout_is=none"],
    "one_step+token_tis": ["trainer.overlap=one_step", "algo.rollout_is=token_tis"],
    # a diagnostic: everything one_step+token_tis changes except the lag (the correction, the rank off the engine's
    # core), in the synchronous loop
    "none+token_tis": ["trainer.overlap=none", "algo.rollout_is=token_tis", "cluster.cpu_rank_cores=free"],
}
LEARN_VAL_STEPS, LEARN_REWARD_STEPS = (8, 12), range(7, 13)  # the rule's two numbers (module docstring)
LEARN_SETTINGS = ["rollout.seeded_sampling=true", "trainer.save_freq=-1"]  # every --learn run's


def learn(work: Path, model: Path, data: Path, png: Path, arms: list[str], seeds: list[int], steps: int = 12) -> dict:
    """The demo job (`steps` steps) once per arm and seed; their on-policy reward, validation score and entropy
    per step, plotted, and with 2 seeds or more the rule's verdict for every arm against the synchronous one."""
    curves: dict = {}
    for seed in seeds:  # seed by seed, so a cut-short bench leaves every arm with the same seeds
        for name in arms:
            out = work / f"learn_{name.replace('+', '_')}_s{seed}"
            seeded = [f"trainer.seed={1 + seed}", f"data.seed={47 + seed}"]
            val = f"data.val_files=[{data}/val.parquet]"
            settings = [val, *LEARN_RUNS[name], *seeded, *LEARN_SETTINGS, f"trainer.total_training_steps={steps}"]
            rows = finished_rows(out, steps) or train(out, model, data, settings)
            curves.setdefault(name, {})[seed] = learning_curves(rows)
            print(f"[overlap bench] learn {name} seed {seed}: {learn_numbers(curves[name][seed])}", flush=True)
    plot_learning(curves, png)
    compared = [name for name in arms if name != "none"] if "none" in arms and len(seeds) > 1 else []
    verdicts = {name: learn_verdict(curves["none"], curves[name]) for name in compared}
    return {"bench": "overlap_learning", "plot": str(png), "seeds": seeds, "verdicts": verdicts, "runs": curves}


def finished_rows(out: Path, last_step: int) -> list[dict] | None:
    """The metrics rows of a run under `out` that reached `last_step` (None: run it)."""
    rows = metrics_rows(out)
    return rows if any(r.get("step") == last_step for r in rows) else None


def learn_numbers(curves: dict) -> dict:
    """The rule's two numbers of one run, mean validation score at LEARN_VAL_STEPS and mean on-policy reward over
    LEARN_REWARD_STEPS, and their starting points `val0` (validation at step 0) and `reward0` (step 1's reward)."""
    val = [curves["val_score"][s] for s in LEARN_VAL_STEPS if s in curves["val_score"]]
    reward = [curves["on_policy_reward"][s] for s in LEARN_REWARD_STEPS if s in curves["on_policy_reward"]]
    starts = 0 in curves["val_score"] and 1 in curves["on_policy_reward"]
    if len(val) != len(LEARN_VAL_STEPS) or len(reward) != len(LEARN_REWARD_STEPS) or not starts:
        raise ValueError(f"a run lacks validation at 0, {LEARN_VAL_STEPS} or rewards over steps 1, 7-12: {curves}")
    return {
        "val": statistics.fmean(val),
        "reward": statistics.fmean(reward),
        "val0": curves["val_score"][0],
        "reward0": curves["on_policy_reward"][1],
    }


def mean_and_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) / len(xs) ** 0.5


def learn_verdict(sync_runs: dict, arm_runs: dict) -> dict:
    """The paired rule (module docstring) on per-seed runs {seed: curves} of the same seeds: per number d, se,
    gain and se_gain, and the verdict."""
    seeds = sorted(arm_runs)
    if sorted(sync_runs) != seeds or len(seeds) < 2:
        raise ValueError(f"the rule pairs runs by seed, 2 or more: the arm has {seeds}, sync {sorted(sync_runs)}")
    arm = {s: learn_numbers(arm_runs[s]) for s in seeds}
    sync = {s: learn_numbers(sync_runs[s]) for s in seeds}
    out: dict = {}
    for key in ("val", "reward"):
        d, se = mean_and_se([arm[s][key] - sync[s][key] for s in seeds])
        gain, se_gain = mean_and_se([arm[s][key] - arm[s][key + "0"] for s in seeds])
        out[key] = {
            "arm": [round(arm[s][key], 4) for s in seeds],
            "sync": [round(sync[s][key], 4) for s in seeds],
            **{k: round(v, 4) for k, v in (("d", d), ("se", se), ("gain", gain), ("se_gain", se_gain))},
        }
    numbers = [out["val"], out["reward"]]
    if any(v["d"] < -2 * v["se"] for v in numbers):
        out["verdict"] = "below"
    elif all(abs(v["d"]) <= 2 * v["se"] and v["gain"] > 2 * v["se_gain"] for v in numbers):
        out["verdict"] = "within noise"
    elif any(v["d"] > 2 * v["se"] for v in numbers):
        out["verdict"] = "above"
    else:
        out["verdict"] = "not shown"
    return out


def learning_curves(rows: list[dict]) -> dict:
    """A run's curves by step, and `minutes`: the run's step time summed up to each step (startup not counted)."""
    minutes, total = {0: 0.0}, 0.0
    for r in rows:
        if "timing_s/step" in r:
            total += r["timing_s/step"] / 60
            minutes[r["step"]] = round(total, 3)
    return {
        "on_policy_reward": {r["step"]: r["rollout/on_policy_reward"] for r in rows if "rollout/on_policy_reward" in r},
        "val_score": {r["step"]: r["val/test_score/avg"] for r in rows if "val/test_score/avg" in r},
        "entropy": {r["step"]: r["actor/entropy"] for r in rows if "actor/entropy" in r},
        "minutes": minutes,
        "step_s": round(statistics.median(r["timing_s/step"] for r in rows if "timing_s/step" in r), 2),
    }


def plot_learning(curves: dict, png: Path) -> None:
    """{arm: {seed: curves}}: each seed a thin line, the mean over seeds a thick one, one colour per arm; by step,
    and the validation score by minutes of steps (the mean at each validation step, at the arm's mean minutes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (
        ("on_policy_reward", "on-policy reward (training batch)"),
        ("val_score", "validation score (16 problems)"),
        ("entropy", "actor entropy"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for (name, seeds), colour in zip(curves.items(), ("C0", "C1", "C2", "C3")):
        for ax, (key, _) in zip(axes, keys):
            per_seed = [dict((int(k), v) for k, v in runs[key].items()) for runs in seeds.values()]
            steps = sorted(set.intersection(*(set(p) for p in per_seed)))
            for points in per_seed:
                ax.plot(sorted(points), [points[s] for s in sorted(points)], color=colour, alpha=0.3, linewidth=0.8)
            mean = [statistics.fmean(p[s] for p in per_seed) for s in steps]
            ax.plot(steps, mean, "-o", color=colour, linewidth=2, label=f"{name} ({len(per_seed)} seeds)")
        plot_by_minutes(axes[3], seeds, colour, name)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[3].set_title("validation score by minutes of steps")
    axes[3].set_xlabel("minutes (sum of step times, this machine)")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def plot_by_minutes(ax, seeds: dict, colour: str, name: str) -> None:
    """One arm's validation score against the minutes its steps took: each seed thin, the mean thick."""
    runs = [{int(k): v for k, v in c["val_score"].items()} for c in seeds.values()]
    clocks = [{int(k): v for k, v in c["minutes"].items()} for c in seeds.values()]
    steps = sorted(set.intersection(*(set(v) & set(m) for v, m in zip(runs, clocks))))
    for val, clock in zip(runs, clocks):
        ax.plot([clock[s] for s in steps], [val[s] for s in steps], color=colour, alpha=0.3, linewidth=0.8)
    x = [statistics.fmean(c[s] for c in clocks) for s in steps]
    ax.plot(x, [statistics.fmean(v[s] for v in runs) for s in steps], "-o", color=colour, linewidth=2, label=name)


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
        arms, seeds = [a for a in args.learn_runs.split(",") if a], [int(x) for x in args.seeds.split(",") if x]
        if set(arms) - set(LEARN_RUNS):
            raise SystemExit(
                f"--learn-runs: unknown {sorted(set(arms) - set(LEARN_RUNS))}; choose from {list(LEARN_RUNS)}"
            )
        model, data = prepare(work)
        print(json.dumps(learn(work, model, data, args.learn, arms, seeds, args.learn_steps)), flush=True)
        return 0
    model, data = prepare(work, args.shape)
    results = {name: run(name, work, model, data, args.steps, args.shape, args.extra) for name in names}
    summary: dict = {
        "bench": "overlap",
        "shape": args.shape,
        "settings": args.extra,
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
