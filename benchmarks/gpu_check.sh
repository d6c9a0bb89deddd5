#!/usr/bin/env bash
# Issue #12's accelerator figures in one prepared run (a GPU or TPU machine; at most 570 s, the
# sum of the steps' limits; not yet run on one):
#   1. useful FLOP/s of local training in bf16 against the chip's peak and a bf16 8192^3 dot,
#      on the shipped model with 10 local steps (benchmarks/mfu.py);
#   2. the round: one-jit vmapped round vs the per-client loop, 10 and 100 clients
#      (benchmarks/round_time.py, default base config);
#   3. the aggregation table, 10/100/1000 clients x 8/64 experts (benchmarks/aggregation_time.py);
#   4. the aggregation's building blocks at 1000 clients x 64 experts next to the formulations
#      tried on CPU (scan vs einsum vs reduction over clients...: benchmarks/
#      aggregation_breakdown.py), so that the choice can be made per backend.
#
# Usage, from the repository root:
#   bash benchmarks/gpu_check.sh              # the full check
#   bash benchmarks/gpu_check.sh --smoke      # tiny sizes, any machine (tests/test_benchmarks.py)
# Environment: OUT (where logs and result JSONs are copied; default /tmp/fedalign_gpu_check),
# PYTHON (default python3), PEAK_TFLOPS (the chip's dense bf16 peak; default 989, an H100/H200
# SXM's data-sheet figure), FEDALIGN_BENCHMARK_RESULTS (where the scripts write their JSONs;
# default benchmarks/results).
#
# A machine without network but with JAX/flax/optax/orbax (e.g. this workplace's device image)
# lacks ml_collections: put its wheel in .whl/ (`python3 -m pip download --no-deps
# --only-binary=:all: -d .whl ml_collections`) and the script installs what .whl holds first.
# TFDS, array_record, dp-accounting and torch are not needed by these three benchmarks.
# Each step has its own time limit; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fedalign_gpu_check}"
PY="${PYTHON:-python3}"
PEAK="${PEAK_TFLOPS:-989}"
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedalign_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/fedalign_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

{
  nvidia-smi 2>/dev/null || true
  "$PY" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

failed=0
step() { # step NAME SECONDS ARGS...: one benchmark, its log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$PY" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  if [ $rc -ne 0 ]; then
    echo "!! $name failed (exit $rc)"
    failed=1
  fi
  # results so far into $OUT after every step: a run stopped from outside keeps them
  cp "${FEDALIGN_BENCHMARK_RESULTS:-benchmarks/results}"/*_"$TAG"*.json "$OUT"/ 2>/dev/null
  return 0
}

if [ $SMOKE = 1 ]; then
  TAG=gpu_check_smoke
  step round_time 600 benchmarks/round_time.py --clients 2 --steps 1 --reps 1 --no-mesh \
    --no-fedalign --chunk-size 0 --batch 1 --seq 16 --vocab 256 --tag "$TAG"
  step mfu 600 benchmarks/mfu.py --config=configs/default.py --reps 1 --dtype bfloat16 \
    --dot_dtype bfloat16 --dot_size 256 --peak_tflops "$PEAK" --tag "$TAG"
  step aggregation 600 benchmarks/aggregation_time.py --clients 4 --experts 4 --reps 1 \
    --dot 256 --tag "$TAG"
  step breakdown 600 benchmarks/aggregation_breakdown.py --clients 8 --experts 4 --reps 1 \
    --tag "$TAG"
else
  # The limits add up to 570 s, under the device tool's 600 s per command; the most wanted
  # figures first.
  TAG=gpu
  step mfu 120 benchmarks/mfu.py --config=configs/default.py --set train.local_steps=10 \
    --dtype bfloat16 --dot_dtype bfloat16 --dot_size 8192 --peak_tflops "$PEAK" --tag "${TAG}_bf16"
  step round_time 240 benchmarks/round_time.py --clients 10 100 --chunk-clients 10 100 --reps 3 \
    --no-mesh --tag "$TAG"
  step aggregation 150 benchmarks/aggregation_time.py --dot 8192 --tag "$TAG"
  step breakdown 60 benchmarks/aggregation_breakdown.py --clients 1000 --tag "${TAG}_1000"
fi
ls -l "$OUT"
exit $failed
