#!/usr/bin/env bash
# Ingest on a GPU (docs/GPU.md): CLIP parity
# (features on the device vs the CPU, a replica on a second stream vs the first, TF32 and f16 vs
# f32), the stages (`bench ingest`, one and more CLIP streams, f32 / TF32 / f16), then the real
# `ingest` of synthetic shards with 1, 2 and 3 streams in each precision, each printing where its
# time went. Estimated ~4 minutes on an H100 (not yet run on one). Results: $OUT/ingest.md.
#   BIN=target/minimind-v-cuda OUT=gpu-results bash scripts/gpu-ingest.sh
#   IMAGES=12000 (synthetic dataset size)  DEV=cpu LIMIT=30: a dry run without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/minimind-v-cuda}
OUT=${OUT:-gpu-results}
DEV=${DEV:-cuda}
IMAGES=${IMAGES:-12000}
CLIP=${CLIP:-random:0}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
ROOT=$PWD
source scripts/gpu-env.sh
WORK=$(mktemp -d)
REPORT=$OUT/ingest.md
: > "$REPORT"

run() {  # limit, command...: its output and exit status into the report
    local limit=$1; shift
    local t0=$SECONDS
    { echo; echo '`'"$*"'`'; echo; } >> "$REPORT"
    timeout "${LIMIT:-$limit}" "$@" >> "$REPORT" 2> "$WORK/err"
    local rc=$?
    { echo; echo "(exit $rc, $((SECONDS - t0)) s)"; tail -3 "$WORK/err"; } >> "$REPORT"
    echo "exit $rc, $((SECONDS - t0)) s: $*"
    LAST_RC=$rc
}

echo "## parity (CLIP rows)" >> "$REPORT"
REQUIRE=$([ "$DEV" = cpu ] || echo --require)
run 90 "$BIN" bench parity $REQUIRE --device "$DEV" --clip "$CLIP" --steps 2 --bf16-steps 0
PARITY_RC=$LAST_RC
echo "## stages" >> "$REPORT"
for precision in "" --tf32 --f16; do
    for streams in 2 3; do
        run 90 "$BIN" bench ingest --device "$DEV" --clip "$CLIP" --images 2000 \
            --clip-images 4096 --clip-batch 256 --clip-streams $streams $precision
    done
done

echo "## ingest end to end ($IMAGES synthetic images)" >> "$REPORT"
cd "$WORK"
"$BIN" synth --out ds --pretrain "$IMAGES" --sft 0 --multi 0 > synth.log 2>&1 || cat synth.log
for precision in f32 tf32 f16; do
    for streams in 1 2 3; do
        name=$precision-$streams
        cat > "$name.toml" <<EOF
[ingest]
stage = "pretrain"
input = "ds/LLaVA-Pretrain/chat-translated.json"
images = "ds/pretrain_images.zip"
out = "shards-$name"
tokenizer = "$ROOT/assets/tokenizer"
clip = "$CLIP"
rows_per_shard = 1024
clip_batch = 256
clip_precision = "$precision"
EOF
        run 120 "$BIN" ingest "$name.toml" --device "$DEV" --clip-streams $streams
    done
done
# The streams must not change a byte; TF32 and f16 change the features (and say so).
{ echo; echo "shard sha256, f32 with 1 vs 2 vs 3 streams:"
  for s in 1 2 3; do (cd shards-f32-$s/data && cat *.parquet | sha256sum); done
  for p in tf32 f16; do
      echo "$p shards' metadata:"; "$BIN" inspect shards-$p-2 2>&1 | grep -E "clip_precision" | head -1
  done
} >> "$REPORT" 2>&1
cd "$ROOT"
rm -rf "$WORK"
grep -E "^\| |^time:|^shards:|exit [0-9]" "$REPORT" | head -60
if [ "$PARITY_RC" != 0 ]; then
    echo "PARITY FAILED (exit $PARITY_RC): see $REPORT" >&2
    exit 1
fi
