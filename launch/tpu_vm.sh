#!/usr/bin/env bash
# Cloud TPU VM / pod slice launcher for bnsynth_jax.
#
#   launch/tpu_vm.sh [--dry-run] ACTION --name NAME --zone ZONE [options] [-- MAIN_ARGS...]
#
# ACTION: create | setup | run | logs | delete | all (create + setup + run + logs)
#   create   gcloud compute tpus tpu-vm create (a single host or a pod slice)
#   setup    copy this checkout (git archive of HEAD) to every worker, install jax[tpu] + package
#   run      start launch/run_tpu.sh on every worker (jax.distributed), in the background
#   logs     stream worker 0's log
#   delete   delete the TPU VM
# Options:
#   --accelerator TYPE  (v4-8, v4-32, v5litepod-16, ...; default v4-8)
#   --version VERSION   (TPU software version; default tpu-ubuntu2204-base)
#   --project PROJECT   --spot
#   --config FILE       (default configs/cifar10.py)
#   --workdir DIR       (a gs:// path every worker can reach; required for run)
# Everything after -- is passed to python -m bnsynth_jax.main on every worker.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

DRY_RUN=0
ACTION=""
NAME=""
ZONE=""
ACCELERATOR="v4-8"
VERSION="tpu-ubuntu2204-base"
PROJECT=""
SPOT=0
CONFIG="configs/cifar10.py"
WORKDIR=""
MAIN_ARGS=()
REMOTE_DIR="bnsynth_jax"

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --accelerator) ACCELERATOR="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --spot) SPOT=1 ;;
    --config) CONFIG="$2"; shift ;;
    --workdir) WORKDIR="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    create|setup|run|logs|delete|all) ACTION="$1" ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[[ -n "$ACTION" ]] || die "no action: use create, setup, run, logs, delete or all (see --help)"
[[ -n "$NAME" ]] || die "--name is required: the TPU VM's name"
[[ -n "$ZONE" ]] || die "--zone is required, e.g. --zone us-central2-b"

COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

# Runs (or, with --dry-run, prints) one command, quoted so it can be pasted.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

do_create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run_cmd gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" \
    --accelerator-type "$ACCELERATOR" --version "$VERSION" "${extra[@]}"
}

do_setup() {
  local archive="/tmp/${NAME}-bnsynth.tar.gz"
  run_cmd git archive --format=tar.gz -o "$archive" HEAD
  run_cmd gcloud compute tpus tpu-vm scp "$archive" "$NAME:~/bnsynth.tar.gz" \
    "${COMMON[@]}" --worker=all
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command \
    "mkdir -p ~/$REMOTE_DIR && tar xzf ~/bnsynth.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && python3 -m venv ~/bnsynth-venv && ~/bnsynth-venv/bin/pip install -q --upgrade pip && ~/bnsynth-venv/bin/pip install -q -e '.[tpu]'"
}

do_run() {
  [[ -n "$WORKDIR" ]] || die "--workdir is required for run: a gs:// path every worker can reach"
  local args
  args="$(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "${MAIN_ARGS[@]}")"
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all --command \
    "cd ~/$REMOTE_DIR && mkdir -p ~/bnsynth_logs && nohup bash launch/run_tpu.sh $args > ~/bnsynth_logs/run.log 2>&1 &"
}

do_logs() {
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=0 --command \
    "tail -n +1 -F ~/bnsynth_logs/run.log"
}

do_delete() {
  run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
}

case "$ACTION" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all) do_create; do_setup; do_run; do_logs ;;
esac
