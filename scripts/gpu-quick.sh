#!/usr/bin/env bash
# The short GPU checks, most important first (docs/GPU.md): parity (this crate's kernels
# against the portable forms, GPU vs CPU training, bf16 vs f32), training throughput at b256 in
# bf16 and f32, and the per-kernel profile of a bf16 step (scripts/gpu-profile.sh).
#   BIN=target/minimind-v-cuda OUT=gpu-results bash scripts/gpu-quick.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/minimind-v-cuda}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
source scripts/gpu-env.sh
t0=$SECONDS
timeout 120 "$BIN" bench parity --require --device cuda --bf16-steps "${BF16_STEPS:-100}" > "$OUT/parity.md" 2>&1
parity=$?
tail -16 "$OUT/parity.md"
echo "parity: exit $parity, $((SECONDS - t0)) s"
for p in bf16 f32; do
    timeout 60 "$BIN" bench train --device cuda --padding dynamic --steps 10 --batch-size 256 --precision $p 2>&1 | tail -3 | tee -a "$OUT/train.md"
done
# A failed parity check makes the profile of this build pointless.
if [ "${PROFILE:-1}" = 1 ] && [ "$parity" = 0 ]; then
    EXTRA=0 PROFILE_LIMIT=120 OUT=$OUT BIN=$BIN bash scripts/gpu-profile.sh > "$OUT/profile-run.log" 2>&1
    head -32 "$OUT/profile.md"
fi
# The measurements above are kept either way; a failed parity fails the script.
if [ "$parity" != 0 ]; then
    echo "PARITY FAILED (exit $parity): see $OUT/parity.md" >&2
    exit 1
fi
