# shellcheck shell=bash
# Shared by every slurm/*.sbatch script: derive the launch from the Slurm environment, run it, and on
# preemption (USR1 from `#SBATCH --signal=B:USR1@N`) let the trainer checkpoint, then requeue the job.
#
# Sourced, not run. The functions only read SLURM_* and C2F_* variables, so the derivation can be
# checked without Slurm:  c2f_print_launch train -m c2f_megatron.cli train-rm cfg.yaml   (one arg a line)
#
# Variables a user may set (sbatch exports the submitting shell's environment):
#   C2F_RUNS            parent of run directories (default: runs, relative to the submit directory)
#   C2F_RUN_DIR         the run directory itself (default: $C2F_RUNS/$SLURM_JOB_NAME-$SLURM_JOB_ID, which a
#                       requeued job finds again because it keeps its job id)
#   C2F_LAUNCHER        torchrun (default: one torchrun per node, c10d rendezvous on the first node) or
#                       srun (one task per GPU: set --ntasks-per-node to the GPU count in the header)
#   GPUS_PER_NODE       processes per node for torchrun (default: SLURM_GPUS_ON_NODE, else nvidia-smi;
#                       on CPU, C2F_DEVICE=cpu or no GPU at all: the job's tasks per node)
#   MASTER_PORT         rendezvous port (default: 20000 + job id % 20000)
#   C2F_REQUEUE         1 (default): requeue after a preemption checkpoint; 0: just exit
#   C2F_DRY_RUN         1: print the launch command (one argument a line) and exit
#   C2F_TORCHRUN, C2F_PYTHON   the torchrun / python executables (default: torchrun, python3)

# Exit code of a job step that stopped for preemption but whose requeue failed: not 0 (the job is not
# done), not a trainer error code (2 config/input, 3 NaN guard).
C2F_EXIT_REQUEUE_FAILED=75

c2f_log() { echo "[c2f-slurm $(date +%H:%M:%S)] $*" >&2; }

# Hosts of a Slurm hostlist, one a line: `scontrol show hostnames`, or (no Slurm configuration, as in the
# dry-run tests) a pure-bash expansion of lists such as gpu[003-005,010],cpu01.
c2f_hostnames() {
  local list=$1
  if command -v scontrol >/dev/null 2>&1 && scontrol show hostnames "$list" 2>/dev/null; then
    return 0
  fi
  local rest=$list item prefix ranges part lo hi i width
  while [[ -n $rest ]]; do
    if [[ $rest =~ ^([^,\[]+)\[([^]]+)\](.*)$ ]]; then
      prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
      local -a parts
      IFS=, read -r -a parts <<<"$ranges"
      for part in "${parts[@]}"; do
        lo=${part%%-*} hi=${part##*-} width=${#lo}
        for ((i = 10#$lo; i <= 10#$hi; i++)); do printf '%s%0*d\n' "$prefix" "$width" "$i"; done
      done
    elif [[ $rest =~ ^([^,\[]+)(.*)$ ]]; then
      item=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
      echo "$item"
    else
      c2f_log "cannot parse hostlist '$list'"
      return 1
    fi
    rest=${rest#,}
  done
}

# Tasks on this node: SLURM_NTASKS_PER_NODE, else the first count of SLURM_TASKS_PER_NODE ("2(x3),1").
c2f_tasks_per_node() {
  if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
    echo "$SLURM_NTASKS_PER_NODE"
  elif [[ -n ${SLURM_TASKS_PER_NODE:-} ]]; then
    local first=${SLURM_TASKS_PER_NODE%%,*}
    echo "${first%%(*}"
  else
    echo 1
  fi
}

# Processes per node for torchrun: GPUS_PER_NODE if set; the job's tasks per node on CPU (C2F_DEVICE=cpu,
# or no GPU in the allocation and no nvidia-smi); else the node's GPUs (SLURM_GPUS_ON_NODE, nvidia-smi).
c2f_nproc_per_node() {
  if [[ -n ${GPUS_PER_NODE:-} ]]; then
    echo "$GPUS_PER_NODE"
  elif [[ ${C2F_DEVICE:-} == cpu ]]; then
    c2f_tasks_per_node
  elif [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    c2f_tasks_per_node
  fi
}

# World size a converter/merge run needs: the product of its --tp and --pp arguments (default 1 each).
c2f_tp_pp_world() {
  local tp=1 pp=1
  while (($#)); do
    case $1 in
      --tp) tp=${2:-1}; shift ;;
      --tp=*) tp=${1#--tp=} ;;
      --pp) pp=${2:-1}; shift ;;
      --pp=*) pp=${1#--pp=} ;;
    esac
    shift
  done
  echo $((tp * pp))
}

# A one-node tool run (converters, merge): torchrun with tp x pp processes, or plain python for one.
c2f_run_tool() {
  local world
  world=$(c2f_tp_pp_world "$@")
  export GPUS_PER_NODE=${GPUS_PER_NODE:-$world}
  if [[ $GPUS_PER_NODE == 1 && ${SLURM_NNODES:-1} == 1 ]]; then
    export C2F_LAUNCHER=${C2F_LAUNCHER:-python}
  fi
  c2f_run tool "$@"
}

# Derive and export the launch geometry and the run directory from the Slurm environment.
c2f_setup() {
  : "${SLURM_JOB_ID:?not inside a Slurm job (submit with sbatch)}"
  : "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
  local hosts
  hosts=$(c2f_hostnames "$SLURM_JOB_NODELIST") || return 1
  C2F_NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-$(wc -l <<<"$hosts")}}
  MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 <<<"$hosts")}
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  C2F_NPROC_PER_NODE=$(c2f_nproc_per_node)
  C2F_RUN_DIR=${C2F_RUN_DIR:-${C2F_RUNS:-runs}/${SLURM_JOB_NAME:-c2f}-${SLURM_JOB_ID}}
  # The batch script asks the trainer to stop by creating the request file (reaches every rank on every
  # node through the shared filesystem, without signalling torchrun); the trainer writes the marker once
  # it has checkpointed and exited cleanly (see c2f_megatron/training/preemption.py).
  C2F_PREEMPT_REQUEST=$C2F_RUN_DIR/preempt.request
  C2F_PREEMPT_MARKER=$C2F_RUN_DIR/preempted.json
  export MASTER_ADDR MASTER_PORT C2F_RUN_DIR C2F_PREEMPT_REQUEST C2F_PREEMPT_MARKER
}

# C2F_CMD=(the full launch command) for PROGRAM ARGS..., e.g. `-m c2f_megatron.cli train-rm cfg.yaml`
# or `tools/merge_checkpoints.py --a A ...`. Call after c2f_setup.
c2f_build_cmd() {
  local launcher=${C2F_LAUNCHER:-torchrun}
  case $launcher in
    torchrun)
      C2F_CMD=(srun --nodes="$C2F_NNODES" --ntasks="$C2F_NNODES" --ntasks-per-node=1
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1
        "${C2F_TORCHRUN:-torchrun}" --nnodes="$C2F_NNODES" --nproc_per_node="$C2F_NPROC_PER_NODE"
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
        --max_restarts=0 "$@")
      ;;
    srun) # every task of the allocation is one rank; c2f reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
      C2F_CMD=(srun --kill-on-bad-exit=1 "${C2F_PYTHON:-python3}" "$@") ;;
    python) # one process (e.g. an HF-format merge)
      C2F_CMD=(srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" "${C2F_PYTHON:-python3}" "$@") ;;
    *)
      c2f_log "C2F_LAUNCHER must be torchrun, srun or python, not '$launcher'"
      return 2
      ;;
  esac
}

# Training programs also get their run directory: logs/metrics and checkpoints under C2F_RUN_DIR.
# (`c2f_launch_args train -m c2f_megatron.cli train-rm CFG a=b` -> ... CFG logging.run_dir=.. checkpoint.dir=.. a=b)
c2f_launch_args() {
  local kind=$1
  shift
  C2F_ARGS=("$@")
  if [[ $kind == train ]]; then
    # PROGRAM (-m module | script), SUBCOMMAND, CONFIG, then the run directory before the user's overrides
    local head=3
    [[ $1 == -m ]] && head=4
    C2F_ARGS=("${@:1:head}" "logging.run_dir=$C2F_RUN_DIR" "checkpoint.dir=$C2F_RUN_DIR/checkpoints" "${@:head+1}")
  fi
}

# Print the launch command for the current environment, one argument a line (dry run / tests).
c2f_print_launch() {
  c2f_setup || return
  c2f_launch_args "$@"
  c2f_build_cmd "${C2F_ARGS[@]}" || return
  printf '%s\n' "${C2F_CMD[@]}"
}

c2f_describe() {
  c2f_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: $C2F_NNODES node(s)" \
    "[$SLURM_JOB_NODELIST], $C2F_NPROC_PER_NODE process(es) per node, master $MASTER_ADDR:$MASTER_PORT," \
    "run dir $C2F_RUN_DIR"
}

# USR1 (or whatever --signal names) reached the batch shell: ask the trainer to checkpoint and stop.
c2f_on_preempt_signal() {
  c2f_log "preemption signal: asking the trainer to checkpoint and exit ($C2F_PREEMPT_REQUEST)"
  : >"$C2F_PREEMPT_REQUEST"
  if [[ ${C2F_LAUNCHER:-torchrun} == srun && -n ${C2F_STEP_PID:-} ]]; then
    kill -USR1 "$C2F_STEP_PID" 2>/dev/null || true # srun forwards it to every task
  fi
}

# Run KIND PROGRAM ARGS... as the job step; KIND=train adds the run directory and the preemption
# protocol: on the signal the trainer saves and exits 0 leaving the marker; then the job is requeued
# (same job id, so the same run directory) and the trainer resumes from the latest checkpoint.
c2f_run() {
  local kind=$1
  c2f_setup || return
  c2f_launch_args "$@"
  c2f_build_cmd "${C2F_ARGS[@]}" || return
  if [[ ${C2F_DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "${C2F_CMD[@]}"
    return 0
  fi
  mkdir -p "$C2F_RUN_DIR"
  # The console also goes to the run directory (appended across requeues).
  exec > >(tee -a "$C2F_RUN_DIR/job.log") 2>&1
  c2f_describe
  c2f_log "launch: ${C2F_CMD[*]}"
  rm -f "$C2F_PREEMPT_REQUEST" "$C2F_PREEMPT_MARKER"
  [[ $kind == train ]] && trap c2f_on_preempt_signal USR1
  # In the background so that bash runs the trap as soon as the signal arrives, not when the step ends.
  "${C2F_CMD[@]}" &
  C2F_STEP_PID=$!
  local rc
  while true; do
    rc=0
    wait "$C2F_STEP_PID" || rc=$?
    kill -0 "$C2F_STEP_PID" 2>/dev/null || break # otherwise wait was interrupted by the trap
  done
  trap - USR1
  if [[ $kind == train && -f $C2F_PREEMPT_MARKER ]]; then
    c2f_log "trainer checkpointed for preemption (exit $rc): $(cat "$C2F_PREEMPT_MARKER")"
    if [[ ${C2F_REQUEUE:-1} == 1 ]]; then
      c2f_log "requeueing job $SLURM_JOB_ID; it resumes from $C2F_RUN_DIR/checkpoints"
      if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
      fi
      c2f_log "scontrol requeue failed (is JobRequeue disabled?); resubmit with C2F_RUN_DIR=$C2F_RUN_DIR"
      return "$C2F_EXIT_REQUEUE_FAILED"
    fi
    return 0
  fi
  if [[ $rc == 0 ]]; then c2f_log "done"; else c2f_log "job step failed with exit code $rc"; fi
  return "$rc"
}
