"""The sync's per-actor bucket plan cache and the first bucket filled ahead (`sync/base.py`)."""

from __future__ import annotations

import pytest
import torch

from luffy_megatron.sync import base
from luffy_megatron.sync.base import FilledAhead, _cached_plan


class _Actor:
    pass


def test_the_plan_is_made_again_only_when_the_parameters_or_settings_change(monkeypatch):
    made = []
    monkeypatch.setattr(base, "plan_flat_buckets", lambda chunks, **kw: made.append(kw) or [object()])
    actor, chunks, arch = _Actor(), [torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)], object()
    first = _cached_plan(actor, chunks, arch, 1024, torch.float32)
    assert _cached_plan(actor, chunks, arch, 1024, torch.float32) is first and len(made) == 1
    with torch.no_grad():
        chunks[0].weight.add_(1.0)  # an optimizer step: in place, the plan's views see it
    assert _cached_plan(actor, chunks, arch, 1024, torch.float32) is first and len(made) == 1
    assert made[0] == {"arch": arch, "bucket_bytes": 1024, "dtype": torch.float32, "all_stages": False}
    settings = {"bucket_bytes": 1024, "dtype": torch.float32}
    for change in (
        lambda: settings.update(bucket_bytes=2048),
        lambda: settings.update(dtype=torch.bfloat16),
        lambda: setattr(chunks[1].weight, "data", chunks[1].weight.data.clone()),  # new storage
        lambda: chunks.append(torch.nn.Linear(2, 2)),
    ):
        before = len(made)
        change()
        plan = _cached_plan(actor, chunks, arch, settings["bucket_bytes"], settings["dtype"])
        assert len(made) == before + 1 and made[-1]["bucket_bytes"] == settings["bucket_bytes"]
        assert _cached_plan(actor, chunks, arch, settings["bucket_bytes"], settings["dtype"]) is plan
    other = _Actor()  # the plan lives on its actor: another actor plans for itself
    _cached_plan(other, chunks, arch, 2048, torch.bfloat16)
    assert len(made) == 6 and other._luffy_sync_plan[1] is not actor._luffy_sync_plan[1]


def test_filled_ahead_produces_the_first_item_at_once_and_defers_its_error():
    produced = []

    def gen(fail):
        produced.append(0)
        if fail:
            raise RuntimeError("export failed")
        yield 0
        produced.append(1)
        yield 1

    ahead = FilledAhead(gen(False))
    assert produced == [0]  # the first bucket is filled before anyone asks for it
    assert list(ahead) == [0, 1] and produced == [0, 1]
    failing = FilledAhead(gen(True))  # no error yet: it belongs to whoever iterates
    with pytest.raises(RuntimeError, match="export failed"):
        next(failing)
    assert list(FilledAhead(iter([]))) == []
