#!/usr/bin/env bash
# The strong student and our training step against UniMatch's own, on a lent GPU, in one call (issue 34).
#
#   bash benchmarks/gpu_student.sh prepare [UNIMATCH_SRC]   # here: .gpu-student/ (at most 60 MiB with the tree)
#   bash benchmarks/gpu_student.sh run [--smoke]            # there, from the repository root, carry .gpu-student
#
# prepare: benchmarks/gpu_student.py prepare (CamVid train/val as JPEG, label PNGs, the splits, both annotators'
# raw and CP masks computed here by bench-student's stage 0 and 1, EdgeNets' model code, the PASCAL ESPNetv2 s2.0
# weights, UniMatch's source when given) and the wheels the GPU image lacks (zarr and its codecs). Needs
# bench-student's inputs (make bench-student's third_party/ and data/ folders) and DiCENet s0.5's weights.
# run: benchmarks/gpu_student.py run (the regime table, trainings side by side on the GPU), then
# benchmarks/unimatch_step.py (our --method unimatch step against UniMatch's unimatch.py: images/s, peak memory).
# Figures go to $OUT (default work/gpu-student): gpu-student.md / .json, unimatch-step.md / .json and the log; the
# runs to $RUNS (default /tmp/gpu-student-runs). Options after `run` go to gpu_student.py run (--budget, --jobs, ...).
# run --smoke: the same path on the CPU with tiny settings, in a few minutes (`make gpu-student-smoke`).
# SEEM (benchmarks/gpu_seem.sh) does not fit in the same call's 64 MiB of carried files: it is a second call.
set -euo pipefail
here=.gpu-student
out=${OUT:-work/gpu-student}       # tables and the log
runs=${RUNS:-/tmp/gpu-student-runs}  # the training runs and generated images
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

prepare() {
  local unimatch=${1:-}
  "$python" benchmarks/gpu_student.py prepare "$here" ${unimatch:+--unimatch "$unimatch"}
  mkdir -p "$here/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$here/wheels" zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  local material tree
  material=$(du -sb "$here" | cut -f1)
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  echo "$here: $(( material / 1048576 )) MiB, with the working tree $(( (material + tree) / 1048576 )) MiB of 60"
  [ $(( material + tree )) -le $(( 60 * 1048576 )) ] || { echo "error: over 60 MiB" >&2; exit 1; }
}

run() {
  local smoke=() rest=()
  for arg in "$@"; do
    if [ "$arg" = --smoke ]; then smoke=(--smoke); else rest+=("$arg"); fi
  done
  [ -f "$here/quality.json" ] || { echo "error: $here/ missing: run 'gpu_student.sh prepare' here and carry it" >&2; exit 2; }
  mkdir -p "$out"
  run_all ${smoke[@]+"${smoke[@]}"} ${rest[@]+"${rest[@]}"} 2>&1 | tee "$out/log"
}

# The cheap step comparison first, then the table; only tables, figures and the log go to $out (the device
# machine brings back a few files), the runs stay in $runs.
run_all() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if ! "$python" -c "import zarr" 2>/dev/null; then  # the GPU image has no zarr: the carried wheels
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-student-site "$here"/wheels/*.whl
    export PYTHONPATH=/tmp/gpu-student-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1
  local start failed=0 dry=() unimatch=()
  start=$(date +%s)
  [ "${1:-}" = --smoke ] && dry=(--cpu-dry-run)
  [ -d "$here/UniMatch" ] && unimatch=(--unimatch "$here/UniMatch")
  "$python" benchmarks/unimatch_step.py --out "$runs/step" --results "$out" ${unimatch[@]+"${unimatch[@]}"} \
    ${dry[@]+"${dry[@]}"} || { echo "the step comparison FAILED"; failed=1; }
  echo "the step comparison took $(( $(date +%s) - start )) s"
  "$python" benchmarks/gpu_student.py run "$here" --out "$runs/table" --results "$out" "$@" ||
    { echo "the table FAILED"; failed=1; }
  echo "all of it took $(( $(date +%s) - start )) s"
  return $failed
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: gpu_student.sh prepare [UNIMATCH_SRC] | run [--smoke]" >&2; exit 2 ;;
esac
