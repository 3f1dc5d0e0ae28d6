"""Ray placement of the Megatron ranks (and, in rollout/, of the vLLM engines)."""
