#!/usr/bin/env bash
# Which CUDA kernels a training step spends its time in (docs/GPU.md): Nsight Compute (ncu) times
# every kernel of `bench train` (each kernel serialised, caches left alone, clocks left alone) and
# scripts/ncu_summary.py sums the durations per kernel name. Then the step unprofiled, and the
# PyTorch baseline on the same GPU. One device run.
#   BIN=target/minimind-v-cuda OUT=gpu-results bash scripts/gpu-profile.sh
#   ARGS="--batch-size 256 --precision bf16" STEPS=2 EXTRA=0 (the profile only)
#   PROFILE_CMD="bench ingest --device cuda --clip random:0 --clip-images 512" STEPS=1: any
#   subcommand's kernels (STEPS then only divides the totals)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/minimind-v-cuda}
OUT=${OUT:-gpu-results}
ARGS=${ARGS:---batch-size 256 --precision bf16}
STEPS=${STEPS:-2}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
source scripts/gpu-env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/profile.md"

t0=$SECONDS
# shellcheck disable=SC2086
timeout "${PROFILE_LIMIT:-180}" "$NCU" --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum --csv --page raw --print-units base \
    --log-file "$OUT/ncu.csv" \
    "$BIN" ${PROFILE_CMD:-bench train --device cuda --padding dynamic --steps $STEPS $ARGS} \
    > "$OUT/ncu-run.md" 2> "$OUT/ncu-run.err"
echo "ncu exit $?, $((SECONDS - t0)) s" | tee -a "$OUT/profile.md"
# The warm-up step and the timed steps: STEPS + 1 steps in the trace.
python3 scripts/ncu_summary.py "$OUT/ncu.csv" --steps $((STEPS + 1)) | tee -a "$OUT/profile.md"
xz -T0 -f "$OUT/ncu.csv"
[ "${EXTRA:-1}" = 1 ] || exit 0

# shellcheck disable=SC2086
timeout 60 "$BIN" bench train --device cuda --padding dynamic --steps 10 $ARGS 2>&1 | tail -4 | tee -a "$OUT/profile.md"
timeout 60 python3 bench/torch_baseline.py --batch-size 256 --steps 10 --masked-logits 2>&1 | tail -6 | tee -a "$OUT/profile.md"
# shellcheck disable=SC2086
timeout 60 "$BIN" bench breakdown --device cuda $ARGS 2>&1 | tee -a "$OUT/profile.md" | tail -30
