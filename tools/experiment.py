#!/usr/bin/env python
"""`make experiment` / `make experiment-quick`: LUFFY's headline comparison in miniature on a CPU.

The same weak model, task, seeds and step budget for four arms, all trained by `luffy-train`'s loop
(`train.loop.train`: Megatron actor, vLLM engine and reward pool on Ray) and graded with `luffy-eval`'s grading:

* on_policy         on-policy GRPO: 8 generations per prompt, no demonstrations (PPO clip on, as upstream's
                    train_on_policy.sh);
* luffy             1 demonstration + 7 generations per prompt, off_policy_reshape=p_div_p_0.1 (the main run);
* luffy_no_reshape  the same without policy shaping (off_policy_reshape=no_reshape: plain importance weight 1);
* sft               algo.mode=sft: token-mean NLL on the same demonstrations, same prompts, optimiser and steps.

Stages (each idempotent; a finished stage or run is not redone, an interrupted run resumes from its checkpoint):

1. data (`<work>/data`): synthetic additions of one-digit numbers with step-by-step <think> demonstrations
   (luffy_megatron/data/synthetic.py): training problems and an in-distribution held-out split with 2-3
   operands, an out-of-distribution split with 4 operands (longer chains than any training problem), all without
   a system prompt (luffy-eval's protocol removes it); and *format-only* demonstrations: the same text with every
   computed number replaced by a random one;
2. the weak model (`<work>/weak_model`): a randomly initialised Llama (~1.1M parameters, a byte-level BPE
   tokenizer trained on the task's text)
   fine-tuned by `train.loop.train` in algo.mode=sft on the format-only demonstrations, so it writes the format but
   its answers are right only by chance; exported as an HF model;
3. the arms x seeds (`<work>/runs/<arm>/seed_<s>`): `train.loop.train` in chunks of --eval-every steps on one set
   of workers per run; after each chunk (and before the first) the engine, holding the actor's weights, answers
   the held-out splits at luffy-eval's temperature 0.6, graded as `luffy-eval --protocol math-verify` grades
   (`eval.grading_text` + the `math` grader in a `RewardPool`, `eval.aggregate`); `evals.jsonl`, the trainer's
   `metrics.jsonl`, and `done.json` when the run is complete;
4. the report (`--out`, default docs/experiment): results.md (table), results.json, reward.png, accuracy.png,
   entropy.png.

    python tools/experiment.py [--quick] [--seeds 0,1,2] [--steps N] [--eval-every K] [--arms a,b] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "experiment_cpu.yaml"
ARMS: dict[str, list[str]] = {
    "on_policy": ["rollout.n_off_policy=0", "algo.loss_remove_clip=false"],
    "luffy": [],
    "luffy_no_reshape": ["algo.off_policy_reshape=no_reshape"],
    "sft": ["algo.mode=sft", "rollout.n=1", "rollout.n_off_policy=-1"],
}
ARM_LABELS = {
    "on_policy": "On-policy GRPO",
    "luffy": "LUFFY (p/(p+0.1))",
    "luffy_no_reshape": "LUFFY, no shaping",
    "sft": "SFT",
}
SPLITS = ("id", "ood")
EVAL_TEMPERATURE = 0.6  # luffy-eval's default (LUFFY's final protocol)

# full and quick presets; every field can be overridden on the command line
PRESETS = {
    "full": dict(
        seeds=[0, 1, 2],
        steps=70,
        eval_every=10,
        format_steps=120,
        num_train=800,
        num_eval=64,
        work="outputs/experiment/full",
        out="docs/experiment",
    ),
    "quick": dict(
        seeds=[0],
        steps=10,
        eval_every=5,
        format_steps=120,
        num_train=800,
        num_eval=32,
        work="outputs/experiment/quick",
        out="docs/experiment/quick",
    ),
}

log = logging.getLogger("experiment")


def say(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data


def _addition_solution(problem, result_of) -> str:
    """synthetic.worked_solution's text for an all-'+' problem, with each step's result given by
    `result_of(upper bound)` (the true sums when `result_of` is None)."""
    from luffy_megatron.data.synthetic import worked_solution

    if any(op != "+" for op in problem.ops):
        raise ValueError(f"format-only demonstrations are made for additions only, got {problem.text()}")
    if result_of is None:
        return worked_solution(problem)

    def noise(_true: int, step: int) -> int:
        bound = sum(problem.operands[: step + 1])  # the largest the running sum can be after `step` additions
        return result_of(bound if bound > 0 else 9)

    return worked_solution(problem, step_result=noise)


def build_data(data_dir: Path, *, num_train: int, num_eval: int, seed: int = 0) -> dict[str, Path]:
    """train.parquet (correct demonstrations), format.parquet (format-only demonstrations of the training problems),
    id.parquet and ood.parquet (held out, no demonstrations). Written once; returns the paths."""
    from luffy_megatron.data import write_luffy_parquet
    from luffy_megatron.data.synthetic import ArithmeticConfig, generate_problems, luffy_row, worked_solution

    paths = {name: data_dir / f"{name}.parquet" for name in ("train", "format", "id", "ood")}
    if all(p.exists() for p in paths.values()):
        return paths
    rng = random.Random(seed)
    seen: set[str] = set()
    in_dist = ArithmeticConfig(min_digits=1, max_digits=1, min_operands=2, max_operands=3, ops=("+",))
    out_dist = ArithmeticConfig(min_digits=1, max_digits=1, min_operands=4, max_operands=4, ops=("+",))
    held_id = generate_problems(num_eval, in_dist, rng, seen)
    held_ood = generate_problems(num_eval, out_dist, rng, seen)
    train = generate_problems(num_train, in_dist, rng, seen)
    fmt = rng.sample(train, len(train))  # the training problems (no held-out one), with format-only texts
    for p in train[:50]:  # the format-only text is synthetic.py's text, numbers aside
        assert _addition_solution(p, None) == worked_solution(p), p

    def rows(problems, split, source, with_target):
        return [
            luffy_row(p, i, split=split, with_target=with_target, system_prompt="", data_source=source)
            for i, p in enumerate(problems)
        ]

    format_rows = rows(fmt, "train", "", True)
    noise = random.Random(seed + 1)
    for row, p in zip(format_rows, fmt):
        row["target"] = [{"role": "assistant", "content": _addition_solution(p, lambda b: noise.randint(0, b))}]
    write_luffy_parquet(rows(train, "train", "", True), paths["train"])
    write_luffy_parquet(format_rows, paths["format"])
    write_luffy_parquet(rows(held_id, "test", "arith_id", False), paths["id"])
    write_luffy_parquet(rows(held_ood, "test", "arith_ood", False), paths["ood"])
    say(
        f"data: {len(train)} training problems (1-digit additions, 2-3 operands), {len(fmt)} format-only "
        f"demonstrations, {num_eval} held-out in-distribution and {num_eval} out-of-distribution (4 operands) "
        f"in {data_dir}"
    )
    return paths


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer of at most `vocab_size` tokens trained on the task's text (350 on this corpus;
    digits always single tokens; <|im_start|>/<|im_end|> special, <|im_end|> the EOS, as SmolLM2's), with no
    chat template of its own, so the trainer and luffy-eval use the default ChatML + <think> template. With a
    few hundred tokens the LM head costs about what the transformer does, instead of ~100x more with a 49k
    vocabulary (a step took ~20 s with SmolLM2's tokenizer, ~1.5 s with this one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_random_model(out_dir: Path, corpus: list[str], seed: int = 0) -> Path:
    """A randomly initialised 4-layer Llama (hidden 128, 4 heads of 32, ~1.1M parameters) with the task
    tokenizer of `build_tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from luffy_megatron.utils.fs import atomic_dir

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = build_tokenizer(corpus)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def corpus_of(paths: dict[str, Path]) -> list[str]:
    """The texts the tokenizer is trained on: every prompt and demonstration of the training files, held-out
    prompts, and the chat template's words."""
    import pandas as pd

    texts = ["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n<think>\n", "system\n"]
    for name in ("train", "format", "id", "ood"):
        df = pd.read_parquet(paths[name])
        texts += [m["content"] for prompt in df["prompt"] for m in prompt]
        if "target" in df:
            texts += [t[0]["content"] for t in df["target"]]
    return texts


# ------------------------------------------------------------------------------------------ evaluation


class HeldOut:
    """The held-out splits as luffy-eval loads and prompts them (eval.load_benchmarks / build_prompts: no system
    prompt, the chat template luffy-eval picks), answered by the run's engines and graded as luffy-eval grades."""

    def __init__(self, paths: dict[str, Path], tokenizer, max_new_tokens: int):
        from luffy_megatron import eval as luffy_eval

        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.benchmarks = dict(
            zip(
                SPLITS,
                luffy_eval.load_benchmarks([str(paths[s]) for s in SPLITS], data_root=None, limit=None, n_samples="1"),
            )
        )
        luffy_eval.build_prompts(
            list(self.benchmarks.values()), tokenizer, keep_system_prompt=False, chat_template=None
        )

    def evaluate(self, fleet, pool, *, seed: int) -> tuple[dict[str, float], list[dict]]:
        from luffy_megatron import eval as luffy_eval

        scores_by_split, samples = {}, []
        for split, bench in self.benchmarks.items():
            outputs = fleet.generate(
                bench.prompt_ids,
                [self.max_new_tokens] * len(bench.prompt_ids),
                temperature=EVAL_TEMPERATURE,
                top_p=1.0,
                top_k=-1,
                seed=seed,
            )
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]  # vLLM's text
            scores = pool.grade(
                [(luffy_eval.grading_text(t), row["answer"]) for t, row in zip(texts, bench.rows)],
                grader=luffy_eval.GRADERS_BY_KIND[bench.kind],
            )
            scores_by_split[split] = luffy_eval.aggregate(bench.problem_ids, scores)["accuracy"]
            samples += [
                {"split": split, "problem": row["problem"], "gold": row["answer"], "response": t, "score": s}
                for t, row, s in zip(texts, bench.rows, scores)
            ]
        return scores_by_split, samples


# ------------------------------------------------------------------------------------------------ runs


def run_config(overrides: list[str]):
    from luffy_megatron.config import load_config

    return load_config(str(RECIPE), overrides)


def with_steps(cfg, steps: int):
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_training_steps=steps))


def start(cfg, log_dir: Path):
    from transformers import AutoTokenizer

    from luffy_megatron.train.setup import pad_token_id, start_workers

    return start_workers(
        cfg, pad_token_id(AutoTokenizer.from_pretrained(cfg.model.path)), use_gpu=False, log_dir=log_dir
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def build_weak_model(work: Path, paths: dict[str, Path], *, format_steps: int) -> Path:
    """Stage 2: the random model fine-tuned on format-only demonstrations with algo.mode=sft, exported to HF."""
    from luffy_megatron.actor.remote import export_hf
    from luffy_megatron.train.loop import train

    weak = work / "weak_model"
    if (weak / "config.json").exists():
        return weak
    init = build_random_model(work / "random_init", corpus_of(paths))
    out = work / "format_sft"
    cfg = run_config(
        [
            f"model.path={init}",
            f"data.train_files=[{paths['format']}]",
            f"trainer.output_dir={out}",
            *ARMS["sft"],
            "data.train_batch_size=32",
            "actor.ppo_mini_batch_size=32",
            "actor.lr=2e-3",
            f"trainer.total_training_steps={format_steps}",
            f"trainer.save_freq={format_steps}",
            "trainer.seed=0",
            "data.seed=0",
        ]
    )
    t0 = time.time()
    say(f"weak model: {format_steps} SFT steps of a random ~1.1M-parameter Llama on format-only demonstrations")
    workers = start(cfg, out / "logs" / "workers")
    try:
        train(cfg, workers=workers)
        workers.actors.run(
            export_hf, str(weak), {"format_sft_steps": format_steps, "wall_s": round(time.time() - t0, 1)}
        )
    finally:
        workers.shutdown()
    say(f"weak model ready in {weak} ({time.time() - t0:.0f}s)")
    return weak


def run_arm(
    arm: str,
    seed: int,
    *,
    work: Path,
    weak: Path,
    paths: dict[str, Path],
    steps: int,
    eval_every: int,
    held_out: HeldOut,
    pool,
) -> dict:
    """One (arm, seed) run; resumes from its checkpoint and skips evaluations already recorded."""
    from luffy_megatron.train.loop import train

    out = work / "runs" / arm / f"seed_{seed}"
    done = out / "done.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("steps") == steps:
            say(f"{arm} seed {seed}: done already ({done})")
            return record
    out.mkdir(parents=True, exist_ok=True)
    evals_path = out / "evals.jsonl"
    evaluated = {row["step"] for row in read_jsonl(evals_path)}
    timing_path = out / "timing.json"
    timing = (
        json.loads(timing_path.read_text())
        if timing_path.exists()
        else {"wall_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "start_s": 0.0}
    )
    points = sorted({0, *range(eval_every, steps + 1, eval_every), steps})
    cfg = run_config(
        [
            f"model.path={weak}",
            f"data.train_files=[{paths['train']}]",
            f"trainer.output_dir={out}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.total_training_steps={steps}",
            f"trainer.save_freq={eval_every}",
            *ARMS[arm],
        ]
    )
    t_run = time.time()
    t0 = time.time()
    workers = start(cfg, out / "logs" / "workers")
    timing["start_s"] += time.time() - t0
    try:
        for point in points:
            if point in evaluated:
                continue
            if point > 0:  # train up to `point` (resuming from the newest checkpoint), leaving the engine synced
                t0 = time.time()
                train(with_steps(cfg, point), workers=workers)
                timing["train_s"] += time.time() - t0
            t0 = time.time()
            accuracy, samples = held_out.evaluate(workers.fleet, pool, seed=1_000_003 * seed + point + 1)
            timing["eval_s"] += time.time() - t0
            append_jsonl(evals_path, {"step": point, **{f"{s}_accuracy": accuracy[s] for s in SPLITS}})
            (out / "samples_last_eval.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            say(
                f"{arm} seed {seed} step {point}/{steps}: held-out accuracy ID {accuracy['id']:.1f}% "
                f"OOD {accuracy['ood']:.1f}%"
            )
            timing["wall_s_partial"] = timing["wall_s"] + time.time() - t_run
            timing_path.write_text(json.dumps(timing))
    finally:
        workers.shutdown()
    timing["wall_s"] += time.time() - t_run
    timing.pop("wall_s_partial", None)
    timing_path.write_text(json.dumps(timing))
    record = {"arm": arm, "seed": seed, "steps": steps, **timing}
    done.write_text(json.dumps(record) + "\n")
    return record


# ---------------------------------------------------------------------------------------------- report


def _mean_spread(values: list[float], fmt: str = "{:.1f}") -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    spread = f"{fmt.format(min(values))}–{fmt.format(max(values))}"
    return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values))} ({spread})"


def collect(work: Path, arms: list[str], seeds: list[int], last_n: int) -> dict[str, Any]:
    """Per arm and seed: the evaluations, the trainer's per-step reward and entropy, and the summary."""
    from luffy_megatron.metrics.sinks import read_metrics

    results: dict[str, Any] = {}
    for arm in arms:
        per_seed = {}
        for seed in seeds:
            out = work / "runs" / arm / f"seed_{seed}"
            done = out / "done.json"
            if not done.exists():
                continue
            metrics = read_metrics(out / "metrics.jsonl")
            by_step: dict[int, dict] = {}
            for row in metrics:  # a resumed chunk never repeats a step; keep the last row of a step anyway
                by_step[int(row["step"])] = row
            steps = sorted(by_step)
            reward = [by_step[s].get("rollout/on_policy_reward") for s in steps]
            entropy = [by_step[s].get("actor/entropy") for s in steps]
            evals = read_jsonl(out / "evals.jsonl")
            final = max(evals, key=lambda r: r["step"])
            tail = [r for r in reward[-last_n:] if r is not None]
            per_seed[seed] = {
                "steps": steps,
                "reward": reward,
                "entropy": entropy,
                "evals": evals,
                "final_id": final["id_accuracy"],
                "final_ood": final["ood_accuracy"],
                "last_reward": statistics.fmean(tail) if tail else None,
                "final_entropy": entropy[-1] if entropy else None,
                **{k: v for k, v in json.loads(done.read_text()).items() if k.endswith("_s")},
            }
        results[arm] = per_seed
    return results


def write_report(results: dict[str, Any], out_dir: Path, *, settings: dict[str, Any], last_n: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = [
        "arm",
        "seeds",
        "final ID accuracy %",
        "final OOD accuracy %",
        f"on-policy reward, last {last_n} steps",
        "final entropy",
        "wall time per seed (s)",
        "wall time, all seeds (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, per_seed in results.items():
        runs = list(per_seed.values())
        if not runs:
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    ARM_LABELS.get(arm, arm),
                    ",".join(str(s) for s in per_seed),
                    _mean_spread([r["final_id"] for r in runs]),
                    _mean_spread([r["final_ood"] for r in runs]),
                    _mean_spread([r["last_reward"] for r in runs], "{:.3f}")
                    if arm != "sft"
                    else "n/a (generates nothing)",
                    _mean_spread([r["final_entropy"] for r in runs], "{:.3f}"),
                    _mean_spread([r["wall_s"] for r in runs], "{:.0f}"),
                    f"{sum(r['wall_s'] for r in runs):.0f}",
                ]
            )
            + " |"
        )
    start_rows = [
        r["evals"][0]
        for per_seed in results.values()
        for r in per_seed.values()
        if r["evals"] and r["evals"][0]["step"] == 0
    ]
    start_line = ""
    if start_rows:
        start_line = (
            f"Before training (the weak model, every arm): ID {_mean_spread([r['id_accuracy'] for r in start_rows])}%, "
            f"OOD {_mean_spread([r['ood_accuracy'] for r in start_rows])}%.\n\n"
        )
    md = (
        f"# LUFFY's comparison in miniature ({settings['preset']})\n\n"
        f"Generated by `python tools/experiment.py{' --quick' if settings['preset'] == 'quick' else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + start_line
        + "Accuracy: held-out problems answered at temperature 0.6 and graded as `luffy-eval` grades (text after "
        "`</think>`, math-verify on the last `\\boxed{}`), after the last step; mean ± sample std over seeds "
        "(min–max). Reward: the trainer's `rollout/on_policy_reward` (generated rows only). Entropy: the "
        "trainer's `actor/entropy` (token mean over the rows trained on, demonstrations included) at the last "
        "step. Wall time: worker start-up, training and evaluation of one run.\n\n"
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "\n\n"
        "![reward](reward.png)\n\n![held-out accuracy](accuracy.png)\n\n![entropy](entropy.png)\n"
    )
    written = [out_dir / "results.md", out_dir / "results.json"]
    written[0].write_text(md)
    written[1].write_text(
        json.dumps(
            {"settings": settings, "arms": {a: {str(s): r for s, r in v.items()} for a, v in results.items()}}, indent=1
        )
    )
    written += plot(results, out_dir)
    return written


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def band(ax, xs_by_seed, ys_by_seed, label, style="-", color=None):
        common = (
            sorted(
                set.intersection(
                    *[set(x for x, y in zip(xs, ys) if y is not None) for xs, ys in zip(xs_by_seed, ys_by_seed)]
                )
            )
            if xs_by_seed
            else []
        )
        if not common:
            return
        table = [dict(zip(xs, ys)) for xs, ys in zip(xs_by_seed, ys_by_seed)]
        vals = [[t[x] for t in table] for x in common]
        mean = [statistics.fmean(v) for v in vals]
        (line,) = ax.plot(common, mean, style, label=label, color=color, marker="o" if len(common) < 12 else None, ms=3)
        if len(table) > 1:
            ax.fill_between(common, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15, color=line.get_color())

    paths = []
    for name, key, ylabel in (
        ("reward", "reward", "on-policy reward (mean of generated rows)"),
        ("entropy", "entropy", "actor/entropy (token mean)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, per_seed in results.items():
            runs = list(per_seed.values())
            if runs and any(v is not None for r in runs for v in r[key]):
                band(ax, [r["steps"] for r in runs], [r[key] for r in runs], ARM_LABELS.get(arm, arm))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} (mean over seeds, band = min–max)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split, title in zip(axes, SPLITS, ("in-distribution (2-3 operands)", "out-of-distribution (4 operands)")):
        for arm, per_seed in results.items():
            runs = list(per_seed.values())
            if runs:
                band(
                    ax,
                    [[e["step"] for e in r["evals"]] for r in runs],
                    [[e[f"{split}_accuracy"] for e in r["evals"]] for r in runs],
                    ARM_LABELS.get(arm, arm),
                )
        ax.set_title(f"held-out accuracy, {title}", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy % (luffy-eval grading, T=0.6)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 seed, 8 steps (under 10 minutes on 2 cores)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (full: 0,1,2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (the same for every arm)")
    ap.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every K steps (and at 0)")
    ap.add_argument("--format-steps", type=int, default=None, help="SFT steps of the weak model on format-only data")
    ap.add_argument("--num-train", type=int, default=None)
    ap.add_argument("--num-eval", type=int, default=None, help="problems in each held-out split")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--work", default=None, help="runs, checkpoints, data, the weak model (not committed)")
    ap.add_argument("--out", default=None, help="table and plots")
    args = ap.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("steps", "eval_every", "format_steps", "num_train", "num_eval", "work", "out"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    preset["seeds"] = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
    preset["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in preset["arms"] if a not in ARMS]
    if unknown or not preset["arms"]:
        ap.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if preset["steps"] < 1 or preset["eval_every"] < 1 or preset["format_steps"] < 1:
        ap.error("--steps, --eval-every and --format-steps must be >= 1")
    preset["preset"] = "quick" if args.quick else "full"
    return argparse.Namespace(**preset)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    work, out = (REPO / args.work if not Path(args.work).is_absolute() else Path(args.work)), Path(args.out)
    out = out if out.is_absolute() else REPO / out
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import ray
    from transformers import AutoTokenizer

    from luffy_megatron.reward.pool import RewardPool
    from luffy_megatron.utils.ray_auth import private_token_for_local_cluster

    paths = build_data(work / "data", num_train=args.num_train, num_eval=args.num_eval)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # the grader pool before Ray and vLLM start threads (as luffy-eval does)
    with RewardPool(num_workers=1, timeout_s=10.0, grader="math") as pool:
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS", "local")
            private_token_for_local_cluster(address)  # token auth, with a token of this run's own
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={
                    "env_vars": {
                        "PYTHONPATH": str(REPO),
                        "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"],
                    }
                },
            )
        try:
            weak = build_weak_model(work, paths, format_steps=args.format_steps)
            cfg = run_config([f"model.path={weak}"])
            held_out = HeldOut(paths, AutoTokenizer.from_pretrained(weak), max_new_tokens=cfg.data.max_response_length)
            for seed in args.seeds:  # seed-major: a partial run still covers every arm
                for arm in args.arms:
                    run_arm(
                        arm,
                        seed,
                        work=work,
                        weak=weak,
                        paths=paths,
                        steps=args.steps,
                        eval_every=args.eval_every,
                        held_out=held_out,
                        pool=pool,
                    )
        finally:
            ray.shutdown()
    last_n = max(1, min(5, args.steps // 2))
    settings = {
        "preset": args.preset,
        "seeds": args.seeds,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "format_sft_steps": args.format_steps,
        "train_problems": args.num_train,
        "held_out_problems": args.num_eval,
        "recipe": str(RECIPE.relative_to(REPO)),
        "total_wall_s": round(time.time() - t0),
    }
    written = write_report(collect(work, args.arms, args.seeds, last_n), out, settings=settings, last_n=last_n)
    say(f"done in {time.time() - t0:.0f}s: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
