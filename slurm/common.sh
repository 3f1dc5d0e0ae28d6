# Shared body of the Slurm launchers (slurm/luffy_*.sh); sourced by them, not run on its own.
#
# One job = one Ray cluster over the job's nodes + the driver `luffy-train` in the batch step:
#   1. checks: NNODES against the job's node count; the recipe (with OVERRIDES) loads, and the nodes it runs on
#      (parallel.nnodes, + cluster.rollout_nnodes when disaggregated) match; a failure here stops the job before
#      any Ray process starts, with the error in the log (exit code 2 for a recipe that does not load);
#   2. the Ray head on the first node, then a Ray worker on every other node, one after another, each waited
#      for until `ray status` counts it (RAY_JOIN_TIMEOUT_S, then the job fails naming the node). Each node's Ray
#      uses its Slurm NodeAddr (--node-ip-address). Token auth is always on, with a token of the run's own that
#      is never printed: a file of mode 0600 in a new directory of mode 0700 under RAY_TOKEN_DIR (default: the
#      output directory, which every node and container of the job sees already), named to every `ray start`
#      and to luffy-train by RAY_AUTH_TOKEN_PATH in their environment; removed at teardown. A Ray client without
#      the token is refused;
#   3. `luffy-train --config RECIPE --set ...` with RAY_ADDRESS, in the batch step (with CONTAINER_IMAGE: in the
#      job's container on the first node, through srun);
#   4. preemption: SIGUSR1 (sbatch --signal=B:USR1@<s>, or `scancel --batch --signal=USR1 <job>`) and SIGTERM reach
#      this shell, which forwards them to luffy-train by pid (as SIGUSR1); luffy-train checkpoints at the end of the
#      current step and exits with 75; then the Ray processes are stopped and the job requeues itself (`scontrol
#      requeue`, at most MAX_REQUEUES times); the requeued run resumes from the newest checkpoint in
#      trainer.output_dir (trainer.resume=auto). A signal before luffy-train started requeues at once;
#   5. teardown (trap on EXIT): luffy-train if still running, then the Ray nodes, workers first, head last, each
#      by the pid of the srun step this script started (see RAY_NODE_WRAPPER), each waited for (RAY_STOP_TIMEOUT_S).
# One log per job: $OUTPUT_DIR/logs/<job name>-<job id>.log (a requeued run appends to it), also copied to the
# Slurm output file.
#
# Exit codes: 0 done; 75 stopped by a signal with a checkpoint (requeued unless MAX_REQUEUES is reached);
# anything else: the failure (2 = bad recipe, as luffy-train).

set -euo pipefail

PREEMPTED_EXIT_CODE=75

_t0=$SECONDS
say() { printf '[luffy-slurm %5ss] %s\n' "$((SECONDS - _t0))" "$*"; }
die() { say "error: $1" >&2; exit "${2:-1}"; }  # $1 = message, $2 = exit code (default 1)

# ------------------------------------------------------------------------------------------ environment

luffy_setup_env() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch ${0##*/} (see the header for the knobs)"
  RECIPE=${RECIPE:?RECIPE is not set}
  NNODES=${NNODES:?NNODES is not set}
  OVERRIDES=${OVERRIDES:-}
  OUTPUT_DIR=${OUTPUT_DIR:-}
  CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
  CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
  RAY_PORT=${RAY_PORT:-6379}
  RAY_JOIN_TIMEOUT_S=${RAY_JOIN_TIMEOUT_S:-300}
  RAY_STOP_TIMEOUT_S=${RAY_STOP_TIMEOUT_S:-60}
  RAY_START_ARGS=${RAY_START_ARGS:-}
  MAX_REQUEUES=${MAX_REQUEUES:-20}
  RAY_TOKEN_DIR=${RAY_TOKEN_DIR:-}
  export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
  export PYTHONUNBUFFERED=1

  CONTAINER_ARGS=()
  if [ -n "$CONTAINER_IMAGE" ]; then  # pyxis: one named container per job, reused by every step on a node
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-name="luffy-$SLURM_JOB_ID" --container-workdir="$PWD")
    [ -n "$CONTAINER_MOUNTS" ] && CONTAINER_ARGS+=(--container-mounts="$CONTAINER_MOUNTS")
  elif [ -n "${LUFFY_VENV:-}" ] || [ -x "$LUFFY_HOME/.venv/bin/python" ]; then
    LUFFY_VENV=${LUFFY_VENV:-$LUFFY_HOME/.venv}
    [ -f "$LUFFY_VENV/bin/activate" ] || die "LUFFY_VENV=$LUFFY_VENV has no bin/activate"
    # shellcheck disable=SC1091
    source "$LUFFY_VENV/bin/activate"
  fi

  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  HEAD_NODE=${NODES[0]}
  GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
  CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-1}
  on_batch_host_prefix
  luffy_override_args
  return 0
}

# SETS: luffy-train's --set arguments from OVERRIDES ("key=value key=value") and OUTPUT_DIR. Split on blanks
# only: no pathname expansion, so a list value such as data.train_files=[a,b] reaches luffy-train as written
# even when a file in the working directory matches it as a glob.
luffy_override_args() {
  local kvs kv
  read -r -a kvs <<<"$OVERRIDES"
  SETS=()
  for kv in "${kvs[@]}"; do SETS+=(--set "$kv"); done
  [ -n "$OUTPUT_DIR" ] && SETS+=(--set "trainer.output_dir=$OUTPUT_DIR")
  return 0
}

# A command on the batch host: inside the job's container when CONTAINER_IMAGE is set, else right here.
# (A prefix, not a function: a function run with & would be a subshell, and $! the subshell's pid.)
on_batch_host_prefix() {
  ON_BATCH_HOST=()
  [ -n "$CONTAINER_IMAGE" ] && ON_BATCH_HOST=(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" "${CONTAINER_ARGS[@]}")
  return 0
}

# The job log: everything this script and its steps print, also copied to the Slurm output file.
start_job_log() {
  local dir=$1/logs
  mkdir -p "$dir"
  JOB_LOG=$dir/${SLURM_JOB_NAME:-luffy}-$SLURM_JOB_ID.log
  exec > >(tee -a "$JOB_LOG") 2>&1
  TEE_PID=$!
  say "=== job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST ($(date -Is)); log $JOB_LOG"
}

# ------------------------------------------------------------------------------------------ recipe check

# Loads RECIPE with the overrides exactly as luffy-train will (so a broken recipe fails before Ray starts) and
# prints "<nodes the run needs> <trainer.output_dir>": parallel.nnodes, plus cluster.rollout_nnodes when the
# layout is disaggregated.
recipe_facts() {
  "${ON_BATCH_HOST[@]}" python - "$RECIPE" "${SETS[@]}" <<'PY'
import sys
from luffy_megatron.config import ConfigError, load_config, parse_overrides_from_argv
try:
    recipe, overrides = parse_overrides_from_argv(["--config", *sys.argv[1:]])
    cfg = load_config(recipe, overrides)
except (ConfigError, OSError) as err:
    print(f"luffy-train: error: {err}", file=sys.stderr)
    sys.exit(2)
rollout_nodes = cfg.cluster.rollout_nnodes if cfg.cluster.layout == "disaggregated" else 0
print(cfg.parallel.nnodes + rollout_nodes, cfg.trainer.output_dir)
PY
}

check_recipe() {
  [ "$NNODES" = "$SLURM_JOB_NUM_NODES" ] || die "this job has $SLURM_JOB_NUM_NODES nodes but NNODES=$NNODES: \
submit with sbatch --nodes=$NNODES, or set NNODES=$SLURM_JOB_NUM_NODES (and the recipe's parallel.nnodes to match)"
  if [ -z "$CONTAINER_IMAGE" ]; then
    command -v luffy-train >/dev/null && command -v ray >/dev/null || die "luffy-train or ray is not on PATH: \
install luffy-megatron (the docker/Dockerfile image, or pip install -r requirements/gpu.lock -e .), or set LUFFY_VENV or CONTAINER_IMAGE"
  fi
  local facts rc=0
  facts=$(recipe_facts) || rc=$?
  [ "$rc" = 0 ] || die "the recipe $RECIPE with OVERRIDES does not load: see the error above" "$rc"
  read -r RECIPE_NNODES RECIPE_OUTPUT_DIR <<<"${facts##*$'\n'}"  # its last line
  [ "$RECIPE_NNODES" = "$NNODES" ] || die "$RECIPE runs on $RECIPE_NNODES nodes (parallel.nnodes, plus \
cluster.rollout_nnodes when disaggregated) but this job has $NNODES: change the recipe or OVERRIDES (parallel.nnodes) \
or submit with --nodes=$RECIPE_NNODES NNODES=$RECIPE_NNODES" 2
  OUTPUT_DIR=${OUTPUT_DIR:-$RECIPE_OUTPUT_DIR}
}

# ------------------------------------------------------------------------------------------ Ray

# The address other nodes reach `node` at: its Slurm NodeAddr (resolved when it is a name).
node_ip() {
  local addr
  addr=$(scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  if [[ ! $addr =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    addr=$(getent ahostsv4 "$addr" | awk 'NR==1{print $1}')
  fi
  [ -n "$addr" ] || die "cannot find the IPv4 address of node $1 (scontrol show node $1: NodeAddr)"
  echo "$addr"
}

# The run's Ray token (see the header, step 2): 32 bytes from /dev/urandom as hex, written with umask 077 into a
# new mktemp directory (mode 0700); never printed. srun passes this shell's environment to every step, so every
# `ray start` and luffy-train gets RAY_AUTH_MODE=token and the file's path; a RAY_AUTH_TOKEN from the submitting
# shell is dropped (Ray would take it before the file). The nodes must see the same file: RAY_TOKEN_DIR (default
# the output directory) has to be on a file system shared by the job's nodes and, with CONTAINER_IMAGE, mounted
# in the container at the same path (as the output directory is). The fake nodes of tests/e2e share one.
# A directory left by an earlier run of this job that was killed before its teardown is removed first.
make_ray_token() {
  local parent=${RAY_TOKEN_DIR:-$OUTPUT_DIR}
  mkdir -p "$parent" && parent=$(cd "$parent" && pwd) || die "cannot make RAY_TOKEN_DIR=$parent"
  rm -rf "$parent/.ray-auth-$SLURM_JOB_ID".*
  RAY_TOKEN_HOME=$(mktemp -d "$parent/.ray-auth-$SLURM_JOB_ID.XXXXXX") || die "cannot make a directory in $parent"
  chmod 700 "$RAY_TOKEN_HOME"
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RAY_TOKEN_HOME/token")
  [ -s "$RAY_TOKEN_HOME/token" ] || die "cannot write the Ray token under $RAY_TOKEN_HOME"
  unset RAY_AUTH_TOKEN
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_TOKEN_HOME/token
}

remove_ray_token() {
  [ -n "$RAY_TOKEN_HOME" ] && rm -rf "$RAY_TOKEN_HOME"
  RAY_TOKEN_HOME=
  return 0
}

# Nodes `ray status` reports (active + idle), 0 while the head does not answer.
ray_node_count() {
  { "${ON_BATCH_HOST[@]}" ray status --address="$RAY_HEAD" 2>/dev/null || true; } | awk '
    /^(Active|Idle):/ {count = 1; next}
    /^(Pending|Recent failures):/ {count = 0}
    count && $1 ~ /^[0-9]+$/ {n += $1}
    END {print n + 0}'
}

wait_for_nodes() {  # $1 = nodes expected, $2 = the node just started (for the message), $3 = its srun pid
  local want=$1 node=$2 pid=$3 deadline=$((SECONDS + RAY_JOIN_TIMEOUT_S)) have=0
  while [ "$SECONDS" -lt "$deadline" ]; do
    have=$(ray_node_count)
    [ "$have" -ge "$want" ] && { say "ray: $node joined ($have/$NNODES nodes)"; return 0; }
    kill -0 "$pid" 2>/dev/null || die "ray on $node exited before joining the cluster at $RAY_HEAD (its output is above)"
    sleep 1
  done
  die "ray on $node did not join the cluster at $RAY_HEAD within RAY_JOIN_TIMEOUT_S=${RAY_JOIN_TIMEOUT_S}s \
(ray status counts $have of $want nodes); its output is above"
}

# srun turns a SIGTERM it receives into SIGKILL for its tasks, but forwards SIGUSR2 as it is. So each node runs
# `ray start --block` under a small shell that turns SIGUSR2 into the SIGTERM on which ray start stops its raylet
# and workers in order (a SIGKILLed `ray start` would orphan them).
RAY_NODE_WRAPPER='ray start --block "$@" & pid=$!
trap "kill -TERM $pid" USR2
rc=0; while kill -0 $pid 2>/dev/null; do rc=0; wait $pid || rc=$?; done; exit $rc'

start_ray_node() {  # $1 = node, then the `ray start` role arguments; sets LAST_SRUN_PID
  local node=$1 ip
  shift
  ip=$(node_ip "$node")
  # shellcheck disable=SC2086  # RAY_START_ARGS is a list of extra options
  srun --overlap --nodes=1 --ntasks=1 -w "$node" --cpus-per-task="$CPUS_PER_NODE" "${CONTAINER_ARGS[@]}" \
    bash -c "$RAY_NODE_WRAPPER" ray-node "$@" --node-ip-address="$ip" --num-cpus="$CPUS_PER_NODE" \
    --num-gpus="$GPUS_PER_NODE" --disable-usage-stats $RAY_START_ARGS > >(sed -u "s/^/[ray $node] /") 2>&1 &
  LAST_SRUN_PID=$!
}

start_ray() {
  HEAD_IP=$(node_ip "$HEAD_NODE")
  RAY_HEAD=$HEAD_IP:$RAY_PORT
  say "ray: head on $HEAD_NODE ($RAY_HEAD), $GPUS_PER_NODE GPUs and $CPUS_PER_NODE CPUs per node"
  start_ray_node "$HEAD_NODE" --head --port="$RAY_PORT" --include-dashboard=false
  HEAD_SRUN_PID=$LAST_SRUN_PID
  wait_for_nodes 1 "$HEAD_NODE" "$HEAD_SRUN_PID"
  local i
  for ((i = 1; i < NNODES; i++)); do  # one after another: each joins before the next starts
    start_ray_node "${NODES[$i]}" --address="$RAY_HEAD"
    WORKER_SRUN_PIDS+=("$LAST_SRUN_PID")
    wait_for_nodes $((i + 1)) "${NODES[$i]}" "$LAST_SRUN_PID"
  done
  export RAY_ADDRESS=$RAY_HEAD
}

stop_pid() {  # $1 = pid of a process this script started, $2 = what it is, $3 = the signal asking it to stop
  local pid=$1 deadline=$((SECONDS + RAY_STOP_TIMEOUT_S))
  kill -0 "$pid" 2>/dev/null || return 0
  kill -s "$3" "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$2 (pid $pid) still running ${RAY_STOP_TIMEOUT_S}s after SIG$3 (RAY_STOP_TIMEOUT_S): SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

stop_ray() {
  local i
  for ((i = ${#WORKER_SRUN_PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${WORKER_SRUN_PIDS[$i]}" "ray worker on ${NODES[$((i + 1))]}" USR2
  done
  WORKER_SRUN_PIDS=()
  [ -n "$HEAD_SRUN_PID" ] && stop_pid "$HEAD_SRUN_PID" "ray head on $HEAD_NODE" USR2
  HEAD_SRUN_PID=
  # `ray start --head` records the address here; a stale copy makes a later bare ray.init() hang
  if [ -n "${RAY_HEAD:-}" ] && [ "$(cat /tmp/ray/ray_current_cluster 2>/dev/null)" = "$RAY_HEAD" ]; then
    rm -f /tmp/ray/ray_current_cluster
  fi
}

# ------------------------------------------------------------------------------------------ signals, teardown

on_stop_signal() {  # $1 = signal name; runs in this shell, between commands
  STOP_SIGNAL=$1
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    # always as SIGUSR1: luffy-train treats both alike, and an srun (container mode) would turn SIGTERM into SIGKILL
    say "SIG$1 received: forwarded to luffy-train (pid $DRIVER_PID) as SIGUSR1; it checkpoints after the current step"
    kill -s USR1 "$DRIVER_PID" 2>/dev/null || true
  else
    say "SIG$1 received before luffy-train started: stopping, the job will be requeued"
  fi
}

teardown() {
  local rc=$?
  trap - EXIT USR1 TERM
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    say "stopping luffy-train (pid $DRIVER_PID)"
    stop_pid "$DRIVER_PID" "luffy-train" USR1
  fi
  stop_ray
  remove_ray_token
  say "=== job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) exits with $rc"
  if [ -n "$TEE_PID" ]; then  # let the log copy finish before Slurm ends the batch step
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null || true
  fi
  exit "$rc"
}

requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
    say "not requeueing: the job was requeued $restarts times already (MAX_REQUEUES=$MAX_REQUEUES); resubmit it to resume"
    return 0
  fi
  stop_ray  # before the requeue: Slurm ends this run as soon as the job is requeued
  remove_ray_token
  say "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); the next run resumes from the newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue $SLURM_JOB_ID failed: resubmit the job to resume"
}

# ------------------------------------------------------------------------------------------ main

luffy_slurm_main() {
  DRIVER_PID= HEAD_SRUN_PID= TEE_PID= STOP_SIGNAL= JOB_LOG= RAY_TOKEN_HOME=
  WORKER_SRUN_PIDS=()
  luffy_setup_env
  trap teardown EXIT
  trap 'on_stop_signal USR1' USR1
  trap 'on_stop_signal TERM' TERM
  [ -n "$OUTPUT_DIR" ] && start_job_log "$OUTPUT_DIR"
  say "recipe $RECIPE, OVERRIDES='$OVERRIDES', nodes ${NODES[*]}"
  check_recipe
  [ -n "$JOB_LOG" ] || start_job_log "$OUTPUT_DIR"
  make_ray_token
  start_ray

  local rc=0
  if [ -z "$STOP_SIGNAL" ]; then
    say "luffy-train --config $RECIPE ${SETS[*]} (RAY_ADDRESS=$RAY_ADDRESS)"
    "${ON_BATCH_HOST[@]}" luffy-train --config "$RECIPE" "${SETS[@]}" &
    DRIVER_PID=$!
    # `wait` returns early when a trapped signal arrives; go on waiting until luffy-train has exited
    while kill -0 "$DRIVER_PID" 2>/dev/null; do
      rc=0
      wait "$DRIVER_PID" || rc=$?
    done
    DRIVER_PID=
    say "luffy-train exited with $rc"
  else
    rc=$PREEMPTED_EXIT_CODE
  fi
  # 138 = killed by the forwarded SIGUSR1 itself: it came before luffy-train installed its handler (while it
  # loaded the data or joined Ray), so nothing was trained since the last checkpoint
  if [ "$rc" = "$PREEMPTED_EXIT_CODE" ] || { [ -n "$STOP_SIGNAL" ] && [ "$rc" = 138 ]; }; then
    rc=$PREEMPTED_EXIT_CODE
    requeue
  fi
  return "$rc"
}
