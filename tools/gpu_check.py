#!/usr/bin/env python
"""One prepared check for a single H100/H200 machine (no vLLM, no Transformer Engine, no network).

    tools/gpu_check.sh --prepare            # here, with network: wheels the GPU machine lacks -> .gpu_wheels/
    tools/gpu_check.sh                      # there: install from .gpu_wheels, run the steps, write the results
    tools/gpu_check.sh --dry-run --out X    # CPU (CI): the same steps on tiny shapes, a skeleton marked DRY RUN

Steps, each in its own process with its own time limit; a failed step does not stop the others:
  1. pytest tests/gpu;
  2. the trainer's memory per phase (MegatronActor, one GPU, a reduced-layer Qwen2.5-7B shape, random weights)
     against the memory plan (perf/memory_plan.py), term by term;
  3. the CUDA IPC weight-sync slots over three syncs between two processes: the producer's reserved memory
     after each sync;
  4. the log-prob path at vocabulary 151,936: peak memory against the plan's log-prob chunk term, time and
     agreement with a plain fp32 log_softmax gather.
The results go to docs/gpu_results.md (or --out) and, when $OUT is set, to $OUT/gpu_results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
import types
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

GIB = 2**30
WHEELS_DIR = REPO / ".gpu_wheels"
# What the GPU machine lacks and can receive as wheels (everything else the steps import is in its image).
WHEELS = ["megatron-core==0.16.1"]
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# Absent on the GPU machine: the steps must not need them (the dry run blocks them in its step processes too).
ABSENT_THERE = ("vllm", "ray", "transformer_engine", "transformer_engine_torch", "datasets", "math_verify", "apex")
BUDGET_S = 460  # install, versions and all steps together (under the 8 minutes the check is allowed)
# step name -> (title, time limit on the GPU, time limit in the dry run)
STEPS = {
    "pytest": ("pytest tests/gpu", 300, 120),
    "memory": ("trainer memory per phase vs the plan", 150, 150),
    "ipc": ("CUDA IPC slots across three syncs", 70, 90),
    "logprob": ("log-prob path at vocabulary 151,936", 60, 90),
}
# The measurements first (each capped), then tests/gpu with what is left of the budget (at least 160 s)
RUN_ORDER = ("memory", "ipc", "logprob", "pytest")
QWEN7B_SHAPE = dict(
    hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, vocab_size=151936
)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
# The shapes of each step: (GPU, dry run)
MEMORY_RUN = (
    {"layers": 4, "prompt": 512, "response": 1536, "rows": 8},
    {"layers": 2, "prompt": 8, "response": 24, "rows": 8},
)
IPC_RUN = ({"layers": 1, "bucket_mb": 512}, {"layers": 1, "bucket_mb": 1})
LOGPROB_RUN = (
    {"tokens": (8192, 32768), "naive_max": 8192, "chunk": 4096},
    {"tokens": (64, 256), "naive_max": 256, "chunk": 32},
)
# tests/gpu tests left out where a package is absent, and why (they would fail on the package, not the code)
DESELECT_WITHOUT: dict = {}  # tests/gpu tests that cannot run where a package is absent, with the reason
LOGPROB_TOL = 1e-3  # max abs difference of log-probs and entropies from the fp32 computation


# --------------------------------------------------------------------------------------------------------------
# Adapters: the one place each depends on an API that other work is changing
# --------------------------------------------------------------------------------------------------------------


def planned_terms(cfg, gpu_memory_gib: float) -> dict:
    """{phase name: {term key: (label, bytes or None)}} of the memory plan for `cfg` (perf/memory_plan.py's
    make_plan and its Phase terms)."""
    from luffy_megatron.perf.memory_plan import Assumptions, make_plan  # lazy: the step processes only

    plan = make_plan(cfg, Assumptions(gpu_memory_gib=gpu_memory_gib))
    return {ph.name: {t.key: (t.label, t.bytes) for t in ph.terms} for ph in plan.phases}


def make_ipc_transport(fleet):
    """The sender side of the shared-memory transport, kept across syncs as the trainer keeps it."""
    from luffy_megatron.sync.shared_memory import SharedMemoryTransport  # lazy: the step processes only

    return SharedMemoryTransport(fleet)


def run_one_sync(transport, ctx) -> dict:
    """One weight sync through the transport (CUDA IPC on a GPU, /dev/shm files on CPU)."""
    return transport.run(ctx)


def ipc_slot_bytes(transport) -> int:
    """Bytes of the bucket buffers the transport object holds between syncs: its tensors (CUDA slots) and its
    buffers with an `nbytes` (/dev/shm files), in its attributes and in lists, tuples and dicts of them."""
    seen, total = set(), 0

    def add(v) -> None:
        nonlocal total
        if id(v) in seen:
            return
        seen.add(id(v))
        if hasattr(v, "untyped_storage"):
            total += v.untyped_storage().nbytes()
        elif isinstance(v, (list, tuple)):
            for x in v:
                add(x)
        elif isinstance(v, dict):
            for x in v.values():
                add(x)
        elif isinstance(getattr(v, "nbytes", None), int) and hasattr(v, "path"):  # ShmBuffer
            total += v.nbytes

    for value in vars(transport).values():
        add(value)
    from luffy_megatron.sync import shared_memory  # lazy: the step processes only

    return total + shared_memory.ipc_slot_bytes()  # the CUDA slots are kept per process and GPU, not per transport


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by the steps
# --------------------------------------------------------------------------------------------------------------


def block_absent_modules() -> None:
    """Makes the packages the GPU machine lacks unimportable here (import raises, find_spec says None)."""
    for name in ABSENT_THERE:
        sys.modules[name] = None  # type: ignore[assignment]


def hf_config(shape: dict, layers: int, max_positions: int) -> dict:
    return dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        num_hidden_layers=layers,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        use_sliding_window=False,
        **shape,
    )


def write_model_dir(root: Path, shape: dict, layers: int, max_positions: int) -> Path:
    d = root / f"qwen2-{layers}l"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(shape, layers, max_positions), indent=1))
    return d


def mem_now(cuda: bool) -> dict:
    """The allocator's numbers (bytes) now; on CPU all None."""
    if not cuda:
        return {"allocated": None, "max_allocated": None, "reserved": None}
    import torch  # lazy: the orchestrator never imports torch

    torch.cuda.synchronize()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "max_allocated": torch.cuda.max_memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
    }


def reset_peak(cuda: bool) -> None:
    if cuda:
        import torch  # lazy: the orchestrator never imports torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer counted once)."""
    seen: dict = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        s = t.untyped_storage()
        seen[(t.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def row(key: str, label: str, planned, measured, how: str) -> dict:
    ratio = measured / planned if planned and measured is not None else None
    return {"key": key, "label": label, "planned": planned, "measured": measured, "ratio": ratio, "how": how}


# --------------------------------------------------------------------------------------------------------------
# Step 2: the trainer's memory per phase
# --------------------------------------------------------------------------------------------------------------


def memory_config(model_dir: Path, run: dict, extra: tuple = ()):
    from luffy_megatron.config import load_config  # lazy: the step processes only

    seq = run["prompt"] + run["response"]
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=bf16",
            "model.transformer_impl=local",
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
            "parallel.nnodes=1",
            "parallel.n_gpus_per_node=1",
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            "parallel.use_distributed_optimizer=false",
            "cluster.layout=colocated",
            f"rollout.n={run['rows']}",
            "rollout.n_off_policy=1",
            "rollout.tensor_model_parallel_size=1",
            "data.train_batch_size=1",
            f"data.max_prompt_length={run['prompt']}",
            f"data.max_response_length={run['response']}",
            "actor.ppo_mini_batch_size=1",
            "actor.ppo_micro_batch_size=1",
            "actor.use_dynamic_bsz=true",
            f"actor.ppo_max_token_len_per_gpu={seq * run['rows']}",
            "actor.offload_during_rollout=true",
            "trainer.total_training_steps=10",
            *extra,
        ],
    )


def memory_batch(vocab: int, run: dict):
    """One prompt group of `rows` full-length rows (row 0 a demonstration), random tokens."""
    import torch  # lazy: the orchestrator never imports torch

    from luffy_megatron.actor.batching import RolloutBatch  # lazy: the step processes only

    g = torch.Generator().manual_seed(0)
    rows, width = run["rows"], run["response"]
    prompt = torch.randint(1, vocab, (run["prompt"],), generator=g).tolist()
    responses = torch.randint(1, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    prefix = torch.zeros(rows, width, dtype=torch.bool)
    prefix[0] = True
    batch = RolloutBatch(
        prompts=[list(prompt) for _ in range(rows)],
        responses=responses,
        response_mask=mask,
        prefix_mask=prefix,
        group_ids=[0] * rows,
    )
    advantages = torch.linspace(-1.0, 1.0, rows).unsqueeze(1).expand(rows, width).contiguous()
    return batch, advantages


def state_inventory(actor) -> dict:
    """Bytes of the trainer state by plan term, counted from the tensors themselves."""
    from luffy_megatron.cluster.offload import _grad_buffers, _torch_optimizers  # lazy: the step processes only

    weights = [p for m in actor.model for p in m.parameters()]
    weight_keys = {(p.device.type, p.untyped_storage().data_ptr()) for p in weights}
    main, moments = [], []
    for opt in _torch_optimizers(actor.optimizer):
        for group in opt.param_groups:
            main += [p for p in group["params"] if (p.device.type, p.untyped_storage().data_ptr()) not in weight_keys]
        for state in opt.state.values():
            moments += [t for t in state.values() if hasattr(t, "untyped_storage") and t.dim() > 0]
    grads = [getattr(b, "grad_data", None) for b in _grad_buffers(actor.model)]
    return {
        "weights": unique_bytes(weights),
        "grads": unique_bytes(grads),
        "main_params": unique_bytes(main),
        "moments": unique_bytes(moments),
    }


def record_loss_inputs(actor, cuda: bool, seen: list) -> None:
    """Wraps the actor's `_token_logprobs` (where the logits meet the log-prob path): records the logits' bytes
    and the allocated memory at that moment."""
    inner = actor._token_logprobs

    def wrapped(mb, shard, logits):
        seen.append({"logits": logits.numel() * logits.element_size(), "allocated": mem_now(cuda)["allocated"]})
        return inner(mb, shard, logits)

    actor._token_logprobs = wrapped


def measure_phases(actor, batch, advantages, cuda: bool) -> tuple[dict, dict]:
    """Runs build -> log-probs -> update -> offload -> reload -> log-probs -> update; returns the memory after
    each (and the peaks of the second log-prob pass and update), and the seconds and loss inputs seen."""
    from luffy_megatron.cluster.offload import offload_to_host, reload_to_device  # lazy: the step processes only

    phases, info, seen = {"build": mem_now(cuda)}, {}, []
    record_loss_inputs(actor, cuda, seen)
    old_lp, _ = actor.compute_log_probs(batch)
    actor.update(batch, advantages=advantages, old_log_probs=old_lp)
    phases["after first update"] = mem_now(cuda)
    info["state_after_update"] = state_inventory(actor)
    off = offload_to_host(actor.optimizer, actor.model)
    phases["offloaded (startup, sync, generate)"] = mem_now(cuda)
    info["offloaded_host_bytes"], info["freed_bytes"] = off.host_bytes, off.freed_bytes
    reload_to_device(off)
    phases["reloaded"] = mem_now(cuda)
    for name, fn in (
        ("log-probs", lambda: actor.compute_log_probs(batch)),
        ("update", lambda: actor.update(batch, advantages=advantages, old_log_probs=old_lp)),
    ):
        seen.clear()
        reset_peak(cuda)
        before = mem_now(cuda)["allocated"]
        t0 = time.perf_counter()
        fn()
        phases[name] = dict(mem_now(cuda), before=before)
        info[f"{name}_s"] = time.perf_counter() - t0
        info[f"{name}_loss_inputs"] = list(seen)
    return phases, info


def process_overhead(cuda: bool):
    """Device memory this process uses outside PyTorch's allocator (CUDA context, NCCL, cuBLAS workspaces):
    what the driver counts as used, less the allocator's reservation (alone on the GPU)."""
    if not cuda:
        return None
    import torch  # lazy: the orchestrator never imports torch

    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def memory_rows(plan: dict, state: dict, phases: dict, info: dict, overhead) -> list[dict]:
    """The plan's terms next to the measured ones."""
    lp_plan, up_plan = plan["log-probs"], plan["update"]
    rows = [row(k, lp_plan[k][0], lp_plan[k][1], state[k], "tensor inventory") for k in state if k in lp_plan]
    lp, up = phases["log-probs"], phases["update"]
    lp_terms = ("forward_workspace", "logits", "logprob_chunk", "slack")
    up_terms = ("activations", "logits", "logprob_chunk", "slack")
    planned_lp = sum(lp_plan[k][1] or 0 for k in lp_terms if k in lp_plan)
    planned_up = sum(up_plan[k][1] or 0 for k in up_terms if k in up_plan)
    peak = lambda p: None if p["max_allocated"] is None else p["max_allocated"] - p["before"]  # noqa: E731
    rows.append(row("log-probs transient", " + ".join(lp_terms), planned_lp, peak(lp), "peak - allocated before"))
    rows.append(row("update transient", " + ".join(up_terms), planned_up, peak(up), "peak - allocated before"))
    seen = info.get("update_loss_inputs") or []
    if seen:
        logits = max(s["logits"] for s in seen)
        rows.append(
            row(
                "logits",
                up_plan.get("logits", ("", None))[0],
                up_plan.get("logits", ("", None))[1],
                logits,
                "the logits tensor the loss received",
            )
        )
    tp = lp_plan.get("trainer_process")
    if tp:
        rows.append(row("trainer_process", tp[0], tp[1], overhead, "used on the GPU - reserved"))
    return rows


def phase_totals(plan: dict, phases: dict) -> list[dict]:
    """Each phase: the plan's trainer terms (no engine terms, no process term) vs the allocator's numbers."""
    skip = ("engine_", "sync_buckets", "trainer_process")
    out = []
    for name, measured_key, measured_at in (
        ("build", "allocated", "after first update"),  # the Adam moments exist from the first update on
        ("startup", "allocated", "offloaded (startup, sync, generate)"),
        ("log-probs", "max_allocated", "log-probs"),
        ("update", "max_allocated", "update"),
    ):
        terms = plan.get(name, {})
        planned = sum(b or 0 for k, (_, b) in terms.items() if not k.startswith(skip) and k not in skip)
        out.append(
            row(
                name,
                f"trainer tensors ({measured_key} at '{measured_at}')",
                planned,
                phases[measured_at][measured_key],
                "torch.cuda allocator",
            )
        )
    return out


def softmax_kernel_workaround(cuda: bool) -> list[str]:
    """megatron-core's fused masked softmax (`masked_softmax_fusion`, which the actor turns on with CUDA) imports
    `scaled_masked_softmax_cuda` (apex's / Megatron's compiled kernels) for sequences of 17-4096 tokens; without
    it the first such forward raises. Where it is missing the step measures with the fusion off and says so."""
    import importlib.util  # lazy: the step processes only

    from luffy_megatron.actor import megatron_actor as ma  # lazy: the step processes only

    if not cuda or importlib.util.find_spec("scaled_masked_softmax_cuda") is not None:
        return []
    if not ma.fusion_settings(ma.Kernels.detect(), use_te=False).get("masked_softmax_fusion"):
        return []
    original = ma.fusion_settings
    ma.fusion_settings = lambda kernels, *, use_te: dict(original(kernels, use_te=use_te), masked_softmax_fusion=False)
    return [
        "masked_softmax_fusion is on (actor/megatron_actor.py fusion_settings: on with CUDA) but "
        "scaled_masked_softmax_cuda does not import here (no apex / Transformer Engine): megatron-core's "
        "FusedScaleMaskSoftmax.is_kernel_available imports it for bf16 sequences of 17-4096 tokens and raises. "
        "This step ran with masked_softmax_fusion=False."
    ]


def model_flops_utilization(arch, run: dict, info: dict, cuda: bool) -> dict:
    """Tokens/s and MFU of the second log-prob pass and update: model FLOPs as perf/flops.py counts them
    (forward 2 x matmul params x tokens + causal attention 2 x heads x head_dim x layers x sum of squared
    lengths; update 3 x the forward, full recompute's extra forward not counted) over the seconds, against the
    plan's peak (dense bf16 of an H100 SXM; the H200 has the same)."""
    from luffy_megatron.perf.flops import attention_coefficient, forward_flops, param_counts, update_flops  # lazy
    from luffy_megatron.perf.memory_plan import Assumptions  # lazy: the step processes only

    seq = run["prompt"] + run["response"]
    tokens, squared = run["rows"] * seq, run["rows"] * seq * seq
    n_mm, coef = param_counts(arch).matmul, attention_coefficient(arch)
    peak = Assumptions().peak_tflops * 1e12
    out = {"tokens": tokens, "peak_tflops": peak / 1e12}
    for name, flops in (
        ("log-probs", forward_flops(n_mm, coef, tokens=tokens, squared_lengths=squared)),
        ("update", update_flops(n_mm, coef, tokens=tokens, squared_lengths=squared)),
    ):
        seconds = info[f"{name}_s"]
        out[name] = {
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if cuda else None,
        }
    return out


def step_memory(dry: bool) -> dict:
    import torch  # lazy: the orchestrator never imports torch

    from luffy_megatron.actor.megatron_actor import MegatronActor  # lazy: the step processes only

    run = MEMORY_RUN[1 if dry else 0]
    shape = TINY_SHAPE if dry else QWEN7B_SHAPE
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_memory_"))
    model_dir = write_model_dir(tmp, shape, run["layers"], 2 * (run["prompt"] + run["response"]))
    cfg = memory_config(model_dir, run)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80.0
    plan = planned_terms(cfg, gpu_gib)
    findings = softmax_kernel_workaround(cuda)
    t0 = time.perf_counter()
    actor = MegatronActor(cfg, hf_dir=model_dir, pad_token_id=0, load_weights=False)
    build_s = time.perf_counter() - t0
    batch, advantages = memory_batch(shape["vocab_size"], run)
    phases, info = measure_phases(actor, batch, advantages, cuda)
    state = info["state_after_update"]
    return {
        "shape": dict(shape, layers=run["layers"], rows=run["rows"], seq=run["prompt"] + run["response"]),
        "measured_on": "cuda" if cuda else "cpu (allocator numbers n/a; tensor inventory is real)",
        "findings": findings,
        "terms": memory_rows(plan, state, phases, info, process_overhead(cuda)),
        "phase_totals": phase_totals(plan, phases),
        "phases": phases,
        "plan": {ph: {k: b for k, (_, b) in terms.items()} for ph, terms in plan.items()},
        "timing": dict(model_flops_utilization(actor.arch, run, info, cuda), build_s=build_s),
        "offload": {"host_bytes": info["offloaded_host_bytes"], "freed_bytes": info["freed_bytes"]},
    }


# --------------------------------------------------------------------------------------------------------------
# Step 3: the IPC slots across three syncs
# --------------------------------------------------------------------------------------------------------------


class _Ref:
    def __init__(self, rid: int):
        self.rid = rid


class _Remote:
    """`obj.remote(*args)` sends one call to the consumer process and returns a reference to its answer."""

    def __init__(self, engine, method: str):
        self.engine, self.method = engine, method

    def remote(self, *args, **kwargs):
        return self.engine.send(self.method, args, kwargs)


class FakeEngine:
    """The engine side of a sync as the transports see it (`begin_weight_update`, `call`, `finish_weight_update`),
    over queues to a consumer process that runs the project's worker extension."""

    def __init__(self, q_in, q_out):
        self.q_in, self.q_out, self.next_id, self.answers = q_in, q_out, 0, {}
        for m in ("begin_weight_update", "finish_weight_update", "call", "placement_info"):
            setattr(self, m, _Remote(self, m))

    def send(self, method, args, kwargs) -> _Ref:
        self.next_id += 1
        self.q_in.put((self.next_id, method, args, kwargs))
        return _Ref(self.next_id)

    def get(self, ref: _Ref, timeout_s: float):
        while ref.rid not in self.answers:
            try:
                rid, ok, value = self.q_out.get(timeout=timeout_s)
            except queue.Empty:
                msg = f"the consumer process did not answer call {ref.rid} within {timeout_s:g} s"
                raise TimeoutError(msg) from None
            self.answers[rid] = (ok, value)
        ok, value = self.answers.pop(ref.rid)
        if not ok:
            raise RuntimeError(f"consumer: {value}")
        return value


def fake_sync_context(base_cls, engine: FakeEngine):
    """The project's SyncContext with the engines reached through `engine` instead of Ray."""

    class Ctx(base_cls):
        def engine_get(self, refs, what: str):
            many = isinstance(refs, list)
            out = [engine.get(r, self.timeout_s) for r in (refs if many else [refs])]
            return out if many else out[0]

    return Ctx


def install_vllm_stand_in() -> None:
    """The consumer process has no vLLM: what the worker extension takes from it for a load are vLLM's config
    context and the layerwise-reload hooks, no-ops here (no model; the IPC slots are opened by the project's own
    `SlotImporter`)."""

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *a, **k: None

    names = [
        "vllm",
        "vllm.config",
        "vllm.model_executor",
        "vllm.model_executor.model_loader",
        "vllm.model_executor.model_loader.reload",
        "vllm.model_executor.model_loader.reload.layerwise",
    ]
    for name in names:
        sys.modules[name] = Stub(name)
    sys.modules["vllm.config"].set_current_vllm_config = lambda cfg: nullcontext()


def consumer_main(q_in, q_out, device_str: str) -> None:
    """The engine worker's side: the project's `LuffyWorkerExtension` (its IPC importers, its /dev/shm
    mappings, its session calls) on a worker whose model is a checksum of every view it is given."""
    install_vllm_stand_in()
    import torch  # lazy: spawned process

    from luffy_megatron.convert.export import views_of  # lazy: spawned process
    from luffy_megatron.rollout.worker_extension import LuffyWorkerExtension  # lazy: spawned process

    class Worker(LuffyWorkerExtension):
        def __init__(self):
            self.device = torch.device(device_str)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.model_runner = type("Runner", (), {"model": None, "model_config": None})()
            self.vllm_config, self.rank, self.loaded, self.version = None, 0, 0, 0

        def _luffy_load_flat(self, flat, entries):
            self.loaded += sum(1 for _name, t in views_of(flat, entries) if t.numel() >= 0)
            return len(entries)

    w = Worker()
    engine_side = {
        "begin_weight_update": lambda: setattr(w, "loaded", 0) or w.luffy_begin_weight_update(direct=False),
        "finish_weight_update": lambda partial=False: consumer_finish(w),
        "placement_info": lambda: {"node_ip": "127.0.0.1", "hostname": platform.node()},
    }
    while True:
        msg = q_in.get()
        if msg is None:
            return
        rid, method, args, kwargs = msg
        try:
            if method == "call":  # ("worker_rpc" | "load_weights_rpc", name, [entries,] *args): one worker here
                kind, name, *rest = args
                value = [getattr(w, name)(*(rest[1:] if kind == "load_weights_rpc" else rest))]
            else:
                value = engine_side[method](*args, **kwargs)
            q_out.put((rid, True, value))
        except Exception as err:  # noqa: BLE001 - reported to the producer, which fails the step
            q_out.put((rid, False, f"{type(err).__name__}: {err}"))


def consumer_finish(worker) -> dict:
    """The engine's `finish_weight_update` on this worker: the extension's own session close, then what the
    engine reports."""
    worker.luffy_finish_weight_update()
    worker.version += 1
    return {"weight_version": worker.version, "num_tensors": worker.loaded, "load": "layerwise"}


def ipc_producer(run: dict, cuda: bool, engine: FakeEngine) -> dict:
    """The trainer's side: a 1-layer model of the step's shape, three syncs through the transport; memory after
    each."""
    import torch  # lazy: the orchestrator never imports torch

    from luffy_megatron.compat.megatron_cpu import seed_everything  # lazy: the step processes only
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch  # lazy: the step processes only
    from luffy_megatron.models.parallel import init_model_parallel  # lazy: the step processes only
    from luffy_megatron.sync.base import SyncContext  # lazy: the step processes only

    init_model_parallel(1, 1)
    seed_everything(0)
    shape = QWEN7B_SHAPE if cuda else TINY_SHAPE
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="gpu_check_ipc_")), shape, run["layers"], 4096)
    arch = read_hf_arch(model_dir)
    chunks = build_model_chunks(arch, params_dtype=torch.bfloat16, construct_dtype=torch.bfloat16)
    if cuda:
        chunks = [c.cuda() for c in chunks]
    actor = type("Actor", (), {"arch": arch, "_unwrapped": lambda self: chunks})()
    fleet = type("Fleet", (), {"engines": [engine]})()
    transport, ctx_cls = make_ipc_transport(fleet), fake_sync_context(SyncContext, engine)
    syncs = []
    for i in range(3):
        ctx = ctx_cls(actor, fleet, bucket_bytes=run["bucket_mb"] << 20, dtype=torch.bfloat16, timeout_s=60)
        t0 = time.perf_counter()
        summary = run_one_sync(transport, ctx)
        seconds = time.perf_counter() - t0
        mem = mem_now(cuda)
        syncs.append(
            dict(
                mem,
                sync=i + 1,
                seconds=seconds,
                slot_bytes=ipc_slot_bytes(transport),
                largest_bucket=max((b.nbytes for b in ctx.buckets), default=0),
                tensors=summary.get("num_tensors"),
                weight_version=summary.get("weight_version"),
            )
        )
    transport.close()
    return {"syncs": syncs, "weights_bytes": unique_bytes([p for c in chunks for p in c.parameters()])}


def step_ipc(dry: bool) -> dict:
    import torch  # lazy: the orchestrator never imports torch
    import torch.multiprocessing as mp  # lazy: the orchestrator never imports torch

    cuda = torch.cuda.is_available()
    run = IPC_RUN[1 if dry else 0]
    spawn = mp.get_context("spawn")
    q_in, q_out = spawn.Queue(), spawn.Queue()
    proc = spawn.Process(target=consumer_main, args=(q_in, q_out, "cuda:0" if cuda else "cpu"), daemon=True)
    proc.start()
    try:
        out = ipc_producer(run, cuda, FakeEngine(q_in, q_out))
    finally:
        q_in.put(None)
        proc.join(timeout=30)
    key = "reserved" if cuda else "slot_bytes"
    values = [s[key] for s in out["syncs"]]
    out["measured"] = key if cuda else "slot_bytes (CPU stand-in: the sender's /dev/shm slot files, not CUDA memory)"
    out["flat"] = max(values) == min(values)
    out["growth_bytes"] = values[-1] - values[0]
    out["transport"] = "CUDA IPC" if cuda else "/dev/shm files (CPU path of the same transport)"
    if not out["flat"]:
        out["failed"] = f"{key} not flat across syncs: {values}"
    return out


# --------------------------------------------------------------------------------------------------------------
# Step 4: the log-prob path at vocabulary 151,936
# --------------------------------------------------------------------------------------------------------------


def logprob_plan_chunk(tokens: int, chunk: int, vocab: int) -> dict:
    """The plan's logits and log-prob chunk terms for a 1-layer model of the step's vocabulary and `tokens`
    tokens per micro-batch."""
    shape = dict(QWEN7B_SHAPE if vocab == QWEN7B_SHAPE["vocab_size"] else TINY_SHAPE)
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="gpu_check_lp_")), shape, 1, 2 * tokens)
    run = {"layers": 1, "prompt": tokens // 16, "response": tokens // 8 - tokens // 16, "rows": 8}
    cfg = memory_config(model_dir, run, (f"actor.log_prob_chunk_tokens={chunk}",))
    terms = planned_terms(cfg, 80.0)["log-probs"]
    return {k: terms[k][1] for k in ("logits", "logprob_chunk") if k in terms}


def measure_logprob(fn, logits, cuda: bool) -> dict:
    import torch  # lazy: the orchestrator never imports torch

    x = logits.detach().clone().requires_grad_(True)
    reset_peak(cuda)
    before = mem_now(cuda)["allocated"]
    t0 = time.perf_counter()
    lp, ent = fn(x)
    (lp.sum() + ent.sum()).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = mem_now(cuda)["max_allocated"]
    out = {"seconds": seconds, "peak_extra": None if peak is None else peak - before}
    del x
    return out, lp.detach(), ent.detach()


def logprob_case(tokens: int, run: dict, cuda: bool) -> dict:
    import torch  # lazy: the orchestrator never imports torch

    from luffy_megatron.algo.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy  # lazy

    vocab = (QWEN7B_SHAPE if cuda else TINY_SHAPE)["vocab_size"]
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(tokens)
    logits = torch.randn(tokens, vocab, device=device, generator=g, dtype=torch.bfloat16).mul_(3)
    target = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    chunk = run["chunk"]
    ours, lp, ent = measure_logprob(
        lambda x: vocab_parallel_logprob_entropy(x, target, chunk_tokens=chunk), logits, cuda
    )
    case = {
        "tokens": tokens,
        "vocab": vocab,
        "chunk_tokens": chunk,
        "chunked": ours,
        "logits_bytes": logits.numel() * logits.element_size(),
        "plan": logprob_plan_chunk(tokens, chunk, vocab),
    }
    if tokens <= run["naive_max"]:
        with torch.no_grad():
            ref_lp, ref_ent = naive_logprob_entropy(logits.float(), target)
        case["max_abs_diff"] = {
            "logprob": float((lp - ref_lp).abs().max()),
            "entropy": float((ent - ref_ent).abs().max()),
        }
        del ref_lp, ref_ent
        case["naive"], _, _ = measure_logprob(lambda x: naive_logprob_entropy(x.float(), target), logits, cuda)
    return case


def step_logprob(dry: bool) -> dict:
    import torch  # lazy: the orchestrator never imports torch

    cuda = torch.cuda.is_available()
    run = LOGPROB_RUN[1 if dry else 0]
    cases = [logprob_case(t, run, cuda) for t in run["tokens"]]
    out = {"cases": cases, "tolerance": LOGPROB_TOL, "measured_on": "cuda" if cuda else "cpu (memory n/a)"}
    bad = [c["tokens"] for c in cases if max(c.get("max_abs_diff", {"x": 0.0}).values()) > LOGPROB_TOL]
    if bad:
        out["failed"] = (
            f"log-probs or entropies differ from the fp32 computation by more than {LOGPROB_TOL} at {bad} tokens"
        )
    return out


STEP_FUNCS = {"memory": step_memory, "ipc": step_ipc, "logprob": step_logprob}


# --------------------------------------------------------------------------------------------------------------
# The orchestrator: install, run each step in its own process, write the results
# --------------------------------------------------------------------------------------------------------------


def sh(cmd: list, timeout: float = 30) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return -1, f"{type(err).__name__}: {err}"


def machine_info(python: str, env: dict) -> dict:
    """The machine and the versions the steps run with (asked of the python the steps use)."""
    code = (
        "import json, sys, torch\n"
        "d = {'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "     'cuda_available': torch.cuda.is_available()}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    v = torch.cuda.nccl.version()\n"
        "    d.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,\n"
        "             nccl='.'.join(map(str, v)) if isinstance(v, tuple) else str(v),\n"
        "             cudnn=torch.backends.cudnn.version())\n"
        "for m in ('megatron.core', 'transformers'):\n"
        "    try:\n"
        "        mod = __import__(m, fromlist=['x']); d[m] = getattr(mod, '__version__', '?')\n"
        "    except Exception as e:\n"
        "        d[m] = 'not importable: ' + type(e).__name__\n"
        "print(json.dumps(d))\n"
    )
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        info = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-2000:]}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as err:
        info = {"error": f"{type(err).__name__}: {err}"}
    rc, smi = sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    info["nvidia_smi"] = smi if rc == 0 else "n/a (no nvidia-smi)"
    info["host"] = platform.node()
    info["cpus"] = os.cpu_count()
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return info


def install_wheels(python: str, site: Path) -> dict:
    """pip install --no-index --no-deps from .gpu_wheels into this interpreter's environment (the image's CUDA
    torch stays: nothing else is resolved), so every process the steps start sees it, torchrun's too (the tests'
    launcher sets PYTHONPATH to the checkout alone). Where that is refused, into `site` (then on PYTHONPATH for
    the steps; the torchrun tests will not see it) and says so."""
    wheels = sorted(str(w) for w in WHEELS_DIR.glob("*.whl"))
    if not wheels:
        return {
            "status": "failed",
            "error": f"no wheels in {WHEELS_DIR}: run tools/gpu_check.sh --prepare here and carry .gpu_wheels",
        }
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    t0 = time.perf_counter()
    rc, text = sh([*pip, *wheels], timeout=180)
    where, target = "this interpreter's environment", None
    if rc != 0:
        first = text
        rc, text = sh([*pip, "--upgrade", "--target", str(site), *wheels], timeout=180)
        where, target = f"{site} (on PYTHONPATH; the interpreter's environment refused: {first[-300:]})", site
    return {
        "status": "ok" if rc == 0 else "failed",
        "seconds": time.perf_counter() - t0,
        "wheels": [Path(w).name for w in wheels],
        "into": where,
        "site": str(target) if target else None,
        "error": text[-3000:] if rc else "",
    }


def run_subprocess(cmd: list, env: dict, timeout: float, log_path: Path) -> tuple[str, int, float]:
    """(status, returncode, seconds) of `cmd` with its output in `log_path`; killed (its process group too)
    after `timeout`."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, status = -9, "timeout"
    return status, rc, time.perf_counter() - t0


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def junit_summary(xml_path: Path) -> dict:
    """Per-test outcomes of a pytest junit file; a failure from a package the machine lacks is marked so."""
    import xml.etree.ElementTree as ET  # lazy: only when pytest ran

    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as err:
        return {"error": f"no junit report: {err}"}
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (
                    (el.get("message") or el.text or "").strip().splitlines()[0][:300]
                    if (el.get("message") or el.text)
                    else ""
                )
        missing = next((m for m in ABSENT_THERE if f"No module named '{m}" in message), None)
        tests.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0) or 0),
                "message": message,
                "absent_package": missing,
            }
        )
    counts: dict = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def verbose_outcomes(log_path: Path) -> dict:
    """Per-test outcomes from pytest -v lines (when the run was killed before its junit report)."""
    tests = []
    for line in tail(log_path, 400).splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL"):
            outcome = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error"}.get(parts[1], "skipped")
            tests.append({"name": parts[0], "outcome": outcome, "seconds": None, "message": "", "absent_package": None})
    counts: dict = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def run_pytest_step(python: str, env: dict, timeout: float, work: Path) -> dict:
    import importlib.util  # lazy: only here

    xml = work / "pytest_junit.xml"
    deselected = [
        (t, f"needs {pkg}, absent here: {why}")
        for pkg, tests in DESELECT_WITHOUT.items()
        if importlib.util.find_spec(pkg) is None
        for t, why in tests
    ]
    cmd = [python, "-m", "pytest", "tests/gpu", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += [f"--deselect={t}" for t, _ in deselected]
    status, rc, seconds = run_subprocess(cmd, env, timeout, work / "pytest.log")
    shown = " ".join(cmd[1:]).replace(str(work), "<work>")
    result = {"status": status, "rc": rc, "seconds": seconds, "command": shown, "deselected": deselected}
    result.update(junit_summary(xml) if xml.exists() else verbose_outcomes(work / "pytest.log"))
    if rc == 5:  # pytest: no tests collected
        result["status"] = "failed"
    if status != "ok":
        result["error_tail"] = tail(work / "pytest.log", 40)
    return result


def run_step(name: str, python: str, env: dict, timeout: float, work: Path, dry: bool) -> dict:
    out_json = work / f"{name}.json"
    cmd = [python, str(Path(__file__).resolve()), "--step", name, "--result", str(out_json)] + (
        ["--dry-run"] if dry else []
    )
    status, rc, seconds = run_subprocess(cmd, env, timeout, work / f"{name}.log")
    result = {"status": status, "rc": rc, "seconds": seconds}
    try:
        result.update(json.loads(out_json.read_text()))
    except (OSError, ValueError):
        pass
    if status == "ok" and result.get("failed"):
        result["status"] = "failed"
    if result["status"] != "ok":
        result["error_tail"] = tail(work / f"{name}.log", 40)
    return result


def step_main(name: str, result_path: Path, dry: bool) -> int:
    """Inside a step's process: run it, write its JSON (the error too), exit 1 on failure."""
    import traceback  # lazy: step processes only

    block_absent_modules()
    try:
        result = STEP_FUNCS[name](dry)
        rc = 1 if result.get("failed") else 0
    except BaseException as err:  # noqa: BLE001 - recorded in the step's result and its exit status
        traceback.print_exc()
        result, rc = {"failed": f"{type(err).__name__}: {err}"[:2000]}, 1
    result_path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"step": name, "failed": result.get("failed")}))
    return rc


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def gib(n) -> str:
    return "n/a" if n is None else f"{n / GIB:.4g}"


def num(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def table(header: list, rows: list) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |" for r in rows]
    return out + [""]


def md_head(res: dict) -> list[str]:
    dry = res["dry_run"]
    lines = ["# GPU check results", ""]
    if dry:
        lines += [
            "**DRY RUN on CPU: not a GPU measurement.** The steps ran on tiny shapes on a CPU machine to check "
            "that they run; every memory figure is n/a or a CPU stand-in, labelled as such.",
            "",
        ]
    lines += [
        f"Produced by `{res['command']}` on {res['machine'].get('date_utc')} UTC ({res['total_s']:.0f} s in all).",
        "",
        "## Machine and versions",
        "",
    ]
    m = res["machine"]
    keys = (
        "host",
        "cpus",
        "nvidia_smi",
        "gpu",
        "gpu_memory_gib",
        "sms",
        "python",
        "torch",
        "cuda",
        "nccl",
        "cudnn",
        "megatron.core",
        "transformers",
        "error",
    )
    lines += table(["what", "value"], [[k, m[k]] for k in keys if k in m])
    inst = res["install"]
    lines += [
        f"Install from .gpu_wheels: {inst['status']}"
        + (f" ({', '.join(inst.get('wheels', []))})" if inst.get("wheels") else "")
        + (f" into {inst['into']}" if inst.get("into") else "")
        + ".",
        "",
    ]
    lines += ["## Summary", ""]
    lines += table(
        ["step", "status", "seconds"],
        [
            [f"{i}. {STEPS[n][0]}", res["steps"][n]["status"], num(res["steps"][n].get("seconds"), "{:.0f}")]
            for i, n in enumerate(STEPS, 1)
        ],
    )
    return lines


def md_pytest(r: dict) -> list[str]:
    lines = [
        "## 1. pytest tests/gpu",
        "",
        f"`{r.get('command', '')}`: {r['status']}, counts {r.get('counts', {})}.",
        "",
    ]
    rows = [
        [
            t["name"],
            t["outcome"],
            num(t["seconds"], "{:.1f}"),
            (f"(needs {t['absent_package']}, absent on this machine) " if t.get("absent_package") else "")
            + t["message"][:160],
        ]
        for t in r.get("tests", [])
    ]
    lines += table(["test", "outcome", "s", "message"], rows) if rows else ["No per-test outcomes.", ""]
    return lines + [f"Deselected: `{t}` ({why})." for t, why in r.get("deselected", [])] + [""]


def md_memory(r: dict) -> list[str]:
    lines = ["## 2. Trainer memory per phase vs the plan", ""]
    if "terms" not in r:
        return lines + [f"No numbers: {r['status']}.", ""]
    s = r["shape"]
    lines += [
        f"MegatronActor, one process, world size 1, random weights; Qwen2 shape hidden {s['hidden_size']}, "
        f"{s['num_attention_heads']} heads / {s['num_key_value_heads']} KV heads, FFN {s['intermediate_size']}, "
        f"vocabulary {s['vocab_size']}, {s['layers']} layers; one micro-batch of {s['rows']} rows x {s['seq']} "
        f"tokens; bf16, local layer spec, full recompute (uniform, 1 layer). Measured on: {r['measured_on']}. "
        "Plan: perf/memory_plan.py for the same config. GiB.",
        "",
    ]
    lines += [f"**Finding:** {f}" for f in r.get("findings", [])] + ([""] if r.get("findings") else [])
    lines += table(
        ["term", "plan's terms", "planned", "measured", "measured/planned", "how measured"],
        [[t["key"], t["label"], gib(t["planned"]), gib(t["measured"]), num(t["ratio"]), t["how"]] for t in r["terms"]],
    )
    lines += ["Phase totals (the plan's trainer tensors, without engine and process terms):", ""]
    lines += table(
        ["phase", "measured as", "planned", "measured", "measured/planned"],
        [[t["key"], t["label"], gib(t["planned"]), gib(t["measured"]), num(t["ratio"])] for t in r["phase_totals"]],
    )
    lines += ["The allocator after each phase (the second log-prob pass and update: peak since just before them):", ""]
    lines += table(
        ["after", "allocated", "max allocated", "reserved"],
        [[k, gib(v["allocated"]), gib(v["max_allocated"]), gib(v["reserved"])] for k, v in r["phases"].items()],
    )
    t = r["timing"]
    lines += [
        f"Build {t['build_s']:.1f} s. Second pass, {t['tokens']} tokens (MFU: model FLOPs as perf/flops.py counts "
        f"them, forward 2 x matmul params x tokens + causal attention, update 3 x forward, recompute not counted, "
        f"over {t['peak_tflops']:.0f} TFLOP/s dense bf16; n/a on CPU):",
        "",
    ]
    lines += table(
        ["pass", "seconds", "tokens/s", "TFLOP/s", "MFU"],
        [
            [
                k,
                num(t[k]["seconds"], "{:.3f}"),
                num(t[k]["tokens_per_s"], "{:.0f}"),
                num(t[k]["tflops"], "{:.1f}"),
                num(t[k]["mfu"], "{:.3f}"),
            ]
            for k in ("log-probs", "update")
        ],
    )
    lines += [
        f"Offload: {gib(r['offload']['host_bytes'])} GiB to host, {gib(r['offload']['freed_bytes'])} GiB of grad "
        "buffers released.",
        "",
    ]
    return lines


def md_ipc(r: dict) -> list[str]:
    lines = ["## 3. CUDA IPC slots across three syncs", ""]
    if "syncs" not in r:
        return lines + [f"No numbers: {r['status']}.", ""]
    lines += [
        f"Producer: the project's shared-memory transport ({r['transport']}) over a 1-layer model of the "
        f"step's shape ({gib(r['weights_bytes'])} GiB of bf16 weights); consumer: a second process running the "
        "project's worker extension (no vLLM, no model). Measured: "
        f"{r['measured']}. Flat across syncs: **{'yes' if r['flat'] else 'NO'}** "
        f"(growth {gib(r['growth_bytes'])} GiB).",
        "",
    ]
    lines += table(
        ["sync", "reserved", "allocated", "slot bytes held", "largest bucket", "tensors", "seconds"],
        [
            [
                s["sync"],
                gib(s["reserved"]),
                gib(s["allocated"]),
                gib(s["slot_bytes"]),
                gib(s["largest_bucket"]),
                s["tensors"],
                num(s["seconds"]),
            ]
            for s in r["syncs"]
        ],
    )
    return lines


def md_logprob(r: dict) -> list[str]:
    lines = ["## 4. Log-prob path at vocabulary 151,936", ""]
    if "cases" not in r:
        return lines + [f"No numbers: {r['status']}.", ""]
    lines += [
        f"bf16 logits, forward + backward of log-prob and entropy; measured on {r['measured_on']}. Peak extra: "
        "max allocated during the call less the allocated memory before it (the logits are already there). "
        f"Agreement with the fp32 log_softmax gather: max abs difference (tolerance {r['tolerance']}). GiB.",
        "",
    ]
    rows = []
    for c in r["cases"]:
        plan_chunk, ch, nv = c["plan"].get("logprob_chunk"), c["chunked"], c.get("naive", {})
        ratio = ch["peak_extra"] / plan_chunk if plan_chunk and ch["peak_extra"] is not None else None
        diff = c.get("max_abs_diff", {})
        rows.append(
            [
                c["tokens"],
                c["vocab"],
                c["chunk_tokens"],
                gib(c["logits_bytes"]),
                gib(ch["peak_extra"]),
                gib(plan_chunk),
                num(ratio),
                num(ch["seconds"], "{:.3f}"),
                gib(nv.get("peak_extra")),
                num(nv.get("seconds"), "{:.3f}"),
                num(diff.get("logprob"), "{:.2e}"),
                num(diff.get("entropy"), "{:.2e}"),
            ]
        )
    return lines + table(
        [
            "tokens",
            "vocab",
            "chunk",
            "logits",
            "chunked peak extra",
            "plan logprob_chunk",
            "ratio",
            "chunked s",
            "naive peak extra",
            "naive s",
            "max diff lp",
            "max diff ent",
        ],
        rows,
    )


def md_failures(res: dict) -> list[str]:
    failed = [(n, r) for n, r in res["steps"].items() if r["status"] != "ok"]
    if res["install"]["status"] == "failed":
        failed.insert(0, ("install", res["install"]))
    if not failed:
        return ["## Failures", "", "None.", ""]
    lines = ["## Failures", ""]
    for name, r in failed:
        lines += [
            f"### {name}: {r['status']}",
            "",
            f"{r.get('failed', '')}".strip(),
            "",
            "```",
            (r.get("error_tail") or r.get("error") or "").strip(),
            "```",
            "",
        ]
    return lines


def write_report(res: dict, out: Path) -> None:
    st = res["steps"]
    lines = md_head(res) + md_pytest(st["pytest"]) + md_memory(st["memory"]) + md_ipc(st["ipc"])
    lines += md_logprob(st["logprob"]) + md_failures(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")


# --------------------------------------------------------------------------------------------------------------
# --prepare, the whole run, the command line
# --------------------------------------------------------------------------------------------------------------


def tree_bytes() -> int:
    """Bytes of what a device call carries besides the carried paths: tracked and untracked-not-ignored files."""
    rc, text = sh(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60)
    if rc != 0:
        return -1
    return sum((REPO / f).stat().st_size for f in text.split("\0") if f and (REPO / f).is_file())


def prepare() -> int:
    """Here, with network: the wheels the GPU machine lacks (Python 3.12, x86_64 Linux) into .gpu_wheels/."""
    WHEELS_DIR.mkdir(exist_ok=True)
    plats = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *plats,
        "-d",
        str(WHEELS_DIR),
        *WHEELS,
    ]
    rc, text = sh(cmd, timeout=600)
    if rc != 0:
        print(text, file=sys.stderr)
        return rc
    bad = [
        w.name
        for w in WHEELS_DIR.glob("*.whl")
        if not (w.name.endswith("py3-none-any.whl") or ("-cp312-" in w.name and "x86_64" in w.name))
    ]
    if bad:
        print(f"wheels that will not install on Python 3.12 x86_64: {bad}", file=sys.stderr)
        return 1
    wheels = sum(w.stat().st_size for w in WHEELS_DIR.glob("*.whl"))
    tree = tree_bytes()
    for w in sorted(WHEELS_DIR.glob("*.whl")):
        print(f"{w.name}  {w.stat().st_size / 2**20:.1f} MiB")
    print(
        f"wheels {wheels / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB = {(wheels + tree) / 2**20:.1f} MiB "
        "(the device call carries at most 64 MiB)"
    )
    return 0 if wheels + tree < 48 * 2**20 else 1


def step_env(dry: bool, site) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO)] + ([str(site)] if site else []) + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(paths)
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run measures nothing: CPU even on a GPU host
    return env


def save_outputs(res: dict, out: Path, work: Path) -> None:
    """The report to `out`; with $OUT set, the report, its numbers as JSON and the logs there too."""
    write_report(res, out)
    dest = os.environ.get("OUT")
    if not dest:
        return
    dest_dir = Path(dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "gpu_results.md").write_text(out.read_text())
    (dest_dir / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
    logs = [f"===== {p.name}\n{p.read_text(errors='replace')[-400_000:]}" for p in sorted(work.glob("*.log"))]
    (dest_dir / "gpu_check_logs.txt").write_text("\n".join(logs))
    junit = work / "pytest_junit.xml"
    if junit.exists():
        (dest_dir / "pytest_junit.xml").write_text(junit.read_text())


def run_all(dry: bool, out: Path, budget_s: float, command: str, only: tuple = tuple(STEPS)) -> int:
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    python = sys.executable
    if dry:
        install = {"status": "skipped (dry run: everything is installed here)"}
    else:
        install = install_wheels(python, work / "site")
    env = step_env(dry, install.get("site") if install["status"] == "ok" else None)
    machine = machine_info(python, env)
    print(
        f"[gpu_check] {'DRY RUN on CPU' if dry else 'GPU run'}: {machine.get('gpu', 'no GPU')}, torch "
        f"{machine.get('torch')}, CUDA {machine.get('cuda')}; install: {install['status']}",
        flush=True,
    )
    steps: dict = {}
    for name in RUN_ORDER:
        _, limit_gpu, limit_dry = STEPS[name]
        left = budget_s - (time.perf_counter() - t_start)
        limit = min(limit_dry if dry else limit_gpu, left)
        if name not in only:
            steps[name] = {"status": "not run", "failed": "not asked for (--only)"}
        elif limit < 10:
            steps[name] = {"status": "skipped", "failed": f"no time left in the {budget_s:.0f} s budget"}
        elif name == "pytest":
            steps[name] = run_pytest_step(python, env, limit, work)
        else:
            steps[name] = run_step(name, python, env, limit, work, dry)
        r = steps[name]
        why = f" - {str(r['failed'])[:200]}" if r.get("failed") else ""
        print(f"[gpu_check] {name}: {r['status']} ({r.get('seconds', 0):.0f} s){why}", flush=True)
    steps = {name: steps[name] for name in STEPS}  # the report's order
    res = {
        "dry_run": dry,
        "command": command,
        "machine": machine,
        "install": install,
        "steps": steps,
        "total_s": time.perf_counter() - t_start,
    }
    save_outputs(res, out, work)
    ok = all(r["status"] in ("ok", "not run") for r in steps.values()) and install["status"] != "failed"
    print(
        f"[gpu_check] {'all steps ok' if ok else 'FAILED: see the Failures section'}; wrote {out}"
        + (f" and {os.environ['OUT']}/gpu_results.{{md,json}}" if os.environ.get("OUT") else ""),
        flush=True,
    )
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="download the wheels the GPU machine lacks (network)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny shapes (CI)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "gpu_results.md", help="the report (markdown)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all steps together")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps to run (of {', '.join(STEPS)})")
    ap.add_argument("--step", choices=sorted(STEP_FUNCS), help=argparse.SUPPRESS)  # inside a step's process
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        return step_main(args.step, args.result, args.dry_run)
    if args.prepare:
        return prepare()
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        ap.error(f"--only: unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    command = "tools/gpu_check.sh" + (" --dry-run" if args.dry_run else "")
    command += f" --only {','.join(only)}" if set(only) != set(STEPS) else ""
    return run_all(args.dry_run, args.out.resolve(), args.budget_s, command, only)


if __name__ == "__main__":
    sys.exit(main())
