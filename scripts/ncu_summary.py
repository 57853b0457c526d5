#!/usr/bin/env python3
"""Sum Nsight Compute's per-kernel durations by kernel name (scripts/gpu-profile.sh).

Input: `ncu --csv --page raw --metrics gpu__time_duration.sum --log-file F`. Prints a markdown
table: kernels by total time, with launches and mean duration, per step of the traced run.
"""
import argparse
import collections
import csv
import io


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--steps", type=int, default=1, help="training steps in the trace")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    text = open(a.csv, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print(f"no kernel rows in {a.csv}: {text[:500]!r}")
        return
    rows = csv.DictReader(io.StringIO(text[start:]))
    total = collections.defaultdict(float)
    count = collections.Counter()
    for r in rows:
        try:
            ns = float(r["gpu__time_duration.sum"].replace(",", ""))
        except (KeyError, ValueError):
            continue  # the units row
        name = r["Kernel Name"]
        total[name] += ns
        count[name] += 1
    all_ns = sum(total.values())
    n = sum(count.values())
    s = a.steps
    print(f"\n{n} kernels, {all_ns / 1e6:.1f} ms of kernel time in the trace; "
          f"per step (/{s}): {n / s:.0f} launches, {all_ns / 1e6 / s:.1f} ms\n")
    print("| kernel | launches/step | ms/step | mean µs | share |")
    print("|---|---|---|---|---|")
    for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[: a.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        short = short.replace("|", "/")
        print(f"| `{short}` | {count[name] / s:.0f} | {ns / 1e6 / s:.2f} | "
              f"{ns / 1e3 / count[name]:.1f} | {100 * ns / all_ns:.1f}% |")


if __name__ == "__main__":
    main()
