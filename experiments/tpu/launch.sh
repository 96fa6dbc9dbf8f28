#!/usr/bin/env bash
# Runs dimo_jax on a Cloud TPU VM (one host or a multi-host slice): creates the TPU VM or reuses
# it, installs the project on every worker, copies the config file to every worker and runs
#   python -m dimo_jax.main --config=<config> --workdir=<workdir> [--config.key=value ...]
# on all workers at once (the same command on every host; JAX finds the other hosts itself).
#
# Preemption: SIGTERM makes the training loops write a final checkpoint; rerunning the same
# launch command recreates a preempted VM, reinstalls and resumes from the latest checkpoint in
# the workdir. See experiments/tpu/README.md.
#
# Example:
#   bash experiments/tpu/launch.sh --name=dimo --zone=us-central2-b --accelerator-type=v4-8 \
#     --config=configs/digits.py --workdir=gs://my-bucket/dimo/digits --config.distill.steps=3000
# Add --dry-run to print the commands instead of running them.
set -euo pipefail

REPO_DEFAULT="https://github.com/dimo-jax/dimo_jax"

NAME="dimo-jax"
ZONE="us-central2-b"
ACCELERATOR="v4-8"
VERSION=""
CONFIG="configs/digits.py"
WORKDIR=""
PROJECT=""
REPO="$REPO_DEFAULT"
REF="main"
JAX_VERSION="0.10.2"
PYTHON_VERSION="3.11"
SPOT=0
SKIP_INSTALL=0
DETACH=0
DRY_RUN=0
OVERRIDES=()

# Paths on the workers, relative to the login user's home.
REMOTE_DIR="dimo_jax_run"
VENV="dimo_venv"

usage() {
  cat <<EOF
Usage: bash experiments/tpu/launch.sh --workdir=DIR [options] [--config.key=value ...]

  --name=NAME               TPU VM name (default: $NAME)
  --zone=ZONE               zone (default: $ZONE)
  --accelerator-type=TYPE   e.g. v4-8, v4-32, v5litepod-8, v5p-8, v6e-8 (default: $ACCELERATOR)
  --version=VERSION         TPU software version (default: tpu-ubuntu2204-base for v2-v4,
                            v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --config=FILE[:ARG]       config file, copied to every worker (default: $CONFIG)
  --workdir=DIR             checkpoints, logs, samples: gs://bucket/path, or a local path on
                            single-host TPU VMs (required)
  --project=PROJECT         Google Cloud project (default: gcloud's configured project)
  --repo=URL                repository to install (default: $REPO_DEFAULT)
  --ref=REF                 branch, tag or commit to install (default: $REF)
  --jax-version=VERSION     jax[tpu] version (default: $JAX_VERSION, the project's pin)
  --python=VERSION          Python of the virtual environment on the workers (default: $PYTHON_VERSION)
  --spot                    create a Spot TPU VM (cheaper, can be preempted)
  --skip-install            do not reinstall (the VM already has this ref installed)
  --detach                  run in the background on the workers (log: ~/$REMOTE_DIR/run.log)
  --dry-run                 print every command instead of running it
  --config.KEY=VALUE        passed to dimo_jax.main unchanged (any number)
  -h, --help                this text

Rerunning the same command resumes: the VM is reused (or recreated when preempted) and
dimo_jax.main continues from the latest checkpoint in --workdir.
EOF
}

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

for arg in "$@"; do
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator-type=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --repo=*) REPO="${arg#*=}" ;;
    --ref=*) REF="${arg#*=}" ;;
    --jax-version=*) JAX_VERSION="${arg#*=}" ;;
    --python=*) PYTHON_VERSION="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$arg' (options take the form --key=value; see --help)" ;;
  esac
done

# ------------------------------------------------------------------------------ checks
[[ -n "$WORKDIR" ]] || die "--workdir is required, e.g. --workdir=gs://my-bucket/dimo/digits"
for pair in "name:$NAME" "zone:$ZONE" "repo:$REPO" "ref:$REF"; do
  [[ -n "${pair#*:}" ]] || die "--${pair%%:*} must not be empty"
done

CONFIG_FILE="${CONFIG%%:*}"
CONFIG_ARG=""
[[ "$CONFIG" == *:* ]] && CONFIG_ARG=":${CONFIG#*:}"
[[ -f "$CONFIG_FILE" ]] || die "config file '$CONFIG_FILE' not found (from $(pwd)); run from the repository \
root or pass --config=<path to a config file>"
[[ "$CONFIG_FILE" == *.py ]] || die "--config=$CONFIG: the config must be a .py file"

# vX-N: N TensorCores (v2-v4, v5p) or chips (v5e, v6e); a slice above 8 spans several hosts.
if [[ ! "$ACCELERATOR" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]]; then
  die "--accelerator-type=$ACCELERATOR is not a TPU accelerator type such as v4-8, v5litepod-8 or v6e-8"
fi
FAMILY="${BASH_REMATCH[1]}"
SIZE="${BASH_REMATCH[2]}"
if [[ -z "$VERSION" ]]; then
  case "$FAMILY" in
    v5litepod | v5e) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p) VERSION="v2-alpha-tpuv5" ;;
    v6e) VERSION="v2-alpha-tpuv6e" ;;
    *) VERSION="tpu-ubuntu2204-base" ;;
  esac
fi
if (( SIZE > 8 )) && [[ "$WORKDIR" != gs://* ]]; then
  die "--workdir=$WORKDIR is local but $ACCELERATOR spans several hosts, which must share the checkpoints; \
use a gs:// workdir"
fi

# ------------------------------------------------------------------------------ commands
# Arguments that need it are single-quoted, so the printed commands can be pasted into a shell.
quote() {
  local a="$1"
  if [[ -z "$a" || "$a" =~ [^A-Za-z0-9_@%+=:,./-] ]]; then
    printf "'%s'" "${a//\'/\'\\\'\'}"
  else
    printf '%s' "$a"
  fi
}

cmdline() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}

show() { printf '+ %s\n' "$(cmdline "$@")"; }

# Every command goes through run: printed (dry run) or echoed to stderr and executed.
# run --capture CMD... stores CMD's stdout in RUN_OUTPUT (empty when CMD fails); in a dry run
# RUN_OUTPUT is $DIMO_DRY_RUN_DESCRIBE (what a describe would report; default: no VM).
RUN_OUTPUT=""
run() {
  local capture=0
  if [[ "$1" == "--capture" ]]; then capture=1; shift; fi
  if (( DRY_RUN )); then
    show "$@"
    (( capture )) && RUN_OUTPUT="${DIMO_DRY_RUN_DESCRIBE:-}"
    return 0
  fi
  show "$@" >&2
  if (( capture )); then
    RUN_OUTPUT="$("$@" 2>/dev/null)" || RUN_OUTPUT=""
  else
    "$@"
  fi
}

note() { echo "# $*"; }

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

if (( ! DRY_RUN )) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
fi

# 1. Create the TPU VM, or reuse it.
run --capture "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" "--format=value(state)"
STATE="$RUN_OUTPUT"
create() {
  local flags=("--accelerator-type=$ACCELERATOR" "--version=$VERSION")
  (( SPOT )) && flags+=("--spot")
  run "${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" "${flags[@]}"
}
case "$STATE" in
  "")
    note "no TPU VM '$NAME' in $ZONE: creating it ($ACCELERATOR, $VERSION)"
    create ;;
  READY)
    note "reusing the TPU VM '$NAME' (state READY)" ;;
  PREEMPTED | TERMINATED)
    note "TPU VM '$NAME' is $STATE: deleting and recreating it (a gs:// workdir keeps the checkpoints)"
    run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
    create ;;
  STOPPED)
    note "starting the stopped TPU VM '$NAME'"
    run "${TPU[@]}" start "$NAME" "${GCLOUD_FLAGS[@]}" ;;
  *)
    die "TPU VM '$NAME' is in state $STATE; wait until it is READY (gcloud compute tpus tpu-vm describe $NAME \
--zone=$ZONE) and rerun" ;;
esac

# 2. Install on every worker: a Python >= 3.11 virtual environment (the TPU images ship 3.10) made
#    with uv, jax[tpu], then the project at REF (reinstalled, so a moved branch is picked up).
UV='$HOME/.local/bin/uv'
PY="\$HOME/$VENV/bin/python"
PIP="$UV pip install --quiet --python $PY"
if (( ! SKIP_INSTALL )); then
  INSTALL="python3 -m pip install --quiet --user --upgrade uv"
  INSTALL+=" && { test -x $PY || $UV venv --quiet --python $PYTHON_VERSION \$HOME/$VENV; }"
  INSTALL+=" && $PIP \"jax[tpu]==$JAX_VERSION\""
  INSTALL+=" && $PIP --reinstall-package dimo_jax \"git+$REPO@$REF\""
  INSTALL+=" && mkdir -p \$HOME/$REMOTE_DIR/configs"
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all "--command=$INSTALL"
fi

# 3. The config file, to the same relative path on every worker. Its imports (e.g. `from configs
#    import digits`) resolve to the installed package.
REMOTE_CONFIG="configs/$(basename "$CONFIG_FILE")"
run "${TPU[@]}" scp "$CONFIG_FILE" "$NAME:$REMOTE_DIR/$REMOTE_CONFIG" "${GCLOUD_FLAGS[@]}" --worker=all

# 4. The same command on every worker.
JOB="$PY -m dimo_jax.main $(quote "--config=$REMOTE_CONFIG$CONFIG_ARG") $(quote "--workdir=$WORKDIR")"
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do JOB+=" $(quote "$o")"; done
if (( DETACH )); then
  JOB="nohup $JOB > \$HOME/$REMOTE_DIR/run.log 2>&1 < /dev/null &"
fi
note "running on all workers; rerun this same command to resume from the latest checkpoint in $WORKDIR"
run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all "--command=cd \$HOME/$REMOTE_DIR && $JOB"
if (( DETACH )); then
  note "detached; follow worker 0's log with:"
  note "  $(cmdline "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0 "--command=tail -f \$HOME/$REMOTE_DIR/run.log")"
fi
