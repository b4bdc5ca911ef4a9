#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (issue 27, item 6): the CIFAR-10 default at full
# scale (configs/cifar10.py:gpu_quick: ResNet-18 teacher on all 50,000 images, 50,000 generator
# images, mixed-view students, the real baseline on the same recipe), its row in a section with
# "GPU" in the title, the float32 / bfloat16 throughput of its steps first (the Throughput
# section, device column), the privacy audit last if time is left.
#
#   launch/device_rows.sh --prepare   here, once (needs the package registries): fills .device/
#                                     with the CIFAR-10 archive and the wheels the device lacks
#   launch/device_rows.sh             on the device, e.g. through the device tool: command
#                                     "BNSYNTH_DEVICE_SECONDS=<limit_s - 30> bash launch/device_rows.sh",
#                                     carry [".device"]
#   launch/device_rows.sh --dry-run   print the pipeline command instead of running anything
#
# What comes back under $OUT (default .device/out): log.txt, RESULTS.md (a copy of
# benchmarks/RESULTS.md with the new rows appended: take them with diff), throughput.json and
# the workdir's small files (reports, manifests, timings; copied every 30 s and at exit).
# The workdir stays in $BNSYNTH_DEVICE_DIR (default /tmp/bnsynth_device): a second call on the
# same warm machine resumes where the first stopped (XLA's compilation cache is kept there too).
# BNSYNTH_DEVICE_SECONDS (default 560): everything ends before it. BNSYNTH_DEVICE_SCALE=smoke:
# the same steps on a 500-image slice with tiny schedules, on a CPU (a check, not a measurement).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
CARRY=${BNSYNTH_DEVICE_CARRY:-.device}
SCALE=${BNSYNTH_DEVICE_SCALE:-full}
DEVICE_DIR=${BNSYNTH_DEVICE_DIR:-/tmp/bnsynth_device}
DATA="$DEVICE_DIR/cifar10_$SCALE"
WORKDIR="$DEVICE_DIR/gpu_quick_$SCALE"
OUT=${OUT:-$PWD/$CARRY/out}
LIMIT=${BNSYNTH_DEVICE_SECONDS:-560}
THROUGHPUT_SECONDS=${BNSYNTH_DEVICE_THROUGHPUT_SECONDS:-75}   # the throughput rows' cap
START=$SECONDS
DRY_RUN=0
PREPARE=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --prepare) PREPARE=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "launch/device_rows.sh: unknown argument $arg (use --prepare, --dry-run or --help)" >&2
       exit 2 ;;
  esac
done

# Pure-Python wheels of what the device image lacks (it has jax, flax, optax, orbax-checkpoint,
# pillow, scikit-learn, absl-py and chex; jax-privacy is for DP mode only, not carried), and
# matplotlib's for CPython 3.12 (report pictures; without it the audit stage is left out).
# module:wheel (the wheel's name prefix, also its distribution name for pip), checked by
# `import module` on the device.
PURE=(ml_collections:ml_collections dm_pix:dm_pix tensorboardX:tensorboardx
  dp_accounting:dp_accounting kymatio:kymatio attr:attrs mpmath:mpmath packaging:packaging
  cycler:cycler pyparsing:pyparsing dateutil:python_dateutil)
BINARY=(matplotlib:matplotlib contourpy:contourpy kiwisolver:kiwisolver fontTools:fonttools)
ARCHIVE=../shared/data/cifar10/cifar10-jpeg.tar.gz

prepare() {
  if [[ ! -f "$ARCHIVE" ]]; then
    echo "launch/device_rows.sh: $ARCHIVE not found: run from the repository beside ../shared" >&2
    exit 1
  fi
  rm -rf "$CARRY/wheels"
  mkdir -p "$CARRY/wheels"
  cp "$ARCHIVE" "$CARRY/cifar10-jpeg.tar.gz"
  local target=(--no-deps --only-binary=:all: --python-version 312 -d "$CARRY/wheels")
  "$PY" -m pip download -q "${target[@]}" "${PURE[@]#*:}"
  "$PY" -m pip download -q "${target[@]}" --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 "${BINARY[@]#*:}"
  du -sh "$CARRY"
}

# Installs into $DEVICE_DIR/site what does not import already (never over the image's own).
install_missing() {
  local site="$DEVICE_DIR/site" entry wheel wheels=()
  mkdir -p "$site"
  for entry in "${PURE[@]}" "${BINARY[@]}"; do
    if ! PYTHONPATH="$site" "$PY" -c "import ${entry%%:*}" 2>/dev/null; then
      for wheel in "$CARRY/wheels/${entry#*:}"-*.whl; do
        if [[ -e "$wheel" ]]; then
          wheels+=("$wheel")
        else
          echo "device_rows: no wheel for ${entry%%:*} in $CARRY/wheels (run --prepare here)"
        fi
      done
    fi
  done
  (( ${#wheels[@]} )) || return 0
  # All at once; if pip refuses (a CPython-3.12 wheel on another Python), one at a time.
  "$PY" -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}" || for wheel in \
      "${wheels[@]}"; do
    "$PY" -m pip install -q --no-index --no-deps --target "$site" "$wheel" ||
      echo "device_rows: $wheel not installed (this Python cannot take it)"
  done
}

unpack_cifar() {
  if [[ -d "$DATA/test" ]]; then return 0; fi
  rm -rf "$DATA.tmp"
  mkdir -p "$DATA.tmp"
  local only=()
  [[ "$SCALE" != smoke ]] || only=(--wildcards 'train/*/00[0-4]?.jpg' 'test/*/00[0-1]?.jpg')
  tar xzf "$CARRY/cifar10-jpeg.tar.gz" -C "$DATA.tmp" "${only[@]}"
  mv "$DATA.tmp" "$DATA"
}

left() { echo $(( LIMIT - (SECONDS - START) )); }

pipeline_args() {
  local args=(--config=configs/cifar10.py:gpu_quick --workdir="$WORKDIR"
    --config.data.root="$DATA")
  if [[ "${1:-}" == audit ]]; then
    args+=(--stages=audit)
  else
    args+=('--stages=teacher,stats,synthesize,relabel,student,evaluate')
  fi
  if [[ "$SCALE" == smoke ]]; then
    args+=(--config.teacher.num_steps=4 --config.teacher.batch_size=50
      --config.teacher.eval_every_epochs=0 --config.synthesis.images_per_class=2
      --config.synthesis.batch_size=20 --config.synthesis.iterations=3
      --config.synthesis.generator.steps=2 --config.student.epochs=2
      --config.student.batch_size=20 --config.relabel.epochs=2 --config.synthesis.view_epochs=2
      --config.relabel.batch_size=20 --config.audit.mia_examples=20 --config.audit.bootstrap=5)
  fi
  printf '%s\n' "${args[@]}"
}

# Runs the pipeline (or its audit stage) until `seconds`; returns its exit status.
run_pipeline() {
  local seconds=$1 stage=${2:-} args
  mapfile -t args < <(pipeline_args "$stage")
  # --foreground: the pipeline stays in this process group (a kill of the call reaches it).
  timeout --foreground --signal=TERM --kill-after=15 "$seconds" \
    "$PY" -m bnsynth_jax.main "${args[@]}"
}

copy_small_files() {
  [[ -d "$WORKDIR" ]] || return 0
  mkdir -p "$OUT/gpu_quick"
  (cd "$WORKDIR" && find . -maxdepth 3 -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' \) \
      -size -2048k -print0 | xargs -0 -r cp --parents -t "$OUT/gpu_quick")
}

finish() {
  local rc=$?
  [[ -z "${COPIER:-}" ]] || kill "$COPIER" 2>/dev/null || true
  copy_small_files || true
  echo "device_rows: done in $(( SECONDS - START ))s, exit $rc; the new rows:" \
    "diff benchmarks/RESULTS.md OUT/RESULTS.md (OUT: where this call's files came back)"
  exec >&- 2>&-
  [[ -z "${TEE:-}" ]] || wait "$TEE" 2>/dev/null || true
}

device_run() {
  mkdir -p "$OUT" "$DEVICE_DIR"
  exec > >(tee -a "$OUT/log.txt") 2>&1
  TEE=$!
  trap finish EXIT
  echo "device_rows: $(date -u +%FT%TZ), scale $SCALE, limit ${LIMIT}s"
  if [[ ! -d "$DATA/test" && ! -f "$CARRY/cifar10-jpeg.tar.gz" ]]; then
    echo "device_rows: $CARRY/cifar10-jpeg.tar.gz missing: run launch/device_rows.sh --prepare" \
      "here and carry $CARRY"
    exit 1
  fi
  install_missing
  # The rows go to a copy of RESULTS.md that comes back (the tree here is not the repository).
  [[ -f "$OUT/RESULTS.md" ]] || cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  export BNSYNTH_RESULTS_MD="$OUT/RESULTS.md" PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR="$DEVICE_DIR/xla_cache"
  export PYTHONPATH="$PWD:$DEVICE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
  local device
  device=$("$PY" -c 'import jax; print(jax.default_backend(), jax.devices()[0].device_kind)')
  echo "device_rows: backend and device: $device"
  if [[ "$SCALE" != smoke && "$device" != gpu* ]]; then
    echo "device_rows: JAX sees no GPU ($device): nothing run (BNSYNTH_DEVICE_SCALE=smoke on a CPU)"
    exit 1
  fi
  unpack_cifar
  local steps=20 rc=0
  [[ "$SCALE" != smoke ]] || steps=2
  # Throughput first, capped: a measurement even if the pipeline does not finish, and the
  # images/s that say how long it will take.
  timeout --foreground --signal=TERM "$THROUGHPUT_SECONDS" "$PY" benchmarks/throughput.py \
    --models=resnet18 --dtypes=float32,bfloat16 --batch_sizes=256 --kinds=synthesis,train \
    --steps="$steps" --repeats=2 --out="$OUT/throughput.json" \
    --note="launch/device_rows.sh, ${device#* }" || echo "device_rows: throughput stopped"
  (while sleep 30; do copy_small_files || true; done) >/dev/null 2>&1 &
  COPIER=$!
  local budget=$(( $(left) - 30 ))
  if (( budget >= 30 )); then
    run_pipeline "$budget" || rc=$?
  else
    echo "device_rows: ${budget}s left for the pipeline: not started"
    rc=124
  fi
  if [[ "$rc" == 0 ]]; then
    "$PY" benchmarks/method_rows.py --section=gpu-cifar10_gpu_quick \
      --title="GPU: the CIFAR-10 default at full scale (configs/cifar10.py:gpu_quick, launch/device_rows.sh)" \
      --real="$WORKDIR" "$WORKDIR" || echo "device_rows: method_rows.py failed"
  else
    echo "device_rows: the pipeline stopped (exit $rc) with $(left)s left: call again on the" \
      "warm machine to resume"
  fi
  if [[ "$rc" == 0 ]] && (( $(left) > 60 )) && "$PY" -c 'import matplotlib' 2>/dev/null; then
    run_pipeline "$(( $(left) - 20 ))" audit || echo "device_rows: the audit stopped (resumable)"
  fi
  return "$rc"
}

if [[ "$PREPARE" == 1 ]]; then
  prepare
elif [[ "$DRY_RUN" == 1 ]]; then
  mapfile -t ARGS < <(pipeline_args)
  printf '%q ' "$PY" -m bnsynth_jax.main "${ARGS[@]}"
  printf '\n'
else
  device_run
fi
