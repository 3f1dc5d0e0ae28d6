"""Weight streaming from Megatron shards to rollout engines (`weights.sync_actor_to_engines`) and its
transports."""
