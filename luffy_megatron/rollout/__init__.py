"""Rollout engines: vLLM in-process (`engine.VLLMEngine`) and as Ray actors (`ray_engine.EngineFleet`).

Imports are lazy: importing this package pulls in neither vLLM nor Ray."""
