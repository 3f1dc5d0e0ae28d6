"""The colocated order of start, step, checkpoint load and take-over (cluster/workers.py), and the memory plan as
a contract over what each process records it holds (utils/memory_ledger.py, perf/phase_contract.py).

The whole-run check on a fake-GPU Ray cluster is tests/e2e/test_cluster_gpu_sim.py; here the pieces."""

from __future__ import annotations

from types import SimpleNamespace

from luffy_megatron.cluster.workers import Workers
from luffy_megatron.perf.memory_plan import Phase
from luffy_megatron.perf.phase_contract import segments, violations
from luffy_megatron.utils.memory_ledger import MemoryLedger

# ----------------------------------------------------------------------------------- the order on a colocated GPU


class Recorder:
    """Stands in for the engine fleet and the ranks: records every call in one list, in order."""

    def __init__(self, log: list, who: str):
        self.log, self.who = log, who

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.log.append((self.who, name, *args))


def colocated_workers(offload: bool) -> tuple[Workers, list]:
    log: list = []
    actors = Recorder(log, "ranks")
    workers = Workers(SimpleNamespace(mode="colocated"), actors, Recorder(log, "engines"), offload=offload)
    return workers, log


def test_the_ranks_keep_only_their_weights_before_any_engine_starts_and_reload_for_the_first_step():
    workers, log = colocated_workers(offload=False)  # even without actor.offload_during_rollout
    workers.after_build()
    assert log == [("ranks", "offload_to_host")]
    log.clear()
    workers.training_phase()
    assert log == [("engines", "sleep"), ("ranks", "reload_to_device")]  # engines free the GPU first


def test_every_wake_follows_the_ranks_giving_back_their_cache_and_the_kv_cache_waits_for_the_sync():
    for offload, give_back in ((False, "release_cache"), (True, "offload_to_host")):
        workers, log = colocated_workers(offload)
        workers.training_phase()
        log.clear()
        workers.rollout_phase()
        assert log == [("ranks", give_back), ("engines", "wake_up", ["weights"])], offload
        log.clear()
        workers.generation_phase()
        assert log == [("engines", "wake_up", ["kv_cache"])]


def test_a_checkpoint_load_or_rebuild_runs_with_the_engines_asleep_and_the_state_on_the_gpu():
    workers, log = colocated_workers(offload=False)
    workers.after_build()
    log.clear()
    with workers.engines_asleep():
        log.append(("driver", "load_checkpoint"))
    assert log == [
        ("engines", "sleep"),
        ("ranks", "reload_to_device"),
        ("driver", "load_checkpoint"),
        ("ranks", "offload_to_host"),
        ("engines", "wake_up", ["weights"]),
    ]
    assert workers.trainer_on_host  # the next training_phase reloads


def test_disaggregated_and_cpu_layouts_switch_nothing():
    log: list = []
    workers = Workers(SimpleNamespace(mode="disaggregated"), Recorder(log, "ranks"), Recorder(log, "engines"))
    workers.after_build()
    workers.training_phase()
    workers.rollout_phase()
    workers.generation_phase()
    with workers.engines_asleep():
        pass
    assert log == []


# --------------------------------------------------------------------------------------------------- the ledger


def test_a_transition_records_what_was_held_before_and_after_also_when_it_raises():
    held = {"weights", "grads", "moments"}
    ledger = MemoryLedger(lambda: held)
    with ledger.transition("offload_to_host"):
        held.difference_update({"grads", "moments"})
    try:
        with ledger.transition("sync_weights", frozenset({"sync_buckets"})):
            raise RuntimeError("engine died")
    except RuntimeError:
        pass
    first, second = ledger.dump()
    assert (first["event"], first["before"], first["after"]) == (
        "offload_to_host",
        ["grads", "moments", "weights"],
        ["weights"],
    )
    assert first["t0"] <= first["t1"] <= second["t0"]
    assert (second["before"], second["after"]) == (["sync_buckets", "weights"], ["weights"])


# ------------------------------------------------------------------------------------------ the contract checker


def plan_of(*phases: tuple[str, str, dict]):
    out = []
    for name, gpus, terms in phases:
        ph = Phase(name, gpus)
        for key, on_gpu in terms.items():
            ph.add(key, key, 1 if on_gpu else None)
        ph.add("activations", "activations", 1)  # transient terms are not state: never in a ledger
        out.append(ph)
    return SimpleNamespace(phases=out)


PLAN = plan_of(
    ("startup", "all", {"weights": 1, "grads": 0, "engine_weights": 1, "engine_kv": 1}),
    ("update", "all", {"weights": 1, "grads": 1, "moments": 1, "engine_weights": 0}),
)


def rec(event, t0, t1, before, after):
    return {"event": event, "t0": t0, "t1": t1, "before": sorted(before), "after": sorted(after)}


def test_an_engine_started_after_the_rank_gave_back_its_state_keeps_the_contract():
    rank = [
        rec("build", 0, 1, set(), {"weights", "grads", "moments"}),
        rec("offload_to_host", 2, 3, {"weights", "grads", "moments"}, {"weights"}),
    ]
    engine = [rec("start", 4, 5, set(), {"engine_weights", "engine_kv"})]
    gpu = {"gpu0": ("all", segments("rank 0", rank) + segments("engine 0", engine))}
    assert violations(gpu, PLAN) == []


def test_an_engine_that_starts_while_the_rank_holds_its_grads_is_named_with_the_closest_phase():
    rank = [rec("build", 0, 1, set(), {"weights", "grads", "moments"})]
    engine = [rec("start", 2, 5, set(), {"engine_weights", "engine_kv"})]
    rank.append(rec("offload_to_host", 6, 7, {"weights", "grads", "moments"}, {"weights"}))  # too late
    found = violations({"gpu0": ("all", segments("rank 0", rank) + segments("engine 0", engine))}, PLAN)
    assert found and "gpu0 held ['engine_kv', 'engine_weights', 'grads', 'moments', 'weights']" in found[0]
    assert "engine 0: start" in found[0] and "'startup', does not count ['grads', 'moments']" in found[0]


def test_a_gpu_of_a_role_the_plan_does_not_know_is_a_violation():
    seg = segments("rank 0", [rec("build", 0, 1, set(), {"weights"})])
    assert violations({"gpu0": ("trainer", seg)}, PLAN) == ["gpu0: the plan has no phase for 'trainer' GPUs"]


# ------------------------------------------------------------------------------------------- NCCL memory (N11)


def test_gpu_ranks_run_without_nvls_buffers_unless_the_user_asks_for_them():
    from luffy_megatron.cluster.placement import rank_gpu_env

    assert rank_gpu_env({}) == {"NCCL_NVLS_ENABLE": "0"}  # what the memory plan counts
    assert rank_gpu_env({"NCCL_NVLS_ENABLE": "1"}) == {"NCCL_NVLS_ENABLE": "1"}


# ------------------------------------------------------------------------------- colocated without offload (N4)


def test_colocated_gpus_without_offload_are_refused_at_start_with_the_plans_numbers():
    import pytest

    from luffy_megatron.config import ConfigError, load_config
    from luffy_megatron.train.setup import refuse_unsafe_colocation
    from tests.helpers import REPO

    cfg = load_config(REPO / "recipes" / "luffy_main.yaml", ["actor.offload_during_rollout=false"])
    gpus = SimpleNamespace(mode="colocated", uses_gpus=True)
    with pytest.raises(ConfigError, match=r"without actor.offload_during_rollout does not fit: .* GiB per GPU"):
        refuse_unsafe_colocation(cfg, gpus)
    refuse_unsafe_colocation(load_config(REPO / "recipes" / "luffy_main.yaml"), gpus)  # with offload: fits
    refuse_unsafe_colocation(cfg, SimpleNamespace(mode="colocated", uses_gpus=False))  # CPU: nothing to refuse


# ---------------------------------------------------------------------------------------- sleep level 2 (N10)


def test_sleep_level_2_only_after_an_update_that_wrote_every_layer():
    from luffy_megatron.rollout.engine import deep_sleep_refusal

    assert deep_sleep_refusal([[], []], missing=[]) is None
    assert "did not send 1 checkpoint tensor" in deep_sleep_refusal([[], []], missing=["lm_head.weight"])
    assert "engine_direct_load" in deep_sleep_refusal([None, []], missing=[])
    why = deep_sleep_refusal([["model.layers.0.mlp"], []], missing=[])
    assert "1 layer(s)" in why and "model.layers.0.mlp" in why


def test_the_layers_vllms_reload_still_waits_on_with_nothing_received_are_named():
    import torch

    from luffy_megatron.rollout.worker_extension import unsynced_layers

    class Info:
        def __init__(self, loaded, total, layer=None):
            self.load_numel, self.load_numel_total = loaded, total
            self.kernel_tensors = (dict(layer.named_parameters()), {}) if layer is not None else None

        def can_load(self):
            return self.load_numel_total is not None

    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(5)), torch.nn.Module())
    model[5].register_buffer("cos_sin_cache", torch.zeros(4))  # a rotary embedding: buffers only
    tied = model[4]
    tied.weight = model[2].weight  # a tied head: its only weight is a written layer's
    del tied.bias
    infos = {
        model[0]: Info(0, 6, model[0]),  # waits, got nothing: its weights would be lost
        model[1]: Info(4, 6, model[1]),  # got some (padding left): written
        model[2]: Info(0, None),  # done (vLLM resets a layer once it is processed)
        model[3]: Info(0, 6, model[3]),  # attention-like: vLLM re-creates it
        tied: Info(0, 4, tied),
        model[5]: Info(0, 4, model[5]),
    }
    for layer in (model[0], model[1], model[3], tied):  # what vLLM does to a layer it waits on
        for name, _ in list(layer.named_parameters(recurse=False)):
            setattr(layer, name, torch.nn.Parameter(torch.empty(2, 2, device="meta")))
    assert unsynced_layers(model, infos, deferred=lambda m: m is model[3]) == ["0"]
