"""`cluster.cpu_cores`: the cores each vLLM-CPU engine of a fleet binds its worker threads to."""

from __future__ import annotations

import pytest

from luffy_megatron.cluster.cpu_cores import engine_cores, omp_bind_value


def test_engines_of_a_fleet_get_cores_of_their_own():
    # the CI machine: 2 cores. Alone an engine gets what vLLM's auto gives (all but one core); two get one each
    assert engine_cores(0, 1, [0, 1]) == [0]
    assert [engine_cores(i, 2, [0, 1]) for i in range(2)] == [[0], [1]]
    # 16 cores, 1 / 2 / 4 engines: disjoint runs, one core per engine left over for vLLM's engine-core processes
    assert engine_cores(0, 1, range(16)) == list(range(15))
    two = [engine_cores(i, 2, range(16)) for i in range(2)]
    assert two == [list(range(0, 7)), list(range(7, 14))]
    four = [engine_cores(i, 4, range(16)) for i in range(4)]
    assert [len(c) for c in four] == [3] * 4 and len({c for cs in four for c in cs}) == 12


def test_more_engines_than_cores_wrap_around_and_affinity_order_does_not_matter():
    assert [engine_cores(i, 3, [5, 3]) for i in range(3)] == [[3], [5], [3]]
    assert engine_cores(1, 2, [9, 8, 7, 6, 5, 4]) == [6, 7]


def test_bad_slots_are_refused():
    with pytest.raises(ValueError, match="engine index 2 of 2"):
        engine_cores(2, 2, [0, 1])
    with pytest.raises(ValueError, match="no CPUs"):
        engine_cores(0, 1, [])


def test_bind_value_is_what_vllm_parses():
    from vllm.utils.cpu_resource_utils import parse_id_list

    for cores in ([0], [1], [0, 1, 2, 3], [3, 4, 6, 8, 9, 10], [15, 0, 1]):
        value = omp_bind_value(cores)
        assert parse_id_list(value) == sorted(cores), value
    assert omp_bind_value([0, 1, 2, 3]) == "0-3" and omp_bind_value([3, 4, 6]) == "3-4,6"
