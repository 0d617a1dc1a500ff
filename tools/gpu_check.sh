#!/usr/bin/env bash
# One-shot GPU check, for a lent GPU machine as it is (docs/gpu.md): at most 8 minutes on one GPU, the most valuable
# figures first, each step under its own time limit and writing its JSON into OUTDIR as soon as it has it.
#
#   bash tools/gpu_check.sh OUTDIR             # a machine whose python3 (or $PYTHON) has torch with a GPU
#   bash tools/gpu_check.sh --dry-run OUTDIR   # the same steps on the CPU at toy sizes (CI runs it)
#   bash tools/gpu_check.sh --only tests,pretrain OUTDIR   # those steps alone (a rerun in what is left of a lease)
#
# Installs nothing and calls no package manager: it runs the `python3` on PATH (or $PYTHON) from this checkout with
# PYTHONPATH set to it; a missing required package or, without --dry-run, no GPU stops it at the first step. To use
# wheels carried to the machine, install them to a folder first and put it on PYTHONPATH (docs/gpu.md).
# OUTDIR gets at most 7 files: status.json (device, each step's exit code, seconds, limit, the tests' results),
# steps.json, compiled.json, loader.json, pretrain.json, gpu_check.log and summary.md (rewritten after each step).
# Generated images and training runs go to a temporary folder outside OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
USAGE="usage: bash tools/gpu_check.sh [--dry-run] [--only STEP,...] OUTDIR"
DRY="" ONLY=""
while [ $# -gt 1 ]; do
  case $1 in
    --dry-run) DRY=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "error: unknown option $1; $USAGE" >&2; exit 2 ;;
  esac
done
OUT=${1:?$USAGE}

# Seconds per step, most valuable first. A step is stopped at its limit (then SIGKILL 5 s later): 435 s of limits
# plus 7 x 5 s of grace and a few seconds of records fit the 8 minutes (480 s).
LIMITS=(probe:30 tests:60 steps:80 compiled:100 jpegs:25 loader:60 pretrain:80)
limit() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%:*}" = "$1" ] && echo "${kv#*:}"; done; }
for name in ${ONLY//,/ }; do
  [ -n "$(limit "$name")" ] || { echo "error: --only $ONLY: no step $name (steps: ${LIMITS[*]%%:*})" >&2; exit 2; }
done
wanted() {  # the probe always runs; the test images when the loader or pretraining step is wanted
  [ -z "$ONLY" ] || [ "$1" = probe ] || [[ ",$ONLY," == *",$1,"* ]] \
    || { [ "$1" = jpegs ] && { wanted loader || wanted pretrain; }; }
}

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || { echo "error: no $PY on PATH (set PYTHON=/path/to/python)" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
if [ -z "$ONLY" ]; then  # a fresh check; with --only the other steps' results stay
  : > "$LOG"
  rm -f "$OUT/status.json" "$OUT/steps.json" "$OUT/compiled.json" "$OUT/loader.json" "$OUT/pretrain.json"
fi
echo "[gpu_check] budget (s): ${LIMITS[*]} = $(( $(printf '%s\n' "${LIMITS[@]}" | cut -d: -f2 | paste -sd+) )) \
+ 5 s grace per step; $PY; output in $OUT" | tee -a "$LOG"
FAILED=0

step() {  # name command...: run under its limit, output to the console and the log, then record it
  local name=$1 lim t0=$SECONDS rc extra=()
  shift
  wanted "$name" || return 0
  lim=$(limit "$name")
  echo "[gpu_check] $name (limit ${lim} s): $*" | tee -a "$LOG"
  timeout --kill-after=5 "$lim" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$name" = tests ] && extra=(--junit "$WORK/tests.xml")
  "$PY" -m tools.gpu_summary record "$OUT" "$name" "$rc" "$((SECONDS - t0))" "$lim" "${extra[@]}"
  "$PY" -m tools.gpu_summary "$OUT" > "$OUT/summary.md"
  echo "[gpu_check] $name: exit code $rc, $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

# the same steps either way; the dry run at toy sizes on the CPU, without compiling (a CPU compile takes minutes)
if [ -n "$DRY" ]; then
  PROBE=(--dry-run); TESTS=(--cuda-dry-run); DEV=cpu
  STEPS=(--variants atto --input-sizes 64 --batch-sizes 2 --rounds 1 --threads 1 --no-memory)  # CUDA: in-process
  COMPILED=(--candidates sparse --variants atto --input-sizes 64 --batch-sizes 2 --rounds 1 --threads 1)
  JPEGS=(--count 12 --size 96x72 --classes 2); COPIES=1
  LOADER=(--workers 0 1 --batch-size 4 --input-size 64 --rounds 1)
  RESUME=(--steps 6 --stop-at 3); PRETRAIN=(--input-size 64 --batch-size 4 --num-workers 1)
else
  PROBE=(); TESTS=(); DEV=cuda
  STEPS=(--variants atto tiny base --input-sizes 224 --batch-sizes 64 --rounds 5)
  COMPILED=(--candidates sparse sparse+compile --variants atto base tiny --input-sizes 224 --batch-sizes 64 --rounds 5)
  JPEGS=(--count 600 --size 500x375 --classes 10); COPIES=6  # 3600 files: 56 batches an epoch
  LOADER=(--workers 8 16 --batch-size 64 --input-size 224 --rounds 3)
  RESUME=(--steps 30 --stop-at 12); PRETRAIN=(--input-size 224 --batch-size 64 --num-workers 8 --compile)
fi

if ! step probe "$PY" -m tools.gpu_summary probe "$OUT" "${PROBE[@]}"; then
  grep '^error: ' "$LOG" | tail -n 1 >&2  # no GPU, or a package missing: nothing else can run
  exit 2
fi
step tests "$PY" -m pytest -q -p no:cacheprovider -m cuda "${TESTS[@]}" tests/test_cuda.py --junitxml "$WORK/tests.xml"
step steps "$PY" -m tools.benchmark --device "$DEV" "${STEPS[@]}" --amp none bf16 --candidates sparse dense timm \
  --json "$OUT/steps.json"
step compiled "$PY" -m tools.benchmark --device "$DEV" "${COMPILED[@]}" --amp bf16 none --no-memory \
  --json "$OUT/compiled.json"
# test images made here from scikit-image's photos, each class folder copied to COPIES in all (the same decoding cost
# per file, a quarter of the time to make them)
if step jpegs bash -c '"$1" -m tools.bench_loader --make-jpegs "$2/jpegs" "${@:4}" && for c in "$2"/jpegs/class_*; do
    for k in $(seq 2 "$3"); do cp -r "$c" "${c}_$k"; done; done' _ "$PY" "$WORK" "$COPIES" "${JPEGS[@]}"; then
  step loader "$PY" -m tools.bench_loader --data "$WORK/jpegs" "${LOADER[@]}" --device "$DEV" --augment-on-device \
    --json "$OUT/loader.json"
  step pretrain "$PY" -m tools.gpu_resume_check --data "$WORK/jpegs" --work "$WORK/resume" --json "$OUT/pretrain.json" \
    "${RESUME[@]}" -- --model convnextv2_atto "${PRETRAIN[@]}" --amp bf16 --augment-on-device --device "$DEV" \
    --warmup-epochs 0 --knn-every-epochs 0
fi
"$PY" -m tools.gpu_summary "$OUT" | tee "$OUT/summary.md"
exit "$FAILED"
