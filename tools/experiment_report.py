"""The miniature's report (tools/experiment.py): results.md with the pre-registered rules before the numbers,
results.json, and the plots."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tools import experiment_stats as stats
from tools.experiment_task import ARM_LABELS, SPLIT_LABELS, SPLITS


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def collect(work: Path, arms: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """Per arm and finished seed: the curve points, the final evaluation, the per-step on-policy reward."""
    results: dict[str, dict[int, dict]] = {}
    for arm in arms:
        results[arm] = {}
        for seed in seeds:
            out = work / "runs" / arm / f"seed_{seed}"
            if not (out / "done.json").exists():
                continue
            by_step = {int(r["step"]): r for r in read_jsonl(out / "metrics.jsonl")}
            evals = read_jsonl(out / "evals.jsonl")
            final = json.loads((out / "final.json").read_text())
            results[arm][seed] = {
                "steps": sorted(by_step),
                "reward": [by_step[s].get("rollout/on_policy_reward") for s in sorted(by_step)],
                "evals": evals,
                "final": final,
                "final_id": final["id"]["accuracy"],
                "probe_entropy": evals[-1]["probe_entropy"],
                "kl_to_base": evals[-1]["kl_to_base"],
                **{k: v for k, v in json.loads((out / "done.json").read_text()).items() if k.endswith("_s")},
            }
    return results


def _ms(values, fmt="{:.1f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    per_seed = ", ".join(fmt.format(v) for v in values)
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))} ({per_seed})"


def verdicts(results: dict, base_eval: dict) -> dict:
    def scores(arm):
        return [{s: r["final"][s]["per_problem"] for s in SPLITS} for r in results.get(arm, {}).values()]

    def runs(arm):
        return list(results.get(arm, {}).values())

    base_id = base_eval["final"]["id"]["accuracy"]
    return {
        "C1": stats.verdict_c1(scores("luffy"), scores("on_policy")),
        "C2": stats.verdict_c2(scores("luffy"), scores("sft")),
        "C3": stats.verdict_c3(runs("luffy"), runs("on_policy"), base_id),
        "C4": stats.verdict_c4(runs("luffy"), runs("luffy_no_reshape")),
        "overlap": stats.overlap_effect(scores("luffy_one_step"), scores("luffy")),
    }


def vs_base(results: dict, base_eval: dict) -> dict:
    """Each arm's final accuracy minus the base's, per split, with the paired bootstrap interval."""
    base = {s: base_eval["final"][s]["per_problem"] for s in SPLITS}
    out = {}
    for arm, per_seed in results.items():
        if per_seed:
            arm_scores = [{s: r["final"][s]["per_problem"] for s in SPLITS} for r in per_seed.values()]
            out[arm] = {s: stats.paired_bootstrap(arm_scores, [base] * len(arm_scores), [s]) for s in SPLITS}
    return out


def _rules() -> str:
    gates = "\n".join(f"- **{g.name}**: {g.rule()}" for g in stats.GATES)
    claims = "\n".join(f"- **{c}: {title}.** {rule}" for c, (title, rule) in stats.CRITERIA.items())
    return (
        "## Pre-registered rules\n\n"
        "Fixed in `tools/experiment_stats.py` and committed before the full run; nothing below was tuned after "
        "it was seen.\n\nGates on the base, checked before any arm runs:\n\n"
        f"{gates}\n\nClaims (differences in percentage points; intervals: problem-level paired bootstrap, 95%, "
        f"2000 resamples, pooled over seeds):\n\n{claims}\n\n"
        f"Overlapped generation (issue 27's arm): {stats.OVERLAP_RULE}\n"
    )


def _tables(results: dict, base_eval: dict) -> str:
    head = [
        "arm",
        "seeds",
        *(SPLIT_LABELS[s] for s in SPLITS),
        "ID using the rewrite %",
        "on-policy reward, last quarter",
    ]
    head += ["probe entropy", "KL to base", "wall s per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = base_eval["final"]
    lines.append(
        "| base (step 0) | - | "
        + " | ".join(f"{base[s]['accuracy']:.1f}" for s in SPLITS)
        + f" | {base['id']['procedure']:.1f} | - | {base_eval['probe']['probe_entropy']:.3f} | 0 | - |"
    )
    for arm, per_seed in results.items():
        rs = list(per_seed.values())
        if not rs:
            continue
        reward = [stats.window_mean(r["reward"], last=0.25) for r in rs] if arm != "sft" else []
        cells = [ARM_LABELS[arm], ",".join(map(str, per_seed))]
        cells += [_ms([r["final"][s]["accuracy"] for r in rs]) for s in SPLITS]
        cells += [_ms([r["final"]["id"]["procedure"] for r in rs]), _ms(reward, "{:.2f}") if reward else "n/a (SFT)"]
        cells += [_ms([r["probe_entropy"] for r in rs], "{:.3f}"), _ms([r["kl_to_base"] for r in rs], "{:.3f}")]
        cells.append(_ms([r["wall_s"] for r in rs], "{:.0f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _difference(d: dict) -> str:
    seeds = ", ".join(f"{v:+.1f}" for v in d["per_seed"])
    return f"{d['difference']:+.1f} pp [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] (per seed: {seeds})"


def _claims(verdict: dict, base_delta: dict) -> str:
    lines = ["## Verdicts\n"]
    c1, c2, c3, c4 = (verdict[c] for c in ("C1", "C2", "C3", "C4"))
    for name in ("C1", "C2", "C3", "C4"):
        lines.append(f"- **{name}: {stats.CRITERIA[name][0]}: {verdict[name]['verdict']}.**")
        v = verdict[name]
        if v["verdict"] == stats.NOT_RUN:
            continue
        if name == "C1":
            lines.append(
                f"  LUFFY - GRPO, ID: {_difference(c1['id'])} ({c1['id']['verdict']}); OOD-length: "
                f"{_difference(c1['ood_length'])} ({c1['ood_length']['verdict']})."
            )
        elif name == "C2":
            lines.append(
                f"  LUFFY - SFT, OOD-aggregate: {_difference(c2['ood_aggregate'])}; ID: {_difference(c2['id'])}."
            )
        elif name == "C3":
            lines.append(
                "  GRPO on-policy reward, first eighth -> last quarter per seed: "
                + ", ".join(
                    f"{a:.3f} -> {b:.3f}"
                    for a, b in zip(c3["grpo_first_eighth_reward"], c3["grpo_last_quarter_reward"])
                )
                + f"; premise per seed {c3['grpo_flat_per_seed']}. LUFFY last-quarter reward per seed: "
                + ", ".join(f"{r:.3f}" for r in c3["luffy_last_quarter_reward"])
                + f"; learns per seed {c3['luffy_learns_per_seed']}."
            )
        else:
            lines.append(
                f"  shaped entropy higher per seed {c4['entropy_higher_per_seed']}; shaped - unshaped "
                f"mean final ID {c4['id_gap']:+.1f} pp."
            )
    overlap = verdict["overlap"]
    lines.append(f"- **Overlapped generation (LUFFY one-step-off vs LUFFY): {overlap['verdict']}.**")
    if overlap["verdict"] != stats.NOT_RUN:
        lines.append(f"  ID: {_difference(overlap['id'])}; OOD-aggregate: {_difference(overlap['ood_aggregate'])}.")
    lines.append("\nEach arm against the base (final minus step 0, same problems):\n")
    for arm, per_split in base_delta.items():
        cells = "; ".join(f"{SPLIT_LABELS[s]} {p:+.1f} [{lo:+.1f}, {hi:+.1f}]" for s, (p, lo, hi) in per_split.items())
        lines.append(f"- {ARM_LABELS[arm]}: {cells}")
    return "\n".join(lines) + "\n"


def _timing(work: Path, results: dict, base_eval: dict, total_wall_s: float) -> str:
    pretraining = work / "base" / "pretraining.json"
    base_s = json.loads(pretraining.read_text())["wall_s"] if pretraining.exists() else float("nan")
    runs_s = sum(r["wall_s"] for per_seed in results.values() for r in per_seed.values())
    return (
        f"Wall time on this machine: base pretraining {base_s / 60:.1f} min, its evaluation "
        f"{base_eval['eval_s']:.0f} s, the runs {runs_s / 60:.1f} min (training and measurement); this invocation "
        f"{total_wall_s / 60:.1f} min (what was done already is not redone)."
    )


def write_report(work: Path, out: Path, *, args, base_eval: dict, total_wall_s: float) -> list[Path]:
    from tools.experiment_plots import plot_all  # lazy: matplotlib loads only for the report

    out.mkdir(parents=True, exist_ok=True)
    results = collect(work, args.arms, args.seeds)
    verdict, base_delta = verdicts(results, base_eval), vs_base(results, base_eval)
    gates = "\n".join(
        f"| {g['name']} | {g['rule']} | {g['value']:.1f}% | {'pass' if g['passed'] else 'FAIL'} |"
        for g in base_eval["gates"]
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    pilot = out / "pilot.md"
    md = (
        f"# LUFFY's claims in miniature ({args.preset})\n\n"
        f"Generated by `python tools/experiment.py{' --quick' if args.preset == 'quick' else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {_timing(work, results, base_eval, total_wall_s)} "
        "Settings: "
        + ", ".join(f"{k}={v}" for k, v in settings.items())
        + ".\n\n"
        + _rules()
        + "\n## The base\n\n| gate | rule | measured | |\n|---|---|---|---|\n"
        + gates
        + (
            "\n\nThe gates were reported, not enforced (the quick preset's smaller base).\n"
            if args.gates == "report"
            else "\n"
        )
        + "\n## Final accuracy (%, T=0.6, avg@"
        + f"{args.samples}; mean ± std over seeds, then per seed)\n\n"
        + _tables(results, base_eval)
        + "\nOn-policy reward: the trainer's `rollout/on_policy_reward` (generated rows only). Probe: the policy's "
        "own T=1 generations on fixed ID prompts, token-mean entropy and KL(policy || base) over the vocabulary. "
        "Using the rewrite: ID answers that rewrite the problem's expression with one line per operation.\n\n"
        + _claims(verdict, base_delta)
        + "\n![accuracy](accuracy.png)\n\n![reward](reward.png)\n\n![probe](probe.png)\n"
        + (f"\n{pilot.read_text()}" if pilot.exists() else "")
    )
    written = [out / "results.md", out / "results.json"]
    written[0].write_text(md)
    written[1].write_text(
        json.dumps(
            {
                "settings": settings,
                "base": base_eval,
                "arms": {a: {str(s): r for s, r in v.items()} for a, v in results.items()},
                "verdicts": verdict,
                "vs_base": base_delta,
            },
            indent=1,
        )
    )
    return written + plot_all(results, base_eval, out)
