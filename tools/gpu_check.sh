#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py does the steps; see its docstring).
#   tools/gpu_check.sh --prepare            here, with network: the wheels the GPU machine lacks -> .gpu_wheels/
#   tools/gpu_check.sh                      on the GPU machine (the call carries .gpu_wheels): results in
#                                           docs/gpu_results.md and, with $OUT set, $OUT/gpu_results.{md,json}
#   tools/gpu_check.sh --dry-run --out F    CPU (CI): the same steps on tiny shapes, a skeleton marked DRY RUN
# The python: $PYTHON, else the checkout's .venv, else python3 (on the GPU machine, the one with CUDA torch).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
if [ -z "$py" ]; then
    echo "gpu_check.sh: no python (set PYTHON)" >&2
    exit 2
fi
cd "$repo" || exit 2
exec "$py" "$here/gpu_check.py" "$@"
