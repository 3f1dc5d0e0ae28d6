"""The collective transport's weight group (`sync.collective.WeightGroup`, gloo through vLLM's stateless group
helper) when an engine worker dies mid-sync. A member SIGKILLed between two bucket broadcasts makes the sender's
next broadcast fail at once (gloo: the dead peer's connection is closed or reset), not after the group's timeout
(`rollout.request_timeout_s`). The other workers wait on the sender, which lives on (a trainer rank): they are
freed only when the sender closes the group, which `CollectiveTransport.transfer` does on a failed broadcast
(tests/unit/test_collective_transport.py); measured without that close, the surviving worker waited until the
sender's process ended in 2 runs of 3. (A member that is alive but stops receiving is the hang case: the
supervisor's health check handles it, tests/e2e/test_rollout_integrity.py. NCCL's behaviour needs a GPU.)"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from tests.dist.launcher import free_port

GROUP_TIMEOUT_S = 120.0  # what the group would wait for a silent peer
STAY_ALIVE_S = 60.0  # the sender lives on after its failed broadcast: only its close can free the others
PROMPT_S = 15.0  # "at once": well before the sender would exit or the group time out
BUCKET_BYTES = 8 << 20


def _report(out: Path, rank: int, row: dict) -> None:
    """One file per member, written whole (a process killed while holding a multiprocessing.Queue's lock
    would block the others' reports)."""
    tmp = out / f"rank{rank}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "at": time.time(), **row}))
    tmp.replace(out / f"rank{rank}.json")


def _member(rank: int, port: int, out: Path, dies_after: int) -> None:
    import torch

    from luffy_megatron.sync.collective import WeightGroup

    group = WeightGroup.create(host="127.0.0.1", port=port, rank=rank, world_size=3, backend="gloo",
                               timeout_s=GROUP_TIMEOUT_S)
    buf = torch.full((BUCKET_BYTES,), rank, dtype=torch.uint8)
    for k in range(50):
        try:
            group.broadcast(buf).wait()
        except Exception as err:  # noqa: BLE001 - reported to the test
            t = time.time()
            if rank == 0:
                group.close()
            _report(out, rank, {"bucket": k, "error": str(err)[:300], "close_s": time.time() - t})
            time.sleep(STAY_ALIVE_S)  # as a trainer rank does after a failed sync (the test ends it sooner)
            return
        if k == 0:
            assert int(buf[0]) == 0 and int(buf[-1]) == 0  # the sender's bytes arrived
        if rank == 2 and k == dies_after:
            _report(out, rank, {"bucket": k, "error": None})
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)  # the sender exports the next bucket
    _report(out, rank, {"bucket": 50, "error": None})


def test_a_worker_killed_mid_sync_fails_the_sender_at_once_and_its_close_frees_the_other_worker(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_member, args=(r, port, tmp_path, 2)) for r in range(3)]
    t0 = time.time()
    for p in procs:
        p.start()
    try:
        while len(list(tmp_path.glob("rank*.json"))) < 3 and time.time() - t0 < GROUP_TIMEOUT_S / 2:
            time.sleep(0.1)
        got = {int(f.stem[4:]): json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")}
    finally:
        for p in procs:  # the sender sleeps STAY_ALIVE_S after its close: end it now
            p.join(timeout=0.5)
            if p.is_alive():
                p.kill()
            p.join(timeout=30)
    assert sorted(got) == [0, 1, 2], f"members that reported: {got}"
    died = got[2]
    assert died["error"] is None and died["bucket"] == 2
    sender, other = got[0], got[1]
    # the sender's next broadcast fails (gloo: the dead peer's connection is closed or reset)
    assert sender["error"] is not None and "gloo" in sender["error"] and sender["bucket"] == 3, sender
    assert sender["at"] - died["at"] < PROMPT_S, (sender, died)
    # the surviving worker's receive fails because the sender closed the group, while the sender still lives
    assert other["error"] is not None and other["bucket"] in (3, 4), other
    assert other["at"] - died["at"] < PROMPT_S and other["at"] < sender["at"] + STAY_ALIVE_S / 2, (other, sender)
    assert procs[2].exitcode == -signal.SIGKILL
