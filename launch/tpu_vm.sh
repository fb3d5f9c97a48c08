#!/usr/bin/env bash
# Launch an effjax training run on a Cloud TPU VM (single host or a multi-host pod slice).
#
#   bash launch/tpu_vm.sh --name my-tpu --accelerator v4-32 \
#       --workdir gs://my-bucket/runs/gpt-small --config configs/gpt.py:small \
#       [--zone us-central2-b] [--project P] [--queued] [--spot] [--teardown] [--dry-run] \
#       -- --config.train.steps=10000 --config.mesh.fsdp=4
#
# Steps: create the TPU VM (or a queued resource, polled until ACTIVE) → copy or clone the repo to every
# worker → on every worker: uv (from PyPI) makes a Python 3.11 venv (the TPU runtime images ship 3.10, below
# our floor) and installs `-e .[tpu,gcs]` (jax[tpu] at our jax pin, the gs:// clients) → run
# `python -m effjax.main --config=... --workdir=... <args after -->` on --worker=all, streaming the logs to the
# terminal and to a local log file → delete the VM if --teardown (also when the run fails).
# No coordinator flags are needed: on a multi-host slice effjax calls jax.distributed.initialize() with no
# arguments (effjax/distributed.py; the dry run prints that decision for the slice's worker count).
#
# Every gcloud call goes through `run`; with --dry-run each command is printed, one per line, prefixed with
# "+ " (shell-quoted, so it can be copied), and nothing is executed. Exit code 2 on bad usage.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/tpu_vm.sh --name NAME --accelerator TYPE --workdir DIR --config CFG [options] [-- EFFJAX_ARGS...]

required:
  --name NAME          TPU VM (and queued-resource) name
  --accelerator TYPE   accelerator type, e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8
  --workdir DIR        run directory, normally gs://BUCKET/runs/NAME (shared by all workers)
  --config CFG         effjax config, e.g. configs/gpt.py:small (relative to the repo root)
options:
  --zone ZONE          default us-central2-b
  --version VERSION    TPU runtime (software) version; default tpu-ubuntu2204-base (v2/v3/v4),
                       v2-alpha-tpuv5-lite (v5litepod/v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --project PROJECT    GCP project (default: gcloud's configured project)
  --queued             create through `gcloud compute tpus queued-resources create` and wait until ACTIVE
  --spot               spot (preemptible) capacity
  --create-arg ARG     extra argument for the create command, repeatable
                       (e.g. --create-arg=--scopes=cloud-platform, --create-arg=--reserved)
  --repo REPO          git URL to clone on every worker, or a local directory to copy (default: this checkout)
  --branch BRANCH      branch/tag to clone (git URLs only)
  --log FILE           local log file (default launch-logs/NAME-TIMESTAMP.log)
  --skip-create        reuse an existing TPU VM called NAME
  --skip-setup         do not copy the repo / install (re-run on an already prepared VM)
  --poll-interval S    seconds between queued-resource state checks (default 30)
  --poll-timeout S     give up waiting for ACTIVE after S seconds (default 86400)
  --teardown           delete the TPU VM / queued resource after the run (also when it fails)
  --dry-run            print the commands (prefixed "+ ") instead of running them
  -h, --help           this help
everything after `--` is appended to `python -m effjax.main`.
EOF
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }

# Shell-quote one word only when needed (like Python's shlex.quote).
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

# ---------------------------------------------------------------------------------------------- arguments
NAME="" ZONE="us-central2-b" ACCEL="" VERSION="" PROJECT="" QUEUED=0 SPOT=0
REPO="" BRANCH="" WORKDIR="" CONFIG="" TEARDOWN=0 DRY_RUN=0 LOG="" SKIP_CREATE=0 SKIP_SETUP=0
POLL_INTERVAL=30 POLL_TIMEOUT=86400
EXTRA=() CREATE_ARGS=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt=$1
  if [[ $opt == --*=* ]]; then  # --opt=value → --opt value
    set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
    opt=$1
  fi
  case $opt in
    --name)          need_value "$@"; NAME=$2; shift 2 ;;
    --zone)          need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator)   need_value "$@"; ACCEL=$2; shift 2 ;;
    --version)       need_value "$@"; VERSION=$2; shift 2 ;;
    --project)       need_value "$@"; PROJECT=$2; shift 2 ;;
    --repo)          need_value "$@"; REPO=$2; shift 2 ;;
    --branch)        need_value "$@"; BRANCH=$2; shift 2 ;;
    --workdir)       need_value "$@"; WORKDIR=$2; shift 2 ;;
    --config)        need_value "$@"; CONFIG=$2; shift 2 ;;
    --log)           need_value "$@"; LOG=$2; shift 2 ;;
    --create-arg)    need_value "$@"; CREATE_ARGS+=("$2"); shift 2 ;;
    --poll-interval) need_value "$@"; POLL_INTERVAL=$2; shift 2 ;;
    --poll-timeout)  need_value "$@"; POLL_TIMEOUT=$2; shift 2 ;;
    --queued)        QUEUED=1; shift ;;
    --spot)          SPOT=1; shift ;;
    --teardown)      TEARDOWN=1; shift ;;
    --dry-run)       DRY_RUN=1; shift ;;
    --skip-create)   SKIP_CREATE=1; shift ;;
    --skip-setup)    SKIP_SETUP=1; shift ;;
    -h|--help)       usage; exit 0 ;;
    --)              shift; EXTRA=("$@"); break ;;
    *)               die "unknown option '$opt' (see --help; effjax arguments go after --)" ;;
  esac
done

[[ -n $NAME ]]    || die "missing --name (the TPU VM name)"
[[ -n $ACCEL ]]   || die "missing --accelerator (e.g. v4-8, v4-32, v5litepod-16)"
[[ -n $CONFIG ]]  || die "missing --config (e.g. configs/gpt.py:small)"
[[ -n $WORKDIR ]] || die "missing --workdir (e.g. gs://BUCKET/runs/$NAME)"
[[ $ACCEL =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
  || die "bad --accelerator '$ACCEL': expected v<generation>[variant]-<size>, e.g. v4-8, v4-32, v5litepod-16, v5p-8"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "bad --name '$NAME': use lowercase letters, digits and '-', starting with a letter"
[[ $POLL_INTERVAL =~ ^[0-9]+$ && $POLL_INTERVAL -gt 0 ]] || die "bad --poll-interval '$POLL_INTERVAL': expected a positive integer"
[[ $POLL_TIMEOUT =~ ^[0-9]+$ ]] || die "bad --poll-timeout '$POLL_TIMEOUT': expected an integer number of seconds"
[[ $CONFIG != /* ]] || die "bad --config '$CONFIG': give a path relative to the repo root (e.g. configs/gpt.py:small)"

if [[ -z $VERSION ]]; then  # runtime default: tpu-ubuntu2204-base, except where a generation needs its own
  case $ACCEL in
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*)             VERSION=v2-alpha-tpuv5 ;;
    v6e-*)             VERSION=v2-alpha-tpuv6e ;;
    *)                 VERSION=tpu-ubuntu2204-base ;;
  esac
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -n $REPO ]] || REPO=$(dirname "$SCRIPT_DIR")
REPO_IS_LOCAL=0
if [[ -d $REPO ]]; then
  REPO_IS_LOCAL=1
  REPO=$(cd "$REPO" && pwd)
  [[ -z $BRANCH ]] || die "--branch applies to git URLs only; '$REPO' is a local directory"
elif [[ ! $REPO =~ ^(https?://|git@|ssh://|git://|file://) ]]; then
  die "bad --repo '$REPO': not a local directory nor a git URL (https://, git@, ssh://, git://, file://)"
fi
if [[ $WORKDIR != gs://* ]]; then
  echo "tpu_vm.sh: warning: --workdir '$WORKDIR' is not a gs:// path; on a multi-host slice every worker" \
       "writes its own local copy and checkpoints will not be shared" >&2
fi
[[ -n $LOG ]] || LOG="launch-logs/$NAME-$(date +%Y%m%d-%H%M%S).log"
PYTHON_VERSION=3.11

# Hosts (workers) of the slice: the number in the type counts TensorCores (2 per chip) for v2-v4 and v5p, chips
# for v5e/v6e; a host has 4 chips, except the 8-chip single-host v5e/v6e machines.
SIZE=${ACCEL##*-}
case $ACCEL in
  v5litepod-*|v5e-*|v6e-*) CHIPS=$SIZE; (( CHIPS <= 8 )) && HOSTS=1 || HOSTS=$(( CHIPS / 4 )) ;;
  *)                       CHIPS=$(( SIZE / 2 )); HOSTS=$(( CHIPS > 4 ? CHIPS / 4 : 1 )) ;;
esac

# ---------------------------------------------------------------------------------------------- helpers
GC_COMMON=(--zone="$ZONE")
[[ -z $PROJECT ]] || GC_COMMON+=(--project="$PROJECT")

# run CMD...: print (dry-run) or execute one command.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# run_logged LOGFILE CMD...: like run, but stream stdout+stderr to the terminal and append them to LOGFILE.
run_logged() {
  local log=$1; shift
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ $(quote_all "$@") 2>&1 | tee -a $(quote "$log")"
  else
    mkdir -p "$(dirname "$log")"
    echo "+ $(quote_all "$@") 2>&1 | tee -a $(quote "$log")" >&2
    "$@" 2>&1 | tee -a "$log"
  fi
}

ssh_all() {  # ssh_all REMOTE_COMMAND: run a shell command on every worker
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GC_COMMON[@]}" --worker=all \
    --strict-host-key-checking=no --command="$1"
}

CREATED=0
teardown() {
  local rc=$?
  if [[ $TEARDOWN == 1 && $CREATED == 1 ]]; then
    CREATED=0
    set +e
    if [[ $QUEUED == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$NAME" "${GC_COMMON[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${GC_COMMON[@]}" --quiet
    fi
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $DRY_RUN == 1 ]]; then
  # What effjax/distributed.py decides on a worker of this slice (libtpu present, HOSTS workers), computed here
  # with that environment; on the VM `python -m effjax.distributed` prints it again after the install.
  WORKER_NAMES=$(seq -s, -f 'w%g' 0 $(( HOSTS - 1 )))
  DECISION=$(cd "$SCRIPT_DIR/.." && EFFJAX_LIBTPU=1 TPU_SKIP_MDS_QUERY=1 TPU_WORKER_HOSTNAMES=$WORKER_NAMES \
    python3 -m effjax.distributed 2>&1) || DECISION="(python3 -m effjax.distributed failed: $DECISION)"
  echo "# $ACCEL: $CHIPS chip(s) on $HOSTS host(s); multi-host start-up on each worker: $DECISION"
fi

# ---------------------------------------------------------------------------------------------- 1. create
if [[ $SKIP_CREATE == 0 ]]; then
  SPOT_FLAG=()
  [[ $SPOT == 0 ]] || SPOT_FLAG=(--spot)
  if [[ $QUEUED == 1 ]]; then
    CREATED=1
    run gcloud compute tpus queued-resources create "$NAME" "${GC_COMMON[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${SPOT_FLAG[@]}" "${CREATE_ARGS[@]}"
    # Poll until the queued resource is ACTIVE (capacity granted and the VM is up).
    DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${GC_COMMON[@]}" --format='value(state.state)')
    if [[ $DRY_RUN == 1 ]]; then
      run "${DESCRIBE[@]}"
      echo "# (poll every ${POLL_INTERVAL}s until the state is ACTIVE)"
    else
      waited=0
      while :; do
        state=$(run "${DESCRIBE[@]}" 2>/dev/null || echo UNKNOWN)
        echo "tpu_vm.sh: queued resource $NAME: $state (${waited}s)" >&2
        case $state in
          ACTIVE) break ;;
          FAILED|SUSPENDED|SUSPENDING) echo "tpu_vm.sh: error: queued resource $NAME is $state" >&2; exit 1 ;;
        esac
        if (( waited >= POLL_TIMEOUT )); then
          echo "tpu_vm.sh: error: queued resource $NAME not ACTIVE after ${POLL_TIMEOUT}s" >&2; exit 1
        fi
        sleep "$POLL_INTERVAL"; waited=$((waited + POLL_INTERVAL))
      done
    fi
  else
    CREATED=1
    run gcloud compute tpus tpu-vm create "$NAME" "${GC_COMMON[@]}" \
      --accelerator-type="$ACCEL" --version="$VERSION" "${SPOT_FLAG[@]}" "${CREATE_ARGS[@]}"
  fi
fi

# ---------------------------------------------------------------------------------------------- 2. code
REMOTE_DIR='~/effjax'   # expanded by the remote shell
if [[ $SKIP_SETUP == 0 ]]; then
  if [[ $REPO_IS_LOCAL == 1 ]]; then
    # Stage a clean copy (no virtualenv, git objects or caches), then copy it to every worker.
    STAGE="${TMPDIR:-/tmp}/effjax-stage-$NAME"
    run rm -rf "$STAGE"
    run mkdir -p "$STAGE/effjax"
    run tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude='*.pyc' \
      --exclude=.pytest_cache --exclude='*.egg-info' --exclude=./launch-logs --exclude=./runs -cf "$STAGE/effjax.tar" .
    run tar -C "$STAGE/effjax" -xf "$STAGE/effjax.tar"
    ssh_all "rm -rf $REMOTE_DIR"
    run gcloud compute tpus tpu-vm scp --recurse --worker=all "${GC_COMMON[@]}" \
      --strict-host-key-checking=no "$STAGE/effjax" "$NAME:~/"
    run rm -rf "$STAGE"
  else
    BRANCH_ARGS=()
    [[ -z $BRANCH ]] || BRANCH_ARGS=(--branch "$BRANCH")
    ssh_all "rm -rf $REMOTE_DIR && git clone --depth=1 $(quote_all "${BRANCH_ARGS[@]}" "$REPO") $REMOTE_DIR"
  fi

  # ------------------------------------------------------------------------------------------ 3. install
  # uv gives every worker a Python 3.11 (downloaded when the image has only 3.10) and resolves -e .[tpu,gcs]:
  # jax[tpu] within our jax pin (so jax, jaxlib and libtpu match), gcsfs and google-cloud-storage for gs://.
  # Then each worker prints its interpreter, jax and the multi-host decision effjax will take there.
  ssh_all "set -e; cd $REMOTE_DIR; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || python3 -m pip install -q --user uv; \
uv venv -q --python $PYTHON_VERSION .venv; . .venv/bin/activate; uv pip install -q -e '.[tpu,gcs]'; \
python -c 'import sys, jax; print(\"effjax env: python\", sys.version.split()[0], \"jax\", jax.__version__)'; \
python -m effjax.distributed"
fi

# ---------------------------------------------------------------------------------------------- 4. train
# require_backend=tpu: a worker whose jax fell back to the CPU stops in one line instead of training there (an
# argument after -- can override it).
MAIN_CMD=$(quote_all python -m effjax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.train.require_backend=tpu "${EXTRA[@]}")
set +e
run_logged "$LOG" gcloud compute tpus tpu-vm ssh "$NAME" "${GC_COMMON[@]}" --worker=all \
  --strict-host-key-checking=no --command="cd $REMOTE_DIR && . .venv/bin/activate && $MAIN_CMD"
RC=$?
set -e
if [[ $RC == 75 ]]; then  # effjax's "preempted" code (effjax/errors.py): a checkpoint was saved
  echo "tpu_vm.sh: training was preempted (exit 75, checkpoint saved): rerun this command to resume" \
       "(add --skip-create --skip-setup while the VM is still up; with --queued a new resource is queued)" >&2
elif [[ $DRY_RUN == 0 && $RC != 0 ]]; then
  echo "tpu_vm.sh: error: training exited with status $RC (log: $LOG)" >&2
fi
# ---------------------------------------------------------------------------------------------- 5. teardown
exit "$RC"   # the EXIT trap deletes the VM when --teardown was given
