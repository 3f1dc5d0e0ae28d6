"""The miniature's pre-registered rules (tools/experiment.py): the base model's gates, the paired statistics and
the verdict of each claim. Pure functions of the measured numbers; the rules' text in the report is rendered
from the constants here, which were committed before the full run was made.

Numbers: accuracies in %, per-problem scores as the mean over a problem's samples (0..1), rewards in 0..1.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN = "reproduced", "not reproduced", "inconclusive", "not run"


# ------------------------------------------------------------------------------------------------ gates


@dataclass(frozen=True)
class Gate:
    name: str
    what: str
    low: float | None = None
    high: float | None = None

    def rule(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g}% <= {self.what} <= {self.high:g}%"
        return f"{self.what} >= {self.low:g}%" if self.low is not None else f"{self.what} <= {self.high:g}%"

    def passed(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


GATES = (
    Gate("facts", "retention accuracy (the two-operand facts, T=0.6)", low=90.0),
    Gate("id_unsolved", "ID accuracy (T=0.6)", high=10.0),
    Gate("rewrite_start", "share of T=1 ID samples that start a rewrite", low=1.0, high=20.0),
    Gate("no_chains", "share of T=1 ID samples with a chain of 2 or more steps", high=2.0),
)


def check_gates(measured: dict[str, float]) -> list[dict]:
    """Each gate against `measured` (keys: the gate names): name, rule, value, passed."""
    return [
        {"name": g.name, "rule": g.rule(), "value": measured[g.name], "passed": g.passed(measured[g.name])}
        for g in GATES
    ]


def gate_failures(checked: list[dict]) -> str:
    """'' when every gate passed, else one line per failed gate."""
    return "\n".join(f"  {c['name']}: {c['value']:.1f}% fails {c['rule']}" for c in checked if not c["passed"])


# ------------------------------------------------------------------------------------------- statistics


def paired_bootstrap(
    a: list[dict[str, list[float]]],
    b: list[dict[str, list[float]]],
    splits: list[str],
    *,
    iterations: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The difference a - b in percentage points of the mean over `splits` of each split's accuracy (mean over
    seeds and problems), with a problem-level paired bootstrap 95% interval: each iteration resamples each
    split's problems with replacement, the same problems for every seed and both arms. `a[s][split]`: the
    per-problem scores of seed s (a seed's problems in the same order in a and b)."""
    rng = np.random.default_rng(seed)
    diffs = [np.array([np.asarray(x[split]) - np.asarray(y[split]) for x, y in zip(a, b)]) for split in splits]
    point = 100.0 * float(np.mean([d.mean() for d in diffs]))
    draws = np.zeros(iterations)
    for d in diffs:
        per_problem = d.mean(axis=0)  # over seeds: a resampled problem counts for every seed
        idx = rng.integers(0, len(per_problem), size=(iterations, len(per_problem)))
        draws += per_problem[idx].mean(axis=1)
    draws *= 100.0 / len(diffs)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def per_seed_differences(a: list[dict], b: list[dict], splits: list[str]) -> list[float]:
    """Per seed, a - b in percentage points of the mean over `splits` of the accuracy."""
    return [
        100.0 * statistics.fmean(statistics.fmean(x[s]) - statistics.fmean(y[s]) for s in splits) for x, y in zip(a, b)
    ]


def window_mean(values: list[float | None], *, first: float | None = None, last: float | None = None) -> float:
    """The mean of the first or last share of a per-step series (at least one step; None entries skipped)."""
    share = first if first is not None else last
    n = max(1, round(len(values) * share))
    part = values[:n] if first is not None else values[-n:]
    kept = [v for v in part if v is not None]
    return statistics.fmean(kept) if kept else float("nan")


# ---------------------------------------------------------------------------------------------- claims

C1_MARGIN = 15.0  # pp, LUFFY over on-policy GRPO, in every seed
C2_NOT_REPRODUCED_BELOW = 5.0  # pp, the interval's upper bound
C3_GRPO_REWARD_RISE = 0.02  # its last-quarter on-policy reward over its first eighth
C3_GRPO_ID_RISE = 5.0  # pp over the base
C3_LUFFY_REWARD = 0.5  # last-quarter on-policy reward
C3_LUFFY_ID_RISE = 30.0  # pp over the base
C4_ID_TOLERANCE = 3.0  # pp: shaped final ID >= unshaped - this
OOD_AGGREGATE = ["ood_length", "ood_operator", "retention"]

CRITERIA = {
    "C1": (
        "LUFFY beats on-policy GRPO",
        f"on ID and on OOD-length separately: reproduced when LUFFY - GRPO >= {C1_MARGIN:g} pp in every seed and "
        "the pooled paired bootstrap 95% interval excludes 0; not reproduced when the interval's upper bound is "
        f"below {C1_MARGIN:g} pp; otherwise inconclusive. The claim's verdict is the ID verdict; OOD-length is "
        "reported beside it.",
    ),
    "C2": (
        "LUFFY beats SFT out of distribution",
        "OOD-aggregate (the mean of the OOD-length, OOD-operator and retention accuracies): reproduced when "
        "LUFFY - SFT > 0 in every seed and the interval excludes 0; not reproduced when the interval's upper "
        f"bound is below +{C2_NOT_REPRODUCED_BELOW:g} pp; otherwise inconclusive. (The design detects gaps of "
        "about 8 pp or more; the paper's is about 10.)",
    ),
    "C3": (
        "LUFFY trains where on-policy RL fails",
        "the premise: GRPO's mean on-policy reward over the last quarter of the steps is at most "
        f"{C3_GRPO_REWARD_RISE:g} above its first eighth's and its final ID at most base + {C3_GRPO_ID_RISE:g} pp, "
        f"in every seed; and LUFFY's last-quarter on-policy reward >= {C3_LUFFY_REWARD:g} and final ID >= base + "
        f"{C3_LUFFY_ID_RISE:g} pp in every seed. Reproduced when both hold; not reproduced when GRPO learns in "
        "every seed (the premise fails) or LUFFY's part fails in every seed; otherwise inconclusive.",
    ),
    "C4": (
        "Policy shaping keeps entropy higher without losing accuracy",
        "the probe entropy of LUFFY (shaped) > LUFFY without shaping at the final step in every seed, and the "
        f"shaped arm's mean final ID >= the unshaped one's - {C4_ID_TOLERANCE:g} pp: reproduced when both hold; "
        "not reproduced when the shaped entropy is lower in every seed or the accuracy condition fails; "
        "otherwise inconclusive.",
    ),
}


OVERLAP_RULE = (
    "Does generating one update ahead change what LUFFY learns? LUFFY one-step-off (trainer.overlap=one_step, "
    "algo.rollout_is=token_tis) against synchronous LUFFY, same seeds, on ID and on OOD-aggregate: changed when "
    "either interval excludes 0; otherwise no change detected (the interval says how large a change could hide). "
    "Written before the arm was run."
)


def overlap_effect(one_step: list[dict], sync: list[dict]) -> dict:
    """LUFFY one-step-off minus synchronous LUFFY (per-seed per-problem scores, same seeds in the same order)."""
    if not one_step or not sync:
        return {"verdict": NOT_RUN}
    id_ = _compare(one_step, sync, ["id"], every_seed=0.0, not_below=0.0)
    ood = _compare(one_step, sync, OOD_AGGREGATE, every_seed=0.0, not_below=0.0)
    changed = any(c["ci"][0] > 0 or c["ci"][1] < 0 for c in (id_, ood))
    keep = ("difference", "ci", "per_seed")
    return {
        "verdict": "changed" if changed else "no change detected",
        "id": {k: id_[k] for k in keep},
        "ood_aggregate": {k: ood[k] for k in keep},
    }


def _compare(a, b, splits, *, every_seed: float, not_below: float) -> dict:
    point, low, high = paired_bootstrap(a, b, splits)
    seeds = per_seed_differences(a, b, splits)
    if min(seeds) >= every_seed and low > 0:
        verdict = REPRODUCED
    elif high < not_below:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return {"difference": point, "ci": [low, high], "per_seed": seeds, "verdict": verdict}


def verdict_c1(luffy: list[dict], grpo: list[dict]) -> dict:
    if not luffy or not grpo:
        return {"verdict": NOT_RUN}
    id_ = _compare(luffy, grpo, ["id"], every_seed=C1_MARGIN, not_below=C1_MARGIN)
    length = _compare(luffy, grpo, ["ood_length"], every_seed=C1_MARGIN, not_below=C1_MARGIN)
    return {"verdict": id_["verdict"], "id": id_, "ood_length": length}


def verdict_c2(luffy: list[dict], sft: list[dict]) -> dict:
    if not luffy or not sft:
        return {"verdict": NOT_RUN}
    ood = _compare(luffy, sft, OOD_AGGREGATE, every_seed=1e-9, not_below=C2_NOT_REPRODUCED_BELOW)
    ood["verdict"] = (
        REPRODUCED
        if min(ood["per_seed"]) > 0 and ood["ci"][0] > 0
        else NOT_REPRODUCED
        if ood["ci"][1] < C2_NOT_REPRODUCED_BELOW
        else INCONCLUSIVE
    )
    id_ = _compare(luffy, sft, ["id"], every_seed=0.0, not_below=0.0)
    return {
        "verdict": ood["verdict"],
        "ood_aggregate": ood,
        "id": {k: id_[k] for k in ("difference", "ci", "per_seed")},
    }


def verdict_c3(luffy: list[dict], grpo: list[dict], base_id: float) -> dict:
    """`luffy`/`grpo`: per seed {"reward": per-step on-policy reward, "final_id": %}."""
    if not luffy or not grpo:
        return {"verdict": NOT_RUN}
    grpo_flat = [
        window_mean(r["reward"], last=0.25) <= window_mean(r["reward"], first=0.125) + C3_GRPO_REWARD_RISE
        and r["final_id"] <= base_id + C3_GRPO_ID_RISE
        for r in grpo
    ]
    luffy_learns = [
        window_mean(r["reward"], last=0.25) >= C3_LUFFY_REWARD and r["final_id"] >= base_id + C3_LUFFY_ID_RISE
        for r in luffy
    ]
    if all(grpo_flat) and all(luffy_learns):
        verdict = REPRODUCED
    elif not any(grpo_flat) or not any(luffy_learns):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return {
        "verdict": verdict,
        "grpo_flat_per_seed": grpo_flat,
        "luffy_learns_per_seed": luffy_learns,
        "grpo_last_quarter_reward": [window_mean(r["reward"], last=0.25) for r in grpo],
        "grpo_first_eighth_reward": [window_mean(r["reward"], first=0.125) for r in grpo],
        "luffy_last_quarter_reward": [window_mean(r["reward"], last=0.25) for r in luffy],
    }


def verdict_c4(shaped: list[dict], unshaped: list[dict]) -> dict:
    """`shaped`/`unshaped`: per seed (same seeds, same order) {"probe_entropy", "final_id"}."""
    if not shaped or not unshaped:
        return {"verdict": NOT_RUN}
    higher = [s["probe_entropy"] > u["probe_entropy"] for s, u in zip(shaped, unshaped)]
    id_gap = statistics.fmean(s["final_id"] for s in shaped) - statistics.fmean(u["final_id"] for u in unshaped)
    accurate = id_gap >= -C4_ID_TOLERANCE
    if all(higher) and accurate:
        verdict = REPRODUCED
    elif not any(higher) or not accurate:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return {"verdict": verdict, "entropy_higher_per_seed": higher, "id_gap": id_gap}
