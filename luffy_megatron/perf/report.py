"""A `Plan` as text (`format_plan`: the model and layout, memory per GPU by phase, the step's FLOPs and
time, the verdict), and the single setting changes under which a plan that does not fit would
(`suggest_fixes`)."""

from __future__ import annotations

import copy
import os
import textwrap

from luffy_megatron.config import ConfigError, validate
from luffy_megatron.perf.flops import PlanError
from luffy_megatron.perf.memory_plan import GIB, Assumptions, Plan, gib_str, make_plan, micro_batch_rows
from luffy_megatron.perf.runtime_memory import (
    CUDA_CONTEXT_GIB,
    NCCL_IDLE_COMM_GIB,
    NCCL_NVLS_COMM_GIB,
    NCCL_USED_COMM_GIB,
)

__all__ = ["format_plan", "plan_with_suggestions", "suggest_fixes"]

_WIDTH = 112  # report lines fit a README code block
_TERM_ORDER = [
    "weights",
    "ref_weights",
    "grads",
    "main_params",
    "moments",
    "activations",
    "forward_workspace",
    "logits",
    "logprob_chunk",
    "slack",
    "sync_buckets",
    "trainer_process",
    "engine_weights",
    "engine_kv",
    "engine_activations",
    "engine_cuda_graphs",
    "engine_sync_buckets",
    "engine_process",
]
# the tables of the memory block: (title, role, phase names); a phase named in none is not printed
_TABLES = [
    ("memory per GPU at start and resume, GiB", "all", ("build", "startup", "resume")),
    ("memory per GPU in each step, GiB", "all", ("sync", "generate", "log-probs", "update")),
    ("memory per trainer GPU, GiB", "trainer", ("startup", "resume", "log-probs", "update")),
    ("memory per rollout GPU, GiB", "rollout", ("startup", "resume", "sync", "generate")),
]


def _si(n: float) -> str:
    return f"{n / 1e9:.2f} B"


def _wrapped(tag: str, text: str) -> list[str]:
    """`text` wrapped to the report's width under a 9-character tag column."""
    return textwrap.wrap(
        text, width=_WIDTH, initial_indent=f"{tag:<9}", subsequent_indent=" " * 9, break_on_hyphens=False
    ) or [tag]


def format_plan(plan: Plan) -> str:
    """The plan as text: the layout, a table of memory per GPU by phase, FLOPs and times, the verdict."""
    blocks = [_model_block(plan), _memory_block(plan), _step_block(plan), _verdict_block(plan)]
    return "\n".join(line for block in blocks for line in block)


def _model_block(plan: Plan) -> list[str]:
    """The title, the model, the trainer's and the engines' layout; a blank line."""
    cfg, lay, asm, arch = plan.cfg, plan.layout, plan.assumptions, plan.arch
    p, m, a, r = cfg.parallel, cfg.model, cfg.actor, cfg.rollout
    nodes = lay.nnodes + lay.rollout_nnodes
    split = f" ({lay.nnodes} training + {lay.rollout_nnodes} rollout)" if lay.rollout_nnodes else ""
    out = [
        f"plan for {plan.recipe or '(config)'} on {nodes} nodes{split} x {lay.gpus_per_node} GPUs = "
        f"{nodes * lay.gpus_per_node} GPUs of {asm.gpu_memory_gib:g} GiB"
    ]
    out += _wrapped("model", f"{os.path.basename(os.path.normpath(m.path))}: {plan.arch_source}")
    tie = "tied" if arch.tie_word_embeddings else "untied"
    out += _wrapped(
        "",
        f"{_si(plan.params.total)} params: {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads x {arch.head_dim}, FFN "
        f"{arch.ffn_hidden_size}, vocab {arch.vocab_size} (padded {plan.params.vocab_padded}, {tie})",
    )
    opt = (
        f"distributed optimizer over DP x CP = {lay.dp * lay.cp}"
        if p.use_distributed_optimizer
        else "optimizer state unsharded"
    )
    vpp = f" VPP={lay.vpp}" if lay.vpp > 1 else ""
    rec = m.recompute_granularity
    if rec == "full":
        rec += f" ({m.recompute_method}, {m.recompute_num_layers} layer{'s' if m.recompute_num_layers > 1 else ''})"
    stage = f"; pipeline stage {plan.worst_stage} shown (the fullest)" if lay.pp > 1 else ""
    out += _wrapped(
        "trainer",
        f"{lay.train_gpus} GPUs: TP={lay.tp} PP={lay.pp}{vpp} CP={lay.cp} DP={lay.dp}, "
        f"{'sequence parallel, ' if p.sequence_parallel else ''}{m.dtype}, {opt}; recompute "
        f"{rec}; {_tokens_line(plan)}; "
        f"{_si(plan.params.per_stage_rank[plan.worst_stage])} params per GPU{stage}",
    )
    if lay.mode == "colocated":
        off = (
            "; actor.offload_during_rollout: grad buffers freed and optimizer state on the host while the "
            "engines are awake"
            if a.offload_during_rollout
            else ""
        )
        out += _wrapped(
            "engines",
            f"colocated: {lay.num_engines} engines x TP={lay.engine_tp} on the trainer's "
            f"GPUs, gpu_memory_utilization {r.gpu_memory_utilization:.2f}{_graphs(r)}; asleep outside sync and "
            "generate (sleep level 2: weights discarded, the sync refills them; the level 1 fallback keeps them "
            f"on the host), woken with their weights for the sync, then with the KV cache{off}",
        )
    else:
        out += _wrapped(
            "engines",
            f"disaggregated: {lay.num_engines} engines x TP={lay.engine_tp} on "
            f"{cfg.cluster.rollout_nnodes} rollout nodes ({lay.rollout_gpus} GPUs), "
            f"gpu_memory_utilization {r.gpu_memory_utilization:.2f}{_graphs(r)}, always awake",
        )
    return out + [""]


def _graphs(r) -> str:
    return "" if r.enforce_eager else ", CUDA graphs"


def _tokens_line(plan: Plan) -> str:
    a, lay = plan.cfg.actor, plan.layout
    per = (
        f"{a.ppo_max_token_len_per_gpu} tokens per micro-batch"
        if a.use_dynamic_bsz
        else f"{micro_batch_rows(plan.cfg, lay.dp)} rows per micro-batch"
    )
    cp = f" (/{lay.cp} per GPU under CP)" if lay.cp > 1 else ""
    return f"{per}{cp}, log-prob chunk {a.log_prob_chunk_tokens} tokens"


def _memory_block(plan: Plan) -> list[str]:
    """A table of memory per GPU for each group of phases (a row per term, a column per phase), then the KV
    cache, the sync buffers, the trainer's NCCL communicators and pinned host memory; a blank line."""
    out = []
    for title, role, names in _TABLES:
        phases = [ph for name in names for ph in plan.phases if ph.name == name and ph.gpus == role]
        if phases:
            out += ([""] if out else []) + _table(plan, title, phases)
    return out + _engine_and_host_lines(plan) + [""]


def _table(plan: Plan, title: str, phases: list) -> list[str]:
    asm = plan.assumptions
    labels: list[tuple[str, str]] = []
    for ph in phases:
        for t in ph.terms:
            if (t.key, t.label) not in labels:
                labels.append((t.key, t.label))
    labels.sort(key=lambda kl: _TERM_ORDER.index(kl[0]))
    width = max(len(title) - 2, *(len(lab) for _, lab in labels)) + 2
    col = max(11, *(len(ph.name) + 2 for ph in phases))
    out = [title.ljust(width + 2) + "".join(ph.name.rjust(col) for ph in phases)]
    for key, label in labels:
        cells = []
        for ph in phases:
            term = next((t for t in ph.terms if t.key == key and t.label == label), None)
            if term is None or (term.bytes is None and not term.where):
                cells.append("-")
            elif term.bytes is None:
                cells.append(term.where)
            else:
                cells.append(gib_str(term.bytes))
        out.append(f"  {label}".ljust(width + 2) + "".join(c.rjust(col) for c in cells))
    out.append("  total".ljust(width + 2) + "".join(gib_str(ph.total).rjust(col) for ph in phases))
    usable = (asm.gpu_memory_gib - asm.reserve_gib) * GIB
    out.append(
        f"  headroom (of {asm.gpu_memory_gib:g} less {asm.reserve_gib:g} reserve)".ljust(width + 2)
        + "".join(gib_str(usable - ph.total).rjust(col) for ph in phases)
    )
    return out


def _engine_and_host_lines(plan: Plan) -> list[str]:
    eng, host, r, sync = plan.engine, plan.host, plan.cfg.rollout, plan.sync
    out = _wrapped(
        "",
        f"the engine KV cache holds {eng.kv_tokens / 1e6:.2f} M tokens per GPU "
        f"({eng.kv_per_token // 1024} KiB per token) = {eng.kv_full_seqs} sequences of {eng.max_seq} "
        f"tokens (rollout.max_num_seqs {r.max_num_seqs})",
    )
    out += _wrapped(
        "",
        f"weight sync ({sync.transport}): {sync.what} of max(rollout.weight_sync_bucket_mb "
        f"{r.weight_sync_bucket_mb} MiB, the largest tensor: {sync.largest}) = {gib_str(sync.slot)} GiB each, "
        "allocated at the first sync and kept for the run",
    )
    out += _nccl_lines(plan)
    if host.per_node_level1:
        out += _wrapped(
            "",
            f"pinned host memory per node of {plan.layout.gpus_per_node} GPUs: {gib_str(host.per_node)} GiB "
            f"(offloaded trainer state {gib_str(host.trainer_state)} GiB per GPU); "
            f"{gib_str(host.per_node_level1)} GiB if the engines sleep at level 1 (+ their weights, "
            f"{gib_str(host.engine_weights)} GiB per GPU)",
        )
    return out


def _nccl_lines(plan: Plan) -> list[str]:
    used = [c for c in plan.comms if c.used]
    nvls = [c for c in used if c.local > 1]
    text = (
        f"trainer CUDA context + NCCL (unmeasured): {CUDA_CONTEXT_GIB:g} GiB + {len(used)} communicators in use x "
        f"{NCCL_USED_COMM_GIB:g} GiB ({', '.join(c.name for c in used)}) + {len(plan.comms) - len(used)} made "
        f"and idle x {NCCL_IDLE_COMM_GIB:g} GiB; "
    )
    extra = len(nvls) * NCCL_NVLS_COMM_GIB
    if plan.assumptions.nccl_nvls:
        text += f"with NVLS buffers (+{extra:g} GiB; NCCL_NVLS_ENABLE=0 removes them)"
    elif extra:
        text += (
            f"assumes NCCL_NVLS_ENABLE=0 on the trainer ranks (NVLS would add ~{extra:g} GiB: --nccl-nvls "
            "plans with it)"
        )
    else:
        text += "no NVLS (no communicator of 2+ GPUs of one node)"
    return _wrapped("", text)


def _step_block(plan: Plan) -> list[str]:
    """The step's rows and tokens, FLOPs and time per phase, the generation estimate, notes; a blank line."""
    cfg, asm, s = plan.cfg, plan.assumptions, plan.step
    a, r, d = cfg.actor, cfg.rollout, cfg.data
    out = _wrapped(
        "step",
        f"{s.prompts} prompts x {r.n} rows = {s.rows} rows: {s.generated_rows} generated, "
        f"{s.off_policy_rows} with a demonstration (mean prefix ratio {s.mean_ratio:.2f}); "
        f"assumed mean lengths: prompt {s.prompt_len:.0f} ({asm.mean_prompt_frac:g} x "
        f"{d.max_prompt_length}), response {s.response_len:.0f} ({asm.mean_response_frac:g} x "
        f"{d.max_response_length}) tokens; {s.tokens / 1e6:.2f} M tokens per step",
    )
    out.append(
        f"FLOPs and time per step at MFU {asm.mfu:g} of {asm.peak_tflops:g} TFLOP/s per GPU (model FLOPs, "
        "recompute not counted)"
    )
    epochs = f"{a.ppo_epochs} epoch{'s' if a.ppo_epochs > 1 else ''}"
    flops, times = plan.flops, plan.times_s
    rows_fmt = [
        ("generation", "2 x params per token + attention over the KV", flops.generation, times.generation),
        ("old log-probs", "2 x params x tokens + attention", flops.old_log_probs, times.old_log_probs),
        ("update", f"6 x params x tokens + attention, {epochs}", flops.update, times.update),
    ]
    if flops.ref_log_probs:
        rows_fmt.insert(
            2, ("ref log-probs", "the reference model, as old log-probs", flops.ref_log_probs, times.ref_log_probs)
        )
    for name, how, fl, t in rows_fmt:
        out.append(f"  {name:<15}{how:<48}{fl / 1e15:10.1f} PFLOP{t:9.1f} s")
    step_how = "without reward grading, weight sync, offload copies"
    out.append(f"  {'step':<15}{step_how:<48}{'':16}{times.step:9.1f} s")
    if plan.overlap:  # the estimate, aligned under the sequential step
        how = "one step off: max(generation, log-probs + update)"
        out.append(f"  {'overlapped':<15}{how:<{len(step_how)}}{'':16}{plan.overlap.step:9.1f} s")
    g = plan.generation
    if g:
        bound = "the longest response" if g.tail_bound else "decode tokens / concurrency"
        out += _wrapped(
            "",
            f"generation: {g.rows_per_engine:.0f} rows per engine at concurrency {g.concurrency}; "
            f"a decode step reads {gib_str(plan.engine.weights)} GiB of weights + "
            f"{g.kv_read_gib:.1f} GiB of KV cache at {asm.gen_bandwidth_util:g} x {asm.hbm_tbs:g} "
            f"TB/s = {g.step_ms:.1f} ms; {g.steps:.0f} steps ({bound}) = {g.decode_s:.1f} s, "
            f"prefill {g.prefill_s:.1f} s",
        )
    out += _overlap_lines(plan)
    for note in plan.notes:
        out += _wrapped("note", note)
    return out + [""]


def _overlap_lines(plan: Plan) -> list[str]:
    """The one-step-off estimate beside the sequential step, or why a colocated layout has none."""
    ov = plan.overlap
    if ov is None:
        return _wrapped(
            "overlap",
            "the one-step-off-policy overlap (trainer.overlap=one_step) needs "
            "cluster.layout=disaggregated: colocated engines and "
            "trainer share the GPUs and cannot run at once, so the step above is sequential",
        )
    sync = f" + weight sync {ov.sync:.1f} s" if ov.sync is not None else ""
    uncounted = "reward grading is" if ov.sync is not None else "the weight sync and reward grading are"
    return _wrapped(
        "overlap",
        f"estimate for the one-step-off-policy mode (trainer.overlap=one_step): the "
        f"engines generate batch k+1 with the "
        f"weights before update k while the trainer computes the log-probs and update of batch k, so a steady-state "
        f"step is max(generation {ov.generation:.1f} s, log-probs + update {ov.trainer:.1f} s){sync} = "
        f"{ov.step:.1f} s, {ov.speedup:.2f}x the speed of the sequential {ov.sequential:.1f} s; {uncounted} counted "
        "in neither",
    )


def _verdict_block(plan: Plan) -> list[str]:
    """ "fits" with the fullest phase, or every problem and the single changes that would fit."""
    asm = plan.assumptions
    if plan.fits:
        fullest = max(reversed(plan.phases), key=lambda ph: ph.total)  # of equal ones, the later
        where = "" if fullest.gpus == "all" else f" ({fullest.gpus} GPUs)"
        return [
            f"fits: the fullest phase is {fullest.name}{where} at {gib_str(fullest.total)} of "
            f"{asm.gpu_memory_gib - asm.reserve_gib:g} usable GiB per GPU ({asm.gpu_memory_gib:g} less "
            f"{asm.reserve_gib:g} reserve)"
        ]
    out = []
    for prob in plan.problems:
        out.extend(textwrap.wrap(f"DOES NOT FIT: {prob}", width=_WIDTH, subsequent_indent="  ", break_on_hyphens=False))
    if plan.suggestions:
        out.extend(
            textwrap.wrap(
                "single changes that fit: " + "; ".join(plan.suggestions),
                width=_WIDTH,
                subsequent_indent="  ",
                break_on_hyphens=False,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Suggestions: single changes that make a recipe fit
# --------------------------------------------------------------------------------------------------------------


def _candidate_changes(cfg) -> list[list[tuple[str, object]]]:
    """Single changes to try, each a few settings that go together, the likeliest first."""
    p, m, a, r = cfg.parallel, cfg.model, cfg.actor, cfg.rollout
    tries: list[list[tuple[str, object]]] = []
    for tp in (2, 4, 8):
        if tp > p.tensor_model_parallel_size:
            tries.append([("parallel.tensor_model_parallel_size", tp), ("parallel.sequence_parallel", True)])
    for pp in (2, 4, 8):
        if pp > p.pipeline_model_parallel_size:
            tries.append([("parallel.pipeline_model_parallel_size", pp)])
    if m.recompute_granularity != "full":
        tries.append(
            [
                ("model.recompute_granularity", "full"),
                ("model.recompute_method", "uniform"),
                ("model.recompute_num_layers", 1),
            ]
        )
    if not p.use_distributed_optimizer:
        tries.append([("parallel.use_distributed_optimizer", True)])
    if not a.offload_during_rollout:
        tries.append([("actor.offload_during_rollout", True)])
    tokens = a.ppo_max_token_len_per_gpu // 2
    while tokens >= cfg.data.max_prompt_length + cfg.data.max_response_length:
        tries.append([("actor.ppo_max_token_len_per_gpu", tokens)])
        tokens //= 2
    if a.log_prob_chunk_tokens > 1024:
        tries.append([("actor.log_prob_chunk_tokens", 1024)])
    for util in (0.7, 0.6, 0.5):
        if util < r.gpu_memory_utilization:
            tries.append([("rollout.gpu_memory_utilization", util)])
    for etp in (2, 4, 8):
        if etp > r.tensor_model_parallel_size:
            tries.append([("rollout.tensor_model_parallel_size", etp)])
    return tries


def suggest_fixes(cfg, assumptions: Assumptions, limit: int = 3) -> list[str]:
    """Up to `limit` single-setting changes (as --set overrides) under which the plan fits."""
    found = []
    for changes in _candidate_changes(cfg):
        trial = copy.deepcopy(cfg)
        for key, value in changes:
            section, name = key.split(".")
            setattr(getattr(trial, section), name, value)
        try:
            validate(trial)
            if make_plan(trial, assumptions).fits:
                found.append(" ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes))
        except (ConfigError, PlanError):
            continue
        if len(found) >= limit:
            break
    return found


def plan_with_suggestions(cfg, assumptions: Assumptions = Assumptions(), *, recipe: str = "") -> Plan:
    plan = make_plan(cfg, assumptions, recipe=recipe)
    if not plan.fits:
        plan.suggestions = suggest_fixes(cfg, assumptions)
    return plan
