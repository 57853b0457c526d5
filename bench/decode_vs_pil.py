"""Decode + resize to 224×224, minimind-v against PIL, on the same JPEGs in one run, one core each.

    python bench/decode_vs_pil.py --bin target/release/minimind-v [--images 2000] [--rounds 3]

Writes `--images` 128×128 colour JPEGs (Pillow's defaults: quality 75, 4:2:0 chroma, the form of
upstream's dataset) to a temporary directory, then alternates rounds: PIL (`Image.open(f)
.convert('RGB').resize((224, 224))`, what upstream does before its CLIP processor; with
transformers installed, also `CLIPImageProcessor` on the result) and `minimind-v bench decode`
on the same files. Prints each side's best images/s and the ratio; exits non-zero when either side
fails. Needs Pillow and numpy. minimind-v runs with RAYON_NUM_THREADS=1.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def make_jpegs(d, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = np.mgrid[0:128, 0:128].astype(np.float32)
        f = rng.uniform(3, 12, 3)
        a = np.stack([128 + 100 * np.sin(x / f[0] + i), 128 + 100 * np.cos(y / f[1]),
                      (x * f[2] + y) % 256], -1)
        a += 8 * rng.standard_normal(a.shape)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:06d}.jpg"))


def pil_round(files, processor):
    t = time.perf_counter()
    for f in files:
        im = Image.open(f).convert("RGB").resize((224, 224))
        if processor is not None:
            processor(images=im, return_tensors="np")
    return len(files) / (time.perf_counter() - t)


def ours_round(binary, d):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = subprocess.run([binary, "bench", "decode", "--dir", d, "--repeat", "1"],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"minimind-v bench decode failed:\n{out.stderr}")
    m = re.search(r"([0-9.]+) images/s", out.stdout)
    if not m:
        sys.exit(f"no rate in: {out.stdout}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/minimind-v")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        from transformers import CLIPImageProcessor
        processor = CLIPImageProcessor()
    except Exception:
        processor = None
    with tempfile.TemporaryDirectory() as d:
        make_jpegs(d, args.images)
        files = sorted(os.path.join(d, f) for f in os.listdir(d))
        pil, proc, ours = [], [], []
        for _ in range(args.rounds):
            pil.append(pil_round(files, None))
            if processor is not None:
                proc.append(pil_round(files, processor))
            ours.append(ours_round(args.bin, d))
    import PIL
    print(f"{args.images} JPEGs 128×128 → 224×224, one core, best of {args.rounds} interleaved rounds")
    print(f"| side | images/s |\n|---|---|")
    print(f"| PIL {PIL.__version__}: open + convert('RGB') + resize | {max(pil):.0f} |")
    if proc:
        print(f"| the same + CLIPImageProcessor | {max(proc):.0f} |")
    print(f"| minimind-v decode + resize | {max(ours):.0f} |")
    print(f"ratio minimind-v / PIL: {max(ours) / max(pil):.2f}×"
          + (f" (/ PIL + CLIPImageProcessor: {max(ours) / max(proc):.2f}×)" if proc else ""))


if __name__ == "__main__":
    main()
