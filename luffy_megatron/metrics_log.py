"""Where a run's numbers go: TensorBoard scalars, a JSON-lines file, one console line per step, and a
results plot at the end. Metric names follow upstream LUFFY (`actor/pg_loss`, `val/test_score/<source>`)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping

CONSOLE_KEYS = ("rollout/reward_mean", "rollout/on_policy_reward", "actor/pg_loss", "actor/off_policy_prob", "actor/grad_norm")


class MetricsLogger:
    def __init__(self, tensorboard_dir: str | Path, jsonl_path: str | Path, *, total_steps: int, console: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self.jsonl = Path(jsonl_path)
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.console = console
        self.t0 = time.time()
        self.first_step: int | None = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for k, v in clean.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.console:
            if self.first_step is None:
                self.first_step = step
            done = step - self.first_step + 1
            per_step = (time.time() - self.t0) / max(done, 1)
            eta = per_step * max(self.total_steps - step, 0)
            shown = "  ".join(f"{k.split('/')[-1]}={clean[k]:.4g}" for k in CONSOLE_KEYS if k in clean)
            tps = clean.get("perf/tokens_per_s")
            rate = f"  {tps:.0f} tok/s" if tps else ""
            print(f"[step {step}/{self.total_steps}] {shown}{rate}  {per_step:.1f}s/step  ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.writer.close()


def read_metrics(jsonl_path: str | Path) -> list[dict]:
    path = Path(jsonl_path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_results(jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Training curves of a run: rewards (on-policy and demonstrations), the off-policy token probability,
    the policy loss and validation scores. Written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl_path)
    panels = [
        ("reward", ["rollout/on_policy_reward", "rollout/off_policy_reward", "rollout/reward_mean"]),
        ("off-policy token prob", ["actor/off_policy_prob", "actor/on_policy_prob"]),
        ("policy loss", ["actor/pg_loss"]),
        ("validation score", sorted({k for r in rows for k in r if k.startswith("val/")})),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key.split("/", 1)[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"luffy-megatron: {Path(jsonl_path).parent.name}")
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
