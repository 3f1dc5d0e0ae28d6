"""One rank of the Megatron policy: log-probs for all rows, and LUFFY's update with upstream's scaling.

Every rank of the TP x PP x DP world builds a `MegatronActor` from the same config and calls the same
methods with the same `RolloutBatch` (SPMD: under torchrun, or one Ray actor per rank). Each data-parallel
rank takes its share of the rows (balanced by tokens); results are returned complete on every rank.

Loss scaling, as upstream (luffy_algorithm.md section 1.4): each micro-batch's loss is its token sum /
max_response_length (plus the entropy token-mean term), micro-batch losses are SUMMED within a mini-batch
(megatron-core's schedules divide by the number of micro-batches; we multiply it back), gradients are
AVERAGED over data-parallel ranks (megatron DDP), clipped to `grad_clip`, then one Adam(W) step.
Averaging makes the step scale with 1/DP on the same rows; `algo.dp_gradient_reduction=sum` removes that.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from luffy_megatron.actor.batching import (
    MicroBatch,
    RolloutBatch,
    balance_rows,
    build_micro_batch,
    build_packed_micro_batch,
    plan_micro_batches,
    split_mini_batches,
)
from luffy_megatron.algo.logprob import vocab_parallel_logprob_entropy
from luffy_megatron.algo.loss import microbatch_policy_loss
from luffy_megatron.algo.options import loss_options

log = logging.getLogger(__name__)


def _transformer_engine_available() -> bool:
    from luffy_megatron.models.hf_to_mcore import transformer_engine_available

    return transformer_engine_available()


def megatron_settings(cfg) -> dict[str, Any]:
    """The one boundary where our config becomes megatron-core settings. Refuses what cannot run here."""
    on_gpu = torch.cuda.is_available()
    te = _transformer_engine_available()
    impl = cfg.model.transformer_impl
    if impl == "transformer_engine" and not te:
        raise ValueError("model.transformer_impl=transformer_engine but transformer_engine does not import; "
                         "install it (NGC PyTorch container) or set model.transformer_impl=local")
    use_te = te if impl == "auto" else impl == "transformer_engine"
    if cfg.model.fp8 is not None and not use_te:
        raise ValueError(f"model.fp8={cfg.model.fp8} needs Transformer Engine, which is not available here "
                         "(it needs CUDA); unset model.fp8 or run in the NGC container on H100s")
    p = cfg.parallel
    if p.context_parallel_size > 1 and not use_te:
        raise ValueError("parallel.context_parallel_size>1 needs Transformer Engine attention (GPU); "
                         "set parallel.context_parallel_size=1 on CPU")
    if p.use_distributed_optimizer and not on_gpu:
        raise ValueError("parallel.use_distributed_optimizer=true needs CUDA (megatron-core 0.16's DistributedOptimizer "
                         "only accepts torch.cuda tensors); set parallel.use_distributed_optimizer=false on CPU")
    dtype = torch.bfloat16 if (cfg.model.dtype == "bf16" and on_gpu) else torch.float32
    if cfg.model.dtype == "bf16" and not on_gpu:
        log.warning("model.dtype=bf16 on a CPU machine: computing in fp32 instead")
    overrides: dict[str, Any] = dict(
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        # Token-budgeted micro-batches differ in shape: pipeline stages must send shapes first.
        # (megatron-core checks the MoE dispatcher even for dense models.)
        variable_seq_lengths=p.pipeline_model_parallel_size > 1,
        moe_token_dispatcher_type="alltoall",
        attention_dropout=cfg.model.attention_dropout,
        hidden_dropout=cfg.model.hidden_dropout,
    )
    if cfg.model.recompute_granularity != "none":
        overrides.update(recompute_granularity=cfg.model.recompute_granularity)
        if cfg.model.recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    if cfg.model.fp8 is not None:
        overrides.update(
            fp8=cfg.model.fp8,
            fp8_recipe=cfg.model.fp8_recipe,
            fp8_margin=cfg.model.fp8_margin,
            fp8_amax_history_len=cfg.model.fp8_amax_history_len,
            fp8_amax_compute_algo=cfg.model.fp8_amax_compute_algo,
        )
    return {"use_te": use_te, "params_dtype": dtype, "config_overrides": overrides}


class MegatronActor:
    """This rank's share of the policy model, its optimizer and its LR schedule."""

    def __init__(self, cfg, *, hf_dir: str | os.PathLike, pad_token_id: int, load_weights: bool = True):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from luffy_megatron.convert.weights import load_hf_weights
        from luffy_megatron.models.cpu_shim import apply_cpu_shim, seed_everything
        from luffy_megatron.models.hf_to_mcore import build_model_chunks, padded_vocab_size, read_hf_arch
        from luffy_megatron.models.parallel import init_model_parallel

        self.cfg = cfg
        self.pad_token_id = pad_token_id
        settings = megatron_settings(cfg)
        apply_cpu_shim()
        p = cfg.parallel
        init_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size)
        seed_everything(cfg.trainer.seed)

        self.hf_dir = Path(hf_dir)
        self.arch = read_hf_arch(self.hf_dir / "config.json")
        chunks = build_model_chunks(
            self.arch,
            params_dtype=torch.float32,  # fp32 master weights; bf16 compute through megatron's Float16Module
            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
            use_te=settings["use_te"],
            **settings["config_overrides"],
        )
        if load_weights and cfg.model.load_checkpoint:
            # a converted Megatron checkpoint (luffy-convert hf-to-megatron), written under any TP/PP
            from luffy_megatron.convert.checkpoint import load_checkpoint as load_model_checkpoint

            load_model_checkpoint(chunks, cfg.model.load_checkpoint)
        elif load_weights:
            load_hf_weights(chunks, self.arch, self.hf_dir)
        self.config = chunks[0].config
        if settings["params_dtype"] == torch.bfloat16:
            from megatron.core.transformer.module import Float16Module

            self.config.bf16 = True
            chunks = [Float16Module(self.config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=p.use_distributed_optimizer,
        )
        self.model = [DistributedDataParallel(self.config, ddp_config, c) for c in chunks]
        a = cfg.actor
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=a.lr,
                weight_decay=a.weight_decay,
                adam_beta1=a.adam_beta1,
                adam_beta2=a.adam_beta2,
                adam_eps=a.adam_eps,
                clip_grad=a.grad_clip,
                bf16=settings["params_dtype"] == torch.bfloat16,
                params_dtype=settings["params_dtype"],
                use_distributed_optimizer=p.use_distributed_optimizer,
            ),
            self.model,
            config_overrides={},  # upstream applies weight decay to every parameter (torch AdamW over all)
        )
        total_steps = max(cfg.trainer.total_training_steps or 1, 1)
        warmup = int(a.lr_warmup_steps_ratio * total_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warmup else a.lr,
            max_lr=a.lr,
            min_lr=a.lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=total_steps,
            lr_decay_style="constant",
            start_wd=a.weight_decay,
            end_wd=a.weight_decay,
            wd_incr_steps=total_steps,
            wd_incr_style="constant",
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss

        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.vocab_padded = padded_vocab_size(self.arch.vocab_size, p.tensor_model_parallel_size, cfg.model.make_vocab_size_divisible_by)
        self.vocab_local = self.vocab_padded // p.tensor_model_parallel_size
        # THD packing needs Transformer Engine attention; the local (CPU) spec pads instead.
        self.packed = settings["use_te"] and cfg.actor.use_sequence_packing
        # sequence parallel splits the sequence over TP ranks; context parallel over 2 x CP chunks
        self.pad_multiple = math.lcm(p.tensor_model_parallel_size if p.sequence_parallel else 1, 2 * p.context_parallel_size if p.context_parallel_size > 1 else 1)
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.step = 0  # optimizer steps taken
        self.loss_opts = loss_options(asdict(cfg.algo))

    # ------------------------------------------------------------------ plumbing

    def _forward_backward(self, micro_batches: list[MicroBatch], loss_fn, *, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            device = self._device
            kwargs = {}
            if mb.cu_seqlens is not None:  # packed rows (THD): attention stays within each row
                from megatron.core.packed_seq_params import PackedSeqParams

                cu = mb.cu_seqlens.to(device)
                kwargs["packed_seq_params"] = PackedSeqParams(
                    qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                    cu_seqlens_kv_padded=cu, max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen,
                )
            output = model(mb.input_ids.to(device), mb.position_ids.to(device), None, **kwargs)
            return output, partial(loss_fn, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches) if len(self.model) == 1 else [iter(micro_batches) for _ in self.model],
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.input_ids.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.input_ids.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _token_logprobs(self, mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob and entropy of each response token of the micro-batch, [b, l] (0 where masked)."""
        v = logits.shape[-1]
        lp, ent = vocab_parallel_logprob_entropy(
            logits.reshape(-1, v),
            mb.targets.reshape(-1).to(logits.device),
            temperature=self.cfg.rollout.temperature,
            chunk_tokens=self.cfg.actor.log_prob_chunk_tokens,
            vocab_start=self.tp_rank * self.vocab_local,
            valid_vocab_size=self.arch.vocab_size,
            tp_group=self.tp_group,
        )
        index = mb.resp_index.to(logits.device)
        lp, ent = lp[index], ent[index]
        mask = mb.resp_mask.to(logits.device).bool()
        return torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)

    def _my_rows(self, batch: RolloutBatch) -> list[int]:
        return balance_rows(batch.sequence_lengths(), self.dp_size)[self.dp_rank]

    def _micro_batches(self, batch: RolloutBatch, rows: list[int]) -> list[MicroBatch]:
        lengths = batch.sequence_lengths()
        a = self.cfg.actor
        if a.use_dynamic_bsz:
            plan = plan_micro_batches(lengths, rows, max_tokens=a.ppo_max_token_len_per_gpu, packed=self.packed)
        else:
            plan = split_mini_batches(rows, a.ppo_micro_batch_size)
        build = build_packed_micro_batch if self.packed else build_micro_batch
        return [build(batch, mb, pad_token_id=self.pad_token_id, pad_multiple=self.pad_multiple) for mb in plan]

    def _share(self, out: torch.Tensor) -> torch.Tensor:
        """Rows filled by one DP rank on the last pipeline stage -> the full tensor on every rank.
        (Collectives run on the compute device: NCCL takes no CPU tensors.)"""
        if self.pp_size == 1 and self.dp_size == 1:
            return out
        out = out.to(self._device)
        if self.pp_size > 1:
            from megatron.core import parallel_state as ps

            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(out, src=last, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(out, group=self.dp_group)
        return out.cpu()

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def compute_log_probs(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Current-policy log-probs and entropies of every response token, [B, L] each (0 where masked).

        Used for `old_log_prob` of ALL rows, demonstrations included (upstream recomputes them with the
        actor rather than trusting the engine's numbers)."""
        for m in self.model:
            m.eval()
        rows = self._my_rows(batch)
        out = torch.zeros(2, batch.num_rows, batch.response_width)

        def collect(mb, logits):
            lp, ent = self._token_logprobs(mb, logits)
            return torch.zeros((), device=logits.device), {"rows": mb.rows, "lp": lp, "ent": ent}

        results = self._forward_backward(self._micro_batches(batch, rows), collect, forward_only=True) if rows else []
        if self.is_last_stage:  # every TP rank of the last stage holds the same numbers
            for r in results:
                width = r["lp"].shape[1]
                out[0, r["rows"], :width] = r["lp"].float().cpu()
                out[1, r["rows"], :width] = r["ent"].float().cpu()
        out = self._share(out)
        return out[0], out[1]

    def update(self, batch: RolloutBatch, *, advantages: torch.Tensor, old_log_probs: torch.Tensor) -> dict[str, float]:
        """LUFFY's policy update on a rollout batch: mini-batches of this rank's rows, each one optimizer step.

        Returns upstream's metric names (`actor/pg_loss`, `actor/off_policy_prob`, `actor/grad_norm`, ...),
        averaged over micro-batches and mini-batches (as upstream's trainer reduces them)."""
        for m in self.model:
            m.train()
        rows = self._my_rows(batch)
        rows_per_mini = self.cfg.actor.ppo_mini_batch_size * self.cfg.rollout.n // self.dp_size
        collected: dict[str, list[float]] = {}
        for mini in split_mini_batches(rows, rows_per_mini):
            micro = self._micro_batches(batch, mini)
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            # megatron-core divides each micro-batch loss by their number (upstream sums them), and DDP
            # averages over data-parallel ranks (upstream too, unless the user asks for the DP-invariant sum).
            loss_scale = len(micro) * (self.dp_size if self.cfg.algo.dp_gradient_reduction == "sum" else 1)

            def loss_fn(mb: MicroBatch, logits: torch.Tensor):
                lp, ent = self._token_logprobs(mb, logits)
                width = lp.shape[1]
                loss, metrics = microbatch_policy_loss(
                    log_prob_BT=lp,
                    entropy_BT=ent,
                    old_log_prob_BT=old_log_probs[mb.rows, :width].to(lp.device),
                    advantages_BT=advantages[mb.rows, :width].to(lp.device),
                    response_mask_BT=mb.resp_mask.to(lp.device),
                    prefix_mask_BT=batch.prefix_mask[mb.rows, :width].to(lp.device),
                    max_response_length=batch.response_width,
                    **self.loss_opts,
                )
                return loss * loss_scale, {k: v.detach() for k, v in metrics.items()}

            results = self._forward_backward(micro, loss_fn, forward_only=False)
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.step += 1
            for r in results:
                for k, v in r.items():
                    collected.setdefault(f"actor/{k}", []).append(float(v))
            collected.setdefault("actor/grad_norm", []).append(float(grad_norm) if grad_norm is not None else float("nan"))
            collected.setdefault("actor/lr", []).append(self.optimizer.param_groups[0]["lr"])
            if not ok:
                log.warning("optimizer step %d skipped (non-finite gradients)", self.step)
        return self._share_metrics({k: sum(v) / len(v) for k, v in collected.items()})

    def _share_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Loss metrics exist on the last pipeline stage: send them to every stage, then average over
        data-parallel ranks (upstream's trainer averages the workers' metrics)."""
        if self.pp_size > 1:
            from megatron.core import parallel_state as ps

            box = [sorted(metrics.items()) if self.is_last_stage else None]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
            metrics = dict(box[0])
        if self.dp_size > 1:
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self._device)
            dist.all_reduce(values, group=self.dp_group)
            metrics = dict(zip(keys, (values / self.dp_size).cpu().tolist()))
        return metrics

    def gradients(self, batch: RolloutBatch, *, advantages: torch.Tensor, old_log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The DP-averaged gradient of one mini-batch holding every row, as HF-named full tensors, without
        stepping the optimizer (for parallel-invariance checks and debugging). Collective."""
        saved = (self.cfg.actor.ppo_mini_batch_size, self.optimizer.step)
        grads: dict[str, torch.Tensor] = {}
        try:
            self.cfg.actor.ppo_mini_batch_size = batch.num_rows // self.cfg.rollout.n
            self.optimizer.step = lambda: (True, None, None)  # stop after backward + DP reduction
            self.update(batch, advantages=advantages, old_log_probs=old_log_probs)
            self.step -= 1
            params = [p for chunk in self._unwrapped() for p in chunk.parameters()]
            # Export reads parameters; point them at their reduced gradients for the duration.
            originals = [p.data for p in params]
            for p in params:
                p.data = p.main_grad.to(p.dtype)
            try:
                grads = {name: t.clone() for name, t in self.export_hf_weights()}
            finally:
                for p, data in zip(params, originals):
                    p.data = data
        finally:
            self.cfg.actor.ppo_mini_batch_size, self.optimizer.step = saved
        return grads

    def export_hf_weights(self, **kwargs):
        """(hf_name, full tensor) pairs of the current weights, on every rank (collective)."""
        from luffy_megatron.convert.export import iter_hf_weights

        return iter_hf_weights(self._unwrapped(), self.arch, **kwargs)

    def _unwrapped(self) -> list:
        chunks = []
        for m in self.model:
            inner = m.module
            chunks.append(getattr(inner, "module", inner) if inner.__class__.__name__ == "Float16Module" else inner)
        return chunks
