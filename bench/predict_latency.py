#!/usr/bin/env python3
"""Whole-process latency and peak memory of classifying one image with ViT-B/16, vitrs vs Python.

Builds a random-weight timm `vit_base_patch16_224` in the hub layout, converts it to vitrs'
native file with `vit convert`, then runs, interleaved, `--reps` times each:
  vitrs:  vit predict --model b16.safetensors IMAGE            (process start to exit)
  python: python -c 'import torch, timm; load; preprocess; first forward'  (the same work)
and reports the median wall time and the median peak RSS (VmHWM read from /proc every 10 ms),
next to the weights' size. Linux only (reads /proc). Not part of CI.

Usage: python bench/predict_latency.py [--vit target/release/vit] [--reps 5] [--threads 2]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def run(cmd, env=None):
    """Wall time and peak RSS (MiB) of one process. The peak is the kernel's high-water mark
    (VmHWM in /proc/PID/status), which only grows, so reading it every 10 ms is enough and
    costs the timed process little (a 2 ms poll took a visible share of one of the two cores;
    wait4's ru_maxrss cannot be used: a child forked from this large Python process inherits
    its resident size)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                pass
            done.wait(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    p.wait()  # the wall clock stops when the process exits, not at the next poll
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {p.stderr.read().decode()}")
    return wall, peak[0] / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit", default="target/release/vit")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch
    import timm
    from PIL import Image
    from timm.models import save_for_hf

    work = tempfile.mkdtemp(prefix="vitrs-latency-")
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    hub = os.path.join(work, "timm-b16")
    save_for_hf(m, hub, safe_serialization=True)
    native = os.path.join(work, "b16.safetensors")
    subprocess.run([a.vit, "convert", "--model", hub, "--out", native], check=True,
                   stdout=subprocess.DEVNULL)
    img = os.path.join(work, "image.png")
    Image.effect_mandelbrot((640, 480), (-2, -1.2, 1, 1.2), 64).convert("RGB").save(img)
    vit = [a.vit, "predict", "--threads", str(a.threads), "--model", native, img]
    py = [sys.executable, "-c", f"""
import torch, timm
from PIL import Image
torch.set_num_threads({a.threads})
m = timm.create_model('local-dir:{hub}', pretrained=True).eval()
t = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=m))
x = t(Image.open('{img}').convert('RGB')).unsqueeze(0)
with torch.inference_mode():
    print(m(x).softmax(-1).topk(5))
"""]
    res = {"vitrs": [], "python": []}
    run(vit), run(py)  # warm the page cache and the interpreter's files
    for _ in range(a.reps):
        res["vitrs"].append(run(vit))
        res["python"].append(run(py))
    weights = os.path.getsize(native) / 2**20
    shutil.rmtree(work)  # two 330 MB checkpoints
    print(f"weights: {weights:.1f} MiB; threads {a.threads}; torch {torch.__version__}, timm {timm.__version__}")
    print("| | wall (median) | range | peak RSS (median) | RSS / weights |")
    print("|---|---|---|---|---|")
    for k, v in res.items():
        w = [x for x, _ in v]
        r = statistics.median(y for _, y in v)
        print(f"| {k} | {statistics.median(w):.3f} s | {min(w):.3f}–{max(w):.3f} s | {r:.0f} MiB | {r / weights:.2f} |")


if __name__ == "__main__":
    main()
