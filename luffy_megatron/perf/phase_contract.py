"""The memory plan as a contract: what every GPU held at every transition of a run must be a phase the plan
counts.

Each rank and engine records its transitions (`utils.memory_ledger`): what it held on its GPU before and after
each build, offload, reload, engine start, sleep, wake, checkpoint load or save and weight sync. Here the
records of the processes that share a GPU are laid on one time line: during a transition a process holds the
union of before and after, between two transitions what the first left. At every instant where something
changes, the union over the processes of that GPU must be a subset of the on-GPU state terms of one phase of
the plan (`perf.memory_plan.Plan.phases`) for that GPU's role ("all" on a colocated layout, "trainer" or
"rollout" on a disaggregated one). A violation names the GPU, the instant's transition, what was held and
the phase that came closest, so an engine that starts or wakes while a rank still holds what the plan says it
must not is caught on CPU, before it is an out-of-memory error on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from luffy_megatron.perf.memory_plan import on_gpu_state_keys


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    holds: frozenset
    what: str  # "rank 0: offload_to_host" (during) or "rank 0: after offload_to_host"


def segments(who: str, records: list[dict]) -> list[Segment]:
    """One process's time line: each transition's span with before | after, then what it left until the next."""
    out: list[Segment] = []
    records = sorted(records, key=lambda r: r["t0"])
    for i, r in enumerate(records):
        before, after = frozenset(r["before"]), frozenset(r["after"])
        out.append(Segment(r["t0"], r["t1"], before | after, f"{who}: {r['event']}"))
        end = records[i + 1]["t0"] if i + 1 < len(records) else float("inf")
        out.append(Segment(r["t1"], end, after, f"{who}: after {r['event']}"))
    return out


def plan_state_sets(plan, role: str) -> dict[str, frozenset]:
    """Each phase of `plan` on GPUs of `role`: the state terms it counts on the GPU."""
    return {ph.name: on_gpu_state_keys(ph) for ph in plan.phases if ph.gpus == role}


def violations(gpus: dict[str, tuple[str, list[Segment]]], plan) -> list[str]:
    """`gpus`: GPU name -> (its role, the segments of every process on it). Returns one line per instant where
    a GPU held a set of state terms that no phase of its role counts (empty: the run kept the contract)."""
    found: list[str] = []
    for gpu, (role, segs) in sorted(gpus.items()):
        phases = plan_state_sets(plan, role)
        if not phases:
            found.append(f"{gpu}: the plan has no phase for {role!r} GPUs")
            continue
        for x in sorted({s.start for s in segs} | {s.end for s in segs if s.end != float("inf")}):
            live = [s for s in segs if s.start <= x <= s.end]
            held = frozenset().union(*(s.holds for s in live))
            if any(held <= allowed for allowed in phases.values()):
                continue
            name, allowed = min(phases.items(), key=lambda kv: len(held - kv[1]))
            during = "; ".join(sorted({s.what for s in live if s.holds}))
            found.append(
                f"{gpu} held {sorted(held)} ({during}): no phase of the plan counts that; the closest, "
                f"{name!r}, does not count {sorted(held - allowed)}"
            )
    return found


def run_timelines(workers) -> dict[str, tuple[str, list[Segment]]]:
    """The time line of every GPU of a running job (`cluster.Workers`): its ranks' and engines' ledgers, each
    GPU named by its node and CUDA_VISIBLE_DEVICES as Ray set them. A colocated engine shares the GPUs of the
    ranks of its layout slot; a disaggregated engine's GPUs hold nothing else, so they are one entry."""
    colocated = workers.placement.mode == "colocated"
    infos = workers.actors.infos()

    def gpu_of(rank: int) -> str:
        return f"node {infos[rank]['node_ip']} GPU {infos[rank]['cuda_visible_devices']}"

    gpus: dict[str, tuple[str, list[Segment]]] = {}
    for rank, records in enumerate(workers.actors.memory_ledgers()):
        gpus.setdefault(gpu_of(rank), ("all" if colocated else "trainer", []))[1].extend(
            segments(f"rank {rank}", records)
        )
    slots = workers.placement.layout.engines
    for e, records in enumerate(workers.fleet.memory_ledgers()):
        names = [gpu_of(r) for r in slots[e].ranks] if colocated else [f"the rollout GPUs of engine {e}"]
        for name in names:
            gpus.setdefault(name, ("all" if colocated else "rollout", []))[1].extend(segments(f"engine {e}", records))
    return gpus
