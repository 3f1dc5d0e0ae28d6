"""`object_store`: each flat bucket goes through Ray's object store (the fallback that works everywhere).

Sender (every stage's): fills the bucket into a host buffer (on GPU the filled device buffer is copied into a
pinned host buffer: Ray must never pickle device tensors), `ray.put`s it once (a copy into the object store),
and asks every engine to load it (`VLLMEngine.load_flat_bucket`: the engine actor reads the object in place and
hands it to its workers through a /dev/shm file they map, or as bytes through vLLM's RPC for remote workers).
The next bucket is filled while the engines load this one; at most two buckets per sender are in flight.

Copies of every byte on CPU: the export into the bucket (1), into the object store (2), the engine actor into
the workers' shared file (3), then vLLM's own load into the model.
"""

from __future__ import annotations

from typing import Iterator

import torch

from luffy_megatron.convert.export import FlatBucket
from luffy_megatron.sync.base import SyncContext, Transport


class ObjectStoreTransport(Transport):
    name = "object_store"

    def __init__(self, fleet):
        super().__init__(fleet)
        self._buffer = None  # host (pinned on GPU) bucket buffer, reused: ray.put copies out of it
        self._device_buffer = None

    def _host(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self._buffer

    def buffer_for(self, bucket: FlatBucket) -> torch.Tensor:
        if self._ctx_device.type == "cpu":
            return self._host(bucket.nbytes)
        if self._device_buffer is None or self._device_buffer.numel() < bucket.nbytes:
            self._device_buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self._ctx_device)
        return self._device_buffer

    def run(self, ctx: SyncContext) -> dict:
        self._ctx_device = ctx.device
        return super().run(ctx)

    def transfer(self, ctx: SyncContext, filling: Iterator) -> None:
        import ray  # lazy: the driver imports this module without Ray started

        in_flight: list = []
        for bucket, buf in filling:
            flat = buf[: bucket.nbytes]
            if flat.device.type != "cpu":
                host = self._host(bucket.nbytes)[: bucket.nbytes]
                host.copy_(flat, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                flat = host
            # a numpy view: Ray stores it out of band and the engine reads it in place, without unpickling a copy
            ref = ray.put(flat.numpy())
            entries = bucket.wire_entries()
            loads = [e.call.remote("load_flat_bucket", ref, entries) for e in self.fleet.engines]
            del ref  # the pending tasks keep the object alive until they ran
            ctx.engine_get(in_flight, "load_flat_bucket") if in_flight else None
            in_flight = loads
        if in_flight:
            ctx.engine_get(in_flight, "load_flat_bucket")
