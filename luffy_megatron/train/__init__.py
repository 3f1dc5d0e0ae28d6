"""The driver: one process that holds the data, the reward pool and the loop, and calls the Megatron ranks
and the vLLM engines on Ray.

loop.py        train() and train_step(): the loop and one step's data flow; `luffy-train`'s main
setup.py       data, Ray, the workers (placement, ranks, engines) and their supervised handles
step_parts.py  the step's boxes: mixing demonstrations into groups, grading, KL penalty and advantages, checks
validation.py  validation as upstream's, the best-model export
progress.py    where the run stands: resume, checkpoints, what a stop or a failure leaves to resume from
"""
