#!/usr/bin/env bash
# Write and submit an sbatch script that trains effjax on GPU nodes managed by SLURM.
#
#   bash launch/gpu_slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
#       --workdir /shared/runs/gpt-small --config configs/gpt.py:small [--per-gpu] [--dry-run] \
#       -- --config.train.steps=10000 --config.mesh.fsdp=8
#
# The batch script computes the coordinator (first host of the allocation, a port derived from the job id) and
# runs one effjax process per node (default: each process drives all the node's GPUs) or, with --per-gpu, one per
# GPU, through `srun`; each task passes --coordinator_address, --num_processes=$SLURM_NTASKS and
# --process_id=$SLURM_PROCID to `python -m effjax.main`, with --config.train.require_backend=gpu (a task whose jax
# has no GPU stops in one line). Before that the job checks that jax's CUDA plugin (the [cuda] extra) is in the
# environment, or installs it with --install.
# --dry-run prints the sbatch file and the sbatch command instead of writing/submitting. Exit code 2 on bad usage.
set -euo pipefail
ORIG_ARGS=("$@")

usage() {
  cat <<'EOF'
usage: bash launch/gpu_slurm.sh --workdir DIR --config CFG [options] [-- EFFJAX_ARGS...]

required:
  --workdir DIR          run directory on a filesystem shared by all nodes (or gs://...)
  --config CFG           effjax config, e.g. configs/gpt.py:small (relative to --repo-dir)
options:
  --nodes N              number of nodes (default 1)
  --gpus-per-node G      GPUs per node (default 8)
  --per-gpu              one process per GPU (N*G processes) instead of one process per node
  --partition P          SLURM partition
  --time T               time limit, e.g. 24:00:00
  --job-name NAME        job name (default effjax)
  --account A            SLURM account
  --cpus-per-task C      CPUs per task (default: not set)
  --port PORT            coordinator port (default 20000 + SLURM_JOB_ID % 20000)
  --repo-dir DIR         repository checkout on the shared filesystem (default: this checkout)
  --venv DIR             virtualenv to activate (default REPO_DIR/.venv when it exists)
  --cuda 12|13           CUDA major version of the jax build: the [cuda] (12, default) or [cuda13] extra
  --install              pip install -e 'REPO_DIR[cuda]' in the job before training (the batch node needs
                         registry access); without it the job only checks that the CUDA plugin is installed
  --xla-flags FLAGS      XLA_FLAGS for the run (default --xla_gpu_enable_latency_hiding_scheduler=true)
  --output FILE          where to write the sbatch script (default ./JOB_NAME.sbatch)
  --no-submit            write the script but do not call sbatch
  --dry-run              print the script and the sbatch command; write and submit nothing
  -h, --help             this help
everything after `--` is appended to `python -m effjax.main`.
EOF
}

die() { echo "gpu_slurm.sh: error: $*" >&2; exit 2; }

quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,~^-]+$ && $s != "~"* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

NODES=1 GPUS=8 PER_GPU=0 PARTITION="" TIME="" JOB_NAME="effjax" ACCOUNT="" CPUS="" PORT="" REPO_DIR="" VENV=""
XLA="--xla_gpu_enable_latency_hiding_scheduler=true" OUTPUT="" NO_SUBMIT=0 DRY_RUN=0 WORKDIR="" CONFIG=""
CUDA=12 INSTALL=0
EXTRA=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt=$1
  if [[ $opt == --*=* ]]; then
    set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
    opt=$1
  fi
  case $opt in
    --nodes)         need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS=$2; shift 2 ;;
    --partition)     need_value "$@"; PARTITION=$2; shift 2 ;;
    --time)          need_value "$@"; TIME=$2; shift 2 ;;
    --job-name)      need_value "$@"; JOB_NAME=$2; shift 2 ;;
    --account)       need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --cpus-per-task) need_value "$@"; CPUS=$2; shift 2 ;;
    --port)          need_value "$@"; PORT=$2; shift 2 ;;
    --repo-dir)      need_value "$@"; REPO_DIR=$2; shift 2 ;;
    --venv)          need_value "$@"; VENV=$2; shift 2 ;;
    --xla-flags)     [[ $# -ge 2 ]] || die "option $1 needs a value"; XLA=$2; shift 2 ;;
    --output)        need_value "$@"; OUTPUT=$2; shift 2 ;;
    --workdir)       need_value "$@"; WORKDIR=$2; shift 2 ;;
    --config)        need_value "$@"; CONFIG=$2; shift 2 ;;
    --cuda)          need_value "$@"; CUDA=$2; shift 2 ;;
    --install)       INSTALL=1; shift ;;
    --per-gpu)       PER_GPU=1; shift ;;
    --no-submit)     NO_SUBMIT=1; shift ;;
    --dry-run)       DRY_RUN=1; shift ;;
    -h|--help)       usage; exit 0 ;;
    --)              shift; EXTRA=("$@"); break ;;
    *)               die "unknown option '$opt' (see --help; effjax arguments go after --)" ;;
  esac
done

[[ -n $CONFIG ]]  || die "missing --config (e.g. configs/gpt.py:small)"
[[ -n $WORKDIR ]] || die "missing --workdir (a directory on a shared filesystem, or gs://...)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "bad --nodes '$NODES': expected a positive integer"
[[ $GPUS =~ ^[1-9][0-9]*$ ]]  || die "bad --gpus-per-node '$GPUS': expected a positive integer"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "bad --cpus-per-task '$CPUS': expected a positive integer"
[[ -z $PORT || ( $PORT =~ ^[0-9]+$ && $PORT -ge 1024 && $PORT -le 65535 ) ]] \
  || die "bad --port '$PORT': expected an integer in 1024..65535"
[[ -z $TIME || $TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] \
  || die "bad --time '$TIME': expected MINUTES, HH:MM:SS or D-HH:MM:SS"
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --job-name '$JOB_NAME': use letters, digits, '_', '.', '-'"
[[ $CUDA == 12 || $CUDA == 13 ]] || die "bad --cuda '$CUDA': expected 12 or 13"
if [[ $CUDA == 12 ]]; then CUDA_EXTRA=cuda; else CUDA_EXTRA=cuda13; fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -n $REPO_DIR ]] || REPO_DIR=$(dirname "$SCRIPT_DIR")
[[ -n $OUTPUT ]] || OUTPUT="$JOB_NAME.sbatch"
if [[ $WORKDIR != /* && $WORKDIR != *://* ]]; then
  WORKDIR="$(pwd)/$WORKDIR"   # the job runs in REPO_DIR: make a relative workdir absolute
fi

if [[ $PER_GPU == 1 ]]; then
  TASKS_PER_NODE=$GPUS
else
  TASKS_PER_NODE=1
fi

# ---------------------------------------------------------------------------------------------- the script
gen_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS"
  [[ -z $CPUS ]]      || echo "#SBATCH --cpus-per-task=$CPUS"
  [[ -z $PARTITION ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z $TIME ]]      || echo "#SBATCH --time=$TIME"
  [[ -z $ACCOUNT ]]   || echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --exclusive"
  # Requeue on preemption; SIGTERM to the tasks 2 minutes before the time limit, so effjax checkpoints and exits
  # 75 ("preempted", effjax/errors.py), which the end of the script turns into a requeue.
  echo "#SBATCH --requeue"
  echo "#SBATCH --signal=TERM@120"
  echo "#SBATCH --output=%x-%j.out"
  echo "# Generated by launch/gpu_slurm.sh: $(quote_all "${ORIG_ARGS[@]}")"
  echo "# $NODES node(s) x $GPUS GPU(s); $TASKS_PER_NODE process(es) per node ($([[ $PER_GPU == 1 ]] && echo "one per GPU" || echo "one per node, each driving all of its GPUs"))."
  echo "set -euo pipefail"
  echo
  echo "cd $(quote "$REPO_DIR")"
  if [[ -n $VENV ]]; then
    echo ". $(quote "$VENV")/bin/activate"
  else
    echo "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"
  fi
  echo
  echo "# jax's CUDA $CUDA plugin (the [$CUDA_EXTRA] extra) must be in this environment: without it jax trains on the CPUs."
  [[ $INSTALL == 0 ]] || echo "pip install -q -e $(quote ".[$CUDA_EXTRA]")"
  echo "if ! python -c 'import importlib.metadata as m; m.version(\"jax-cuda$CUDA-plugin\")' 2>/dev/null; then"
  echo "  echo \"effjax: error: jax-cuda$CUDA-plugin is not installed for \$(command -v python): pip install -e '.[$CUDA_EXTRA]' (or gpu_slurm.sh --install)\" >&2"
  echo "  exit 2"
  echo "fi"
  cat <<'EOF'

# Coordinator: the first host of the allocation; the port is derived from the job id so that jobs sharing a
# node do not collide. Every process connects to it; process 0 hosts it.
COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # not head: SIGPIPE + pipefail
EOF
  if [[ -n $PORT ]]; then
    echo "COORDINATOR_PORT=$PORT"
  else
    echo 'COORDINATOR_PORT=$((20000 + SLURM_JOB_ID % 20000))'
  fi
  cat <<'EOF'
export EFFJAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:$COORDINATOR_PORT"
echo "effjax: coordinator $EFFJAX_COORDINATOR_ADDRESS, $SLURM_NTASKS process(es) on $SLURM_JOB_NUM_NODES node(s)"

# XLA flags for GPUs. The latency-hiding scheduler overlaps collectives (FSDP all-gathers / reduce-scatters,
# data-parallel all-reduces) with compute. Other commonly useful flags, to add after checking that your jaxlib's
# XLA still knows them (an unknown flag is a fatal error):
#   --xla_gpu_enable_triton_gemm=false                  cuBLAS instead of Triton GEMMs (often faster for bf16)
#   --xla_gpu_enable_highest_priority_async_stream=true
#   --xla_gpu_all_reduce_combine_threshold_bytes=134217728   combine small all-reduces
#   --xla_gpu_enable_command_buffer=                    disable CUDA graphs if they misbehave
EOF
  echo "export XLA_FLAGS=\"\${XLA_FLAGS:-} $(printf '%s' "$XLA" | sed 's/[\\"$`]/\\&/g')\""
  cat <<'EOF'
# Let XLA take most of the GPU memory up front (the default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

# NCCL: collectives between GPUs (NVLink inside a node, InfiniBand/RoCE or TCP between nodes).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}            # INFO to see the chosen transport / topology
# export NCCL_SOCKET_IFNAME=ib0                  # interface for bootstrap / TCP traffic (site specific)
# export NCCL_IB_HCA=mlx5                        # InfiniBand adapters to use
# export NCCL_NVLS_ENABLE=0                      # disable NVLink SHARP if it causes hangs
# export NCCL_CROSS_NIC=1 NCCL_IB_GID_INDEX=3    # typical RoCE settings

EOF
  echo "export EFFJAX_PER_GPU=$PER_GPU"
  cat <<'EOF'
# One task per process. With one process per GPU each task selects its GPU with CUDA_VISIBLE_DEVICES=SLURM_LOCALID
# (not with cgroup-isolating --gpus-per-task, which can stop NCCL from using NVLink peer-to-peer between tasks).
# --kill-on-bad-exit stops every task as soon as one fails instead of leaving the others blocked in a collective.
code=0
srun --kill-on-bad-exit=1 bash -c '
  if [ "$EFFJAX_PER_GPU" = 1 ]; then export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; fi
  exec python -m effjax.main "$@" \
    --coordinator_address="$EFFJAX_COORDINATOR_ADDRESS" \
    --num_processes="$SLURM_NTASKS" \
    --process_id="$SLURM_PROCID"' effjax \
EOF
  printf '  %s || code=$?\n' "$(quote_all --config="$CONFIG" --workdir="$WORKDIR" --config.train.require_backend=gpu \
    "${EXTRA[@]}")"
  cat <<'EOF'
# 75: preempted with a checkpoint saved -> requeue (the job resumes from it); 0 finished, 2 user error and
# 3 diverged end the job.
if [ "$code" = 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit "$code"
EOF
}

SBATCH_CMD=(sbatch "$OUTPUT")
if [[ $DRY_RUN == 1 ]]; then
  # What effjax/distributed.py decides in task 0 of this job (the flags srun passes), computed here.
  TASKS=$(( NODES * TASKS_PER_NODE ))
  DECISION=$(cd "$SCRIPT_DIR/.." && EFFJAX_COORDINATOR_ADDRESS="FIRST_HOST:${PORT:-PORT}" EFFJAX_NUM_PROCESSES=$TASKS \
    EFFJAX_PROCESS_ID=0 python3 -m effjax.distributed 2>&1) || DECISION="(python3 -m effjax.distributed failed: $DECISION)"
  echo "# $NODES node(s) x $GPUS GPU(s), $TASKS process(es); multi-host start-up in task 0: $DECISION"
  echo "# ---- $OUTPUT"
  gen_script
  echo "# ----"
  echo "+ $(quote_all "${SBATCH_CMD[@]}")"
  exit 0
fi

gen_script > "$OUTPUT"
chmod +x "$OUTPUT"
echo "gpu_slurm.sh: wrote $OUTPUT" >&2
if [[ $NO_SUBMIT == 0 ]]; then
  command -v sbatch >/dev/null || { echo "gpu_slurm.sh: error: sbatch not found (use --no-submit to only write $OUTPUT)" >&2; exit 1; }
  echo "+ $(quote_all "${SBATCH_CMD[@]}")" >&2
  "${SBATCH_CMD[@]}"
fi
