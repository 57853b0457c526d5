#!/usr/bin/env bash
# The GPU checks in one run on a GPU machine (docs/GPU.md): parity with the CPU, bf16 vs f32,
# ingest and training throughput with peak GPU memory, the PyTorch baseline, the real trainer
# end to end, and a world of one through NCCL. Needs the stripped CUDA binary from
# scripts/build-cuda.sh (or its .xz copy). Every check has its own time limit and runs even when
# an earlier one failed. Results: $OUT/summary.md (one row per check), $OUT/results.md (every
# check's output), $OUT/logs.tar.gz (stderr and memory samples).
#   BIN=target/minimind-v-cuda OUT=gpu-results bash scripts/gpu-check.sh
#   QUICK=1 (fewer steps) REF=<copy of shared/reference/tiny_llm> (PyTorch model check)
#   E2E_BATCH=128 E2E_STEPS=150 E2E_PRECISION=f32 E2E_IMAGES=3000 (the real trainer's run)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/minimind-v-cuda}
OUT=${OUT:-gpu-results}
QUICK=${QUICK:-0}
DEV=${DEV:-cuda}    # DEV=cpu LIMIT=20: a dry run of the script's plumbing on a machine without a GPU
WORK=$(mktemp -d)
ROOT=$PWD
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
source scripts/gpu-env.sh
{ echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; nvidia-smi; nproc; free -g; } > "$WORK/env.txt" 2>&1
head -20 "$WORK/env.txt"

# One check: its own time limit, peak GPU memory sampled by nvidia-smi every 100 ms.
check() {
    local name=$1 limit=$2; shift 2
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$WORK/$name.mem" &
    local smi=$!
    local t0=$SECONDS
    timeout "${LIMIT:-$limit}" "$@" > "$WORK/$name.md" 2> "$WORK/$name.err"
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    local mib; mib=$(sort -n "$WORK/$name.mem" | tail -1)
    [ "$name" = parity ] && PARITY_RC=$rc
    echo "| $name | $rc | $((SECONDS - t0)) s | ${mib:-?} MiB |" | tee -a "$OUT/summary.md"
    { echo; echo "## $name (exit $rc, $((SECONDS - t0)) s, peak GPU ${mib:-?} MiB)"; echo;
      echo '`'"$*"'`'; echo; cat "$WORK/$name.md";
      echo; echo '```'; tail -5 "$WORK/$name.err"; echo '```'; } >> "$OUT/results.md"
}

echo "| check | exit | wall | peak GPU memory |" > "$OUT/summary.md"
echo "|---|---|---|---|" >> "$OUT/summary.md"
: > "$OUT/results.md"
if [ "$QUICK" = 1 ]; then BF16=200; STEPS=20; else BF16=500; STEPS=30; fi

train() {  # batch precision padding
    check "train-b$1-$2" 60 "$BIN" bench train --device "$DEV" --batch-size "$1" --steps "$STEPS" --precision "$2" --padding "$3"
}
# Most important first: a run cut short by its time limit still brings back what it did.
# --require: on a GPU, a miss, a NaN or a fallback to the CPU fails the check (a CPU dry run
# compares the CPU with itself, so it cannot require).
REQUIRE=$([ "$DEV" = cpu ] || echo --require)
check parity 150 "$BIN" bench parity $REQUIRE --device "$DEV" --bf16-steps "$BF16"
train 256 bf16 dynamic
train 256 f32 dynamic
train 256 tf32 dynamic
# PyTorch: its model against the reference vectors first, then the same step on the same GPU.
if [ -n "${REF:-}" ]; then
    check torch-reference 60 python3 bench/torch_baseline.py --check-reference "$REF"
fi
check torch-b256-masked 90 python3 bench/torch_baseline.py --batch-size 256 --steps "$STEPS" --masked-logits
check ingest 90 "$BIN" bench ingest --device "$DEV" --clip random:0 --images 4000 --clip-images 4096 --clip-batch 256
check ingest-tf32 90 "$BIN" bench ingest --device "$DEV" --clip random:0 --images 4000 --clip-images 4096 --clip-batch 256 --tf32
# The real trainer end to end (shards → loader → steps), alone and as a world of one through
# the data-parallel path (NCCL in an nccl build): the same shards, the same steps.
cd "$WORK"
"$BIN" synth --out ds --pretrain "${E2E_IMAGES:-3000}" --sft 0 --multi 0 > synth.log 2>&1
cat > ingest.toml <<EOF
[ingest]
stage = "pretrain"
input = "ds/LLaVA-Pretrain/chat-translated.json"
images = "ds/pretrain_images.zip"
out = "shards"
tokenizer = "$ROOT/assets/tokenizer"
clip = "random:0"
rows_per_shard = 512
clip_batch = 256
EOF
check ingest-real 90 "$BIN" ingest ingest.toml --device "$DEV"
for who in solo nccl1; do
    cat > "$who.toml" <<EOF
[train]
shards = "shards"
out = "$who"
model = "minimind_512"
steps = ${E2E_STEPS:-150}
batch_size = ${E2E_BATCH:-128}
lr = 4e-4
checkpoint_every = 1000
precision = "${E2E_PRECISION:-f32}"
EOF
done
check train-solo 90 "$BIN" train solo.toml --device "$DEV"
check train-nccl1 90 env MMV_RANK=0 MMV_WORLD_SIZE=1 MMV_MASTER_ADDR=127.0.0.1:29517 "$BIN" train nccl1.toml --device "$DEV"
for who in solo nccl1; do
    python3 - "$who" >> "$OUT/results.md" <<'PY'
import json, sys
who = sys.argv[1]
rows = [json.loads(l) for l in open(f"{who}/metrics.jsonl")]
tail = rows[len(rows) // 2:]
sps = sorted(r["samples_per_s"] for r in tail)[len(tail) // 2]
print(f"\n{who}: {len(rows)} steps, loss {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}, "
      f"median samples/s (second half) {sps:.0f}, median data wait "
      f"{sorted(r['data_wait'] for r in tail)[len(tail) // 2]:.3f}")
PY
done
python3 - >> "$OUT/results.md" <<'PY'
import json
a = [json.loads(l)["loss"] for l in open("solo/metrics.jsonl")]
b = [json.loads(l)["loss"] for l in open("nccl1/metrics.jsonl")]
d = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else float("nan")
print(f"\nsolo vs world-of-one: {len(a)} / {len(b)} steps, max relative loss difference {d:.2e}")
PY
cd "$ROOT"
check torch-b64 90 python3 bench/torch_baseline.py --batch-size 64 --steps "$STEPS"
train 128 bf16 dynamic
train 128 f32 dynamic
train 64 bf16 both
train 64 f32 both
train 32 bf16 dynamic
train 32 f32 dynamic
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude ds --exclude shards --exclude 'solo/checkpoint' --exclude 'nccl1/checkpoint' . 2>/dev/null
cat "$OUT/summary.md"
grep -E "^(solo|nccl1|solo vs)" "$OUT/results.md"
# Every check above ran; a failed parity still fails the script.
if [ "${PARITY_RC:-1}" != 0 ]; then
    echo "PARITY FAILED (exit ${PARITY_RC:-none}): see $OUT/results.md" >&2
    exit 1
fi
