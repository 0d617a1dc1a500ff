#!/usr/bin/env bash
# One-shot GPU check (about 8 minutes on one GPU): the CUDA-marked tests (backend agreement on CUDA in float32 and
# under bf16 autocast, fp16 with the scaler, no host sync inside a sparse training step), the step benchmark on
# CUDA (atto, tiny and base at 224, batches 64 and 128, eager and compiled, float32 and bf16, with the ratios and
# GPU memory) and the input-pipeline benchmark with 8 and 16 workers. Writes JSON files and summary.md to OUTDIR.
#
#   bash tools/gpu_check.sh OUTDIR             # on a machine with a GPU
#   bash tools/gpu_check.sh --dry-run OUTDIR   # the same steps on the CPU at toy sizes, in seconds (CI runs it)
#
# Set-up as tools/test.sh does (FCMAE_NO_MINKOWSKI=1 skips the MinkowskiEngine build, which has no CUDA build here).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash tools/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -n "${FCMAE_SKIP_SETUP:-}" ] || FCMAE_NO_MINKOWSKI=${FCMAE_NO_MINKOWSKI:-1} bash tools/setup.sh
PY="${FCMAE_VENV:-.venv}/bin/python"
STATUS="$OUT/status.txt"
: > "$STATUS"

step() {  # name, command...: run, keep the log, record the exit code (a failing step does not stop the others)
  local name=$1; shift
  local t0=$SECONDS
  echo "[gpu_check] $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then rc=0; else rc=$?; fi
  echo "$name $rc $((SECONDS - t0))" >> "$STATUS"
  tail -n 25 "$OUT/$name.log"
}

if [ -n "$DRY" ]; then
  DEVICE=cpu
  "$PY" -c "import torch; print(torch.__version__, 'cpu (dry run)')" > "$OUT/device.txt"
  step tests "$PY" -m pytest -q -p no:cacheprovider -m cuda --cuda-dry-run tests/test_cuda.py
  step bench_steps "$PY" -m tools.benchmark --device cpu --variants atto --input-sizes 64 --batch-sizes 2 \
    --rounds 1 --threads 1 --amp none bf16 --json "$OUT/bench_steps.json"
  "$PY" -m tools.bench_loader --make-jpegs "$OUT/jpegs" --count 16 --size 500x375 > /dev/null
  step bench_loader "$PY" -m tools.bench_loader --data "$OUT/jpegs" --workers 0 --batch-size 8 --rounds 1 \
    --device cpu --json "$OUT/bench_loader.json"
else
  DEVICE=cuda
  "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" > "$OUT/device.txt"
  step tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  step bench_steps "$PY" -m tools.benchmark --device cuda --variants atto tiny base --input-sizes 224 \
    --batch-sizes 64 128 --rounds 5 --amp none bf16 --compile --json "$OUT/bench_steps.json"
  "$PY" -m tools.bench_loader --make-jpegs "$OUT/jpegs" --count 2000 --size 500x375 > /dev/null
  step bench_loader "$PY" -m tools.bench_loader --data "$OUT/jpegs" --workers 8 16 --batch-size 128 --rounds 2 \
    --device cuda --json "$OUT/bench_loader.json"
fi
"$PY" -m tools.gpu_summary "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
