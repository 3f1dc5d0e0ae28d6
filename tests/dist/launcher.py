"""Run a script under `torchrun` (gloo, CPU) from a test and collect what rank 0 reports.

Scripts print one line `RESULT <json>` on rank 0 (or, as the last JSON line of stdout, a bare JSON
object); `run_torchrun` returns that object, or fails the test with the script's output when it exits
non-zero or reports nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout_s: int = 300, env: dict | None = None) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, cwd=REPO)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {Path(script).name} exited {proc.returncode}:\n{out[-6000:]}")
    lines = proc.stdout.splitlines()
    results = [line[len("RESULT "):] for line in lines if line.startswith("RESULT ")]
    results = results or [line for line in lines if line.startswith("{")]
    if not results:
        raise AssertionError(f"torchrun {Path(script).name} reported no RESULT line:\n{out[-6000:]}")
    return json.loads(results[-1])


def report(obj: dict) -> None:
    """Call on rank 0 of a torchrun script to hand `obj` back to the test."""
    print("RESULT " + json.dumps(obj), flush=True)
