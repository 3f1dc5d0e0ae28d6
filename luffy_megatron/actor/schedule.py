"""The actor's learning-rate schedule in upstream LUFFY's units.

Upstream (mix_fsdp_worker.py) builds `get_constant_schedule_with_warmup(optimizer, num_warmup_steps)` with
`num_warmup_steps = int(lr_warmup_steps_ratio * total_training_steps)`, where the trainer injects the real
total number of trainer steps (`len(train_dataloader) * total_epochs`, or trainer.total_training_steps), and
steps the scheduler once per `update_actor` call, i.e. once per trainer step (rollout batch), however many
mini-batch optimizer steps that call makes. Its factor at scheduler step s is min(1, s / max(1, warmup)).

We build megatron-core's `OptimizerParamScheduler` so that its lr equals that factor x actor.lr at every
trainer step. One deliberate difference, behind `actor.zero_lr_first_step`: upstream's factor is 0 at s = 0
even without warmup (min(1, 0 / 1)), so its first update runs at lr 0; by default we train at the full lr
from the first step when there is no warmup; `actor.zero_lr_first_step=true` reproduces upstream.
"""

from __future__ import annotations


def lr_warmup_steps(ratio: float, total_steps: int) -> int:
    """Upstream's warmup length, in trainer steps."""
    return int(ratio * total_steps)


def upstream_lr_factor(scheduler_step: int, warmup_steps: int) -> float:
    """`get_constant_schedule_with_warmup`'s lambda (verl/utils/torch_functional.py), at scheduler step s
    (0 before the first update_actor)."""
    return min(1.0, float(scheduler_step) / float(max(1, warmup_steps)))


def make_lr_scheduler(optimizer, actor_cfg, total_steps: int):
    """megatron-core's scheduler over `optimizer` with upstream's constant-with-warmup schedule; step it once
    per trainer step (`scheduler.step(increment=1)` after the update's mini-batches)."""
    # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    a = actor_cfg
    total_steps = max(int(total_steps), 1)
    warmup = lr_warmup_steps(a.lr_warmup_steps_ratio, total_steps)
    if warmup == 0 and a.zero_lr_first_step:
        warmup = 1  # megatron: lr = 0 at step 0, full from step 1 = upstream's min(1, s / 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else a.lr,
        max_lr=a.lr,
        min_lr=a.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup),
        lr_decay_style="constant",
        start_wd=a.weight_decay,
        end_wd=a.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
