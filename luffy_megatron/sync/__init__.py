"""Weight streaming from Megatron shards to rollout engines.

* `weights.py`: `sync_actor_to_engines` (who sends what, the choice of transport: `resolve_transport`,
  `transport_for`); it imports the three transports.
* `base.py`: what the transports share: `SyncContext` (one rank's view of a sync), `Transport` (the engines'
  update session around a transfer), `FilledAhead`, `finish_summary`, `node_ip`.
* one module per transport, each importing only `base.py` (and `shm_buffer.py`): `collective.py` (per-sender
  process groups: gloo on CPU, NCCL on GPU), `shared_memory.py` (/dev/shm on CPU, CUDA IPC on GPU),
  `object_store.py` (Ray's object store).
* `shm_buffer.py`: the POSIX shared-memory buffers (/dev/shm files mapped as tensors).
"""
