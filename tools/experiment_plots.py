"""The miniature's plots (tools/experiment.py): held-out accuracy curves, on-policy reward, and the probe's
entropy and KL to the base; mean over seeds, band = min-max."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tools.experiment_task import ARM_LABELS  # noqa: E402


def _band(ax, xs_by_seed, ys_by_seed, label) -> None:
    tables = [{x: y for x, y in zip(xs, ys) if y is not None} for xs, ys in zip(xs_by_seed, ys_by_seed)]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    if not common:
        return
    vals = [[t[x] for t in tables] for x in common]
    (line,) = ax.plot(
        common, [statistics.fmean(v) for v in vals], label=label, marker="o" if len(common) < 12 else None
    )
    if len(tables) > 1:
        ax.fill_between(common, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15, color=line.get_color())


def _curves(results, base_eval, key, base_value):
    """Per arm: (steps per seed, values per seed) of an evaluation key, step 0 from the base."""
    for arm, per_seed in results.items():
        runs = list(per_seed.values())
        if runs:
            xs = [[0] + [e["step"] for e in r["evals"]] for r in runs]
            ys = [[base_value] + [e[key] for e in r["evals"]] for r in runs]
            yield ARM_LABELS[arm], xs, ys


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, base_eval: dict, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split, title in zip(axes, ("id", "ood_length"), ("ID (3-5 operands)", "OOD-length (6-7 operands)")):
        for label, xs, ys in _curves(results, base_eval, f"{split}_accuracy", base_eval["curve"][split]):
            _band(ax, xs, ys, label)
        ax.set_title(f"held-out accuracy, {title}", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy % (T=0.6, luffy-eval grading)")
    axes[0].legend(fontsize=8)
    paths = [_save(fig, out / "accuracy.png")]

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, per_seed in results.items():
        runs = list(per_seed.values())
        if runs and arm != "sft":
            _band(ax, [r["steps"] for r in runs], [r["reward"] for r in runs], ARM_LABELS[arm])
    ax.set_xlabel("training step")
    ax.set_ylabel("on-policy reward (generated rows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "reward.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    probe = base_eval["probe"]
    for ax, key, title in zip(axes, ("probe_entropy", "kl_to_base"), ("entropy", "KL(policy || base)")):
        for label, xs, ys in _curves(results, base_eval, key, probe[key] if key in probe else 0.0):
            _band(ax, xs, ys, label)
        ax.set_title(f"probe: token-mean {title} on the policy's own T=1 generations", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    paths.append(_save(fig, out / "probe.png"))
    return paths
