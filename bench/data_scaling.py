#!/usr/bin/env python3
"""ViT vs ResNet as the training data grows, with and without pre-training: the ViT paper's
inductive-bias question on a machine anyone has. Standard library only; it runs `vit`.

    python3 bench/data_scaling.py                 # the experiment of docs/results.md
    python3 bench/data_scaling.py --smoke         # a two-minute check that it all runs

On Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), class-balanced nested
training subsets of 100 ... 30 000 images (`[data] per_class` with a fixed seed takes the first
k of one shuffled order, so a smaller subset is inside every larger one), four models:

  vit-scratch     the repository's Fashion-MNIST ViT (configs/fashion-mnist.toml's [model])
  resnet-scratch  ResNet-20 (configs/resnet-fashion-mnist.toml: SGD momentum 0.9, cosine, wd)
  vit-pretrained  the same ViT pre-trained on all 30 000 images of classes 0-4, fine-tuned
                  with a new zero-initialised head (the paper's SGD recipe, no weight decay)
  resnet-pretrained  the same for the ResNet (new zero classifier)

Every run at a subset size sees the same number of images (5 N, at least MIN_IMAGES so that
the small subsets get enough steps, at most MAX_IMAGES to keep the experiment near an hour),
in batches of 32, with the same augmentation (horizontal flips).
Hyper-parameters: each model's learning rate is chosen from a grid of two on a stratified
validation split carved from the training subset (10 %, `[data] val_fraction`), by the run with
seed 0; the test split (classes 5-9, 5 000 images) is evaluated once, for the chosen run, then
for the same learning rate with seeds 1 and 2 (subsets up to 3 000 images; a seed draws the
subset, the split, the initialisation and the batches). Results: OUT/results.json, OUT/table.md,
OUT/accuracy.svg, and the ViT's mean attention distance per head against depth on the smallest
and the largest subset (OUT/distance-*.png, `vit attention --distance`).

Runs go `--jobs` at a time with `--threads` each (default 2 x 1: small models use two cores
better as two processes). A run already finished in OUT is not run again, so a killed
experiment continues where it stopped.
"""

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [5, 6, 7, 8, 9]
PRETRAIN_CLASSES = [0, 1, 2, 3, 4]
SIZES = [100, 300, 1000, 3000, 10000, 30000]
# Images seen by every run at subset size N: 5 N, at least MIN_IMAGES, at most MAX_IMAGES.
EPOCH_IMAGES_PER_N = 5
MIN_IMAGES = 10240
MAX_IMAGES = 40960
PRETRAIN_EPOCHS = 3
SEEDS_UP_TO = 3000
VAL_FRACTION = 0.1
# Batch 32, so that the smallest budget is 320 optimizer steps (at batch 128 the ViT, which
# needs more steps than the ResNet, stayed near 60 % whatever the data: too few steps, not
# too few images). Pre-training keeps the recipes' batch 128.
BATCH = 32
PRETRAIN_BATCH = 128

MODELS = ["vit-scratch", "resnet-scratch", "vit-pretrained", "resnet-pretrained"]
# Learning-rate grids for batch 32, the recipe's own value scaled to it first (it wins
# ties): AdamW's 3e-3 at 128 by the square root of the batch ratio, SGD's 0.1 (and the
# fine-tuning 0.03) linearly.
GRIDS = {
    "vit-scratch": [1.5e-3, 5e-4],
    "resnet-scratch": [0.025, 0.01],
    "vit-pretrained": [0.01, 0.003],
    "resnet-pretrained": [0.01, 0.003],
}
# Pre-training: the recipes' own learning rates at batch 128.
PRETRAIN_LR = {"vit": 3e-3, "resnet": 0.1}
COLORS = {
    "vit-scratch": "#1f77b4",
    "resnet-scratch": "#d62728",
    "vit-pretrained": "#17becf",
    "resnet-pretrained": "#ff7f0e",
}

VIT_MODEL = """[model]
patch_size = 4
width = 64
depth = 6
heads = 4
mlp_dim = 128
"""
RESNET_MODEL = """[model]
arch = "resnet"
depth = 20
width = 16
"""


def optimizer(model, lr):
    if model == "vit-scratch":
        return f'lr = {lr}\nmin_lr = 1e-5\noptimizer = {{ kind = "adamw", weight_decay = 0.05 }}\ngrad_clip = 1.0\n'
    if model == "resnet-scratch":
        return f'lr = {lr}\nmin_lr = 0.0\noptimizer = {{ kind = "sgd", momentum = 0.9, weight_decay = 5e-4 }}\n'
    # Fine-tuning: the paper's SGD with momentum, no weight decay, gradients clipped at 1.
    return f'lr = {lr}\nmin_lr = 0.0\noptimizer = {{ kind = "sgd", momentum = 0.9, weight_decay = 0.0 }}\ngrad_clip = 1.0\n'


def budget(n, scale):
    return int(scale * min(MAX_IMAGES, max(MIN_IMAGES, EPOCH_IMAGES_PER_N * n)))


def schedule(n_train, images):
    """Epochs and warm-up steps that show a run of n_train images about `images` images."""
    batch = min(BATCH, n_train)
    per_epoch = (n_train // batch) * batch
    epochs = max(1, math.ceil(images / per_epoch))
    steps = epochs * (n_train // batch)
    return batch, epochs, max(1, round(0.05 * steps))


def run_toml(model_block, data_lines, epochs, batch, warmup, opt, seed, extra=""):
    """A run config: the model, Fashion-MNIST with `data_lines`, flips, a cosine schedule."""
    return f"""{model_block}
[data]
dataset = "fashion-mnist"
{data_lines}mean = [0.2860]
std = [0.3530]
workers = 1

[augment]
hflip = true

[train]
epochs = {epochs}
batch_size = {batch}
warmup_steps = {warmup}
schedule = "cosine"
{opt}seed = {seed}
log_every = 50
checkpoint_every = 0
{extra}"""


def config(model, n, lr, seed, images, pretrained):
    """The TOML of one run, and its number of epochs."""
    per_class = n // len(CLASSES)
    n_val = len(CLASSES) * max(1, round(VAL_FRACTION * per_class))
    batch, epochs, warmup = schedule(n - n_val, images)
    arch = VIT_MODEL if model.startswith("vit") else RESNET_MODEL
    finetune = ""
    if model.endswith("pretrained"):
        arch = ""  # the pre-trained model's
        finetune = f'[finetune]\nfrom = "{pretrained}"\n'
    data = f"classes = {CLASSES}\nper_class = {per_class}\nval_fraction = {VAL_FRACTION}\n"
    text = run_toml(arch, data, epochs, batch, warmup, optimizer(model, lr), seed, finetune)
    return text, epochs


class Vit:
    """Runs the `vit` binary, `threads` compute threads a run."""

    def __init__(self, binary, threads):
        self.binary, self.threads = str(binary), str(threads)

    def __call__(self, *args, log=None):
        cmd = [self.binary, *args]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if log is not None:
            log.write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        return p.stdout

    def train(self, cfg_text, run_dir):
        """Trains a run (once: a finished run of the same config is read back); its last
        validation top-1."""
        done = run_dir / "done.json"
        cfg = run_dir.parent / f"{run_dir.name}.toml"
        if done.is_file() and cfg.is_file() and cfg.read_text() == cfg_text:
            return json.loads(done.read_text())
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(cfg_text)
        t0 = time.time()
        self("train", "--config", str(cfg), "--out", str(run_dir), "--threads", self.threads,
             log=run_dir.parent / f"{run_dir.name}.log")
        evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e.get("kind") == "eval"]
        r = {"val_top1": evals[-1]["top1"], "val_n": evals[-1]["n"],
             "on": evals[-1]["on"], "wall_s": time.time() - t0}
        done.write_text(json.dumps(r))
        return r

    def test(self, run_dir):
        """Test top-1 of a run's model on classes 5-9 (once per trained model)."""
        out = run_dir / "test.json"
        if out.is_file() and out.stat().st_mtime >= (run_dir / "done.json").stat().st_mtime:
            return json.loads(out.read_text())["top1"]
        s = self("eval", "--model", str(run_dir / "model.safetensors"), "--dataset",
                 "fashion-mnist", "--classes", ",".join(map(str, CLASSES)), "--json",
                 "--confusion", str(run_dir / "test-confusion.png"), "--threads", self.threads)
        out.write_text(s)
        return json.loads(s)["top1"]


def pretrain(vit, out, arch, scale):
    """The model pre-trained on every image of classes 0-4 (their test split evaluates it)."""
    model = VIT_MODEL if arch == "vit" else RESNET_MODEL
    name = "vit-scratch" if arch == "vit" else "resnet-scratch"
    epochs = max(1, round(PRETRAIN_EPOCHS * scale))
    steps = epochs * (30000 // PRETRAIN_BATCH)
    text = run_toml(model, f"classes = {PRETRAIN_CLASSES}\n", epochs, PRETRAIN_BATCH,
                    round(0.05 * steps), optimizer(name, PRETRAIN_LR[arch]), 0)
    run = out / "pretrain" / arch
    r = vit.train(text, run)
    return run / "model.safetensors", r


def cell(vit, out, model, n, seeds, scale, pretrained):
    """One model at one subset size: the learning rate chosen on validation (seed 0), then
    test accuracy of the chosen run and of the same learning rate with the other seeds."""
    images = budget(n, scale)
    base = out / "runs" / model / f"n{n}"
    grid = []
    for lr in GRIDS[model]:
        text, epochs = config(model, n, lr, 0, images, pretrained)
        r = vit.train(text, base / f"lr{lr:g}-s0")
        grid.append((lr, r))
    lr, best = max(grid, key=lambda g: g[1]["val_top1"])  # first of equals: the recipe's
    tests = [vit.test(base / f"lr{lr:g}-s0")]
    walls = [best["wall_s"]]
    for seed in range(1, seeds if n <= SEEDS_UP_TO else 1):
        text, _ = config(model, n, lr, seed, images, pretrained)
        r = vit.train(text, base / f"lr{lr:g}-s{seed}")
        tests.append(vit.test(base / f"lr{lr:g}-s{seed}"))
        walls.append(r["wall_s"])
    return {
        "model": model, "n": n, "images_seen": images, "lr": lr,
        "grid": {f"{g:g}": r["val_top1"] for g, r in grid},
        "test_top1": tests,
        "mean": statistics.mean(tests),
        "std": statistics.stdev(tests) if len(tests) > 1 else None,
        "run": str((base / f"lr{lr:g}-s0").relative_to(out)),
        "wall_s": sum(r["wall_s"] for _, r in grid) + sum(walls[1:]),
    }


def svg_plot(results, path, title):
    """Test accuracy against training images (log scale), one line per model, bars from the
    lowest to the highest seed."""
    w, h, left, right, top, bottom = 720, 440, 70, 190, 40, 50
    xs = sorted({r["n"] for r in results})
    lo = min(min(r["test_top1"]) for r in results)
    hi = max(max(r["test_top1"]) for r in results)
    lo, hi = math.floor(lo * 20) / 20, min(1.0, math.ceil(hi * 20) / 20)
    lx0, lx1 = math.log10(xs[0]) - 0.1, math.log10(xs[-1]) + 0.1

    def px(n):
        return left + (math.log10(n) - lx0) / (lx1 - lx0) * (w - left - right)

    def py(a):
        return top + (hi - a) / max(hi - lo, 1e-9) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{title}</text>']
    steps = round((hi - lo) / 0.05)
    for i in range(steps + 1):
        a = lo + i * 0.05
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{py(a):.1f}" y2="{py(a):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{py(a) + 4:.1f}" text-anchor="end">{100 * a:.0f} %</text>')
    for n in xs:
        out.append(f'<line x1="{px(n):.1f}" x2="{px(n):.1f}" y1="{top}" y2="{h - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{px(n):.1f}" y="{h - bottom + 18}" text-anchor="middle">{n:,}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">'
               'training images (classes 5-9 of Fashion-MNIST, log scale)</text>')
    out.append(f'<text x="18" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {(top + h - bottom) / 2})">test top-1</text>')
    for i, m in enumerate(MODELS):
        rs = sorted((r for r in results if r["model"] == m), key=lambda r: r["n"])
        if not rs:
            continue
        c = COLORS[m]
        pts = " ".join(f'{px(r["n"]):.1f},{py(r["mean"]):.1f}' for r in rs)
        dash = ' stroke-dasharray="6 4"' if m.endswith("scratch") else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for r in rs:
            x = px(r["n"])
            if len(r["test_top1"]) > 1:
                y0, y1 = py(min(r["test_top1"])), py(max(r["test_top1"]))
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0:.1f}" y2="{y1:.1f}" stroke="{c}"/>')
                for y in (y0, y1):
                    out.append(f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{c}"/>')
            out.append(f'<circle cx="{x:.1f}" cy="{py(r["mean"]):.1f}" r="3.5" fill="{c}"/>')
        ly = top + 20 + 22 * i
        out.append(f'<line x1="{w - right + 15}" x2="{w - right + 45}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{w - right + 52}" y="{ly + 4}">{m}</text>')
    out.append(f'<text x="{w - right + 15}" y="{top + 20 + 22 * len(MODELS) + 10}" fill="#555">'
               'bars: lowest to highest seed</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def table(results):
    sizes = sorted({r["n"] for r in results})
    by = {(r["model"], r["n"]): r for r in results}
    lines = ["| training images | " + " | ".join(MODELS) + " |",
             "|---:|" + "---:|" * len(MODELS)]
    for n in sizes:
        row = []
        for m in MODELS:
            r = by.get((m, n))
            if r is None:
                row.append("—")
            elif r["std"] is None:
                row.append(f'{100 * r["mean"]:.2f} (1 seed, lr {r["lr"]:g})')
            else:
                row.append(f'{100 * r["mean"]:.2f} ± {100 * r["std"]:.2f} '
                           f'({len(r["test_top1"])} seeds, lr {r["lr"]:g})')
        lines.append(f"| {n:,} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "data-scaling"))
    ap.add_argument("--vit", default=str(ROOT / "target" / "release" / "vit"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every run's images seen (and pre-training's epochs)")
    ap.add_argument("--smoke", action="store_true",
                    help="sizes 100 and 300, 1 seed, a tenth of the budget: checks that it runs")
    a = ap.parse_args()
    if a.smoke:
        a.sizes, a.seeds, a.budget_scale = "100,300", 1, 0.1
        if a.out == ap.get_default("out"):
            a.out = str(ROOT / "runs" / "data-scaling-smoke")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(a.vit).is_file():
        subprocess.run(["cargo", "build", "--release", "-p", "vitrs-cli"], cwd=ROOT, check=True)
    vit = Vit(a.vit, a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    t0 = time.time()
    results = []
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        pre = {arch: pool.submit(pretrain, vit, out, arch, a.budget_scale)
               for arch in ("vit", "resnet")}
        jobs = [pool.submit(cell, vit, out, m, n, a.seeds, a.budget_scale, None)
                for n in sizes for m in ("vit-scratch", "resnet-scratch")]
        pre_paths = {}
        for arch, f in pre.items():
            pre_paths[arch], r = f.result()
            print(f"pre-trained {arch} on classes 0-4: top-1 {100 * r['val_top1']:.2f} % on "
                  f"their test split ({r['wall_s']:.0f} s)", flush=True)
        jobs += [pool.submit(cell, vit, out, m, n, a.seeds, a.budget_scale,
                             pre_paths[m.split("-")[0]])
                 for n in sizes for m in ("vit-pretrained", "resnet-pretrained")]
        for f in cf.as_completed(jobs):
            r = f.result()
            results.append(r)
            print(f'{r["model"]:>18} n={r["n"]:>6}: test {100 * r["mean"]:.2f} % '
                  f'({len(r["test_top1"])} seed(s), lr {r["lr"]:g} of {r["grid"]}) '
                  f'[{time.time() - t0:.0f} s]', flush=True)
    results.sort(key=lambda r: (MODELS.index(r["model"]), r["n"]))
    # Where the ViT trained from scratch looks, on the smallest and the largest subset.
    distance = {}
    for n in (sizes[0], sizes[-1]):
        r = next(r for r in results if r["model"] == "vit-scratch" and r["n"] == n)
        model = out / r["run"] / "model.safetensors"
        s = vit("attention", "--model", str(model), "--distance", "--dataset", "fashion-mnist",
                "--limit", "500", "--json", "--out", str(out / f"distance-n{n}.png"),
                "--threads", str(a.threads * a.jobs))
        distance[n] = json.loads(s)
    wall = time.time() - t0
    summary = {"results": results, "distance": distance, "wall_s": wall,
               "budget": {"per_n": EPOCH_IMAGES_PER_N, "min": MIN_IMAGES, "max": MAX_IMAGES,
                          "scale": a.budget_scale},
               "jobs": a.jobs, "threads": a.threads}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(results))
    svg_plot(results, out / "accuracy.svg",
             "ViT vs ResNet-20 on Fashion-MNIST classes 5-9, from scratch and pre-trained on 0-4")
    print(table(results))
    for n, d in distance.items():
        means = [statistics.mean(row) for row in d["distance_px"]]
        print(f"ViT from scratch on {n} images: mean attention distance per layer (px): "
              + ", ".join(f"{m:.1f}" for m in means))
    print(f"wall time {wall / 60:.1f} min; {out}/table.md, accuracy.svg, distance-*.png")


if __name__ == "__main__":
    sys.exit(main())
