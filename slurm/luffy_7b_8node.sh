#!/bin/bash
# LUFFY main run, Qwen2.5-Math-7B on 8 nodes x 8 GPUs:
#   sbatch slurm/luffy_7b_8node.sh
#   OVERRIDES="trainer.total_epochs=1 logging.experiment_name=try" sbatch slurm/luffy_7b_8node.sh
#   NNODES=2 RECIPE=recipes/my.yaml sbatch --nodes=2 slurm/luffy_7b_8node.sh
# What the job does, its log, preemption and exit codes: slurm/common.sh. Submit from the repository root
# (or set LUFFY_HOME). Preemption: the 900 s between SIGUSR1 and the time limit must cover the rest of one
# training step plus a checkpoint; raise @900 if steps are slower.
#SBATCH --job-name=luffy-7b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out

# Knobs (environment variables; sbatch passes the submitting shell's environment):
export RECIPE=${RECIPE:-recipes/luffy_main.yaml}         # the run's recipe (tools/plan.py checks it fits)
export NNODES=${NNODES:-8}                         # must equal the job's node count and the recipe's parallel.nnodes
export OVERRIDES=${OVERRIDES:-}                    # "key=value key=value": each becomes luffy-train --set key=value
export OUTPUT_DIR=${OUTPUT_DIR:-}                  # empty: the recipe's trainer.output_dir (checkpoints, logs/, tensorboard/)
export CONTAINER_IMAGE=${CONTAINER_IMAGE:-}        # e.g. /shared/luffy-megatron+gpu.sqsh, docker/Dockerfile imported by enroot (pyxis)
export CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}      # e.g. /lustre/me:/lustre/me (pyxis --container-mounts)
# More: LUFFY_VENV, RAY_PORT, RAY_START_ARGS, RAY_TOKEN_DIR, RAY_JOIN_TIMEOUT_S, RAY_STOP_TIMEOUT_S, MAX_REQUEUES
# (slurm/common.sh).

# Slurm runs a copy of this file: find the checkout from the submitted path (or the submit directory).
if [ -z "${LUFFY_HOME:-}" ]; then
  _script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  LUFFY_HOME=$(cd "$(dirname "${_script:-$SLURM_SUBMIT_DIR/slurm/x}")/.." 2>/dev/null && pwd)
fi
[ -f "$LUFFY_HOME/slurm/common.sh" ] || { echo "luffy: no slurm/common.sh under LUFFY_HOME=$LUFFY_HOME" >&2; exit 1; }
export LUFFY_HOME
source "$LUFFY_HOME/slurm/common.sh"
luffy_slurm_main
