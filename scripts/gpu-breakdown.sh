#!/usr/bin/env bash
# Where the time goes on a GPU (docs/GPU.md): `bench breakdown` at the batch sizes that matter,
# CLIP ingest with and without TF32, and the full 500-step bf16 parity. One device run.
#   BIN=target/minimind-v-cuda OUT=gpu-results bash scripts/gpu-breakdown.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/minimind-v-cuda}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
source scripts/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/breakdown.md"
run() {  # name limit command…
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    { echo; echo "## $name"; echo; echo '`'"$*"'`'; echo; } >> "$OUT/breakdown.md"
    timeout "$limit" "$@" >> "$OUT/breakdown.md" 2> "$OUT/$name.err"
    local rc=$?
    [ "$name" = parity-500 ] && PARITY_RC=$rc
    echo "exit $rc, $((SECONDS - t0)) s" >> "$OUT/breakdown.md"
    tail -3 "$OUT/$name.err" >> "$OUT/breakdown.md"
}
run breakdown-b256-bf16 90 "$BIN" bench breakdown --device cuda --batch-size 256 --precision bf16
run ingest 60 "$BIN" bench ingest --device cuda --clip random:0 --images 2000 --clip-images 4096 --clip-batch 256
run ingest-tf32 60 "$BIN" bench ingest --device cuda --clip random:0 --images 2000 --clip-images 4096 --clip-batch 256 --tf32
run breakdown-b256-f32 90 "$BIN" bench breakdown --device cuda --batch-size 256 --precision f32
run breakdown-b32-bf16 60 "$BIN" bench breakdown --device cuda --batch-size 32 --precision bf16
run parity-500 200 "$BIN" bench parity --require --device cuda --bf16-steps 500
cat "$OUT/breakdown.md"
if [ "${PARITY_RC:-1}" != 0 ]; then
    echo "PARITY FAILED (exit ${PARITY_RC:-none})" >&2
    exit 1
fi
