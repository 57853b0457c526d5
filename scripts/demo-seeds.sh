#!/usr/bin/env bash
# The demo's accuracy over several seeds, one full default demo per seed, one after another (so
# each run has the machine to itself and its wall time means something). Prints a Markdown table:
# seed, wall time, colour, shape, the same with the image features zeroed, two-image pairs.
#
#   bash scripts/demo-seeds.sh                 # the reporting seeds, 101–105 (docs/DEMO.md)
#   SEEDS="0 1 2 3 4" bash scripts/demo-seeds.sh   # the tuning seeds
#   OUT=out/seeds BIN=target/release/minimind-v EXTRA="--sft-steps 6000" bash scripts/demo-seeds.sh
#
# Seeds 0–4 are the tuning seeds: every setting of the demo was chosen by looking at them.
# Seeds 101–105 are the reporting seeds: they are never used to choose anything.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-101 102 103 104 105}
OUT=${OUT:-out/seeds}
BIN=${BIN:-target/release/minimind-v}
EXTRA=${EXTRA:-}
[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
table="$OUT/table.md"
{
    echo "CPU: $cpu; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(date -u +%F)"
    echo "command: $BIN demo --seed S --out $OUT/seed-S $EXTRA"
    echo
    echo "| seed | wall | colour | shape | colour, image zeroed | shape, image zeroed | pairs: attribute / exact | bar |"
    echo "|---|---|---|---|---|---|---|---|"
} > "$table"
for seed in $SEEDS; do
    log="$OUT/seed-$seed.log"
    t0=$SECONDS
    # shellcheck disable=SC2086
    "$BIN" demo --seed "$seed" --out "$OUT/seed-$seed" $EXTRA > "$log" 2>&1 || {
        echo "seed $seed: the demo failed (see $log)" >&2
        exit 1
    }
    wall=$((SECONDS - t0))
    pct() { grep -m1 "$1" "$log" | grep -oE '[0-9.]+%' | sed -n "${2:-1}p"; }
    blind=$(grep -m1 '^with the image features zeroed' "$log" | grep -oE '[0-9.]+%' | tr '\n' ' ')
    pairs=$(grep -m1 '^two-image pairs' "$log" | grep -oE '[0-9.]+%' | sed -n '1p;3p' | tr '\n' ' ')
    bar=$(grep -m1 '^bar ' "$log" | grep -oE '(NOT )?MET$')
    read -r bc bs <<< "$blind"
    read -r pk pe <<< "$pairs"
    echo "| $seed | ${wall} s | $(pct '^colour accuracy') | $(pct '^shape accuracy') | $bc | $bs | $pk / $pe | $bar |" >> "$table"
    tail -1 "$table"
done
cat "$table"
