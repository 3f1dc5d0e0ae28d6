"""A Ray cluster the run starts itself gets token auth with a token of the run's own, in the environment (so
Ray writes nothing to ~/.ray); a cluster to join, a token given, or auth turned off by the user are left alone."""

import os

import pytest

from luffy_megatron.utils.ray_auth import private_token_for_local_cluster


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("mode", [None, "token", "TOKEN"])
def test_a_new_local_cluster_gets_a_fresh_token(clean_env, mode):
    if mode:
        clean_env.setenv("RAY_AUTH_MODE", mode)
    private_token_for_local_cluster("local")
    first = os.environ["RAY_AUTH_TOKEN"]
    assert len(first) == 64 and int(first, 16) >= 0
    assert os.environ.get("RAY_AUTH_MODE") == mode  # left to Ray, which reads it when imported
    clean_env.delenv("RAY_AUTH_TOKEN")
    private_token_for_local_cluster("local")
    assert os.environ["RAY_AUTH_TOKEN"] != first


@pytest.mark.parametrize(
    "address, env",
    [
        ("127.0.1.1:6379", {}),  # a cluster to join brings its token
        ("local", {"RAY_AUTH_TOKEN": "given"}),
        ("local", {"RAY_AUTH_TOKEN_PATH": "/some/file"}),
        ("local", {"RAY_AUTH_MODE": "disabled"}),  # the user's explicit choice
    ],
)
def test_left_alone(clean_env, address, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    private_token_for_local_cluster(address)
    assert {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")} == {
        "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE"),
        "RAY_AUTH_TOKEN": env.get("RAY_AUTH_TOKEN"),
        "RAY_AUTH_TOKEN_PATH": env.get("RAY_AUTH_TOKEN_PATH"),
    }
