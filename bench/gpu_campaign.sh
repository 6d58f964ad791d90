#!/usr/bin/env bash
# The one-call GPU campaign: everything to run on a machine with a GPU, in one command
# that ends in under 8 minutes on an H100/H200, leaving at most 8 flat files in OUTDIR:
#
#   bench/gpu_campaign.sh OUTDIR [--dry-run]        (or: make gpu OUT=OUTDIR)
#
# On a bare machine without network whose Python already has torch and Triton (pytest, pybind11,
# ninja too): installs fastrob in place without touching torch, then `fastrob info`, the `-m cuda`
# tests (time-boxed), `fastrob check --record` (the record gets the passing tests as evidence) and the
# benchmarks (fused ops vs eager with GB/s against the copy bandwidth of the same run; the
# regularized steps; the attacks against torchattacks, skipped when torchattacks is absent). A step
# that fails is logged and the next one still runs; the exit status is the number of failed steps.
#
# --dry-run: the same steps in their CPU form (no install, the Triton interpreter, the cuda tests
# only collected, one op checked, benchmarks skipped), which CI runs so that this script cannot rot.
#
# Files in OUTDIR: campaign.log (every step's output), summary.txt (one line a step), check.txt (the
# self-check table), verified.json (the record), pytest-cuda.xml (JUnit), bench.csv (the benchmark
# rows). Budgets (seconds) can be overridden: CAMPAIGN_BUDGET (total, default 480), PYTEST_BUDGET.
set -uo pipefail

OUT=""
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "usage: bench/gpu_campaign.sh OUTDIR [--dry-run]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${CAMPAIGN_BUDGET:-480}"
LOG="$OUT/campaign.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0
START=$SECONDS

# step NAME SECONDS COMMAND...: runs COMMAND with at most SECONDS (and what is left of the budget,
# keeping 20 s for the last copies), logs its output and its status, and never stops the campaign.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 20))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "$name: skipped (time budget spent)" | tee -a "$SUMMARY"
    return
  fi
  echo "===== $name (limit ${limit}s): $*" >>"$LOG"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  [ "$verdict" != "ok" ] && FAILED=$((FAILED + 1))
  echo "$name: $verdict in $((SECONDS - t0)) s" | tee -a "$SUMMARY" >>"$LOG"
  echo "$name: $verdict in $((SECONDS - t0)) s"
}

skip() {
  echo "$1: skipped ($2)" | tee -a "$SUMMARY"
  echo "===== $1: skipped ($2)" >>"$LOG"
}

has_module() {
  "$PY" -c "import $1" >/dev/null 2>&1
}

if [ "$DRY" -eq 1 ]; then
  export TRITON_INTERPRET=1
  skip install "dry run: the checkout is already importable"
else
  # --no-deps --no-build-isolation: the machine's torch stays as it is, and nothing is downloaded
  # the extension for this GPU only (sm_90 on an H100/H200) keeps the nvcc build short
  export FASTROB_CUDA_ARCH="${FASTROB_CUDA_ARCH:-90}"
  step install 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi

step info 60 "$PY" -m fastrob info

if [ "$DRY" -eq 1 ]; then
  step pytest-cuda 120 "$PY" -m pytest -q -m cuda --collect-only -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml"
  step check 120 bash -o pipefail -c "'$PY' -m fastrob check --op sqnorm --record --record-path '$OUT/verified.json' | tee '$OUT/check.txt'"
  skip benchmarks "dry run"
else
  step pytest-cuda "${PYTEST_BUDGET:-120}" "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml"
  # the record gets every (op, backend, GPU) whose checks all passed, with that op's passing cuda tests
  tests_arg=()
  [ -s "$OUT/pytest-cuda.xml" ] && tests_arg=(--tests-passed "$OUT/pytest-cuda.xml")
  # 33 checks (5 ops x cuda, triton + layer_norm x triton, x 3 dtypes); most of the time is Triton's JIT
  # compile of the check shapes
  step check 120 bash -o pipefail -c "'$PY' -m fastrob check --record ${tests_arg[*]} | tee '$OUT/check.txt'"
  cp fastrob/verified.json "$OUT/verified.json" 2>/dev/null
  # benchmarks append to bench/results/<device>.csv; only this run's rows go to OUTDIR
  mkdir -p bench/results
  BENCH_MARK="$(mktemp)"
  step bench-pgd_step 40 "$PY" -m bench.pgd_step
  # with the rows of the modern activations and layer norm (6 ops x 3 passes x up to 3 providers more)
  step bench-ops 90 "$PY" -m bench.ops
  step bench-regularizers 70 "$PY" -m bench.regularizers
  step bench-attention 90 "$PY" -m bench.attention
  # regularized steps of a ConvNeXt-like model (grouped convolutions routed) and J-SIGR
  step bench-any_model 60 "$PY" -m bench.any_model
  if has_module torchattacks; then
    step bench-attacks 60 "$PY" -m bench.attacks
  else
    skip bench-attacks "torchattacks is not installed (pip install --no-deps torchattacks to include it)"
  fi
  if ! has_module "fastrob.attacks" || ! "$PY" -c "from fastrob.attacks import AutoAttack" >/dev/null 2>&1; then
    skip autoattack "fastrob.attacks.AutoAttack is absent in this checkout"
  fi
  # the rows this run appended (files newer than the mark), header once
  first=1
  for csv in $(find bench/results -name '*.csv' -newer "$BENCH_MARK"); do
    if [ "$first" -eq 1 ]; then cat "$csv" >"$OUT/bench.csv"; first=0; else tail -n +2 "$csv" >>"$OUT/bench.csv"; fi
  done
  rm -f "$BENCH_MARK"
fi

echo "campaign: $FAILED failed steps in $((SECONDS - START)) s (budget ${BUDGET}s)" | tee -a "$SUMMARY"
exit "$FAILED"
