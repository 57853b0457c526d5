"""Planning at scale: synthetic inputs shaped like upstream's, then `ingest --plan-only` on them.

    python bench/plan_scale.py --bin target/release/minimind-v --json 595000 --parquet 250000 1000000

Writes, under --work (default /tmp/plan_scale):
- a v1 JSON of N pretrain records (`{id, image, conversations: [{from, value}, ...]}`, Chinese
  caption-length text as upstream's LLaVA-Pretrain translation has), planned against an empty
  zip: planning reads and tokenizes the records, it does not open images;
- Parquet inputs of N rows in upstream's later format (`conversations` JSON text, `image_bytes`
  of ~1 KB, distinct per row), row groups of 10,000 rows.

For each it runs `minimind-v ingest <pipeline> --plan-only` and prints the plan line, the wall time
and the peak resident memory (the process's VmHWM, which the program prints). Needs pyarrow for
the Parquet inputs.

`--ingest N ...` runs whole ingests (decode, the random-initialised small CLIP tower, shard writes)
of N Parquet rows holding real 128×128 JPEGs (from `minimind-v synth`, each row its own name, so
nothing is deduplicated), planned in windows of `--window` rows, and prints each run's wall time
and peak resident memory (the child's ru_maxrss, from wait4).
"""

import argparse
import json
import os
import random
import subprocess
import time
import zipfile

QUESTIONS = ["提供给定图像的简要描述。\n<image>", "<image>\n简要描述这幅图像。", "这张图片里有什么？\n<image>"]
WORDS = "一只 猫 坐在 窗台 上 看着 外面 的 雨 城市 街道 夜晚 灯光 蓝色 天空 白云 海边 日落 孩子 在 公园 里 玩耍".split()


def caption(rng):
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))) + "。"


def write_json(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            rec = {
                "id": f"GCC_train_{i:09d}",
                "image": f"GCC_train_{i:09d}.jpg",
                "conversations": [
                    {"from": "human", "value": rng.choice(QUESTIONS)},
                    {"from": "gpt", "value": caption(rng)},
                ],
            }
            f.write(("," if i else "") + json.dumps(rec, ensure_ascii=False))
        f.write("]")


def write_parquet(path, n, seed=0, group=10_000):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    schema = pa.schema([("conversations", pa.string()), ("image_bytes", pa.binary())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, group):
            rows = range(start, min(n, start + group))
            conv = [
                json.dumps(
                    [
                        {"role": "user", "content": rng.choice(QUESTIONS)},
                        {"role": "assistant", "content": caption(rng)},
                    ],
                    ensure_ascii=False,
                )
                for _ in rows
            ]
            images = [i.to_bytes(8, "little") * 128 for i in rows]
            w.write_table(pa.table({"conversations": conv, "image_bytes": images}, schema=schema))


def plan(bin_path, work, name, input_line):
    pipeline = os.path.join(work, f"{name}.toml")
    with open(pipeline, "w") as f:
        f.write(f'[ingest]\nstage = "pretrain"\n{input_line}\nout = "{work}/out-{name}"\nclip = "random-small:0"\n')
    t = time.time()
    run = subprocess.run([bin_path, "ingest", pipeline, "--plan-only"], capture_output=True, text=True)
    wall = time.time() - t
    if run.returncode != 0:
        raise SystemExit(f"{name}: ingest --plan-only failed:\n{run.stderr}")
    lines = run.stdout.strip().splitlines()
    print(f"{name}: {lines[0]}")
    print(f"{name}: {[l for l in lines if 'peak resident' in l][0].strip()}; wall {wall:.1f} s")


def ingest(bin_path, work, n, window):
    import pyarrow as pa
    import pyarrow.parquet as pq

    synth = os.path.join(work, "synth")
    if not os.path.exists(synth):
        subprocess.run([bin_path, "synth", "--out", synth, "--pretrain", "500", "--sft", "0", "--multi", "0"],
                       check=True, capture_output=True)
    with zipfile.ZipFile(os.path.join(synth, "pretrain_images.zip")) as z:
        jpegs = [z.read(name) for name in sorted(z.namelist()) if name.endswith(".jpg")]
    path = os.path.join(work, f"jpegs-{n}.parquet")
    if not os.path.exists(path):
        schema = pa.schema([("image", pa.string()), ("conversations", pa.string()), ("image_bytes", pa.binary())])
        with pq.ParquetWriter(path, schema) as w:
            for start in range(0, n, 1000):
                rows = range(start, min(n, start + 1000))
                conv = json.dumps([{"role": "user", "content": "<image>\n简要描述这幅图像。"},
                                   {"role": "assistant", "content": "一个红色的圆形。"}], ensure_ascii=False)
                w.write_table(pa.table({
                    "image": [f"img{i:08d}.jpg" for i in rows],
                    "conversations": [conv] * len(rows),
                    "image_bytes": [jpegs[i % len(jpegs)] for i in rows],
                }, schema=schema))
    name = f"ingest-{n}"
    out = os.path.join(work, f"out-{name}")
    subprocess.run(["rm", "-rf", out], check=True)
    pipeline = os.path.join(work, f"{name}.toml")
    with open(pipeline, "w") as f:
        f.write(f'[ingest]\nstage = "pretrain"\ninput = "{path}"\nout = "{out}"\nclip = "random-small:0"\nplan_window = {window}\n')
    log = os.path.join(work, f"{name}.log")
    t = time.time()
    with open(log, "w") as f:
        child = subprocess.Popen([bin_path, "ingest", pipeline, "--device", "cpu"], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.time() - t
    text = open(log).read()
    if status != 0:
        raise SystemExit(f"{name}: ingest failed:\n{text}")
    written = [l for l in text.splitlines() if l.startswith("records read")][0]
    print(f"{name}: {written}; window {window}; wall {wall:.1f} s; peak RSS {usage.ru_maxrss / 1e3:.0f} MB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/minimind-v")
    ap.add_argument("--work", default="/tmp/plan_scale")
    ap.add_argument("--json", type=int, nargs="*", default=[595_000])
    ap.add_argument("--parquet", type=int, nargs="*", default=[])
    ap.add_argument("--ingest", type=int, nargs="*", default=[])
    ap.add_argument("--window", type=int, default=5000)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    zip_path = os.path.join(args.work, "empty.zip")
    zipfile.ZipFile(zip_path, "w").close()
    for n in args.json:
        path = os.path.join(args.work, f"v1-{n}.json")
        if not os.path.exists(path):
            write_json(path, n)
        plan(args.bin, args.work, f"json-{n}", f'json = "{path}"\nimages = "{zip_path}"')
    for n in args.parquet:
        path = os.path.join(args.work, f"rows-{n}.parquet")
        if not os.path.exists(path):
            write_parquet(path, n)
        plan(args.bin, args.work, f"parquet-{n}", f'input = "{path}"')
    for n in args.ingest:
        ingest(args.bin, args.work, n, args.window)


if __name__ == "__main__":
    main()
