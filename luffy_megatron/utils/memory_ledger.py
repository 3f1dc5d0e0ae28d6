"""What a rank or an engine holds on its GPU, recorded at every transition (build, offload, reload, engine
start, sleep, wake, checkpoint load and save, weight sync).

The names are the state terms of the memory plan (`perf/memory_plan.py` STATE_KEYS): a trainer rank holds
`weights`, `ref_weights`, `grads`, `main_params`, `moments` and `sync_buckets` (during a sync; the CUDA IPC slots
from the first sync on); an engine holds `engine_weights`, `engine_kv` and `engine_sync_buckets` (the collective
transport's receive buffers, once weights came through them). Each record is one transition:
what the process held before it, what it holds after, and when it started and ended. While a transition runs
the process may hold both (an engine that wakes allocates before the call returns; a rank that offloads frees
only at the end), so `perf.phase_contract` counts the union over the transition's whole span. On a CUDA device
each record also carries what torch's allocator held after it (allocated, reserved, peak)."""

from __future__ import annotations

import collections
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

LEDGER_LENGTH = 1024  # transitions kept per process: a few per step


class MemoryLedger:
    """The transitions of one process (a rank or an engine), oldest first, the last `LEDGER_LENGTH`."""

    def __init__(self, holdings: Callable[[], frozenset]):
        self._holdings = holdings
        self.records: collections.deque = collections.deque(maxlen=LEDGER_LENGTH)

    def holdings(self) -> frozenset:
        return frozenset(self._holdings())

    @contextmanager
    def transition(self, event: str, extra: frozenset = frozenset()) -> Iterator[None]:
        """Records `event` around the block: holdings before and after (`extra`: what the process holds only
        inside the block, such as the sync buckets of a weight sync). Recorded also when the block raises."""
        t0, before = time.time(), self.holdings()
        try:
            yield
        finally:
            self.record(event, t0, before | extra, self.holdings())

    def record(self, event: str, t0: float, before: frozenset, after: frozenset) -> None:
        entry = {"event": event, "t0": t0, "t1": time.time(), "before": sorted(before), "after": sorted(after)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            entry["cuda"] = {
                "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved(),
                "max_allocated": torch.cuda.max_memory_allocated(),
            }
        self.records.append(entry)

    def dump(self) -> list[dict]:
        return list(self.records)
