"""The Megatron-core actor on each rank: model, optimizer, log-probs and the LUFFY update.

megatron_actor.py   `MegatronActor`: build (HF conversion or a checkpoint), log-probs, update, HF export
batching.py         rollout rows -> padded or packed micro-batches, dynamic batch sizes
context_parallel.py sharding a micro-batch over the context-parallel ranks and gathering the results
reference.py        the frozen reference policy of the KL terms
schedule.py         the learning-rate schedule
checkpoint.py       the actor's checkpoints: model, optimizer, RNG, trainer state; `latest`, pruning
remote.py           the functions the driver runs on every rank (export, weight sync, save, load)
"""
