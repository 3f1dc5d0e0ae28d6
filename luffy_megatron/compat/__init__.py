"""Every patch to a third-party library, one module per library; each patch names the upstream code and version.

megatron      megatron-core fixes for every platform (two-stage pipeline shape exchange, in-process save queue)
megatron_cpu  megatron-core on CPU-only torch (gloo): `apply_cpu_shim`, one function per patch; `seed_everything`
versions      the installed stack's versions, and the refusal of a torch the installed vLLM was not built for
vllm          vLLM: wake a caller blocked on an engine core that died (`raise_when_engine_core_dies`)
"""
