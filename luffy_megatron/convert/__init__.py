"""HF <-> megatron-core name maps, tensor transforms, checkpoint readers/writers, streaming export."""
