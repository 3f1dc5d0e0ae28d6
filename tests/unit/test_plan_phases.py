"""tools/plan.py's phases follow the run's order on the GPUs (build, startup, resume; each step sync, generate,
log-probs, update), the weight-sync slots are 2 x max(bucket, largest tensor) and stay from the first sync on,
the trainer's NCCL communicators are megatron-core's groups, a colocated layout that does not fit without
offload is refused with the plan's numbers, and a disaggregated plan prints the one-step-off overlap estimate."""

import pytest

from luffy_megatron.config import load_config
from luffy_megatron.perf.memory_plan import (
    GIB,
    STATE_KEYS,
    Assumptions,
    StepTimes,
    colocated_offload_problem,
    make_plan,
    on_gpu_state_keys,
    one_step_off_estimate,
)
from luffy_megatron.perf.report import format_plan
from luffy_megatron.perf.runtime_memory import (
    CUDA_CONTEXT_GIB,
    NCCL_IDLE_COMM_GIB,
    NCCL_NVLS_COMM_GIB,
    NCCL_USED_COMM_GIB,
    trainer_communicators,
)
from tests.helpers import REPO
from tools.plan import main as plan_main

MAIN = str(REPO / "recipes/luffy_main.yaml")
TRAINER = {"weights", "grads", "main_params", "moments"}


def keys(plan, name, gpus=None):
    return on_gpu_state_keys(plan.phase(name, gpus))


def test_colocated_phases_follow_the_runs_order():
    """Ranks built with nothing else; engines start beside the offloaded ranks; resume loads with the engines
    asleep; each step syncs into engines woken with their weights only, then generates with the KV cache; the
    trainer's state is back only while the engines sleep. The sync slots stay from the first sync on."""
    plan = make_plan(load_config(MAIN))
    assert [(ph.name, ph.gpus) for ph in plan.phases] == [
        (n, "all") for n in ("build", "startup", "resume", "sync", "generate", "log-probs", "update")
    ]
    assert keys(plan, "build") == TRAINER
    assert keys(plan, "startup") == {"weights", "engine_weights", "engine_kv"}
    assert keys(plan, "resume") == TRAINER | {"sync_buckets"}
    assert keys(plan, "sync") == {"weights", "sync_buckets", "engine_weights"}
    assert keys(plan, "generate") == {"weights", "sync_buckets", "engine_weights", "engine_kv"}
    for name in ("log-probs", "update"):
        assert keys(plan, name) == TRAINER | {"sync_buckets"}
        assert plan.phase(name).get("engine_process") > 0  # the asleep engine's process stays
    sync, gen = plan.phase("sync"), plan.phase("generate")
    assert gen.total - sync.total == gen.get("engine_kv") + gen.get("engine_activations")
    # a plan whose every phase fits the GPU is what the run needs: the fullest is generate, not the sync
    assert max(plan.phases, key=lambda ph: ph.total).name == "generate"


def test_state_keys_are_the_terms_the_order_decides():
    plan = make_plan(load_config(MAIN, ["algo.use_kl_loss=true", "algo.kl_loss_coef=0.001"]))
    every = {t.key for ph in plan.phases for t in ph.terms}
    assert STATE_KEYS - {"engine_sync_buckets"} <= every
    assert keys(plan, "update") == TRAINER | {"ref_weights", "sync_buckets"}
    assert "ref_weights" not in keys(plan, "generate")  # offloaded with the optimizer
    assert on_gpu_state_keys(plan.phase("update")) <= STATE_KEYS


def test_without_offload_the_trainer_keeps_its_state_beside_the_engines():
    plan = make_plan(load_config(MAIN, ["actor.offload_during_rollout=false"]))
    for name in ("startup", "sync", "generate"):
        assert TRAINER <= keys(plan, name)


def test_disaggregated_phases_per_role():
    cfg = load_config(
        MAIN,
        ["cluster.layout=disaggregated", "actor.offload_during_rollout=false", "parallel.nnodes=6"]
        + ["cluster.rollout_nnodes=2"],
    )
    plan = make_plan(cfg)
    assert [(ph.name, ph.gpus) for ph in plan.phases] == [
        ("startup", "trainer"),
        ("resume", "trainer"),
        ("log-probs", "trainer"),
        ("update", "trainer"),
        ("startup", "rollout"),
        ("resume", "rollout"),
        ("sync", "rollout"),
        ("generate", "rollout"),
    ]
    assert keys(plan, "startup", "trainer") == TRAINER
    assert keys(plan, "update", "trainer") == TRAINER | {"sync_buckets"}  # the collective sender's two slots
    assert keys(plan, "startup", "rollout") == {"engine_weights", "engine_kv"}
    assert keys(plan, "sync", "rollout") == {"engine_weights", "engine_kv", "engine_sync_buckets"}
    slot = 152064 * 3584 * 2
    assert plan.phase("sync", "rollout").get("engine_sync_buckets") == 2 * slot
    assert plan.phase("update", "trainer").get("sync_buckets") == 2 * slot
    assert "memory per trainer GPU" in format_plan(plan) and "memory per rollout GPU" in format_plan(plan)


@pytest.mark.parametrize(
    "recipe, hidden",
    [
        ("recipes/luffy_main.yaml", 3584),
        ("recipes/luffy_14b_16node.yaml", 5120),
        ("recipes/luffy_32b_16node.yaml", 5120),
    ],
)
def test_sync_slots_are_the_largest_tensor_not_the_bucket(recipe, hidden):
    """The export gives a tensor larger than the bucket a bucket of its own (the embedding and the LM head,
    HF vocabulary x hidden in bf16); the CUDA IPC transport keeps two slots of that size on every trainer GPU."""
    plan = make_plan(load_config(str(REPO / recipe)))
    slot = 152064 * hidden * 2
    assert slot > 512 * 2**20 and plan.sync.slot == slot
    assert plan.phase("generate").get("sync_buckets") == 2 * slot
    bigger = make_plan(load_config(str(REPO / recipe), ["rollout.weight_sync_bucket_mb=4096"]))
    assert bigger.phase("generate").get("sync_buckets") == 2 * 4096 * 2**20


def test_sync_buffers_of_each_transport():
    slot = 152064 * 3584 * 2
    collective = make_plan(load_config(MAIN, ["rollout.weight_sync_transport=collective"]))
    for name in ("resume", "sync", "generate", "log-probs", "update"):  # the receive pair lives in the engine
        assert collective.phase(name).get("engine_sync_buckets") == 2 * slot
        assert collective.phase(name).get("sync_buckets") == 2 * slot
    assert "engine_sync_buckets" not in {t.key for t in collective.phase("startup").terms}
    store = make_plan(load_config(MAIN, ["rollout.weight_sync_transport=object_store"]))
    assert store.phase("generate").get("sync_buckets") == slot


def test_cuda_graphs_are_in_the_reservation_and_go_to_host_with_the_engine():
    graphs = make_plan(load_config(MAIN, ["rollout.enforce_eager=false"]))
    eager = make_plan(load_config(MAIN, ["rollout.enforce_eager=true"]))
    assert graphs.phase("generate").get("engine_cuda_graphs") == GIB
    assert graphs.phase("sync").get("engine_cuda_graphs") == GIB  # vLLM restores them with the weights
    assert graphs.phase("update").get("engine_cuda_graphs") is None
    assert "engine_cuda_graphs" not in {t.key for ph in eager.phases for t in ph.terms}
    assert graphs.phase("generate").total == eager.phase("generate").total  # the KV cache gives it up
    assert eager.engine.kv - graphs.engine.kv == GIB


# ----- the trainer's NCCL communicators ---------------------------------------------------------------------------


@pytest.mark.parametrize("tp, pp, cp, dp", [(2, 1, 1, 32), (4, 2, 1, 4), (2, 2, 2, 2), (8, 1, 1, 16)])
def test_communicators_are_megatrons_groups_of_rank_0(tp, pp, cp, dp):
    """The ranks of each group rank 0 is in, as megatron-core 0.16's own rank generators make them (dense model:
    expert parallel 1, expert tensor parallel = TP)."""
    from megatron.core.parallel_state import RankGenerator

    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=tp, ep=1, dp=dp * cp, pp=pp, cp=1, order="tp-ep-dp-pp")
    want = {
        "data parallel with CP": dense.get_ranks("dp-cp"),
        "data parallel": dense.get_ranks("dp"),
        "context parallel": dense.get_ranks("cp"),
        "model parallel (TP x PP)": dense.get_ranks("tp-pp"),
        "tensor parallel": dense.get_ranks("tp"),
        "pipeline parallel": dense.get_ranks("pp"),
        "TP x DP x CP": dense.get_ranks("tp-dp-cp"),
        "TP x DP": dense.get_ranks("tp-dp"),
        "TP x CP": dense.get_ranks("tp-cp"),
        "expert tensor parallel": expert.get_ranks("tp"),
        "expert TP x EP": expert.get_ranks("tp-ep"),
        "expert TP x EP x PP": expert.get_ranks("tp-ep-pp"),
        "expert data parallel": expert.get_ranks("dp"),
    }
    want = {name: next(g for g in groups if 0 in g) for name, groups in want.items()}
    comms = trainer_communicators(
        tp=tp,
        pp=pp,
        cp=cp,
        dp=dp,
        gpus_per_node=8,
        distributed_optimizer=True,
        tied_embeddings=False,
        transport="shared_memory",
        colocated=True,
        engine_tp=tp,
        engine_workers=tp * pp * cp * dp,
    )
    got = {c.name: sorted(c.ranks) for c in comms if c.ranks}
    assert got.pop("world") == list(range(tp * pp * cp * dp))
    if pp > 1:
        assert got.pop("embedding (first + last stage)") == [0, (pp - 1) * tp * cp * dp]
    assert got == {name: sorted(ranks) for name, ranks in want.items() if len(ranks) > 1}
    ipc = [c for c in comms if not c.ranks]
    assert [(c.size, c.used) for c in ipc] == ([(tp, True)] if tp > 1 else [])


def test_trainer_process_counts_each_communicator():
    plan = make_plan(load_config(MAIN))
    used = [c for c in plan.comms if c.used]
    idle = [c for c in plan.comms if not c.used]
    # TP=2 DP=32 with the distributed optimizer: data parallel (with and without CP), TP, world, the IPC group
    assert len(used) == 5 and len(idle) == 8
    want = CUDA_CONTEXT_GIB + len(used) * NCCL_USED_COMM_GIB + len(idle) * NCCL_IDLE_COMM_GIB
    assert plan.phase("update").get("trainer_process") == int(want * GIB)
    nvls = make_plan(load_config(MAIN), Assumptions(nccl_nvls=True))
    extra = nvls.phase("update").get("trainer_process") - plan.phase("update").get("trainer_process")
    assert extra == pytest.approx(len(used) * NCCL_NVLS_COMM_GIB * GIB, abs=1)
    text = " ".join(format_plan(plan).split())
    assert "assumes NCCL_NVLS_ENABLE=0 on the trainer ranks" in text
    assert not nvls.fits  # the recipes fit only without NVLS buffers


# ----- colocated without offload ------------------------------------------------------------------------------------


def test_colocated_without_offload_is_refused_with_the_plans_numbers():
    kept = load_config(MAIN, ["actor.offload_during_rollout=false"])
    text = colocated_offload_problem(kept, "colocated")
    plan = make_plan(kept)
    fullest = max(plan.phases, key=lambda ph: ph.total)
    assert text.startswith("cluster.layout=colocated on GPUs without actor.offload_during_rollout does not fit: ")
    assert f"{fullest.name} needs {fullest.total / GIB:.1f} GiB per GPU" in text
    offloaded = make_plan(load_config(MAIN))
    assert (
        "with actor.offload_during_rollout=true the fullest phase is generate at "
        f"{offloaded.phase('generate').total / GIB:.1f} GiB: set it" in text
    )

    class Layout:  # cluster.layout.ClusterLayout's mode
        mode = "colocated"

    assert colocated_offload_problem(kept, Layout()) == text
    assert colocated_offload_problem(load_config(MAIN), "colocated") is None  # offload on
    assert colocated_offload_problem(kept, "disaggregated") is None
    assert colocated_offload_problem(kept, "cpu") is None
    # small enough to fit without offload
    assert colocated_offload_problem(kept, "colocated", Assumptions(gpu_memory_gib=141.0)) is None


# ----- the fake-GPU cluster test's tiny model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        ["cluster.layout=colocated", "actor.offload_during_rollout=true"],
        ["cluster.layout=disaggregated", "parallel.nnodes=1", "cluster.rollout_nnodes=1"],
    ],
)
def test_plan_of_the_fake_gpu_clusters_tiny_model(layout, tmp_path):
    """tests/e2e/test_cluster_gpu_sim.py's job: a 2-layer Llama, TP=2, 2 nodes x 2 GPUs."""
    from tests.e2e.test_cluster_gpu_sim import job_config
    from tests.e2e.tiny_run import tiny_llama_dir

    tiny = (tiny_llama_dir(), tmp_path / "data")
    cfg = job_config(tiny, tmp_path / "out", "parallel.nnodes=2", "parallel.n_gpus_per_node=2", *layout)
    plan = make_plan(cfg)
    assert plan.fits
    roles = {ph.gpus for ph in plan.phases}
    assert roles == ({"all"} if "cluster.layout=colocated" in layout else {"trainer", "rollout"})
    for ph in plan.phases:
        assert on_gpu_state_keys(ph) <= STATE_KEYS
    # the tiny model's largest tensor is far below the 16 MiB bucket
    assert plan.sync.slot == 16 * 2**20


# ----- the one-step-off overlap estimate (trainer.overlap=one_step) --------------------------------------------


def plan_cli(capsys, *args) -> tuple[int, str]:
    code = plan_main([str(MAIN), *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(
    "nodes, rollout_nodes, extra",
    [
        (6, 2, []),  # generation-bound
        (1, 7, []),  # trainer-bound: log-probs + update on 8 GPUs take longer than generation on 56
        (4, 4, ["algo.use_kl_loss=true", "algo.kl_loss_coef=0.001"]),  # the reference's log-probs are the trainer's
    ],
)
def test_disaggregated_plan_prints_the_one_step_off_step_beside_the_sequential_one(nodes, rollout_nodes, extra, capsys):
    """The engines generate batch k+1 while the trainer computes log-probs and update k: the steady-state step is
    max(generation, log-probs + update) (the plan estimates no sync time, so none is added), never more than the
    sequential step, and printed under it with the speed-up."""
    sets = ["cluster.layout=disaggregated", f"cluster.rollout_nnodes={rollout_nodes}"]
    sets += ["actor.offload_during_rollout=false", *extra]
    plan = make_plan(load_config(MAIN, [f"parallel.nnodes={nodes}", *sets]))
    t, ov = plan.times_s, plan.overlap
    trainer = t.old_log_probs + t.ref_log_probs + t.update
    assert (t.ref_log_probs > 0) == bool(extra)
    assert ov.step == pytest.approx(max(t.generation, trainer))
    assert ov.sync is None and ov.sequential == pytest.approx(t.generation + trainer) == pytest.approx(t.step)
    assert ov.step <= t.step and ov.speedup == pytest.approx(t.step / ov.step) and ov.speedup > 1
    bound = "generation" if t.generation >= trainer else "trainer"
    assert bound == {2: "generation", 7: "trainer", 4: "generation"}[rollout_nodes]

    code, out = plan_cli(capsys, "--nodes", str(nodes), *(a for s in sets for a in ("--set", s)))
    assert code == 0
    lines = out.splitlines()
    step = next(i for i, line in enumerate(lines) if line.startswith("  step "))
    assert lines[step].endswith(f"{t.step:.1f} s")
    overlapped = lines[step + 1]
    assert overlapped.startswith("  overlapped     one step off: max(generation, log-probs + update)")
    assert overlapped.endswith(f"{ov.step:.1f} s") and len(overlapped) == len(lines[step])
    text = " ".join(out.split())
    assert (
        f"overlap estimate for the one-step-off-policy mode (trainer.overlap=one_step): "
        f"the engines generate batch k+1 with "
        f"the weights before update k while the trainer computes the log-probs and update of batch k, so a "
        f"steady-state step is max(generation {t.generation:.1f} s, log-probs + update {trainer:.1f} s) = "
        f"{ov.step:.1f} s, {t.step / ov.step:.2f}x the speed of the sequential {t.step:.1f} s; the weight sync and "
        "reward grading are counted in neither" in text
    )
    assert "needs cluster.layout=disaggregated" not in text


def test_one_step_off_estimate_adds_the_sync_to_both_steps_and_is_none_when_colocated():
    times = StepTimes(generation=50.0, old_log_probs=5.0, ref_log_probs=5.0, update=30.0)
    assert one_step_off_estimate("colocated", times) is None
    ov = one_step_off_estimate("disaggregated", times, sync_s=4.0)
    assert (ov.step, ov.sequential) == (50.0 + 4.0, 90.0 + 4.0)
    assert ov.speedup == pytest.approx(94.0 / 54.0)
    slow_trainer = StepTimes(generation=20.0, old_log_probs=10.0, ref_log_probs=0.0, update=30.0)
    assert one_step_off_estimate("disaggregated", slow_trainer).step == 40.0
    assert one_step_off_estimate("disaggregated", StepTimes(0.0, 0.0, 0.0, 0.0)).speedup == 1.0


def test_colocated_plan_says_the_overlap_needs_a_disaggregated_layout(capsys):
    plan = make_plan(load_config(MAIN, ["parallel.nnodes=8"]))
    assert plan.layout.mode == "colocated" and plan.overlap is None
    code, out = plan_cli(capsys, "--nodes", "8")
    assert code == 0
    assert "  overlapped " not in out
    overlap = [line for line in out.splitlines() if line.startswith("overlap ")]
    assert len(overlap) == 1
    assert (
        "overlap the one-step-off-policy overlap (trainer.overlap=one_step) needs "
        "cluster.layout=disaggregated: colocated "
        "engines and trainer share the GPUs and cannot run at once, so the step above is sequential"
        in " ".join(out.split())
    )
