#!/usr/bin/env bash
# Local CUDA GPUs: one process drives every visible GPU (the 'data' mesh axis spans them).
#
#   launch/gpu.sh [--dry-run] [--install] --config=configs/cifar10.py --workdir=DIR [MAIN_ARGS...]
#
# --install   pip install -e '.[cuda12]' first (jax with CUDA 12 wheels)
# --dry-run   print the commands instead of running them
# Several GPU hosts: add --distributed --coordinator=HOST0:PORT --num_processes=N --process_id=I
# on each host (same command otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
INSTALL=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done

run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ "$INSTALL" == 1 ]]; then
  run_cmd python3 -m pip install -e '.[cuda12]'
fi
# TensorFlow (TFDS input only) must not take GPU memory; JAX preallocates 75% by default.
export TF_CPP_MIN_LOG_LEVEL=2
run_cmd python3 -m bnsynth_jax.main "${ARGS[@]}"
