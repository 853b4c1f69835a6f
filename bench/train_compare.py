#!/usr/bin/env python3
"""Training-step throughput side by side: vitrs (`vit bench --train`) vs PyTorch eager
(timm VisionTransformer, or the CIFAR ResNet of tools/make_resnet_fixtures.py; AdamW), same
model, batch and thread count, interleaved, medians.

Usage (repository root, after `cargo build --release`):
    python bench/train_compare.py [--config configs/bench-train.toml] [--threads 2] [--reps 5]
    python bench/train_compare.py --resnet resnet20@28x1
The model is the [model] of --config (explicit dims; image size, channels and classes default
to Fashion-MNIST's 28x28x1 and 10): by default the benchmark ViT of configs/bench-train.toml
(patch 4, D 192, depth 6, 3 heads, MLP 768), batch 128. With --resnet, a ResNet preset of
`vit bench` (resnet{DEPTH}[w{WIDTH}][@{SIZE}[x{CHANNELS}]], 10 classes) on both sides.
Each vitrs repetition also reads the FMA peak in its process (`vit bench --peak`), for vitrs'
share of it and whether the step meets the speed issue's bar.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

# The bar and the share of the FMA peak, as bench/compare.py computes them (this directory is
# on the path when a script in it runs).
from compare import BAR, efficiency, peak_range, percent, verdict


def resnet(spec):
    """The PyTorch twin of `vit bench --model SPEC` for a ResNet preset, and its input shape."""
    import re
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from make_resnet_fixtures import ResNet
    m = re.fullmatch(r"resnet(\d+)(?:w(\d+))?(?:@(\d+)(?:x(\d+))?)?", spec)
    if not m:
        sys.exit(f"not a ResNet preset: {spec}")
    depth, width, size, ch = (int(v) if v else d for v, d in zip(m.groups(), (0, 16, 32, 3)))
    return ResNet(depth, width, ch, 10), (ch, size, size)


def vit_once(vit, config, batch, threads, steps):
    """One vit process: seconds per step (median of `steps`), its GFLOP/s, and the FMA peak of
    the instruction set it ran, read in the same process (`--peak`)."""
    out = json.loads(subprocess.run(
        [vit, "bench", "--model", config, "--train", "--batch-size", str(batch), "--threads", str(threads),
         "--iters", str(steps), "--warmup", "1", "--json", "--peak"],
        check=True, capture_output=True, text=True,
    ).stdout)
    return out["median_batch_seconds"], out["gflops_per_sec"], out["peak_gflops_per_sec"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit", default="target/release/vit")
    ap.add_argument("--config", default="configs/bench-train.toml")
    ap.add_argument("--resnet", help="a ResNet preset instead of --config's ViT, e.g. resnet20@28x1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition (median)")
    a = ap.parse_args()

    import torch
    import timm

    torch.set_num_threads(a.threads)
    if a.resnet:
        model, shape = resnet(a.resnet)
        a.config = a.resnet  # what `vit bench --model` is given
    else:
        import tomllib
        with open(a.config, "rb") as f:
            m = tomllib.load(f)["model"]
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=m.get("image_size", 28), patch_size=m["patch_size"], in_chans=m.get("channels", 1),
            num_classes=m.get("num_classes", 10), embed_dim=m["width"], depth=m["depth"], num_heads=m["heads"],
            mlp_ratio=m["mlp_dim"] / m["width"], global_pool="avg" if m.get("pool") == "mean" else "token")
        shape = (m.get("channels", 1), m.get("image_size", 28), m.get("image_size", 28))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(a.batch, *shape)
    y = torch.arange(a.batch) % 10

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    torch_step()
    t_vit, t_torch, gflops, peaks = [], [], [], []
    for _ in range(a.reps):
        t, g, p = vit_once(a.vit, a.config, a.batch, a.threads, a.steps)
        t_vit.append(t)
        gflops.append(g)
        peaks.append(p)
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            torch_step()
            ts.append(time.perf_counter() - t0)
        t_torch.append(statistics.median(ts))
        print(f"vit {a.batch / t_vit[-1]:.1f} img/s, torch {a.batch / t_torch[-1]:.1f} img/s", file=sys.stderr, flush=True)
    mv, mt = statistics.median(t_vit), statistics.median(t_torch)
    print(f"threads {a.threads}, batch {a.batch}, torch {torch.__version__}, timm {timm.__version__}, "
          f"median of {a.reps} interleaved repetitions\n")
    ratio, eff = mt / mv, efficiency(gflops, peaks)
    print(f"FMA peak read beside each vitrs repetition: {peak_range(peaks)}\n")
    print("| | vitrs | PyTorch | vitrs / PyTorch | vitrs, % of FMA peak | bar met |")
    print("|---|---|---|---|---|---|")
    print(f"| training images/s | {a.batch / mv:.1f} | {a.batch / mt:.1f} | {ratio:.2f} | "
          f"{percent(eff)} | {verdict(ratio, eff)} |")
    print("\n" + BAR)


if __name__ == "__main__":
    main()
