"""Weight buckets reach the object store from host memory (GPU-readiness item 9)."""

import torch

from luffy_megatron.rollout import ray_engine
from luffy_megatron.rollout.engine import host_bucket


def test_host_tensors_pass_through_without_a_copy():
    t = torch.arange(6.0).reshape(2, 3)
    out = host_bucket([("a", t)])
    assert out[0][0] == "a" and out[0][1].data_ptr() == t.data_ptr()


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _FakeEngine:
    """Just enough of a VLLMEngineActor handle for `update_weights_from_buckets` (no Ray actor)."""

    def __init__(self):
        self.loaded = []
        self.begin_weight_update = _Remote(lambda: None)
        self.load_weights = _Remote(lambda ref: self.loaded.append(ref))
        self.finish_weight_update = _Remote(lambda partial=False: {"weight_version": 1, "num_tensors": 1})


def test_fleet_moves_each_bucket_to_host_before_ray_put(monkeypatch):
    seen_by_host_bucket, put = [], []

    def spy_host_bucket(bucket):
        seen_by_host_bucket.append(bucket)
        return [(name, t.clone()) for name, t in bucket]  # a distinct host copy we can recognise

    monkeypatch.setattr(ray_engine, "host_bucket", spy_host_bucket)
    monkeypatch.setattr(ray_engine.ray, "put", lambda obj: put.append(obj) or obj)
    monkeypatch.setattr(ray_engine.ray, "get", lambda refs: refs)
    engine = _FakeEngine()
    fleet = ray_engine.EngineFleet([engine], dtype=torch.float32)
    buckets = [[("w", torch.ones(3))], [("v", torch.zeros(2))]]
    fleet.update_weights_from_buckets(iter(buckets))
    assert [b[0][1].data_ptr() for b in seen_by_host_bucket] == [b[0][1].data_ptr() for b in buckets]
    # what went into the object store is what host_bucket returned, never the exporter's tensors
    assert len(put) == 2
    for original, stored in zip(buckets, put):
        assert stored[0][1].data_ptr() != original[0][1].data_ptr()
        assert torch.equal(stored[0][1], original[0][1])
