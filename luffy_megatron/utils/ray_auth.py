"""Ray token authentication for a Ray cluster that this process starts itself (`ray.init(address="local")`).

Ray turns token authentication on for a new local cluster unless RAY_AUTH_MODE says otherwise. It takes the
token from RAY_AUTH_TOKEN, else from the file that RAY_AUTH_TOKEN_PATH names, else from ~/.ray/auth_token, and
when it finds none it writes a new one to ~/.ray/auth_token. Every later Ray process of the user then presents
that file's token, and `ray start --address` workers of a cluster started with another token fail with
InvalidAuthToken. So a run that starts its own cluster gets a token of its own instead, in this process's
environment: the GCS, raylets and workers that Ray starts inherit it, and nothing is written to disk. A cluster
to join (RAY_ADDRESS, as the Slurm launcher sets it) comes with its own token (slurm/common.sh).
"""

from __future__ import annotations

import os
import secrets

TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def private_token_for_local_cluster(address: str) -> None:
    """Call before `ray.init(address=address)`. When `address` is "local" (a new cluster), token auth is not
    turned off (RAY_AUTH_MODE unset or "token") and no token is given (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), sets
    RAY_AUTH_TOKEN to a new random token. RAY_AUTH_MODE is left alone: Ray reads it once, when it is imported,
    and turns token auth on by itself for a new local cluster when the variable is unset."""
    if address != "local" or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if any(os.environ.get(name) for name in TOKEN_SOURCES):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
