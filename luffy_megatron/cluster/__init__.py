"""Where the Megatron ranks and the vLLM engines run on the Ray cluster.

layout.py     the layout from the config alone (pure): which GPU of which node hosts which rank and engine
placement.py  the layout on Ray: one STRICT_PACK placement group per node, a bundle per GPU, bounded wait
actor_group.py the Megatron ranks as Ray actors in their bundles (rendezvous at rank 0's node)
offload.py    actor.offload_during_rollout: optimizer state to host and back
workers.py    placement + ranks + engines of one job, and the colocated phase switches (sleep / wake)
supervision.py the ranks as the loop calls them: bounded waits, a dead rank named (`GuardedRanks`, `RankFailure`)
cpu_cores.py  CPU engines' cores of their own (vLLM-CPU's thread binding knows nothing of other engines)
"""
