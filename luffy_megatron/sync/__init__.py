"""Weight streaming from Megatron shards to rollout engines: `weights.sync_actor_to_engines` (who sends what,
the engines' update session, the choice of transport) and one module per transport: `collective.py`
(per-sender process groups: gloo on CPU, NCCL on GPU), `shared_memory.py` (/dev/shm on CPU, CUDA IPC on GPU),
`object_store.py` (Ray's object store); `shm.py` holds the POSIX shared-memory buffers."""
