#!/usr/bin/env python3
"""Side-by-side inference speed: vitrs (`vit bench`) vs PyTorch eager (timm), same machine,
same thread count, fp32, random weights, interleaved (vit, torch, vit, torch, ...), medians.

Usage (from the repository root, after `cargo build --release`):
    python bench/compare.py [--threads 2] [--reps 5] [--models Ti/16,S/16,B/16] [--batches 1,16]
`bench/compare.sh` makes a virtual environment with the pinned packages and runs this.
Prints a Markdown table; `--json FILE` also saves the raw timings.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TIMM = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224", "B": "vit_base_patch16_224"}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vit_once(vit, model, batch, threads):
    """One vit process: one warm-up forward, one timed; returns seconds per batch."""
    out = subprocess.run(
        [vit, "bench", "--model", model, "--batch-size", str(batch), "--threads", str(threads),
         "--iters", "1", "--warmup", "1", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["median_batch_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit", default="target/release/vit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="Ti/16,S/16,B/16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    import timm

    torch.set_num_threads(a.threads)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    rows = []
    for name in a.models.split(","):
        variant = name.split("/")[0]
        tm = timm.create_model(TIMM[variant], pretrained=False).eval()
        for batch in [int(b) for b in a.batches.split(",")]:
            x = torch.randn(batch, 3, 224, 224)
            with torch.inference_mode():
                tm(x)  # warm-up
                t_vit, t_torch = [], []
                for _ in range(a.reps):
                    t_vit.append(vit_once(a.vit, name, batch, a.threads))
                    t0 = time.perf_counter()
                    tm(x)
                    t_torch.append(time.perf_counter() - t0)
            mv, mt = statistics.median(t_vit), statistics.median(t_torch)
            row = {"model": name, "batch": batch, "vit_s": mv, "torch_s": mt,
                   "vit_ips": batch / mv, "torch_ips": batch / mt, "ratio": mt / mv,
                   "vit_all": t_vit, "torch_all": t_torch}
            rows.append(row)
            print(f"{name} b{batch}: vit {batch / mv:.2f} img/s, torch {batch / mt:.2f} img/s, "
                  f"ratio {mt / mv:.2f}", file=sys.stderr, flush=True)

    print(f"CPU: {cpu_model()}; threads: {a.threads}; torch {torch.__version__}, timm {timm.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; median of {a.reps} interleaved repetitions\n")
    print("| model | batch | vitrs img/s | PyTorch img/s | vitrs / PyTorch |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} @224 | {r['batch']} | {r['vit_ips']:.2f} | {r['torch_ips']:.2f} | {r['ratio']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
