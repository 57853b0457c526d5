#!/usr/bin/env python3
"""PyTorch baseline for `minimind-v bench train`: the same MiniMind-V model (upstream v1) and the
same training step (AdamW, grad clip 1.0, masked mean cross-entropy), on the same kind of
synthetic batches (length ±20% around --mean-len, last quarter of each sample trained, image
features from 4 random images), with dynamic padding and with upstream's pad-to-512, f32 and bf16
autocast. Prints a Markdown table like the Rust bench, for docs/BENCHMARKS.md.

    python3 bench/torch_baseline.py --batch-size 64 --steps 30
    python3 bench/torch_baseline.py --check-reference ../shared/reference/tiny_llm   # model check

On the CPU, side by side with minimind-v in one run (interleaved, `--rounds` times each, same
model, batch, lengths and thread count; prints the rates and each binary's ratio to PyTorch; give
several binaries to compare builds):

    python3 bench/torch_baseline.py --device cpu --vs target/release/minimind-v \
        --model minimind_512 --batch-size 8 --mean-len 100 --steps 10 --rounds 3

`--model demo` is the offline demo's dim-64 model. `--masked-logits` computes the output head
only at the loss positions, as minimind-v does; by default PyTorch computes it everywhere, as
upstream does.
"""
import argparse
import json
import math
import os
import random
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PLACEHOLDER = [30] * 25 + [32] * 25

# Presets of `minimind-v bench train --model` (demo: the offline demo's model over the
# random-initialised demo tower's 192-wide features).
MODELS = {
    "minimind_512": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=8),
    "demo": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vision_dim=192),
}


class Config:
    def __init__(self, dim=512, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=6400,
                 multiple_of=64, norm_eps=1e-5, max_seq_len=512, rope_theta=1e4, vision_dim=768):
        self.__dict__.update(locals())
        del self.__dict__["self"]

    @property
    def ffn_hidden(self):
        h = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_tables(cfg, device):
    hd = cfg.dim // cfg.n_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    freqs = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv)
    return torch.polar(torch.ones_like(freqs), freqs)  # (T, hd/2) complex


def apply_rope(x, cis):
    # Upstream's complex form: pairs (x[2i], x[2i+1]).
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.nh * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, self.nkv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, self.nkv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)

    def forward(self, x, cis):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.nh, self.hd)
        k = self.wk(x).view(b, t, self.nkv, self.hd)
        v = self.wv(x).view(b, t, self.nkv, self.hd)
        q, k = apply_rope(q, cis[:t]), apply_rope(k, cis[:t])
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.dim, h, bias=False)
        self.w2 = nn.Linear(h, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cis):
        h = x + self.attention(self.attention_norm(x), cis)
        return h + self.feed_forward(self.ffn_norm(h))


class VisionProj(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(cfg.vision_dim, cfg.dim))

    def forward(self, x):
        return self.vision_proj(x)


class MiniMindV(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as upstream
        self.vision_proj = VisionProj(cfg)
        self.register_buffer("cis", rope_tables(cfg, "cpu"), persistent=False)
        # Upstream's init (and minimind-v's random_state): N(0, 0.02), w3/wo scaled by depth.
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def hidden(self, ids, feats, starts):
        """ids (B, T); feats (B, K, 50, vision_dim); starts: per row, the placeholder starts."""
        h = self.tok_embeddings(ids)
        if feats is not None:
            proj = self.vision_proj(feats.to(h.dtype))
            h = h.clone()
            for b, row in enumerate(starts):
                for k, s in enumerate(row):
                    if s + 50 <= h.shape[1]:
                        h[b, s:s + 50] = proj[b, k].to(h.dtype)
        for layer in self.layers:
            h = layer(h, self.cis)
        return self.norm(h)

    def loss(self, ids, feats, starts, targets, mask, masked_logits=False):
        h = self.hidden(ids, feats, starts)
        if masked_logits:  # the output head only where the loss is counted (what minimind-v does)
            sel = mask.reshape(-1).bool()
            logits = self.output(h.reshape(-1, h.shape[-1])[sel])
            return F.cross_entropy(logits.float(), targets.reshape(-1)[sel])
        logits = self.output(h)  # upstream: every position
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none")
        m = mask.reshape(-1).float()
        return (ce * m).sum() / m.sum()


def placeholder_starts(row):
    starts, i = [], 0
    while i + 50 <= len(row):
        if row[i:i + 50] == PLACEHOLDER:
            starts.append(i)
            i += 50
        else:
            i += 1
    return starts


def check_reference(directory):
    from safetensors.torch import load_file
    cfgj = json.load(open(os.path.join(directory, "config.json")))
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps",
            "max_seq_len", "rope_theta")
    cfg = Config(**{k: cfgj[k] for k in keys if k in cfgj})
    model = MiniMindV(cfg)
    state = torch.load(os.path.join(directory, "model.pth"), map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"output.weight"}, (missing, unexpected)
    case = load_file(os.path.join(directory, "case.safetensors"))
    ids = case["input_ids"]
    starts = [placeholder_starts(r.tolist()) for r in ids]
    feats = case["image_feats"]
    h = model.hidden(ids, feats, starts)
    logits = model.output(h)
    diff = (logits - case["logits"]).abs().max().item()
    loss = model.loss(ids, feats, starts, case["targets"], case["loss_mask"])
    print(f"reference: max |logits diff| {diff:.2e} (want < 1e-4); "
          f"loss {loss.item():.6f} vs {case['loss'].item():.6f}")
    ok = diff < 1e-4 and abs(loss.item() - case["loss"].item()) < 1e-5
    print("reference check:", "OK" if ok else "FAILED")
    return ok


def batches(cfg, batch_size, mean_len, count, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.rand(50, cfg.vision_dim, generator=gen) * 2 - 1 for _ in range(4)]
    out = []
    for _ in range(count):
        rows = []
        for _ in range(batch_size):
            n = int(mean_len * rng.uniform(0.8, 1.2))
            ids = [1, 320, 275, 201] + PLACEHOLDER
            ids += [rng.randrange(100, 6000) for _ in range(n - len(ids))]
            answer = n * 3 // 4
            rows.append((ids, [int(i >= answer) for i in range(n)], rng.randrange(4)))
        out.append(rows)
    return out, feats


def collate(rows, feats, pad_to, device):
    t = pad_to or max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for b, (r, m, _) in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(m)] = torch.tensor(m)
    f = torch.stack([feats[r[2]] for r in rows])[:, None]  # (B, 1, 50, C)
    x, y, m = ids[:, :-1], ids[:, 1:], mask[:, 1:]
    return x.to(device), y.to(device), m.to(device), f.to(device), [[4]] * len(rows)


def measure(cfg, args, pad_to, precision, device):
    """(real tokens/s, samples/s, peak GPU GiB, last loss) of args.steps steps after one warm-up."""
    torch.manual_seed(0)
    model = MiniMindV(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    data, feats = batches(cfg, args.batch_size, args.mean_len, args.steps + 1, 3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = 0
    for i, b in enumerate(data):
        x, y, m, f, starts = collate(b, feats, pad_to, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss(x, f, starts, y, m, masked_logits=args.masked_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        else:
            tokens += sum(len(r[0]) for r in b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    last = loss.item()
    if not math.isfinite(last):
        raise SystemExit(f"PyTorch: a step's loss is {last}")
    return tokens / secs, args.steps * args.batch_size / secs, mem, last


def head(args, device):
    logits = "logits at masked positions" if args.masked_logits else "logits everywhere (upstream)"
    return (f"PyTorch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
            f"{args.model}, batch {args.batch_size}, mean len {args.mean_len}, {logits}")


def bench(args):
    device = torch.device(args.device)
    cfg = Config(**MODELS[args.model])
    pads = {"dynamic": (None,), "both": (None, 512)}[args.padding]
    precisions = {"f32": ("f32",), "bf16": ("bf16",), "both": ("f32", "bf16")}[args.precision]
    rows = [(p, q, *measure(cfg, args, p, q, device)) for p in pads for q in precisions]
    print(head(args, device) + "\n")
    print("| padding | precision | tokens/s (real) | samples/s | peak GPU GiB | last loss |")
    print("|---|---|---|---|---|---|")
    for pad_to, precision, tps, sps, mem, last in rows:
        pad = "dynamic" if pad_to is None else f"pad to {pad_to}"
        print(f"| {pad} | {precision} | {tps:.0f} | {sps:.1f} | {mem:.2f} | {last:.4f} |")


def ours(args, binary):
    """minimind-v's f32 dynamic-padding rate (real tokens/s) on the same model and batches."""
    cmd = [binary, "bench", "train", "--device", "cpu", "--model", args.model,
           "--batch-size", str(args.batch_size), "--mean-len", str(args.mean_len),
           "--steps", str(args.steps), "--padding", "dynamic", "--precision", "f32"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    row = next((l for l in out.stdout.splitlines() if l.startswith("| dynamic")), None)
    if row is None:
        raise SystemExit(f"no dynamic row in the output of {' '.join(cmd)}:\n{out.stdout}")
    return float(row.split("|")[6])


def side_by_side(args):
    """Interleaved rounds of PyTorch and each minimind-v binary on the CPU; fails on a failed or
    non-finite row."""
    if args.device != "cpu":
        raise SystemExit("--vs compares CPU steps: use --device cpu")
    cfg = Config(**MODELS[args.model])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "unknown CPU")
    print(head(args, "cpu") + f"; {cpu}\n")
    names = [os.path.basename(b) for b in args.vs]
    print("| round | PyTorch tokens/s | " + " | ".join(f"{n} tokens/s | ratio" for n in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    theirs, mine = [], [[] for _ in args.vs]
    for r in range(args.rounds):
        rates = [measure(cfg, args, None, "f32", torch.device("cpu"))[0]]
        rates += [ours(args, b) for b in args.vs]
        if not all(math.isfinite(x) and x > 0 for x in rates):
            raise SystemExit(f"round {r + 1}: a rate is not a positive number: {rates}")
        theirs.append(rates[0])
        for m, x in zip(mine, rates[1:]):
            m.append(x)
        cells = " | ".join(f"{x:.0f} | {x / rates[0]:.2f}×" for x in rates[1:])
        print(f"| {r + 1} | {rates[0]:.0f} | {cells} |", flush=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    mt = median(theirs)
    cells = " | ".join(f"{median(m):.0f} | {median(m) / mt:.2f}×" for m in mine)
    print(f"| median | {mt:.0f} | {cells} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check-reference", metavar="DIR")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mean-len", type=int, default=94)
    p.add_argument("--masked-logits", action="store_true")
    p.add_argument("--model", choices=sorted(MODELS), default="minimind_512")
    p.add_argument("--padding", choices=("dynamic", "both"), default="both")
    p.add_argument("--precision", choices=("f32", "bf16", "both"), default="both")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, the core count)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vs", metavar="MINIMIND_V", nargs="+",
                   help="side by side with these minimind-v binaries (one column each)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_reference:
        raise SystemExit(0 if check_reference(args.check_reference) else 1)
    if args.vs:
        side_by_side(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
