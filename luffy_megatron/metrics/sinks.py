"""Where a run's numbers go: TensorBoard scalars (and the run's whole config as text), a JSON-lines file,
one console line per step, and a results plot at the end. Metric names follow upstream LUFFY / verl
(`critic/score/mean`, `actor/pg_loss`, `val/test_score/<source>`, `timing_s/<phase>`; see metrics/compute.py)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Mapping

from torch.utils.tensorboard import SummaryWriter

from luffy_megatron.config import yaml_text
from luffy_megatron.utils.fs import atomic_write_text

log = logging.getLogger("luffy.metrics")

# (metric, label) of the console line
CONSOLE_KEYS = (
    ("critic/score/mean", "score"),
    ("on_off_metrics/on_score", "on_score"),
    ("actor/pg_loss", "pg_loss"),
    ("actor/off_policy_prob", "off_prob"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad_norm"),
    ("response_length/mean", "resp_len"),
)
CONFIG_TAG = "config"  # TensorBoard text tag of the run's config (stored as "config/text_summary")


def config_text(cfg) -> str:
    """The whole config as `luffy_megatron.config.dump_yaml` writes it (a recipe that loads back), under a
    comment naming logging.project_name / logging.experiment_name, indented four spaces so TensorBoard's
    markdown shows it as a code block."""
    text = f"# {cfg.logging.project_name} / {cfg.logging.experiment_name}\n" + yaml_text(cfg)
    return "\n".join("    " + line for line in text.splitlines())


class MetricsLogger:
    def __init__(
        self,
        tensorboard_dir: str | Path,
        jsonl_path: str | Path,
        *,
        total_steps: int,
        console: bool = True,
        config=None,
        config_step: int = 0,
        start_step: int | None = None,
    ):
        """`config`: the run's `Config`, written as TensorBoard text (`CONFIG_TAG`) at `config_step`; its
        logging.log_every_steps spaces the console lines (every step still goes to TensorBoard and the jsonl).
        `start_step`: the step the run continues after (a resumed run's checkpoint, 0 for a fresh start): what
        an earlier run logged after it is dropped, from the jsonl (`keep_rows_until`) and from TensorBoard
        (`purge_step`), so the steps it redoes appear once."""
        if start_step is not None:
            keep_rows_until(jsonl_path, start_step)
        purge_step = None if start_step is None else start_step + 1
        self.writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge_step)
        if config is not None:
            self.writer.add_text(CONFIG_TAG, config_text(config), config_step)
            self.writer.flush()
        self.jsonl = Path(jsonl_path)
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.console = console
        self.every = max(1, config.logging.log_every_steps) if config is not None else 1
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
            if step % self.every and step < self.total_steps:
                return
            shown = "  ".join(f"{label}={clean[k]:.4g}" for k, label in CONSOLE_KEYS if k in clean)
            tps = clean.get("perf/throughput")
            rate = f"  {tps:.0f} tok/s/GPU" if tps else ""
            print(
                f"[step {step}/{self.total_steps}] {shown}{rate}  {per_step:.1f}s/step  ETA {eta / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.writer.close()


def read_metrics(jsonl_path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A line that does not decode to a row (a last line torn by a crash) is
    skipped, with a warning that counts them."""
    rows, bad = _decode_rows(jsonl_path)
    if bad:
        log.warning("%s: skipped %d line(s) that do not decode (torn by a crash?)", jsonl_path, bad)
    return rows


def _decode_rows(jsonl_path: str | Path) -> tuple[list[dict], int]:
    """(rows, number of lines that are not a JSON object with a step)."""
    path = Path(jsonl_path)
    if not path.exists():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def keep_rows_until(jsonl_path: str | Path, step: int) -> None:
    """Drop the rows of a metrics.jsonl logged after `step` (a resumed run logs those steps again) and the lines
    that do not decode (a torn last line would glue itself to the next row); the file is rewritten atomically,
    and only if something is dropped."""
    rows, bad = _decode_rows(jsonl_path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) == len(rows) and not bad:
        return
    log.warning(
        "%s: dropped %d row(s) after step %d (the run continues from there) and %d line(s) that do not decode",
        jsonl_path,
        len(rows) - len(kept),
        step,
        bad,
    )
    atomic_write_text(jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))


def first_logged(rows: list[dict], names: tuple[str, ...]) -> str | None:
    """The first of `names` that some row holds (a metric under today's name, else its older name)."""
    return next((k for k in names if any(k in r for r in rows)), None)


def plot_results(jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Training curves of a run: rewards (on-policy and demonstrations), the off-policy token probability,
    the policy loss and validation scores. Written to a temporary name, then renamed."""
    import matplotlib  # lazy: only the end-of-run plot needs matplotlib (slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use('Agg')

    rows = read_metrics(jsonl_path)
    # (label, metric names: today's first, then the name older runs logged)
    val = [(k.split("/", 1)[-1], (k,)) for k in sorted({k for r in rows for k in r if k.startswith("val/")})]
    panels = [
        (
            "reward",
            [
                ("on-policy", ("on_off_metrics/on_score", "rollout/on_policy_reward")),
                ("demonstrations", ("on_off_metrics/off_score", "rollout/off_policy_reward")),
                ("all rows", ("critic/score/mean", "rollout/reward_mean")),
            ],
        ),
        (
            "token probability",
            [("off_policy_prob", ("actor/off_policy_prob",)), ("on_policy_prob", ("actor/on_policy_prob",))],
        ),
        ("policy loss", [("pg_loss", ("actor/pg_loss",))]),
        ("entropy", [("entropy", ("actor/entropy", "actor/entropy_loss"))]),
        ("validation score", val),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, series) in zip(axes, panels):
        for label, names in series:
            key = first_logged(rows, names)
            pts = [(r["step"], r[key]) for r in rows if key in r] if key else []
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
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


def plot_results_or_warn(jsonl_path: str | Path, out_png: str | Path) -> Path | None:
    """`plot_results`, where a failure only warns (the run it plots has finished): returns None then."""
    try:
        return plot_results(jsonl_path, out_png)
    except Exception as err:  # noqa: BLE001 - any plotting error; the run's results are in the jsonl
        log.warning("the results plot %s was not written: %s: %s", out_png, type(err).__name__, err)
        return None
