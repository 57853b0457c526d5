#!/usr/bin/env bash
# Issue 6's checks in one run on a GPU machine (docs/GPU.md): parity with the CPU, bf16 vs f32,
# ingest and training throughput with peak GPU memory. Needs the stripped CUDA binary from
# scripts/build-cuda.sh. Results: one Markdown file per check under $OUT (default gpu-results/).
#   BIN=target/minimind-v-cuda OUT=gpu-results bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/minimind-v-cuda}
OUT=${OUT:-gpu-results}
QUICK=${QUICK:-0}   # 1: fewer steps, to fit a short device lease
mkdir -p "$OUT"
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    xz -dc "$BIN.xz" > "$BIN" 2>/dev/null \
        || python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$BIN.xz" "$BIN"
    chmod +x "$BIN"
fi

# CUDA 13 runtime libraries from the machine's Python packages (PyTorch brings them).
libdirs=$(python3 - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
want = ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnccl.so.2")
dirs = []
for r in roots:
    for w in want:
        for p in glob.glob(os.path.join(r, "**", w), recursive=True):
            d = os.path.dirname(p)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/env.txt"
nvidia-smi | tee -a "$OUT/env.txt"

# Peak GPU memory of one command: sample nvidia-smi every 100 ms while it runs.
peak() {
    local name=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" &
    local smi=$!
    local t0=$SECONDS
    "$@" > "$OUT/$name.md" 2> "$OUT/$name.err"
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    local mib; mib=$(sort -n "$OUT/$name.mem" | tail -1)
    echo "| $name | rc $rc | $((SECONDS - t0)) s | peak GPU ${mib:-?} MiB |" | tee -a "$OUT/summary.md"
    cat "$OUT/$name.md"; tail -3 "$OUT/$name.err"
}

echo "| check | exit | wall | memory |" > "$OUT/summary.md"
echo "|---|---|---|---|" >> "$OUT/summary.md"
if [ "$QUICK" = 1 ]; then BF16=200; STEPS=10; else BF16=500; STEPS=30; fi
peak parity "$BIN" bench parity --device cuda --bf16-steps "$BF16"
peak ingest "$BIN" bench ingest --device cuda --clip random:0 --images 4000 --clip-images 4096 --clip-batch 256
for b in 32 64 128 256; do
    for p in f32 bf16; do
        peak "train-b$b-$p" "$BIN" bench train --device cuda --batch-size "$b" --steps "$STEPS" --precision "$p"
    done
done
# The PyTorch baseline: first its model against the reference vectors (REF: a copy of
# shared/reference/tiny_llm), then the same step, upstream-style and with masked logits.
if [ -n "${REF:-}" ]; then
    peak torch-reference python3 bench/torch_baseline.py --check-reference "$REF"
fi
peak torch-baseline python3 bench/torch_baseline.py --batch-size 64 --steps "$STEPS"
peak torch-baseline-masked python3 bench/torch_baseline.py --batch-size 64 --steps "$STEPS" --masked-logits
cat "$OUT/summary.md"
