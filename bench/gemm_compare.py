#!/usr/bin/env python3
"""The engine's matrix products against PyTorch's SGEMM on the same shapes, same threads,
interleaved (vit, torch, vit, torch, ...), medians: the GEMM's measured anchor on any host.
Each repetition runs every product once, so a busy spell of the host spreads over many
products; besides the ratio of the medians, the table gives the median of the repetitions'
own ratios (vitrs and PyTorch timed seconds apart, under the same load).

Shapes: the linear layers of ViT-B/16 at batch 1 and 16 (forward; vitrs with the weight packed
once, as `vit` runs repeated inference, and packed per call), and the training products
(forward, backward to the input `dx`, backward to the weight `dw`) of
`configs/bench-train.toml` and `configs/fashion-mnist.toml` at batch 128. PyTorch runs
`F.linear(x, W, b)`, `dy @ W` and `dy.T @ x`. Also measures the FMA peak of the instruction
set vitrs runs (`vit bench --peak`, before and after the products, the higher reading) so
every figure has its efficiency, and where the products run on AMX tiles, the tile unit's
peak beside it.

Usage (from the repository root, after `cargo build --release`; torch from
tools/requirements.txt):
    python bench/gemm_compare.py [--threads 2] [--reps 5] [--iters 5] [--only b1,b16,train]
                                 [--write docs/perf.md] [--json FILE]
`--write FILE` puts the table into FILE between `<!-- gemm_compare.py:begin -->` and
`<!-- gemm_compare.py:end -->`.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# (group, name, op, m, k, n): x (m, k), W (n, k).
SHAPES = [
    ("b1", "B/16 b1 qkv", "fwd", 197, 768, 2304),
    ("b1", "B/16 b1 proj", "fwd", 197, 768, 768),
    ("b1", "B/16 b1 fc1", "fwd", 197, 768, 3072),
    ("b1", "B/16 b1 fc2", "fwd", 197, 3072, 768),
    ("b16", "B/16 b16 qkv", "fwd", 3152, 768, 2304),
    ("b16", "B/16 b16 proj", "fwd", 3152, 768, 768),
    ("b16", "B/16 b16 fc1", "fwd", 3152, 768, 3072),
    ("b16", "B/16 b16 fc2", "fwd", 3152, 3072, 768),
]
# The two training configs at batch 128: 28x28 images, patch 4 -> 50 tokens -> m = 6400.
for cfg, d, mlp in (("bench-train", 192, 768), ("fashion-mnist", 64, 128)):
    for layer, k, n in (("qkv", d, 3 * d), ("fc1", d, mlp), ("fc2", mlp, d)):
        for op in ("fwd", "dx", "dw"):
            SHAPES.append(("train", f"{cfg} {layer} {op}", op, 6400, k, n))


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Untimed calls before the timed ones, on both sides: vitrs runs each product in a fresh
# process (its first calls fault in its buffers and wake its threads), PyTorch in this one.
WARMUP = 3


def vit_gemm(vit, op, m, k, n, threads, iters, packed):
    args = [vit, "bench", "--gemm", f"{op}:{m}x{k}x{n}", "--threads", str(threads),
            "--iters", str(iters), "--warmup", str(WARMUP), "--json"]
    if packed:
        args.append("--packed")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[0])


def torch_gemm(torch, op, m, k, n, iters):
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    x = torch.rand(m, k, generator=g) - 0.5
    w = torch.rand(n, k, generator=g) - 0.5
    b = torch.rand(n, generator=g) - 0.5
    dy = torch.rand(m, n, generator=g) - 0.5
    if op == "fwd":
        f = lambda: F.linear(x, w, b)  # noqa: E731
    elif op == "dx":
        f = lambda: dy @ w  # noqa: E731
    else:
        f = lambda: dy.t() @ x  # noqa: E731
    with torch.inference_mode():
        for _ in range(WARMUP):
            f()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vit", default="target/release/vit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", default="b1,b16,train")
    ap.add_argument("--write")
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    groups = set(a.only.split(","))
    known = {s[0] for s in SHAPES}
    if not groups <= known:
        ap.error(f"--only {a.only}: unknown group(s) {', '.join(sorted(groups - known))}; "
                 f"choose from {','.join(sorted(known))}")
    shapes = [s for s in SHAPES if s[0] in groups]
    def read_peaks():
        out = subprocess.run([a.vit, "bench", "--peak", "--threads", str(a.threads), "--json"],
                             check=True, capture_output=True, text=True).stdout
        return {json.loads(l)["kernels"]: json.loads(l) for l in out.splitlines()}

    peaks = read_peaks()
    # Repetitions outermost: each runs every product once (vitrs, then PyTorch), so a few
    # seconds of a busy host land on one repetition of many products, not on all the
    # repetitions of one.
    timings = [dict(t_vit=[], t_pk=[], t_torch=[], kern=None, engine=None) for _ in shapes]
    for rep in range(a.reps):
        for (group, name, op, m, k, n), t in zip(shapes, timings):
            r = vit_gemm(a.vit, op, m, k, n, a.threads, a.iters, packed=False)
            t["kern"], t["engine"] = r["kernels"], r.get("gemm")
            t["t_vit"].append(r["median_seconds"])
            if op == "fwd" and group != "train":
                t["t_pk"].append(vit_gemm(a.vit, op, m, k, n, a.threads, a.iters, packed=True)["median_seconds"])
            t["t_torch"].append(torch_gemm(torch, op, m, k, n, a.iters))
        print(f"repetition {rep + 1} of {a.reps} done", file=sys.stderr, flush=True)
    # The peak read again after the products: a host that took a CPU away during one reading
    # would otherwise inflate every share of it; the higher reading is the machine's.
    for kern, after in read_peaks().items():
        before = peaks.get(kern)
        if before is None or after["peak_gflops_per_sec"] > before["peak_gflops_per_sec"]:
            peaks[kern] = after
    rows, raw = [], []
    for (group, name, op, m, k, n), t in zip(shapes, timings):
        t_vit, t_pk, t_torch, kern = t["t_vit"], t["t_pk"], t["t_torch"], t["kern"]
        flop = 2.0 * m * k * n
        gf = lambda ts: flop / statistics.median(ts) / 1e9 if ts else None  # noqa: E731
        peak = peaks.get(kern, {}).get("peak_gflops_per_sec")
        # Each repetition's own ratio (its vitrs and PyTorch timings ran seconds apart, under
        # the same load), then their median.
        best_t = [min(v, p) for v, p in zip(t_vit, t_pk)] if t_pk else t_vit
        paired = statistics.median(tt / tv for tv, tt in zip(best_t, t_torch))
        row = dict(name=name, op=op, m=m, k=k, n=n, vit=gf(t_vit), vit_packed=gf(t_pk),
                   torch=gf(t_torch), kernels=kern, gemm=t["engine"], peak=peak, paired=paired)
        rows.append(row)
        raw.append(dict(row, t_vit=t_vit, t_vit_packed=t_pk, t_torch=t_torch))
        best = max(x for x in (row["vit"], row["vit_packed"]) if x)
        print(f"{name}: vitrs {row['vit']:.1f}" + (f" (packed {row['vit_packed']:.1f})" if row["vit_packed"] else "")
              + f" GFLOP/s, torch {row['torch']:.1f}, ratio {best / row['torch']:.2f}"
              f" (paired {paired:.2f})", file=sys.stderr)
    kern = rows[0]["kernels"] if rows else "?"
    peak = peaks.get(kern, {}).get("peak_gflops_per_sec")
    engine = rows[0].get("gemm") if rows else None
    # On the tile unit (AMX) the engine is not held to the FMA peak: "% of peak" is then
    # the FMA peak of the rung, exceeded by design; the tile unit's own peak (`vit bench
    # --peak`: its bf16 rate over the six products each f32 one takes) is given beside it.
    amx = peaks.get(engine, {}).get("peak_gflops_per_sec") if engine else None
    head = (f"CPU: {cpu_model()}; threads: {a.threads}; vitrs kernels: {kern}, GEMM "
            f"{engine or 'fma'}, FMA peak {peak:.1f} GFLOP/s"
            + (" (the AMX products are not bound by it" + (f"; the tile unit's f32 peak: {amx:.1f} GFLOP/s)" if amx else ")")
               if engine and engine.startswith("amx") else "")
            + f"; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
            f"median of {a.reps} interleaved repetitions of {a.iters} products")
    lines = [head, "",
             "| product (m × k × n) | vitrs GFLOP/s | vitrs, weight packed once | PyTorch GFLOP/s | vitrs / PyTorch | median of the repetitions' ratios | vitrs, % of peak | PyTorch, % of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = max(x for x in (r["vit"], r["vit_packed"]) if x)
        pk = f"{r['vit_packed']:.1f}" if r["vit_packed"] else "—"
        lines.append(f"| {r['name']} ({r['m']} × {r['k']} × {r['n']}) | {r['vit']:.1f} | {pk} | {r['torch']:.1f} | "
                     f"{best / r['torch']:.2f} | {r['paired']:.2f} | {100 * best / peak:.0f} % | {100 * r['torch'] / peak:.0f} % |")
    table = "\n".join(lines)
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(peaks=peaks, rows=raw), f, indent=1)
    if a.write:
        text = open(a.write).read()
        b, e = "<!-- gemm_compare.py:begin -->", "<!-- gemm_compare.py:end -->"
        if b in text and e in text:
            text = text[: text.index(b) + len(b)] + "\n" + table + "\n" + text[text.index(e):]
        else:
            text += f"\n{b}\n{table}\n{e}\n"
        with open(a.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
