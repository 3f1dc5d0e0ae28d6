"""No NCCL weight-group wait without a deadline (`sync.collective.wait_bounded`, `EventWait`,
`WeightGroup.abort`), on CPU with a fake CUDA event and communicator: a broadcast that never completes raises
within the sync timeout, naming the group and the setting, and aborts the communicator exactly once; one that
completes returns; the transport then closes the group and the next sync builds a new one, as on gloo
(tests/unit/test_collective_transport.py). The kill case on two GPUs: tests/gpu/test_gpu_transports.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.convert.export import FlatBucket
from luffy_megatron.sync.collective import CollectiveTransport, EventWait, WeightGroup, wait_bounded


class Clock:
    """A clock that moves only when the waiter sleeps."""

    def __init__(self):
        self.now, self.sleeps = 100.0, 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.sleeps += 1


class Event:
    """A CUDA event whose broadcast completes after `after` queries (None: never, as with a dead peer)."""

    def __init__(self, after=None, error=None):
        self.after, self.error, self.queries = after, error, 0

    def query(self) -> bool:
        self.queries += 1
        if self.error is not None:
            raise self.error
        return self.after is not None and self.queries > self.after


class Comm:
    """vLLM's PyNcclCommunicator: `destroy()` is its ncclCommAbort."""

    def __init__(self):
        self.destroyed = 0

    def destroy(self):
        self.destroyed += 1


def test_a_wait_that_never_completes_raises_at_the_deadline_and_aborts_once():
    clock, aborts = Clock(), []
    with pytest.raises(TimeoutError) as err:
        wait_bounded(
            Event().query, timeout_s=30, what="weight group luffy-weights-stage1-10.0.0.2:4242 (nccl)",
            on_expiry=lambda: aborts.append(clock()), clock=clock, sleep=clock.sleep,
        )  # fmt: skip
    msg = str(err.value)
    assert "luffy-weights-stage1-10.0.0.2:4242" in msg and "30s" in msg and "rollout.request_timeout_s" in msg
    assert len(aborts) == 1 and 130.0 <= aborts[0] < 130.002  # at the deadline, not before, not long after
    assert 29_000 < clock.sleeps < 30_020  # polled every millisecond once the pause has grown, not spun


def test_a_wait_that_completes_returns_without_aborting():
    clock, aborts, event = Clock(), [], Event(after=5)
    wait_bounded(
        event.query, timeout_s=30, what="g", on_expiry=lambda: aborts.append(1), clock=clock, sleep=clock.sleep
    )
    assert aborts == [] and event.queries == 6 and clock.now - 100.0 < 0.01


def test_a_failing_query_aborts_and_raises_its_error():
    aborts = []
    with pytest.raises(RuntimeError, match="an illegal memory access"):
        wait_bounded(
            Event(error=RuntimeError("CUDA error: an illegal memory access")).query, timeout_s=30, what="g",
            on_expiry=lambda: aborts.append(1),
        )  # fmt: skip
    assert aborts == [1]


def _nccl_group(comm, timeout_s=0.2):
    """A WeightGroup on NCCL whose broadcast never completes (its peer is dead); no CUDA needed."""
    group = WeightGroup("nccl", comm=comm, device=torch.device("cuda", 0), timeout_s=timeout_s, name="g-stage0")
    group.broadcast = lambda tensor: EventWait(Event(), group)  # what WeightGroup.broadcast returns on NCCL
    return group


def test_an_event_wait_aborts_the_groups_communicator_once_and_the_group_refuses_more_broadcasts():
    comm = Comm()
    group = _nccl_group(comm)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="g-stage0"):
        EventWait(Event(), group).wait()
    assert 0.2 <= time.monotonic() - t0 < 5
    assert comm.destroyed == 1 and group.comm is None and group.aborts == 1
    group.abort()
    group.close()  # what the transport does next: no second abort
    assert comm.destroyed == 1 and group.aborts == 1
    with pytest.raises(RuntimeError, match="aborted or closed"):
        WeightGroup.broadcast(group, torch.zeros(4, dtype=torch.uint8))


def test_a_transfer_whose_broadcast_never_completes_fails_and_the_next_sync_rebuilds():
    comm = Comm()
    transport = CollectiveTransport(fleet=SimpleNamespace(engines=[]))
    transport.group = _nccl_group(comm)
    buckets = [FlatBucket(owner=0, nbytes=64) for _ in range(3)]
    ctx = SimpleNamespace(buckets=buckets, is_driver=False, device=torch.device("cpu"), all_gather=lambda obj: [obj])

    def filling():
        for b in buckets:
            yield b, transport.buffer_for(b)

    with pytest.raises(TimeoutError, match="rollout.request_timeout_s"):
        transport.transfer(ctx, filling())
    assert comm.destroyed == 1  # aborted once, although the transport then closed the group
    assert transport.group is None and transport.inflight == [None, None]
    assert transport._needs_setup(ctx) is True  # the next sync builds every sender's group anew
