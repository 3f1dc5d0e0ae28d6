"""luffy-megatron: LUFFY (off-policy guided reasoning RL) on Megatron-core actors with vLLM rollouts."""

__version__ = "0.1.0"
