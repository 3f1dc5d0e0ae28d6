"""The Slurm launchers agree with their recipes and with each other (no Slurm needed; the real runs are in
tests/e2e/test_slurm.py): the #SBATCH header asks for what the recipe runs on, and the launchers differ only
in their header (the logic is slurm/common.sh)."""

import re
import subprocess
from pathlib import Path

import pytest

from luffy_megatron.config import load_config
from tests.helpers import REPO

LAUNCHERS = {"luffy_7b_8node.sh": 8, "luffy_32b_16node.sh": 16}


def _header(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))


def _default(path: Path, knob: str) -> str:
    return re.search(rf"^export {knob}=\${{{knob}:-([^}}]*)}}", path.read_text(), re.M).group(1)


@pytest.mark.parametrize("name,nodes", LAUNCHERS.items())
def test_header_and_recipe_agree(name, nodes):
    path = REPO / "slurm" / name
    h = _header(path)
    assert h["nodes"] == str(nodes) and h["gpus-per-node"] == "8" and h["ntasks-per-node"] == "1"
    assert "exclusive" in h and "requeue" in h
    seconds = int(re.fullmatch(r"B:USR1@(\d+)", h["signal"]).group(1))  # to the batch shell, which forwards it
    assert 300 <= seconds < 3600
    assert _default(path, "NNODES") == str(nodes)
    cfg = load_config(REPO / _default(path, "RECIPE"), [])
    assert cfg.parallel.nnodes == nodes and cfg.parallel.n_gpus_per_node == 8
    assert cfg.trainer.resume == "auto"  # the requeued run must resume
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_the_launchers_differ_only_in_their_header():
    bodies = []
    for name in LAUNCHERS:
        text = (REPO / "slurm" / name).read_text()
        bodies.append(text[text.index("# Slurm runs a copy of this file") :])
    assert bodies[0] == bodies[1]
    assert 'source "$LUFFY_HOME/slurm/common.sh"' in bodies[0]
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "common.sh")]).returncode == 0


def test_overrides_reach_luffy_train_as_written_even_when_a_file_matches_them_as_a_glob(tmp_path):
    """OVERRIDES is split on blanks only: `data.train_files=[a,b]` is a bracket glob that matches the file
    `data.train_files=a`, which an unquoted `for kv in $OVERRIDES` would put in its place."""
    (tmp_path / "data.train_files=a").write_text("")
    script = (
        f'source "{REPO / "slurm" / "common.sh"}"\n'
        'OVERRIDES="data.train_files=[a,b]  trainer.total_epochs=1" OUTPUT_DIR=/out\n'
        "luffy_override_args\n"
        'printf "%s\\n" "${SETS[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "--set",
        "data.train_files=[a,b]",
        "--set",
        "trainer.total_epochs=1",
        "--set",
        "trainer.output_dir=/out",
    ]
    empty_script = script.replace(
        'OVERRIDES="data.train_files=[a,b]  trainer.total_epochs=1" OUTPUT_DIR=/out', 'OVERRIDES="" OUTPUT_DIR='
    )
    empty = subprocess.run(["bash", "-c", empty_script], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert empty.returncode == 0 and empty.stdout.strip() == "", empty.stderr


def test_each_run_gets_a_private_ray_token_that_is_never_printed(tmp_path):
    """make_ray_token: 32 random bytes as hex in a file of mode 0600, in a new directory of mode 0700 under
    RAY_TOKEN_DIR (default OUTPUT_DIR), named by RAY_AUTH_TOKEN_PATH with RAY_AUTH_MODE=token; a RAY_AUTH_TOKEN
    inherited from the submitting shell is dropped; remove_ray_token deletes the directory, and make_ray_token
    the directories an earlier, killed run of the same job left (not another job's)."""
    for stale in ("out/.ray-auth-7.OLDrun", "out/.ray-auth-71.other"):
        (tmp_path / "job" / stale).mkdir(parents=True)
    script = (
        f'source "{REPO / "slurm" / "common.sh"}"\n'
        "SLURM_JOB_ID=7 OUTPUT_DIR=out RAY_TOKEN_DIR= RAY_TOKEN_HOME= RAY_AUTH_MODE=disabled RAY_AUTH_TOKEN=inherited\n"
        "make_ray_token\n"
        'echo "mode=$RAY_AUTH_MODE path=$RAY_AUTH_TOKEN_PATH token=${RAY_AUTH_TOKEN-unset}"\n'
        'stat -c "%a" "$RAY_TOKEN_HOME" "$RAY_AUTH_TOKEN_PATH"\n'
        'cp "$RAY_AUTH_TOKEN_PATH" ../copy; first=$RAY_TOKEN_HOME\n'
        'remove_ray_token; make_ray_token; [ -e "$first" ] || echo "first removed"\n'
        'cmp -s "$RAY_AUTH_TOKEN_PATH" ../copy || echo "second differs"\n'
    )
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path / "job", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    token = (tmp_path / "copy").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token), token
    assert token not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    path = re.fullmatch(r"mode=token path=(\S+) token=unset", lines[0]).group(1)
    assert re.fullmatch(rf"{tmp_path}/job/out/\.ray-auth-7\.\w+/token", path), path  # absolute, under OUTPUT_DIR
    assert lines[1:] == ["700", "600", "first removed", "second differs"]
    left = sorted(p.name for p in (tmp_path / "job" / "out").glob(".ray-auth-*"))
    assert len(left) == 2 and ".ray-auth-71.other" in left and ".ray-auth-7.OLDrun" not in left, left
