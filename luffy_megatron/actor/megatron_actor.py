"""One rank of the Megatron policy: log-probs for all rows, and LUFFY's update with upstream's scaling.

Every rank of the TP x PP x DP world builds a `MegatronActor` from the same config and calls the same
methods with the same `RolloutBatch` (SPMD: under torchrun, or one Ray actor per rank). Each data-parallel
rank takes its share of the rows (balanced by tokens); results are returned complete on every rank.

Loss scaling, as upstream: each micro-batch's loss is its token sum /
max_response_length (plus the entropy token-mean term), micro-batch losses are SUMMED within a mini-batch
(megatron-core's schedules divide by the number of micro-batches; we multiply it back), gradients are
AVERAGED over data-parallel ranks (megatron DDP), clipped to `grad_clip`, then one Adam(W) step.
Averaging makes the step scale with 1/DP on the same rows; `algo.dp_gradient_reduction=sum` removes that, and
`algo.reference_dp=R` gives the gradient upstream's averaging gives on R ranks.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from luffy_megatron.actor.batching import (
    MicroBatch,
    RolloutBatch,
    balance_rows,
    build_micro_batch,
    build_packed_micro_batch,
    contiguous_rows,
    empty_micro_batch,
    gradient_accumulation,
    micro_batch_counts,
    micro_batch_prompts,
    padding_multiples,
    plan_micro_batches,
    rows_per_rank,
    split_mini_batches,
)
from luffy_megatron.actor.context_parallel import gather_tokens, shard_micro_batch
from luffy_megatron.actor.reference import ReferenceModel
from luffy_megatron.actor.schedule import make_lr_scheduler
from luffy_megatron.algo.logprob import vocab_parallel_logprob_entropy
from luffy_megatron.algo.loss import microbatch_policy_loss
from luffy_megatron.algo.options import (
    dp_loss_factor,
    loss_options,
    rollout_is_options,
    uses_reference,
    uses_target_probs,
)
from luffy_megatron.algo.rollout_correction import loss_weights
from luffy_megatron.compat.megatron import apply_mcore_patches
from luffy_megatron.compat.megatron_cpu import apply_cpu_shim, seed_everything
from luffy_megatron.convert.checkpoint import load_checkpoint as load_model_checkpoint
from luffy_megatron.convert.export import iter_hf_weights
from luffy_megatron.convert.weights import load_hf_weights
from luffy_megatron.models.hf_to_mcore import (
    build_model_chunks,
    padded_vocab_size,
    read_hf_arch,
    transformer_engine_available,
)
from luffy_megatron.models.parallel import init_model_parallel

# megatron-core is imported inside the methods (lazy): the driver imports this module for `megatron_settings`
# and never imports megatron.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    """What this machine can run: CUDA, Transformer Engine, and apex's fused weight-gradient GEMM
    (`fused_weight_gradient_mlp_cuda`, needed by megatron-core's own linear layers for
    `gradient_accumulation_fusion`; the GPU image of docker/Dockerfile does not install it)."""

    cuda: bool
    te: bool
    apex_wgrad: bool
    # apex's `scaled_masked_softmax_cuda`, which megatron-core's fused softmax imports for bf16 sequences of
    # 17-4096 keys (fusions/fused_softmax.py `get_batch_per_block`): without it the first forward raises
    masked_softmax: bool = False

    @classmethod
    def detect(cls) -> "Kernels":
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            te=transformer_engine_available(),
            apex_wgrad=cuda and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
            masked_softmax=cuda and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        )


def fusion_settings(kernels: Kernels, *, use_te: bool) -> dict[str, Any]:
    """The kernel fusions megatron's own training turns on, where their kernels exist; all off on CPU.
    Without the RoPE fusion, megatron-core 0.16 applies RoPE to packed (THD) rows one sequence at a
    time in a Python loop."""
    gpu = kernels.cuda
    return dict(
        apply_rope_fusion=gpu and use_te,  # TE's fused RoPE (BSHD and THD)
        bias_activation_fusion=gpu,  # megatron-core's jit-fused bias + SwiGLU
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu and kernels.masked_softmax,  # local spec only; TE attention has its own kernels
        gradient_accumulation_fusion=gpu and kernels.apex_wgrad,  # wgrad GEMM accumulates into main_grad
    )


def _resolve_use_te(cfg, kernels: Kernels) -> bool:
    """Whether to build with Transformer Engine; refuses settings that cannot run with these kernels."""
    impl = cfg.model.transformer_impl
    if impl == "transformer_engine" and not kernels.te:
        raise ValueError(
            "model.transformer_impl=transformer_engine but transformer_engine does not import; "
            "install it (the GPU image of docker/Dockerfile) or set model.transformer_impl=local"
        )
    use_te = kernels.te if impl == "auto" else impl == "transformer_engine"
    if cfg.model.fp8 is not None and not use_te:
        raise ValueError(
            f"model.fp8={cfg.model.fp8} needs Transformer Engine, which is not available here "
            "(it needs CUDA); unset model.fp8 or run in the GPU image of docker/Dockerfile on H100s"
        )
    p = cfg.parallel
    if p.context_parallel_size > 1 and not use_te:
        raise ValueError(
            "parallel.context_parallel_size>1 needs Transformer Engine attention (GPU); "
            "set parallel.context_parallel_size=1 on CPU"
        )
    if p.use_distributed_optimizer and not kernels.cuda:
        raise ValueError(
            "parallel.use_distributed_optimizer=true needs CUDA (megatron-core 0.16's DistributedOptimizer "
            "only accepts torch.cuda tensors); set parallel.use_distributed_optimizer=false on CPU"
        )
    return use_te


def _config_overrides(cfg, kernels: Kernels, use_te: bool) -> dict[str, Any]:
    """The TransformerConfig overrides: parallelism, p2p, dropout, fusions, recompute and FP8."""
    p = cfg.parallel
    overrides: dict[str, Any] = dict(
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        # Token-budgeted micro-batches differ in shape: pipeline stages must send shapes first.
        # (megatron-core checks the MoE dispatcher even for dense models.)
        variable_seq_lengths=p.pipeline_model_parallel_size > 1,
        # The interleaved schedule sends both directions at once; megatron-core's batched p2p posts them
        # in an order that pairs them wrongly with two stages. Megatron-LM's default for interleaving:
        # overlapped, unbatched p2p (`_p2p_ops`, ordered for two stages; see compat/megatron.py).
        **(dict(overlap_p2p_comm=True, batch_p2p_comm=False) if p.virtual_pipeline_model_parallel_size else {}),
        moe_token_dispatcher_type="alltoall",
        attention_dropout=cfg.model.attention_dropout,
        hidden_dropout=cfg.model.hidden_dropout,
        **fusion_settings(kernels, use_te=use_te),
    )
    m = cfg.model
    if m.recompute_granularity == "full":
        overrides.update(
            recompute_granularity="full",
            recompute_method=m.recompute_method,
            recompute_num_layers=m.recompute_num_layers,
        )
    elif m.recompute_granularity == "selective":
        overrides.update(recompute_granularity="selective")  # megatron-core's default module: core_attn
    if m.fp8 is not None:
        overrides.update(
            fp8=m.fp8,
            fp8_recipe=m.fp8_recipe,
            fp8_margin=m.fp8_margin,
            fp8_amax_history_len=m.fp8_amax_history_len,
            fp8_amax_compute_algo=m.fp8_amax_compute_algo,
            tp_only_amax_red=m.tp_only_amax_red,
        )
    return overrides


def _ddp_settings(cfg, kernels: Kernels) -> dict[str, Any]:
    """The DistributedDataParallelConfig settings."""
    p = cfg.parallel
    overlap = kernels.cuda and p.use_distributed_optimizer
    return dict(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # megatron's training: overlap the DP reduce-scatter with backward and the param all-gather with
        # the next forward, in buckets (bucket_size=None: megatron-core's default, max(40M, 1M x DP) elements)
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap,
        align_param_gather=overlap and p.virtual_pipeline_model_parallel_size is not None,
        bucket_size=None,
    )


def megatron_settings(cfg, kernels: Optional[Kernels] = None) -> dict[str, Any]:
    """The one boundary where our config becomes megatron-core settings. Refuses what cannot run here.

    Returns `use_te`, `params_dtype` (the compute dtype: bf16 when asked, on CPU too), `config_overrides`
    (TransformerConfig), `ddp` (DistributedDataParallelConfig), `fp8` and `equal_micro_batches`."""
    kernels = kernels or Kernels.detect()
    use_te = _resolve_use_te(cfg, kernels)
    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    overrides = _config_overrides(cfg, kernels, use_te)
    m = cfg.model
    ddp = _ddp_settings(cfg, kernels)
    return {
        "use_te": use_te,
        "params_dtype": dtype,
        "config_overrides": overrides,
        "ddp": ddp,
        "fp8": m.fp8 is not None,
        # FP8 reduces amax over TP x DP (x CP) at every GEMM/autocast exit unless tp_only_amax_red: every
        # data-parallel rank must then run the same number of micro-batches.
        "equal_micro_batches": m.fp8 is not None and not m.tp_only_amax_red,
    }


def exact_fp32_copies(chunks: list, dtype: torch.dtype) -> dict:
    """Host copies of the fp32 parameters whose values `dtype` cannot hold exactly (none when the
    weights came from a bf16 checkpoint). The optimizer's fp32 main params are seeded from them after the
    model is cast, so they start from the original weights, not from their bf16 rounding."""
    if dtype == torch.float32:
        return {}
    out = {}
    for chunk in chunks:
        for param in chunk.parameters():
            value = param.detach()
            if value.dtype == torch.float32 and not torch.equal(value.to(dtype).float(), value):
                out[param] = value.cpu().clone()
    return out


def seed_main_params(optimizer, originals: dict) -> int:
    """Overwrite the fp32 main params of the (bf16) model params in `originals` with those values:
    megatron-core's Float16OptimizerWithFloat16Params (full copies) and DistributedOptimizer (this rank's
    shard of each param). Returns the number of main params written."""
    written = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "shard_fp32_from_float16_groups"):  # distributed optimizer
            for model_group, main_group in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
                for param, main in zip(model_group, main_group):
                    if param in originals:
                        rng = opt._get_model_param_range_map(param)["param"]
                        main.data.copy_(originals[param].view(-1)[rng.start : rng.end])
                        written += 1
        elif hasattr(opt, "fp32_from_float16_groups"):
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for param, main in zip(model_group, main_group):
                    if param in originals:
                        main.data.copy_(originals[param])
                        written += 1
    return written


class MegatronActor:
    """This rank's share of the policy model, its optimizer and its LR schedule."""

    def __init__(self, cfg, *, hf_dir: str | os.PathLike, pad_token_id: int, load_weights: bool = True):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        settings = megatron_settings(cfg)
        apply_cpu_shim()
        apply_mcore_patches()
        p = cfg.parallel
        init_model_parallel(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size,
            p.context_parallel_size,
        )
        seed_everything(cfg.trainer.seed)

        self.hf_dir = Path(hf_dir)
        self.arch = read_hf_arch(self.hf_dir / "config.json")
        originals = self._build_model(settings, load_weights=load_weights)
        self.optimizer = self._build_optimizer(settings["params_dtype"])
        seed_main_params(self.optimizer, originals)
        del originals
        # LR schedule in upstream's units (actor/schedule.py): one scheduler step per trainer step, warmup over
        # int(lr_warmup_steps_ratio x total trainer steps); the trainer fills in the real total.
        self.scheduler = make_lr_scheduler(self.optimizer, cfg.actor, cfg.trainer.total_training_steps or 1)
        self._set_schedule_hooks()

        self._parallel_coords()
        self.vocab_padded = padded_vocab_size(
            self.arch.vocab_size, p.tensor_model_parallel_size, cfg.model.make_vocab_size_divisible_by
        )
        self.vocab_local = self.vocab_padded // p.tensor_model_parallel_size
        # THD packing needs Transformer Engine attention; the local (CPU) spec pads instead.
        self.packed = settings["use_te"] and cfg.actor.use_sequence_packing
        self.row_multiple, self.total_multiple = padding_multiples(
            tp=p.tensor_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            cp=p.context_parallel_size,
            fp8=settings["fp8"],
            packed=self.packed,
        )
        self.equal_micro_batches = settings["equal_micro_batches"]
        # the interleaved schedule runs micro-batches in groups of PP (microbatch_group_size_per_vp_stage)
        self.micro_batch_multiple = self.pp_size if len(self.model) > 1 else 1
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.step = 0  # optimizer steps taken
        self.loss_opts = loss_options(cfg.algo)
        self.use_target_probs = uses_target_probs(cfg.algo)  # teacher probs in the off-policy ratio
        # importance weights of the engines' log-probs (or none)
        self.rollout_is = rollout_is_options(cfg.algo, cfg.trainer.overlap)
        # upstream divides every micro-batch loss by ppo_mini_batch_size // ppo_micro_batch_size (its units),
        # with or without dynamic batch sizes (upstream's dp_actor)
        self.loss_opts["gradient_accumulation"] = gradient_accumulation(cfg)
        # the frozen reference of the KL terms (algo.use_ref, use_kl_loss, kl_ctrl_coef): the initial weights again
        self.reference = None
        if uses_reference(cfg.algo):
            self.reference = ReferenceModel(cfg, self.arch, settings, self.hf_dir)

    def _build_model(self, settings: dict, *, load_weights: bool) -> dict:
        """This rank's model chunks, loaded, cast and wrapped in megatron's DDP (`self.model`, `self.config`,
        `self.ddp_config`, `self.half`). Returns the exact fp32 values the bf16 cast rounds
        (`exact_fp32_copies`), for the optimizer's main params."""
        # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        cfg = self.cfg
        dtype = settings["params_dtype"]
        # The config says bf16 from the start, as megatron's own bf16 training (softmax upcast, bf16
        # pipeline buffers); the parameters are made in fp32 so the weights load exactly, then cast.
        chunks = build_model_chunks(
            self.arch,
            params_dtype=dtype,
            construct_dtype=torch.float32,
            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
            use_te=settings["use_te"],
            **settings["config_overrides"],
        )
        if load_weights and cfg.model.load_checkpoint:
            # a converted Megatron checkpoint (luffy-convert hf-to-megatron), written under any TP/PP
            load_model_checkpoint(chunks, cfg.model.load_checkpoint)
        elif load_weights:
            load_hf_weights(chunks, self.arch, self.hf_dir)
        self.config = chunks[0].config
        originals = exact_fp32_copies(chunks, dtype)
        self.half = dtype != torch.float32
        if self.half:
            # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(self.config, c) for c in chunks]
        self.ddp_config = DistributedDataParallelConfig(**settings["ddp"])
        self.model = [DistributedDataParallel(self.config, self.ddp_config, c) for c in chunks]
        return originals

    def _build_optimizer(self, dtype: torch.dtype):
        """megatron's Adam(W) over `self.model`, with the actor's settings."""
        # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        a = self.cfg.actor
        return get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=a.lr,
                weight_decay=a.weight_decay,
                adam_beta1=a.adam_beta1,
                adam_beta2=a.adam_beta2,
                adam_eps=a.adam_eps,
                clip_grad=a.grad_clip,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
            ),
            self.model,
            config_overrides={},  # upstream applies weight decay to every parameter (torch AdamW over all)
        )

    def _parallel_coords(self) -> None:
        """This rank's groups, ranks and sizes in megatron's parallel_state."""
        # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
        from megatron.core import parallel_state as ps

        cp_size = self.cfg.parallel.context_parallel_size
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.cp_group = ps.get_context_parallel_group() if cp_size > 1 else None
        self.cp_rank = ps.get_context_parallel_rank()
        self.cp_size = cp_size
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)

    def _set_schedule_hooks(self) -> None:
        """The hooks megatron-core's schedules call, set as Megatron-LM's training sets them."""
        # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
        from megatron.core.distributed import finalize_model_grads

        one = len(self.model) == 1
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model[0].no_sync if one else [m.no_sync for m in self.model]
        self.config.grad_scale_func = self.optimizer.scale_loss
        if self.ddp_config.overlap_grad_reduce:
            self.config.grad_sync_func = (
                self.model[0].start_grad_sync if one else [m.start_grad_sync for m in self.model]
            )
        if self.ddp_config.overlap_param_gather and self.ddp_config.align_param_gather:
            self.config.param_sync_func = (
                self.model[0].start_param_sync if one else [m.start_param_sync for m in self.model]
            )

    # ------------------------------------------------------------------ plumbing

    def _forward_backward(
        self, micro_batches: list[MicroBatch], loss_fn, *, forward_only: bool, model: Optional[list] = None
    ) -> list[dict]:
        """Runs megatron-core's schedule over the micro-batches; `loss_fn(mb, shard, logits)` on the last
        stage, where `shard` is this CP rank's part of the micro-batch (None without context parallelism).
        `model`: the chunks to run (default the policy's; the frozen reference's for its log-probs)."""
        # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model = self.model if model is None else model

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            device = self._device
            kwargs = {}
            input_ids, position_ids, shard = mb.input_ids, mb.position_ids, None
            if self.cp_size > 1:
                shard = shard_micro_batch(
                    mb.input_ids,
                    mb.position_ids,
                    mb.targets,
                    cp_size=self.cp_size,
                    cp_rank=self.cp_rank,
                    cu_seqlens=mb.cu_seqlens,
                )
                input_ids, position_ids = shard.input_ids, shard.position_ids
            if mb.cu_seqlens is not None:  # packed rows (THD): attention stays within each row
                # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
                from megatron.core.packed_seq_params import PackedSeqParams

                cu = mb.cu_seqlens.to(device)
                kwargs["packed_seq_params"] = PackedSeqParams(
                    qkv_format="thd",
                    cu_seqlens_q=cu,
                    cu_seqlens_kv=cu,
                    cu_seqlens_q_padded=cu,
                    cu_seqlens_kv_padded=cu,
                    max_seqlen_q=mb.max_seqlen,
                    max_seqlen_kv=mb.max_seqlen,
                )
            if self.half:  # keep the logits in bf16: the log-prob path upcasts one chunk at a time
                kwargs["fp32_output"] = False
            output = model(input_ids.to(device), position_ids.to(device), None, **kwargs)
            return output, partial(loss_fn, mb, shard)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches) if len(model) == 1 else [iter(micro_batches) for _ in model],
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.input_ids.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.input_ids.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _token_logprobs(self, mb: MicroBatch, shard, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob and entropy of each response token of the micro-batch, [b, l] (0 where masked).
        Under context parallelism the per-token values of every CP rank are gathered first."""
        v = logits.shape[-1]
        targets = mb.targets if shard is None else shard.targets
        lp, ent = vocab_parallel_logprob_entropy(
            logits.reshape(-1, v),
            targets.reshape(-1).to(logits.device),
            temperature=self.cfg.rollout.temperature,
            chunk_tokens=self.cfg.actor.log_prob_chunk_tokens,
            vocab_start=self.tp_rank * self.vocab_local,
            valid_vocab_size=self.arch.vocab_size,
            tp_group=self.tp_group,
        )
        if shard is not None:
            lp, ent = gather_tokens(lp, shard, self.cp_group), gather_tokens(ent, shard, self.cp_group)
        index = mb.resp_index.to(logits.device)
        lp, ent = lp[index], ent[index]
        mask = mb.resp_mask.to(logits.device).bool()
        return torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)

    def _rows_by_rank(self, batch: RolloutBatch) -> list[list[int]]:
        """The rows of each data-parallel rank: balanced by tokens (actor.balance_batch, upstream's
        _balance_batch), or the batch cut into equal contiguous parts in its order."""
        if self.cfg.actor.balance_batch:
            return balance_rows(batch.sequence_lengths(), self.dp_size)
        return contiguous_rows(batch.num_rows, self.dp_size)

    def _plan(self, batch: RolloutBatch, rows: list[int]) -> list[list[int]]:
        a = self.cfg.actor
        if not rows:
            return []
        if a.use_dynamic_bsz:
            return plan_micro_batches(
                batch.sequence_lengths(), rows, max_tokens=a.ppo_max_token_len_per_gpu, packed=self.packed
            )
        return split_mini_batches(rows, rows_per_rank(micro_batch_prompts(a), self.cfg.rollout.n, self.dp_size))

    def _micro_batches(self, batch: RolloutBatch, rows_by_rank: list[list[int]]) -> list[MicroBatch]:
        """This rank's micro-batches for the rows of every DP rank (`rows_by_rank[dp_rank]` are its own),
        padded with empty micro-batches to the count every rank must run (FP8, interleaved schedule)."""
        if self.equal_micro_batches:
            plans = [self._plan(batch, rows) for rows in rows_by_rank]
        else:
            plans = [[] for _ in rows_by_rank]
            plans[self.dp_rank] = self._plan(batch, rows_by_rank[self.dp_rank])
        counts = micro_batch_counts(
            [len(pl) for pl in plans], equal_across_ranks=self.equal_micro_batches, multiple=self.micro_batch_multiple
        )
        plan = plans[self.dp_rank]
        if self.packed:
            build = partial(build_packed_micro_batch, total_multiple=self.total_multiple)
        else:
            build = build_micro_batch
        out = [build(batch, mb, pad_token_id=self.pad_token_id, pad_multiple=self.row_multiple) for mb in plan]
        empty_length = math.lcm(self.row_multiple, self.total_multiple)
        out += [
            empty_micro_batch(pad_token_id=self.pad_token_id, length=empty_length, packed=self.packed)
            for _ in range(counts[self.dp_rank] - len(plan))
        ]
        return out

    def _share(self, out: torch.Tensor) -> torch.Tensor:
        """Rows filled by one DP rank on the last pipeline stage -> the full tensor on every rank.
        (Collectives run on the compute device: NCCL takes no CPU tensors.)"""
        if self.pp_size == 1 and self.dp_size == 1:
            return out
        out = out.to(self._device)
        if self.pp_size > 1:
            # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
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
        return self._log_probs(batch, self.model)

    @torch.no_grad()
    def compute_ref_log_probs(self, batch: RolloutBatch) -> torch.Tensor:
        """The frozen reference policy's log-probs of every response token, [B, L] (0 where masked; upstream
        `compute_ref_log_prob`): the initial weights (actor/reference.py), through the same micro-batches,
        schedule and log-prob path as `compute_log_probs`. Needs the reference (algo/options.py uses_reference)."""
        if self.reference is None:
            raise ValueError(
                "compute_ref_log_probs needs the reference model, which is built only when "
                "algo.use_kl_loss=true, algo.kl_ctrl_coef > 0 or algo.use_ref=true"
            )
        return self._log_probs(batch, self.reference.chunks)[0]

    def _log_probs(self, batch: RolloutBatch, model: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros(2, batch.num_rows, batch.response_width)

        def collect(mb, shard, logits):
            if not mb.rows:  # an empty micro-batch (equal counts across ranks)
                return torch.zeros((), device=logits.device), {"rows": [], "lp": None, "ent": None}
            lp, ent = self._token_logprobs(mb, shard, logits)
            return torch.zeros((), device=logits.device), {"rows": mb.rows, "lp": lp, "ent": ent}

        micro = self._micro_batches(batch, self._rows_by_rank(batch))
        results = self._forward_backward(micro, collect, forward_only=True, model=model) if micro else []
        if self.is_last_stage:  # every TP (and CP) rank of the last stage holds the same numbers
            for r in results:
                if not r["rows"]:
                    continue
                width = r["lp"].shape[1]
                out[0, r["rows"], :width] = r["lp"].float().cpu()
                out[1, r["rows"], :width] = r["ent"].float().cpu()
        out = self._share(out)
        return out[0], out[1]

    def _mini_batches(self, batch: RolloutBatch) -> list[list[list[int]]]:
        """For each mini-batch (one optimizer step), the rows of every DP rank."""
        rows_per_mini = rows_per_rank(self.cfg.actor.ppo_mini_batch_size, self.cfg.rollout.n, self.dp_size)
        per_rank = [split_mini_batches(rows, rows_per_mini) for rows in self._rows_by_rank(batch)]
        return [list(minis) for minis in zip(*per_rank)]

    def _backward(
        self,
        batch: RolloutBatch,
        rows_by_rank: list[list[int]],
        advantages: torch.Tensor,
        old_log_probs: torch.Tensor,
        ref_log_probs: Optional[torch.Tensor] = None,
        behaviour_log_probs: Optional[torch.Tensor] = None,
    ) -> list[dict]:
        """Forward + backward of one mini-batch and the DP gradient reduction; returns the micro-batch metrics.
        `ref_log_probs`: the reference model's, for algo.use_kl_loss; `behaviour_log_probs`: the engines', for
        algo.rollout_is."""
        batch.check_target_probs(enabled=self.use_target_probs)  # on every rank, before any forward
        batch.check_behaviour_log_probs(behaviour_log_probs, mode=self.rollout_is["mode"])
        micro = self._micro_batches(batch, rows_by_rank)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        # megatron-core divides each micro-batch loss by their number (upstream sums them), and DDP
        # averages over data-parallel ranks (upstream too, unless algo.dp_gradient_reduction=sum or
        # algo.reference_dp rescales it; dp_loss_factor says where megatron-core does what)
        loss_scale = len(micro) * dp_loss_factor(self.cfg.algo, self.dp_size)

        def loss_fn(mb: MicroBatch, shard, logits: torch.Tensor):
            if not mb.rows:  # an empty micro-batch: zero loss, but backward still runs every collective
                return logits.sum() * 0.0, {}
            lp, ent = self._token_logprobs(mb, shard, logits)
            width = lp.shape[1]
            old = old_log_probs[mb.rows, :width].to(lp.device)
            prefix = batch.prefix_mask[mb.rows, :width].to(lp.device)
            loss, metrics = microbatch_policy_loss(
                log_prob_BT=lp,
                entropy_BT=ent,
                old_log_prob_BT=old,
                ref_log_prob_BT=None if ref_log_probs is None else ref_log_probs[mb.rows, :width].to(lp.device),
                advantages_BT=advantages[mb.rows, :width].to(lp.device),
                response_mask_BT=mb.resp_mask.to(lp.device),
                prefix_mask_BT=prefix,
                target_probs_BT=batch.loss_target_probs(
                    mb.rows, width, enabled=self.use_target_probs, device=lp.device
                ),
                rollout_is_weights_BT=loss_weights(
                    **self.rollout_is,
                    old_log_prob_BT=old,
                    behaviour_log_prob_BT=None if behaviour_log_probs is None else behaviour_log_probs[mb.rows, :width],
                    response_mask_BT=mb.resp_mask.to(lp.device),
                    prefix_mask_BT=prefix,
                ),
                max_response_length=batch.response_width,
                **self.loss_opts,
            )
            return loss * loss_scale, {k: v.detach() for k, v in metrics.items()}

        return self._forward_backward(micro, loss_fn, forward_only=False) if micro else []

    def update(
        self,
        batch: RolloutBatch,
        *,
        advantages: torch.Tensor,
        old_log_probs: torch.Tensor,
        ref_log_probs: Optional[torch.Tensor] = None,
        behaviour_log_probs: Optional[torch.Tensor] = None,
    ) -> dict[str, float]:
        """LUFFY's policy update on a rollout batch: mini-batches of this rank's rows, each one optimizer step.

        Returns upstream's metric names (`actor/pg_loss`, `actor/off_policy_prob`, `actor/grad_norm`, ...),
        averaged over micro-batches and mini-batches (as upstream's trainer reduces them). With
        algo.use_kl_loss, `ref_log_probs` (`compute_ref_log_probs`) add kl_loss_coef x KL to the loss
        (`actor/kl_loss`, `actor/kl_coef`). With algo.rollout_is, `behaviour_log_probs` (the engines' log-probs,
        [B, L], NaN where none; `algo.rollout_correction.behaviour_log_probs`) weight the on-policy tokens' loss."""
        for m in self.model:
            m.train()
        collected: dict[str, list[float]] = {}
        # actor.ppo_epochs passes over the same mini-batches in the same order, as upstream
        passes = [rows for _ in range(self.cfg.actor.ppo_epochs) for rows in self._mini_batches(batch)]
        for rows_by_rank in passes:
            results = self._backward(batch, rows_by_rank, advantages, old_log_probs, ref_log_probs, behaviour_log_probs)
            ok, grad_norm, _ = self.optimizer.step()
            self.step += 1
            for r in results:
                for k, v in r.items():
                    collected.setdefault(f"actor/{k}", []).append(float(v))
            collected.setdefault("actor/grad_norm", []).append(
                float(grad_norm) if grad_norm is not None else float("nan")
            )
            collected.setdefault("actor/lr", []).append(self.optimizer.param_groups[0]["lr"])
            if not ok:
                log.warning("optimizer step %d skipped (non-finite gradients)", self.step)
        collected["actor/optimizer_steps"] = [float(len(passes))]
        self.scheduler.step(increment=1)  # one LR step per trainer step, as upstream's update_actor
        if self.ddp_config.overlap_param_gather:
            # The updated shards are all-gathered by the next forward's pre-hooks; the weight export
            # reads the parameters before that, so gather them now (megatron's training does the same
            # before evaluation and checkpointing).
            for m in self.model:
                m.start_param_sync(force_sync=True)
        return self._share_metrics({k: sum(v) / len(v) for k, v in collected.items()})

    def _share_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Loss metrics exist on the last pipeline stage: send them to every stage, then average over
        data-parallel ranks (upstream's trainer averages the workers' metrics)."""
        if self.pp_size > 1:
            # lazy: megatron-core is imported only on the ranks and in tools, never by the driver
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

    def gradients(
        self,
        batch: RolloutBatch,
        *,
        advantages: torch.Tensor,
        old_log_probs: torch.Tensor,
        ref_log_probs: Optional[torch.Tensor] = None,
        behaviour_log_probs: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """The DP-reduced gradient of one mini-batch holding every row, as HF-named full fp32 tensors,
        without stepping the optimizer (for parallel-invariance checks and debugging). Collective."""
        if self.ddp_config.use_distributed_optimizer:
            raise ValueError(
                "MegatronActor.gradients() reads the full reduced gradient, but with "
                "parallel.use_distributed_optimizer=true each data-parallel rank holds only its reduced shard "
                "(the rest of its grad buffer is unreduced); run gradient checks with "
                "parallel.use_distributed_optimizer=false"
            )
        for m in self.model:
            m.train()
        every_row = [list(rows) for rows in self._rows_by_rank(batch)]
        self._backward(batch, every_row, advantages, old_log_probs, ref_log_probs, behaviour_log_probs)
        grads = {name: t.clone() for name, t in self.export_hf_weights(tensor_of=lambda p: p.main_grad)}
        for m in self.model:
            m.zero_grad_buffer()
        return grads

    def export_hf_weights(self, **kwargs):
        """(hf_name, full tensor) pairs of the current weights, on every rank (collective)."""
        return iter_hf_weights(self._unwrapped(), self.arch, **kwargs)

    def _unwrapped(self) -> list:
        chunks = []
        for m in self.model:
            inner = m.module
            chunks.append(getattr(inner, "module", inner) if inner.__class__.__name__ == "Float16Module" else inner)
        return chunks
