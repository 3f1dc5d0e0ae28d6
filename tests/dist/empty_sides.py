"""torchrun script: the real MegatronActor's log-prob pass and update on batches where one unit (a mini-batch, a
micro-batch, a data-parallel shard or a pipeline micro-batch) has no off-policy rows, no on-policy rows or no
valid response tokens. Every case starts from the same weights and a fresh Adam state.

Usage: empty_sides.py HF_DIR LAYOUT (dp2: DP=2; pp2: PP=2). Rank 0 reports, per case, the update's metrics, each
micro-batch's rows and metrics (every rank), each optimizer step's (ok, grad norm), and whether the log-probs and
the weights after the step are finite.

Layout of the 16 rows (4 prompts x rollout.n=4; row 4g is group g's demonstration), with balance_batch=false and
ppo_mini_batch_size=2, ppo_micro_batch_size=1 prompts:
  dp2: rank k holds rows 8k..8k+7; its mini-batch m rows 8k+4m..+3; its micro-batches 2 rows each.
  pp2: mini-batch m holds rows 8m..8m+7; its (pipeline) micro-batches 4 rows each.
"""

import sys

import torch
import torch.distributed as dist

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.actor.megatron_actor import MegatronActor
from luffy_megatron.algo import compute_advantages
from luffy_megatron.config import load_config
from luffy_megatron.models.parallel import ensure_process_group, shutdown_distributed
from tests.dist.actor_fixtures import actor_overrides
from tests.dist.launcher import report

N, GROUPS, WIDTH = 4, 4, 8
ROWS = N * GROUPS
# layout: unit name -> the rows it holds
UNITS = {
    "dp2": {"mini": [4, 5, 6, 7, 12, 13, 14, 15], "micro": [0, 1], "shard": list(range(8, 16))},
    "pp2": {"mini": list(range(8, 16)), "micro": [0, 1, 2, 3]},
}
SIDES = ("no_off", "no_on", "no_tokens")


def make_batch(unit_rows: list[int], side: str, vocab: int = 500) -> RolloutBatch:
    """Every group: its first row a full demonstration, the others on-policy; lengths 2..WIDTH. Then the rows of
    the unit lose their demonstrations (no_off), become demonstrations (no_on) or lose every response token."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (3 + r // N,), generator=g).tolist() for r in range(0, ROWS, N)]
    lengths = torch.randint(2, WIDTH + 1, (ROWS,), generator=g)
    mask = (torch.arange(WIDTH).unsqueeze(0) < lengths.unsqueeze(1)).long()
    prefix = torch.zeros(ROWS, WIDTH, dtype=torch.bool)
    prefix[::N] = mask[::N].bool()
    for r in unit_rows:
        if side == "no_off":
            prefix[r] = False
        elif side == "no_on":
            prefix[r] = mask[r].bool()
        else:
            mask[r], prefix[r] = 0, False
    responses = torch.randint(1, vocab, (ROWS, WIDTH), generator=g) * mask
    return RolloutBatch(
        prompts=[prompts[r // N] for r in range(ROWS)],
        responses=responses,
        response_mask=mask,
        prefix_mask=prefix,
        group_ids=[r // N for r in range(ROWS)],
    )


def advantages(batch: RolloutBatch) -> torch.Tensor:
    """Group-mean advantages (the algorithm's own) of fixed 0/1 scores on each row's last valid token."""
    scores = torch.zeros(ROWS, WIDTH)
    for r, n in enumerate(batch.response_lengths()):
        if n:
            scores[r, n - 1] = float(r % 3 == 0)
    return compute_advantages(
        token_level_rewards_BT=scores,
        response_mask_BT=batch.response_mask,
        prefix_mask_BT=batch.prefix_mask,
        group_ids=batch.group_ids,
    )


class Recorder:
    """Wraps the actor: the rows of each micro-batch it builds, the metrics its loss returns for each, and each
    optimizer step's (ok, grad norm)."""

    def __init__(self, actor: MegatronActor):
        self.plans, self.results, self.steps = [], [], []
        micro_batches, backward, step = actor._micro_batches, actor._backward, actor.optimizer.step

        def record_micro_batches(batch, rows_by_rank):
            out = micro_batches(batch, rows_by_rank)
            self.plans.append([mb.rows for mb in out])
            return out

        def record_backward(*args, **kwargs):
            results = backward(*args, **kwargs)
            self.results.append([{k: float(v) for k, v in r.items()} for r in results])
            return results

        def record_step():
            ok, grad_norm, zeros = step()
            self.steps.append((bool(ok), None if grad_norm is None else float(grad_norm)))
            return ok, grad_norm, zeros

        actor._micro_batches, actor._backward, actor.optimizer.step = record_micro_batches, record_backward, record_step

    def take(self) -> dict:
        """What was recorded since the last call (after an update: its micro-batches and steps)."""
        micro = [
            {"mini": mini, "rows": rows, "metrics": metrics}
            for mini, (plan, results) in enumerate(zip(self.plans, self.results))
            for rows, metrics in zip(plan, results)
        ]
        out = {"micro": micro, "steps": self.steps}
        self.plans, self.results, self.steps = [], [], []
        return out


def reset(actor: MegatronActor, initial: list[torch.Tensor]) -> None:
    """The initial weights again and a fresh Adam state, so that a case cannot inherit another's NaN."""
    params = [p for m in actor.model for p in m.parameters()]
    with torch.no_grad():
        for p, w in zip(params, initial):
            p.copy_(w)
    for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        opt.optimizer.state.clear()


def run_case(actor: MegatronActor, recorder: Recorder, initial: list, unit_rows: list[int], side: str) -> dict:
    reset(actor, initial)
    batch = make_batch(unit_rows, side)
    old_lp, entropy = actor.compute_log_probs(batch)
    masked = ~batch.response_mask.bool()
    log_probs = {
        "finite": bool(torch.isfinite(old_lp).all() and torch.isfinite(entropy).all()),
        "zero_where_masked": bool((old_lp[masked] == 0).all() and (entropy[masked] == 0).all()),
        "valid_nonzero": bool((old_lp[~masked] != 0).all()),
    }
    recorder.take()
    metrics = actor.update(batch, advantages=advantages(batch), old_log_probs=old_lp)
    params = [p for m in actor.model for p in m.parameters()]
    local = {
        **recorder.take(),
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in params),
        "moved": max(float((p - w).abs().max()) for p, w in zip(params, initial)),
    }
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, local)
    return {
        "metrics": metrics,
        "log_probs": log_probs,
        "ranks": ranks,
        "prefix_rows": [r for r in range(ROWS) if batch.prefix_mask[r].any()],
        "token_rows": [r for r in range(ROWS) if batch.response_mask[r].any()],
    }


def main() -> None:
    hf_dir, layout = sys.argv[1:3]
    ensure_process_group()
    pp = 2 if layout == "pp2" else 1
    cfg = load_config(
        None,
        actor_overrides(world=dist.get_world_size(), pp=pp)
        + [
            f"rollout.n={N}",
            f"data.train_batch_size={GROUPS}",
            "actor.ppo_mini_batch_size=2",
            "actor.use_dynamic_bsz=false",
            "actor.ppo_micro_batch_size=1",
            "actor.balance_batch=false",
        ],
    )
    actor = MegatronActor(cfg, hf_dir=hf_dir, pad_token_id=0)
    recorder = Recorder(actor)
    initial = [p.detach().clone() for m in actor.model for p in m.parameters()]
    cases = {
        f"{unit}_{side}": run_case(actor, recorder, initial, rows, side)
        for unit, rows in UNITS[layout].items()
        for side in SIDES
    }
    if dist.get_rank() == 0:
        report({"layout": layout, "units": UNITS[layout], "cases": cases})
    shutdown_distributed()


if __name__ == "__main__":
    main()
