"""Validation as upstream's `_validate`, and upstream's best-model export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from luffy_megatron.actor.remote import export_hf
from luffy_megatron.config import Config
from luffy_megatron.metrics.compute import StepTimer
from luffy_megatron.rollout.faults import EngineSupervisor
from luffy_megatron.train.step_parts import VALIDATION_STEP, StepDeps, sampling_seed

log = logging.getLogger("luffy.trainer")


def validate_after_step(
    deps: StepDeps, val_set: list | None, out: Path, step: int, total_steps: int, timer: StepTimer
) -> dict[str, float]:
    """Every trainer.test_freq steps and after the last: validate (timed as `testing`) and, under
    trainer.save_best_hf, export the model when it is the best so far. Returns the validation metrics."""
    cfg = deps.cfg
    if val_set is None or cfg.trainer.test_freq <= 0:
        return {}
    if step % cfg.trainer.test_freq != 0 and step != total_steps:
        return {}
    with timer("testing"):
        metrics = validate(cfg, deps.engines, deps.rewards, deps.tokenizer, val_set)
    if cfg.trainer.save_best_hf:
        save_best_hf(deps.ranks, out, metrics["val/test_score/avg"], step)
    return metrics


def validate(cfg: Config, engines: EngineSupervisor, rewards, tokenizer, val_set: list) -> dict[str, float]:
    """Validation as upstream's `_validate`: n_val samples per prompt at val_temperature with top_p=1 and
    top_k=-1 (upstream's validation sampling, whatever the training sampling; rollout.seeded_sampling: the same
    seed per row at every validation), scored by the training reward;
    `val/test_score/<data_source>` (rows without a source: `unknown`) and their mean `val/test_score/avg`
    (upstream's avg_score, which picks the best checkpoint). data.val_batch_size prompts per generate call
    (None: all at once); the scores do not depend on it."""
    n_val = cfg.rollout.n_val
    chunk = cfg.data.val_batch_size or len(val_set)
    seed = sampling_seed(cfg, VALIDATION_STEP)  # rollout.seeded_sampling: the same rows' seeds every time
    texts: list[str] = []
    for start in range(0, len(val_set), chunk):
        part = val_set[start : start + chunk]
        prompts = [ex.prompt_ids for ex in part for _ in range(n_val)]
        outputs = engines.generate(
            prompts,
            [cfg.data.max_response_length] * len(prompts),
            temperature=cfg.rollout.val_temperature,
            top_p=1.0,
            top_k=-1,
            seed=None if seed is None else seed + start * n_val,
        )
        texts += [tokenizer.decode(o) for o in outputs]
    golds = [ex.ground_truth for ex in val_set for _ in range(n_val)]
    scores = rewards.grade(list(zip(texts, golds)))
    return validation_metrics(scores, [val_set[i // n_val].data_source for i in range(len(scores))])


def validation_metrics(scores: list[float], sources: list[str | None]) -> dict[str, float]:
    """Per-source means (`val/test_score/<source>`, `unknown` for rows without one) and their mean over the
    sources, `val/test_score/avg` (upstream: np.mean over the val/test_score/* values)."""
    by_source: dict[str, list[float]] = {}
    for score, source in zip(scores, sources):
        by_source.setdefault(source or "unknown", []).append(score)
    out = {f"val/test_score/{k}": sum(v) / len(v) for k, v in by_source.items()}
    out["val/test_score/avg"] = sum(out.values()) / len(out)
    return out


def save_best_hf(ranks, out: Path, score: float, step: int) -> bool:
    """Upstream's `maybe_save_best_hf`: when `score` (val/test_score/avg) beats the best so far (recorded in
    <out>/best/actor/metrics.json), export the actor as an HF model there, replacing the previous best
    atomically. Returns whether it saved."""
    best_dir = out / "best" / "actor"
    record = best_dir / "metrics.json"
    best = json.loads(record.read_text())["best_avg_score"] if record.exists() else -float("inf")
    if not score > best:
        return False
    ranks.run(export_hf, best_dir, {"best_avg_score": score, "global_step": step})
    log.warning("new best val/test_score/avg %.4f at step %d: HF model in %s", score, step, best_dir)
    return True
