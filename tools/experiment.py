#!/usr/bin/env python
"""`make experiment` / `make experiment-quick`: the paper's claims in miniature on a CPU, pre-registered.

A ~1.8M-parameter Llama "pretrained" here, through the stack's SFT mode, on every two-operand fact (it knows the
facts and answers directly; 5% of its answers use a one-line rewrite), then taught multi-operand sums by
rewrite-chain demonstrations (tools/experiment_task.py) in four arms that differ only in their own switch, all
trained by `train.loop.train` (Megatron actor, vLLM engine and reward pool on Ray) on one set of workers:

* on_policy         on-policy GRPO: 8 generations per prompt, no demonstrations (PPO clip on, as upstream's
                    train_on_policy.sh);
* luffy             1 demonstration + 7 generations per prompt, off_policy_reshape=p_div_p_0.1;
* luffy_no_reshape  the same without policy shaping (off_policy_reshape=no_reshape);
* sft               algo.mode=sft: NLL on the same demonstrations, same prompts, optimiser and steps.
* luffy_one_step    LUFFY with generation overlapped with training (trainer.overlap=one_step: every generated
                    row one update old) and the rollout importance correction (algo.rollout_is=token_tis).

Stages (each idempotent: a finished stage or run is not redone, an interrupted run resumes from its checkpoint):

1. data (`<work>/data`): the training demonstrations, the base's fact corpus, the held-out splits;
2. the base (`<work>/base`): pretrained, exported to HF, evaluated once (`eval.json`); its gates
   (tools/experiment_stats.GATES) are checked before any arm runs: `--gates enforce` (the full preset) stops
   with a message when one fails, `--gates report` (the quick preset) reports them;
3. the arms x seeds (`<work>/runs/<arm>/seed_<s>`): trained in chunks of --eval-every steps; after each chunk
   the engine (holding the actor's weights) answers 64 ID and 64 OOD-length problems, and the probe measures
   the policy's entropy on its own generations and its KL to the base; after the last step every split is
   answered --samples times at T=0.6 and graded as `luffy-eval --protocol math-verify` grades;
4. the report (`--out`): results.md (the pre-registered rules first, then the numbers and verdicts),
   results.json, accuracy.png, reward.png, probe.png.

    python tools/experiment.py [--quick] [--seeds 0,1,2] [--steps N] [--lr X] [--arms a,b] [--out DIR] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import experiment_stats as stats  # noqa: E402
from tools.experiment_report import read_jsonl, write_report  # noqa: E402
from tools.experiment_task import SPLITS, build_data, build_random_model, corpus_of  # noqa: E402

RECIPE = REPO / "recipes" / "experiment_cpu.yaml"
ARMS: dict[str, list[str]] = {
    "on_policy": ["rollout.n_off_policy=0", "algo.loss_remove_clip=false"],
    "luffy": [],
    "luffy_no_reshape": ["algo.off_policy_reshape=no_reshape"],
    "sft": ["algo.mode=sft", "rollout.n=1", "rollout.n_off_policy=-1"],
    "luffy_one_step": ["trainer.overlap=one_step", "algo.rollout_is=token_tis"],
}
CURVE_SPLITS = ("id", "ood_length")

# full and quick presets; every field can be overridden on the command line
PRESETS = {
    "full": dict(
        seeds=[0, 1, 2],
        steps=80,
        eval_every=20,
        lr=None,  # the recipe's
        base_steps=800,
        base_hidden=192,
        fact_copies=10,
        num_train=800,
        num_eval=256,
        curve_problems=64,
        probe_prompts=64,
        samples=2,
        gates="enforce",
        work="outputs/experiment/full",
        out="docs/experiment",
    ),
    "quick": dict(
        seeds=[0],
        steps=20,
        eval_every=10,
        lr=None,
        base_steps=600,
        base_hidden=192,
        fact_copies=10,
        num_train=200,
        num_eval=64,
        curve_problems=32,
        probe_prompts=32,
        samples=1,
        gates="report",
        work="outputs/experiment/quick",
        out="docs/experiment/quick",
    ),
}


def say(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_config(overrides: list[str]):
    from luffy_megatron.config import load_config  # lazy: the trainer's config loads only when used

    return load_config(str(RECIPE), overrides)


def with_steps(cfg, steps: int):
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_training_steps=steps))


class Lab:
    """The workers (started once, reused by the base's pretraining and every run), the grader pool, the
    held-out splits and the probe."""

    def __init__(self, args, work: Path, paths: dict[str, Path], pool):
        self.args, self.work, self.paths, self.pool = args, work, paths, pool
        self.workers = self.held_out = self.probe = None

    def ensure_workers(self, cfg):
        from transformers import AutoTokenizer  # lazy: heavy

        from luffy_megatron.train.setup import pad_token_id, start_workers  # lazy: loads Ray and vLLM clients

        if self.workers is None:
            t0 = time.time()
            pad = pad_token_id(AutoTokenizer.from_pretrained(cfg.model.path))
            self.workers = start_workers(cfg, pad, use_gpu=False, log_dir=self.work / "logs" / "workers")
            say(f"workers started in {time.time() - t0:.0f}s (reused by every run)")
        return self.workers

    def measuring(self, base: Path):
        from transformers import AutoTokenizer  # lazy: heavy

        from tools.experiment_measure import HeldOut, Probe  # lazy: loads luffy_megatron.eval and torch

        if self.held_out is None:
            cfg = run_config([f"model.path={base}"])
            self.held_out = HeldOut(self.paths, AutoTokenizer.from_pretrained(base), cfg.data.max_response_length)
            self.probe = Probe(self.held_out, base, num_prompts=self.args.probe_prompts)
        return self.held_out, self.probe

    def export(self, directory: Path) -> Path:
        from luffy_megatron.actor.remote import export_hf  # lazy: loads the actor's module

        self.workers.actors.run(export_hf, str(directory), {})
        return directory

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()


def build_base(lab: Lab) -> Path:
    """Stage 2a: a random Llama pretrained on the facts in algo.mode=sft through `train.loop.train`, exported."""
    from luffy_megatron.train.loop import train  # lazy: loads Ray, Megatron client code

    args, work = lab.args, lab.work
    base = work / "base"
    if (base / "config.json").exists():
        return base
    init = build_random_model(work / "random_init", corpus_of(lab.paths), hidden=args.base_hidden, layers=4)
    cfg = run_config(
        [
            f"model.path={init}",
            f"data.train_files=[{lab.paths['facts']}]",
            f"trainer.output_dir={work / 'base_run'}",
            *ARMS["sft"],
            "data.train_batch_size=64",
            "actor.ppo_mini_batch_size=64",
            "actor.lr=1e-3",
            "actor.lr_warmup_steps_ratio=0.05",
            "actor.zero_lr_first_step=false",
            f"trainer.total_training_steps={args.base_steps}",
            f"trainer.save_freq={args.base_steps}",
            "trainer.seed=0",
            "data.seed=0",
        ]
    )
    t0 = time.time()
    say(f"base: {args.base_steps} SFT steps of a random Llama (hidden {args.base_hidden}) on the two-operand facts")
    train(cfg, workers=lab.ensure_workers(cfg))
    lab.export(base)
    (base / "pretraining.json").write_text(json.dumps({"steps": args.base_steps, "wall_s": time.time() - t0}))
    say(f"base ready in {base} ({time.time() - t0:.0f}s)")
    return base


def evaluate_base(lab: Lab, base: Path) -> dict:
    """Stage 2b: the base on every split (as the runs' final evaluation), the curve splits, the probe and the
    gate samples; cached in <base>/eval.json."""
    cached = base / "eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    args = lab.args
    lab.ensure_workers(run_config([f"model.path={base}"]))  # fresh workers load the base; reused ones hold it
    held_out, probe = lab.measuring(base)
    fleet, t0 = lab.workers.fleet, time.time()
    final = held_out.evaluate(fleet, lab.pool, splits=SPLITS, limit=None, k=args.samples, seed=11)
    curve = held_out.evaluate(fleet, lab.pool, splits=CURVE_SPLITS, limit=args.curve_problems, k=1, seed=13)
    measured = {
        "facts": final["retention"]["accuracy"],
        "id_unsolved": final["id"]["accuracy"],
        **held_out.gate_samples(fleet, seed=17),
    }
    record = {
        "final": final,
        "curve": {s: curve[s]["accuracy"] for s in CURVE_SPLITS},
        "probe": probe.measure(fleet, base, seed=19),
        "gates": stats.check_gates(measured),
        "eval_s": time.time() - t0,
    }
    cached.write_text(json.dumps(record))
    return record


def arm_config(lab: Lab, arm: str, seed: int, out: Path, base: Path):
    args = lab.args
    return run_config(
        [
            f"model.path={base}",
            f"data.train_files=[{lab.paths['train']}]",
            f"trainer.output_dir={out}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.total_training_steps={args.steps}",
            f"trainer.save_freq={args.eval_every}",
            *([f"actor.lr={args.lr}"] if args.lr is not None else []),
            *ARMS[arm],
        ]
    )


def run_arm(lab: Lab, arm: str, seed: int, base: Path) -> None:
    """One (arm, seed) run on the shared workers: trained in chunks, measured after each; resumes from its
    checkpoint and skips the measurements already recorded."""
    from luffy_megatron.train.loop import train  # lazy: loads Ray, Megatron client code

    args = lab.args
    out = lab.work / "runs" / arm / f"seed_{seed}"
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()).get("steps") == args.steps:
        say(f"{arm} seed {seed}: done already ({done})")
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg, evals_path = arm_config(lab, arm, seed, out, base), out / "evals.jsonl"
    measured = {row["step"] for row in read_jsonl(evals_path)}
    workers = lab.ensure_workers(cfg)
    held_out, probe = lab.measuring(base)
    t_run, timing = time.time(), {"train_s": 0.0, "eval_s": 0.0}
    for point in sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps}):
        if point in measured:
            continue
        t0 = time.time()
        train(with_steps(cfg, point), workers=workers)  # resumes from the newest checkpoint; engine left synced
        timing["train_s"] += time.time() - t0
        t0, eval_seed = time.time(), 1_000_003 * (seed + 1) + point
        curve = held_out.evaluate(
            workers.fleet, lab.pool, splits=CURVE_SPLITS, limit=args.curve_problems, k=1, seed=eval_seed
        )
        policy = lab.export(out / "policy_export")
        row = {
            "step": point,
            **{f"{s}_accuracy": curve[s]["accuracy"] for s in CURVE_SPLITS},
            "id_procedure": curve["id"]["procedure"],
            **probe.measure(workers.fleet, policy, seed=eval_seed + 1),
        }
        shutil.rmtree(policy, ignore_errors=True)
        if point == args.steps:
            final = held_out.evaluate(workers.fleet, lab.pool, splits=SPLITS, limit=None, k=args.samples, seed=11)
            (out / "final.json").write_text(json.dumps(final))
        timing["eval_s"] += time.time() - t0
        append_jsonl(evals_path, row)
        say(
            f"{arm} seed {seed} step {point}/{args.steps}: ID {row['id_accuracy']:.1f}% OOD-length "
            f"{row['ood_length_accuracy']:.1f}% procedure {row['id_procedure']:.0f}% entropy "
            f"{row['probe_entropy']:.3f} KL {row['kl_to_base']:.3f}"
        )
    done.write_text(
        json.dumps({"arm": arm, "seed": seed, "steps": args.steps, "wall_s": time.time() - t_run, **timing})
    )


def check_base(base_eval: dict, mode: str) -> None:
    """Print the gates; with mode 'enforce' a failed gate stops the experiment before any arm runs."""
    for gate in base_eval["gates"]:
        say(f"gate {gate['name']}: {gate['value']:.1f}% ({gate['rule']}): {'pass' if gate['passed'] else 'FAIL'}")
    failures = stats.gate_failures(base_eval["gates"])
    if failures and mode == "enforce":
        raise SystemExit(
            "the base model fails its pre-registered gates, so the comparison would not test the paper's premise "
            f"(facts known, procedure latent):\n{failures}\nNo arm was run. Change the base (--base-steps, "
            "--base-hidden, --fact-copies) and delete its directory to rebuild it, or run with --gates report "
            "to go on anyway (the report then says the gates failed)."
        )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 seed, 20 steps, a smaller base (under 10 minutes)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (full: 0,1,2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (the same for every arm)")
    ap.add_argument("--eval-every", type=int, default=None, help="curve points every K steps")
    ap.add_argument("--lr", type=float, default=None, help="every arm's learning rate (default: the recipe's)")
    ap.add_argument("--base-steps", type=int, default=None, help="the base's pretraining steps")
    ap.add_argument("--base-hidden", type=int, default=None, help="the base's hidden size (a multiple of 32)")
    ap.add_argument("--fact-copies", type=int, default=None, help="copies of each fact in the base's corpus")
    ap.add_argument("--num-train", type=int, default=None, help="training problems")
    ap.add_argument("--num-eval", type=int, default=None, help="problems per held-out split (retention: half)")
    ap.add_argument("--curve-problems", type=int, default=None, help="ID and OOD-length problems per curve point")
    ap.add_argument("--probe-prompts", type=int, default=None, help="ID prompts of the entropy/KL probe")
    ap.add_argument("--samples", type=int, default=None, help="samples per problem in the final evaluation")
    ap.add_argument("--gates", choices=("enforce", "report"), default=None, help="a failed base gate stops the run")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--work", default=None, help="runs, checkpoints, data, the base (not committed)")
    ap.add_argument("--out", default=None, help="report and plots")
    args = ap.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in preset:
        if key != "seeds" and getattr(args, key, None) is not None:
            preset[key] = getattr(args, key)
    preset["seeds"] = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
    preset["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in preset["arms"] if a not in ARMS]
    if unknown or not preset["arms"]:
        ap.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if min(preset["steps"], preset["eval_every"], preset["base_steps"], preset["samples"]) < 1:
        ap.error("--steps, --eval-every, --base-steps and --samples must be >= 1")
    if preset["base_hidden"] % 32:
        ap.error("--base-hidden must be a multiple of 32 (heads of 32)")
    preset["preset"] = "quick" if args.quick else "full"
    return argparse.Namespace(**preset)


def start_ray() -> None:
    import ray  # lazy: only for a run

    from luffy_megatron.utils.ray_auth import private_token_for_local_cluster

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "local")
    private_token_for_local_cluster(address)  # token auth, with a token of this run's own
    env = {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})


def main(argv=None) -> int:
    args = parse_args(argv)
    work, out = (REPO / p if not Path(p).is_absolute() else Path(p) for p in (args.work, args.out))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import ray  # lazy: only for a run

    from luffy_megatron.reward.pool import RewardPool  # lazy: only for a run

    paths = build_data(work / "data", num_train=args.num_train, num_eval=args.num_eval, fact_copies=args.fact_copies)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with RewardPool(num_workers=1, timeout_s=10.0, grader="math") as pool:  # before Ray and vLLM start threads
        start_ray()
        lab = Lab(args, work, paths, pool)
        try:
            base = build_base(lab)
            base_eval = evaluate_base(lab, base)
            check_base(base_eval, args.gates)
            for seed in args.seeds:  # seed-major: a partial run still covers every arm
                for arm in args.arms:
                    run_arm(lab, arm, seed, base)
        finally:
            lab.shutdown()
            ray.shutdown()
    written = write_report(work, out, args=args, base_eval=base_eval, total_wall_s=time.time() - t0)
    say(f"done in {time.time() - t0:.0f}s: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
