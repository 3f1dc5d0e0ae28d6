"""The fake Slurm cluster's job query (tests/e2e/slurm_cluster.py) retries a client that died of its round trip, and
raises every other failure at once."""

import subprocess

import pytest

from tests.e2e import slurm_cluster
from tests.e2e.slurm_cluster import FakeSlurmCluster, SlurmSetupError

SHOWN = "JobId=7 JobName=luffy JobState=RUNNING Restarts=0 ExitCode=0:0\n"


def _cluster(tmp_path, monkeypatch, answers: list[tuple[int, str, str]]) -> tuple[FakeSlurmCluster, list]:
    monkeypatch.setattr(slurm_cluster.time, "sleep", lambda s: None)
    cluster, calls = FakeSlurmCluster(tmp_path), []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        rc, out, err = answers[len(calls) - 1]
        return subprocess.CompletedProcess(cmd, rc, out, err)

    monkeypatch.setattr(slurm_cluster.subprocess, "run", fake_run)
    return cluster, calls


def test_a_client_killed_by_sigpipe_is_asked_again(tmp_path, monkeypatch):
    cluster, calls = _cluster(tmp_path, monkeypatch, [(-13, "", ""), (0, SHOWN, "")])
    assert cluster.job("7")["JobState"] == "RUNNING"
    assert len(calls) == 2


def test_a_timed_out_round_trip_is_asked_again(tmp_path, monkeypatch):
    timed_out = (1, "", "slurm_load_jobs error: Socket timed out on send/recv operation\n")
    cluster, calls = _cluster(tmp_path, monkeypatch, [timed_out, timed_out, (0, SHOWN, "")])
    assert cluster.job("7")["ExitCode"] == "0:0"
    assert len(calls) == 3


def test_a_real_error_raises_at_once(tmp_path, monkeypatch):
    cluster, calls = _cluster(tmp_path, monkeypatch, [(1, "", "slurm_load_jobs error: Invalid job id specified\n")])
    with pytest.raises(SlurmSetupError, match="Invalid job id"):
        cluster.job("7")
    assert len(calls) == 1


def test_the_last_try_raises(tmp_path, monkeypatch):
    cluster, calls = _cluster(tmp_path, monkeypatch, [(-13, "", "")] * 3)
    with pytest.raises(SlurmSetupError, match=r"failed \(-13\)"):
        cluster.job("7")
    assert len(calls) == 3
