"""Fixes of megatron-core 0.16.1 behaviour that is wrong on every platform (GPU and CPU).

`apply_mcore_patches` is applied by the actor; `in_process_results_queue` wraps our synchronous checkpoint
saves. Each names the upstream code (file:function, under megatron/core/) it works around. The CPU-only
workarounds are in `megatron_cpu.py`.
"""

from __future__ import annotations

import contextlib
import queue

import torch

_APPLIED = False


def apply_mcore_patches() -> None:
    """Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    _pair_two_stage_shape_exchange()
    _APPLIED = True


def _pair_two_stage_shape_exchange() -> None:
    """Pipeline shape exchange with a pipeline of two stages (interleaved schedule).

    pipeline_parallel/p2p_communication.py:P2PCommunicator._communicate_shapes always posts its shape
    sends/receives as one batch in the order send_prev, recv_prev, send_next, recv_next. With two stages the
    previous and the next rank are the same peer, and sends/receives between a pair of ranks are matched in
    the order they are posted: rank 0's send_prev (a gradient's shape) meets rank 1's recv_prev (an
    activation's shape). The interleaved schedule sends both directions at once, so with
    `variable_seq_lengths` the shapes cross and the schedule then fails or hangs. megatron-core's own
    `_p2p_ops` (same file) orders the same four operations so that they pair up (even/odd ranks, and the
    world group for one direction when the group has two ranks); the shapes go through it here, exactly as
    the tensors do when `batch_p2p_comm` is off.
    """
    from megatron.core.pipeline_parallel import p2p_communication  # lazy: the driver never imports megatron

    original = p2p_communication.P2PCommunicator._communicate_shapes

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        if self.config.use_ring_exchange_p2p or self.pp_group.size() != 2:
            return original(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next)
        device = torch.cuda.current_device()

        def shape_of(t):
            return None if t is None else torch.tensor(t.size(), device=device, dtype=torch.int64)

        recv_prev_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_prev else None
        recv_next_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_next else None
        reqs = p2p_communication._p2p_ops(
            tensor_send_prev=shape_of(tensor_send_prev),
            tensor_recv_prev=recv_prev_shape,
            tensor_send_next=shape_of(tensor_send_next),
            tensor_recv_next=recv_next_shape,
            group=self.pp_group,
            prev_pipeline_rank=self.prev_rank,
            next_pipeline_rank=self.next_rank,
        )
        for req in reqs.values():
            req.wait()
        return (
            recv_prev_shape.tolist() if recv_prev_shape is not None else [0, 0, 0],
            recv_next_shape.tolist() if recv_next_shape is not None else [0, 0, 0],
        )

    p2p_communication.P2PCommunicator._communicate_shapes = _communicate_shapes


@contextlib.contextmanager
def in_process_results_queue():
    """The torch_dist checkpoint writer collects write results through a queue made by
    `mp.get_context("spawn").Manager()` (dist_checkpointing/strategies/filesystem_async.py:
    _get_write_results_queue, kept in the module global `_results_queue`): the first save of a process starts
    a manager process that re-imports `__main__` (seconds, and a trap for scripts without a main guard). A
    synchronous save puts and gets that queue in the calling process, so a plain queue.Queue serves; it is
    swapped in only for the duration of our (sync) save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async  # lazy: as above

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous
