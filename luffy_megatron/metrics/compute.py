"""What a step reports, under the names LUFFY's upstream (verl) trainer logs, as pure functions.

Data of the batch (upstream `mix_trainer.compute_data_metrics_ours`, verl `compute_data_metrics`):
  critic/score/mean|max|min        the sequence score: sum of a row's token-level scores (the verifier's reward)
  critic/rewards/mean|max|min      the sum of a row's token-level rewards after any KL penalty (= the score
                                   without one, as upstream with `use_kl_loss` or no `kl_ctrl`)
  critic/advantages/mean|max|min   over the valid response tokens of every row (verl's masked_select)
  response_length/mean|max|min|clip_ratio   valid response tokens per row (a demonstration prefix counts);
                                   clip_ratio: the share of rows whose length reached data.max_response_length
  prompt_length/mean|max|min|clip_ratio     prompt tokens per row; clip_ratio against data.max_prompt_length
  on_off_metrics/...               upstream LUFFY's on/off-policy split of lengths and scores
Phases of a step (upstream `_timer` / `compute_timing_metrics`): `StepTimer` -> `timing_s/<phase>` and
`timing_per_token_ms/{gen,update_actor}`.
Speed (`perf_metrics`): `perf/throughput` = prompt + response tokens of the batch / step seconds / GPUs of
the run (on a CPU run: per Megatron rank), `perf/total_num_tokens`, and on a GPU whose bf16 peak is known
(`peak_flops`) `perf/mfu` = the model FLOPs of the old-log-prob forward and the update (`ModelFlops`, counted
as `perf/flops.py` counts them) / the seconds of those two phases / the trainer's GPUs / the peak, and
upstream's `mfu/actor` (the update alone). No MFU on a CPU: there is no peak to divide by.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from luffy_megatron.perf.flops import (
    PlanError,
    attention_coefficient,
    forward_flops,
    param_counts,
    resolve_arch,
    update_flops,
)

Tensor = torch.Tensor

# Dense BF16 peak per GPU (NVIDIA data sheets, without sparsity), matched on torch.cuda.get_device_name();
# the first pattern contained in the name wins, so the specific forms come before the plain model name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM (e.g. "NVIDIA H200")
    ("H800", 989e12),
    ("A100", 312e12),  # SXM4 and PCIe
    ("A800", 312e12),
)

TIMED_PHASES = ("gen", "reward", "old_log_prob", "update_actor", "sync", "testing", "save_checkpoint", "step")


# --------------------------------------------------------------------------------------------- data


def _stats(name: str, values: Tensor) -> dict[str, float]:
    values = values.float()
    return {
        f"{name}/mean": float(values.mean()),
        f"{name}/max": float(values.max()),
        f"{name}/min": float(values.min()),
    }


def data_metrics(
    *,
    token_scores_BT: Tensor,
    advantages_BT: Tensor,
    response_mask_BT: Tensor,
    prompt_lengths: Sequence[int],
    max_prompt_length: int,
    max_response_length: int,
    token_rewards_BT: Optional[Tensor] = None,
    prefix_mask_BT: Optional[Tensor] = None,
) -> dict[str, float]:
    """Upstream's batch metrics (module docstring) of one step's rows. `token_rewards_BT` None: no KL
    penalty, the rewards are the scores. `prefix_mask_BT` (demonstration tokens) adds upstream LUFFY's
    `on_off_metrics/*`; a side without rows is left out (upstream would log NaN)."""
    mask = response_mask_BT.bool()
    if token_scores_BT.shape != mask.shape or advantages_BT.shape != mask.shape:
        raise ValueError(
            f"scores {tuple(token_scores_BT.shape)}, advantages {tuple(advantages_BT.shape)} and "
            f"response mask {tuple(mask.shape)} must have the same [rows, tokens] shape"
        )
    if len(prompt_lengths) != mask.shape[0]:
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {mask.shape[0]} rows")
    score_B = token_scores_BT.float().sum(-1)
    reward_B = (token_scores_BT if token_rewards_BT is None else token_rewards_BT).float().sum(-1)
    response_B = mask.sum(-1).float()
    prompt_B = torch.tensor([float(n) for n in prompt_lengths])
    out = {**_stats("critic/score", score_B), **_stats("critic/rewards", reward_B)}
    valid_adv = torch.masked_select(advantages_BT.float(), mask)
    if valid_adv.numel():
        out.update(_stats("critic/advantages", valid_adv))
    out.update(_stats("response_length", response_B))
    out["response_length/clip_ratio"] = float((response_B >= max_response_length).float().mean())
    out.update(_stats("prompt_length", prompt_B))
    out["prompt_length/clip_ratio"] = float((prompt_B >= max_prompt_length).float().mean())
    if prefix_mask_BT is not None:
        off = prefix_mask_BT.bool().any(-1)
        on = ~off
        for side, rows in (("on", on), ("off", off)):
            if rows.any():
                out[f"on_off_metrics/{side}_response_length_mean"] = float(response_B[rows].mean())
                out[f"on_off_metrics/{side}_score"] = float(score_B[rows].mean())
        if on.any():
            out["on_off_metrics/off_on_example_ratio"] = float(off.sum()) / float(on.sum())
    return out


# --------------------------------------------------------------------------------------------- time


class StepTimer:
    """Seconds per phase of one step: `with timer("gen"): ...`. A phase timed twice adds up (upstream's
    `_timer` keeps the last); a phase that raises is still counted."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.started = clock()

    def finish(self, name: str = "step") -> float:
        """Record the time since the timer was made as phase `name` (the whole step); returns it."""
        self.seconds[name] = self.clock() - self.started
        return self.seconds[name]

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - t0

    def metrics(
        self, *, prompt_tokens: Optional[float] = None, response_tokens: Optional[float] = None
    ) -> dict[str, float]:
        """`timing_s/<phase>`, and with the token counts upstream's `timing_per_token_ms/gen` (per response
        token) and `timing_per_token_ms/update_actor` (per prompt + response token)."""
        out = {f"timing_s/{k}": v for k, v in self.seconds.items()}
        if prompt_tokens is not None and response_tokens is not None:
            per = {"gen": response_tokens, "update_actor": prompt_tokens + response_tokens}
            for name, tokens in per.items():
                if name in self.seconds and tokens > 0:
                    out[f"timing_per_token_ms/{name}"] = self.seconds[name] * 1000 / tokens
        return out


# --------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of the actor's passes over a batch, from the architecture (`perf/flops.py`'s counting:
    matmul params = every linear weight with the output layer; causal attention 2 x heads x head_dim x
    layers x S^2 per sequence forward)."""

    matmul_params: int
    attention_coef: int

    @classmethod
    def of_model(cls, model_path: str, *, tensor_parallel: int = 1) -> "ModelFlops":
        """From the HF config.json at `model_path` (megatron's vocabulary padding at this TP);
        `perf.flops.PlanError` for a model it cannot read."""
        arch, _ = resolve_arch(model_path)
        return cls(param_counts(arch, tp=tensor_parallel).matmul, attention_coefficient(arch))

    def forward(self, sequence_lengths: Sequence[int]) -> float:
        """One forward over sequences of these lengths (prompt + response each): the old log-probs."""
        return forward_flops(
            self.matmul_params,
            self.attention_coef,
            tokens=float(sum(sequence_lengths)),
            squared_lengths=float(sum(n * n for n in sequence_lengths)),
        )

    def update(self, sequence_lengths: Sequence[int], *, epochs: int = 1) -> float:
        """Forward + backward over these sequences, `epochs` times (6 x params x tokens + attention)."""
        return update_flops(
            self.matmul_params,
            self.attention_coef,
            tokens=float(sum(sequence_lengths)),
            squared_lengths=float(sum(n * n for n in sequence_lengths)),
            epochs=epochs,
        )


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Dense BF16 peak FLOP/s of a GPU named as torch.cuda.get_device_name() names it; None for no GPU
    (None) or one not in `PEAK_BF16_FLOPS` (no MFU is logged rather than one against a made-up peak)."""
    if not device_name:
        return None
    name = device_name.upper()
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern in name:
            return flops
    return None


def perf_metrics(
    *,
    sequence_lengths: Sequence[int],
    seconds: dict[str, float],
    num_gpus: int,
    train_gpus: int,
    flops: Optional[ModelFlops] = None,
    peak: Optional[float] = None,
    ppo_epochs: int = 1,
) -> dict[str, float]:
    """`perf/total_num_tokens`, `perf/throughput` (tokens / `seconds["step"]` / `num_gpus`) and, with
    `flops` and a `peak`, `perf/mfu` (old-log-prob forward + update over their seconds, per trainer GPU)
    and upstream's `mfu/actor` (the update over `seconds["update_actor"]`). `seconds`: `StepTimer.seconds`."""
    tokens = float(sum(sequence_lengths))
    out = {"perf/total_num_tokens": tokens}
    step_s = seconds.get("step")
    if step_s and step_s > 0 and num_gpus > 0:
        out["perf/throughput"] = tokens / step_s / num_gpus
    if flops is None or peak is None or train_gpus <= 0:
        return out
    update_s, old_s = seconds.get("update_actor", 0.0), seconds.get("old_log_prob", 0.0)
    update = flops.update(sequence_lengths, epochs=ppo_epochs)
    if update_s > 0 and old_s > 0:
        out["perf/mfu"] = (flops.forward(sequence_lengths) + update) / (old_s + update_s) / train_gpus / peak
    if update_s > 0:
        out["mfu/actor"] = update / update_s / train_gpus / peak
    return out


def run_gpus(layout) -> tuple[int, int]:
    """(GPUs of the run, GPUs that train) of a `cluster.layout.ClusterLayout`. A CPU layout holds no GPUs:
    its Megatron ranks stand in for them, so throughput there is per rank."""
    if not layout.uses_gpus:
        return layout.world_size, layout.world_size
    return layout.num_gpus, layout.world_size


@dataclass(frozen=True)
class RunPerf:
    """What the speed metrics of a run need, fixed at its start: GPUs of the run and of training, the model's
    FLOPs and the GPU's peak (None on a CPU or an unknown GPU), the update's epochs."""

    num_gpus: int
    train_gpus: int
    flops: Optional[ModelFlops] = None
    peak: Optional[float] = None
    ppo_epochs: int = 1

    @classmethod
    def of_run(cls, cfg, layout, device_name: Optional[str]) -> "RunPerf":
        """From the config, the run's `ClusterLayout` and the GPU model of the ranks
        (`cuda_device_name` of `ActorGroup.infos()`, None on CPU ranks). A model whose FLOPs
        cannot be counted (`perf.flops` cannot read its config) logs no MFU, with a warning."""
        num_gpus, train_gpus = run_gpus(layout)
        peak = peak_flops(device_name)
        flops = None
        if device_name and peak is None:
            logging.getLogger("luffy.monitoring").warning(
                "no bf16 peak known for GPU %r (known: %s): perf/mfu is not logged",
                device_name,
                ", ".join(p for p, _ in PEAK_BF16_FLOPS),
            )
        if peak is not None:
            try:
                flops = ModelFlops.of_model(cfg.model.path, tensor_parallel=cfg.parallel.tensor_model_parallel_size)
            except PlanError as err:
                logging.getLogger("luffy.monitoring").warning("perf/mfu is not logged: %s", err)
        return cls(num_gpus, train_gpus, flops, peak, cfg.actor.ppo_epochs)

    def step_metrics(self, batch, timer: StepTimer) -> dict[str, float]:
        """At the end of a step (`timer.finish()` is called here): `timing_s/*`, `timing_per_token_ms/*` and
        `perf_metrics` of a `RolloutBatch`."""
        timer.finish("step")
        prompt_tokens = float(sum(len(p) for p in batch.prompts))
        response_tokens = float(sum(batch.response_lengths()))
        return {
            **timer.metrics(prompt_tokens=prompt_tokens, response_tokens=response_tokens),
            **perf_metrics(
                sequence_lengths=batch.sequence_lengths(),
                seconds=timer.seconds,
                num_gpus=self.num_gpus,
                train_gpus=self.train_gpus,
                flops=self.flops,
                peak=self.peak,
                ppo_epochs=self.ppo_epochs,
            ),
        }
