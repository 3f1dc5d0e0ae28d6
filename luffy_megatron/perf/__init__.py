"""What a recipe costs: parameters, FLOPs, memory per GPU and step time, from the config alone.

flops.py        model shapes (config.json or the built-in table), parameter counts, model FLOPs, trainer state
                bytes; the runtime MFU (`metrics.compute.ModelFlops`) counts with these
memory_plan.py  the plan: memory per GPU in each phase of a step, FLOPs and time per step, what does not fit
report.py       the plan as text and the single changes that would make it fit (tools/plan.py)
"""
