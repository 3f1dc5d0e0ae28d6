"""Can the rollouts of a step be trusted? Drift between the engines' and the trainer's log-probs, and the
weight version of every generated row.

* **Weight versions.** The trainer's weight version is the step whose update made the actor's weights
  (0 = the weights it started from, k after the update of step k; a resumed run starts at its checkpoint's
  step). After every sync the engines label what they received with it (`VLLMEngine.label_weights`), and
  vLLM stamps every output token with the label of the weights that sampled it. The rows of step k must all
  come from version k - 1; `check_weight_versions` refuses a batch that does not, naming the engine and
  both versions (a sync that never reached an engine leaves its old label, so this is what catches it).
* **Drift.** For every token an engine sampled, |engine log-prob - actor old log-prob|, over the generated
  tokens of the response (demonstration tokens come from no engine). With the same weights the two differ
  by kernel numerics only; stale or half-synced weights show up as a jump. `rollout.max_logprob_diff`
  bounds the mean (warn or fail the step, `rollout.logprob_diff_action`).

Pure functions on tensors and lists, tested on CPU (tests/unit/test_rollout_integrity.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from luffy_megatron.cluster.supervision import RunError

log = logging.getLogger("luffy.trainer")


class RolloutIntegrityError(RunError):
    """A step's rollouts cannot be trained on (stale weights, or log-prob drift over the limit)."""


class StaleRolloutError(RolloutIntegrityError):
    def __init__(self, message: str, *, engine: int, engine_version: int, actor_version: int, drift: dict):
        super().__init__(message)
        self.engine, self.engine_version, self.actor_version, self.drift = engine, engine_version, actor_version, drift


class LogprobDriftError(RolloutIntegrityError):
    def __init__(self, message: str, *, drift: dict):
        super().__init__(message)
        self.drift = drift


@dataclass
class RolloutRecord:
    """What the engines did for the rows of one batch (row order of the `RolloutBatch`)."""

    engines: list[Optional[int]]  # engine index per row; None for rows no engine generated (full demonstrations)
    weight_versions: list[tuple[int, ...]]  # weight version(s) that sampled each row's tokens; () when not generated
    engine_log_prob_BT: torch.Tensor  # float32 [B, L]: the engine's log-prob of each generated token, 0 elsewhere
    generated_mask_BT: torch.Tensor  # bool [B, L]: generated tokens inside the response mask
    attempts: list[int] = field(default_factory=list)  # 2 for rows generated again on a restarted engine

    @property
    def num_generated_tokens(self) -> int:
        return int(self.generated_mask_BT.sum())


def record_generations(
    *, prefixes: Sequence[Sequence[int]], generations: Sequence, response_mask_BT: torch.Tensor
) -> RolloutRecord:
    """Places each row's engine log-probs where `assemble_responses` put its generated tokens: after the
    prefix, cut to the response width, and only inside the response mask (up to the first EOS).

    `generations[i]`: the `rollout.engine.Generation` of row i, or None for rows not sent to an engine."""
    rows, width = response_mask_BT.shape
    if len(prefixes) != rows or len(generations) != rows:
        raise ValueError(f"{rows} rows but {len(prefixes)} prefixes and {len(generations)} generations")
    log_prob = torch.zeros((rows, width), dtype=torch.float32)
    generated = torch.zeros((rows, width), dtype=torch.bool)
    engines: list[Optional[int]] = []
    versions: list[tuple[int, ...]] = []
    attempts: list[int] = []
    for i, (prefix, gen) in enumerate(zip(prefixes, generations)):
        if gen is None or not gen.token_ids:
            engines.append(None if gen is None else gen.engine)
            versions.append(())
            attempts.append(0 if gen is None else gen.attempts)
            continue
        if len(gen.logprobs) != len(gen.token_ids):
            raise ValueError(f"row {i}: {len(gen.token_ids)} generated tokens but {len(gen.logprobs)} log-probs")
        start = min(len(prefix), width)
        n = min(len(gen.token_ids), width - start)
        if n > 0:
            log_prob[i, start : start + n] = torch.tensor(gen.logprobs[:n], dtype=torch.float32)
            generated[i, start : start + n] = True
        engines.append(gen.engine)
        versions.append(tuple(gen.weight_versions))
        attempts.append(gen.attempts)
    generated &= response_mask_BT.bool()
    return RolloutRecord(engines, versions, log_prob, generated, attempts)


def logprob_drift(record: RolloutRecord, old_log_prob_BT: torch.Tensor, rows: Optional[Sequence[int]] = None) -> dict:
    """|engine - actor old log-prob| over the generated tokens (of `rows`, default all): mean, max and the
    number of tokens. Empty dict when no token was generated."""
    mask = record.generated_mask_BT
    if rows is not None:
        keep = torch.zeros(mask.shape[0], dtype=torch.bool)
        keep[list(rows)] = True
        mask = mask & keep[:, None]
    num = int(mask.sum())
    if num == 0:
        return {}
    width = min(old_log_prob_BT.shape[1], mask.shape[1])
    if width < mask.shape[1] and bool(mask[:, width:].any()):
        raise ValueError(f"old log-probs cover {width} response positions but tokens were generated beyond them")
    diff = (record.engine_log_prob_BT[:, :width] - old_log_prob_BT[:, :width].float()).abs()[mask[:, :width]]
    return {"mean": float(diff.mean()), "max": float(diff.max()), "tokens": num}


def drift_metrics(record: RolloutRecord, drift: dict, actor_version: Optional[int] = None) -> dict[str, float]:
    """The step's `rollout/*` integrity scalars; with `actor_version`, `rollout/weight_version_lag`: how many
    updates behind the actor the oldest weights that sampled a row were (trainer.overlap=one_step: 1)."""
    out: dict[str, float] = {}
    if drift:
        out["rollout/logprob_diff_mean"] = drift["mean"]
        out["rollout/logprob_diff_max"] = drift["max"]
    made = [v for vs in record.weight_versions for v in vs]
    if made:
        out["rollout/weight_version"] = float(min(made))
        if actor_version is not None:
            out["rollout/weight_version_lag"] = float(actor_version - min(made))
    return out


def rows_of_version(record: RolloutRecord, version: int) -> list[int]:
    """The rows every token of which was sampled by weights `version` (rows with no generated token excluded)."""
    return [r for r, vs in enumerate(record.weight_versions) if vs and all(v == version for v in vs)]


def check_weight_versions(
    record: RolloutRecord,
    actor_version: int,
    *,
    old_log_prob_BT: Optional[torch.Tensor] = None,
    describe_engine: Callable[[int], str] = lambda e: f"engine {e}",
    max_lag: int = 0,
) -> None:
    """Raises `StaleRolloutError` when a row was sampled by weights other than the actor's `actor_version`, or
    more than `max_lag` updates older (trainer.overlap=one_step: 1); the first offending engine is named with
    both versions and how many of its rows are affected."""
    stale: dict[tuple[Optional[int], int], list[int]] = {}
    for row, (engine, versions) in enumerate(zip(record.engines, record.weight_versions)):
        for v in versions:
            if not actor_version - max_lag <= v <= actor_version:
                stale.setdefault((engine, v), []).append(row)
                break
    if not stale:
        return
    (engine, version), rows = next(iter(stale.items()))
    drift = logprob_drift(record, old_log_prob_BT, rows) if old_log_prob_BT is not None else {}
    who = describe_engine(engine) if engine is not None else "an engine"
    mixed = [r for r in rows if len(record.weight_versions[r]) > 1]
    how = (
        f"{len(mixed)} of them sampled partly by weights version "
        f"{', '.join(map(str, record.weight_versions[mixed[0]]))}"
        if mixed
        else ""
    )
    measured = (
        (
            f"; on those rows |engine - actor log-prob| is {drift['mean']:.4g} on average (max {drift['max']:.4g}) "
            f"over {drift['tokens']} tokens"
        )
        if drift
        else ""
    )
    others = len(stale) - 1
    actor_weights = f"the weights after step {actor_version}" if actor_version else "the weights it started from"
    message = (
        f"stale rollouts: {who} generated {len(rows)} row(s) with weight version {version}, but the actor is at "
        f"weight version {actor_version} ({actor_weights}){', ' + how if how else ''}"
        f"{measured}. The weights of the last update did not reach this engine (a lost or failed weight sync), "
        f"so the batch is refused rather than trained on"
        f"{f' ({others} more engine/version pair(s) are stale too)' if others else ''}"
    )
    raise StaleRolloutError(
        message,
        engine=engine if engine is not None else -1,
        engine_version=version,
        actor_version=actor_version,
        drift=drift,
    )


def enforce_max_logprob_diff(drift: dict, *, max_logprob_diff: Optional[float], action: str, step: int) -> None:
    """`rollout.max_logprob_diff` on the mean drift: a warning, or `LogprobDriftError` with action 'error'."""
    if max_logprob_diff is None or not drift or drift["mean"] <= max_logprob_diff:
        return
    message = (
        f"step {step}: mean |engine - actor log-prob| over {drift['tokens']} generated tokens is {drift['mean']:.4g} "
        f"(max {drift['max']:.4g}), above rollout.max_logprob_diff={max_logprob_diff:g}: the engines do not "
        "compute what the trainer computes (weights not synced, a conversion or sampling-setting mismatch)"
    )
    if action == "error":
        raise LogprobDriftError(message + "; rollout.logprob_diff_action=error stops the run", drift=drift)
    log.warning("%s (rollout.logprob_diff_action=warn: training goes on)", message)
