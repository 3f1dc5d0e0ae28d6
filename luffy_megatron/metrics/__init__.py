"""A run's numbers: what a step reports and where it goes.

compute.py  the metrics of a step under upstream LUFFY's / verl's names, pure functions; step timing; MFU
sinks.py    TensorBoard, metrics.jsonl, the console line and the results plot
"""
