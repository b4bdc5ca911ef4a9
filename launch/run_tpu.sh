#!/usr/bin/env bash
# What every TPU worker runs (launch/tpu_vm.sh starts it on all workers at once):
#   bash launch/run_tpu.sh --config=configs/cifar10.py --workdir=gs://BUCKET/RUN [--config.x=y ...]
# jax.distributed.initialize() auto-detects the pod slice; each worker reads its data partitions.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f "$HOME/bnsynth-venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$HOME/bnsynth-venv/bin/activate"
fi
export TF_CPP_MIN_LOG_LEVEL=2
exec python3 -m bnsynth_jax.main --distributed "$@"
