#!/usr/bin/env python3
"""The transfer experiments of docs/results.md, run with the `vit` binary (standard library only).

1. Label efficiency: pre-train on Fashion-MNIST classes 0-4 (all their training images), then
   fine-tune on classes 5-9 with only --per-class labelled images per class, and compare with
   the same model trained from scratch on those images. Test accuracy on classes 5-9 (5,000
   images), mean and spread over --seeds seeds (the seed picks the images and the order).
2. Resolution: a patch-7 model pre-trained at 28 px, evaluated at 42 px (images upsampled,
   position embeddings interpolated from 4x4 to 6x6) before and after fine-tuning at 42 px.

Usage (repository root, after `cargo build --release`; dataset from
`apt-get install -y dataset-fashion-mnist`):
    python3 bench/transfer.py [--out runs/transfer] [--seeds 3] [--per-class 100]
Prints a Markdown summary; every run directory (curves, metrics) stays under --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PRE_CONFIG = """
[model]
patch_size = {patch}
width = 64
depth = 6
heads = 4
mlp_dim = 128
{head}
[data]
dataset = "fashion-mnist"
mean = [0.2860]
std = [0.3530]
[augment]
hflip = true
[train]
epochs = {epochs}
batch_size = 64
lr = 2e-3
min_lr = 1e-5
warmup_steps = {warmup}
optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
grad_clip = 1.0
log_every = 200
checkpoint_every = 2000
"""


def sh(args):
    t = time.time()
    print("$ " + " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True).stdout
    return out, time.time() - t


def last_eval(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [json.loads(l) for l in f if '"eval"' in l]
    return evals[-1]["top1"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit", default="target/release/vit")
    ap.add_argument("--out", default="runs/transfer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--pre-epochs", type=int, default=6)
    ap.add_argument("--ft-epochs", type=int, default=30)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    vit = a.vit

    # 1. Label efficiency.
    pre_cfg = os.path.join(a.out, "pre04.toml")
    with open(pre_cfg, "w") as f:
        f.write(PRE_CONFIG.format(patch=4, epochs=a.pre_epochs, head="pre_logits = 64", warmup=300))
    # From scratch: the fine-tuned model's architecture (linear head), a warm-up for 500 images.
    scratch_cfg = os.path.join(a.out, "scratch.toml")
    with open(scratch_cfg, "w") as f:
        f.write(PRE_CONFIG.format(patch=4, epochs=a.ft_epochs, head="", warmup=50))
    pre = os.path.join(a.out, "pre04")
    if not os.path.exists(os.path.join(pre, "model.safetensors")):
        _, t = sh([vit, "train", "--config", pre_cfg, "--classes", "0-4", "--out", pre])
        print(f"pre-training on classes 0-4: {last_eval(pre) * 100:.2f} % on their test images, {t:.0f} s",
              file=sys.stderr)
    pre_model = os.path.join(pre, "model.safetensors")
    ft, scratch = [], []
    for seed in range(a.seeds):
        d = os.path.join(a.out, f"ft59-seed{seed}")
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            sh([vit, "finetune", "--from", pre_model, "--dataset", "fashion-mnist", "--classes", "5-9",
                "--per-class", str(a.per_class), "--epochs", str(a.ft_epochs), "--batch-size", "32",
                "--warmup-steps", "20", "--hflip", "--seed", str(seed), "--out", d])
        ft.append(last_eval(d))
        d = os.path.join(a.out, f"scratch59-seed{seed}")
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            sh([vit, "train", "--config", scratch_cfg, "--classes", "5-9", "--per-class", str(a.per_class),
                "--batch-size", "32", "--seed", str(seed), "--out", d])
        scratch.append(last_eval(d))

    def fmt(xs):
        m = statistics.mean(xs) * 100
        s = statistics.stdev(xs) * 100 if len(xs) > 1 else 0.0
        return f"{m:.2f} ± {s:.2f} % ({', '.join(f'{x * 100:.2f}' for x in xs)})"

    print("## Label efficiency (classes 5-9, %d labelled images per class)\n" % a.per_class)
    print("| model | test top-1 on classes 5-9 (mean ± std over %d seeds) |" % a.seeds)
    print("|---|---|")
    print(f"| pre-trained on classes 0-4, fine-tuned | {fmt(ft)} |")
    print(f"| same model from scratch | {fmt(scratch)} |")

    # 2. Resolution: patch 7 -> 28 px is 4x4 patches, 42 px is 6x6.
    pre7_cfg = os.path.join(a.out, "pre7.toml")
    with open(pre7_cfg, "w") as f:
        f.write(PRE_CONFIG.format(patch=7, epochs=a.pre_epochs, head="pre_logits = 64", warmup=300))
    pre7 = os.path.join(a.out, "pre7")
    if not os.path.exists(os.path.join(pre7, "model.safetensors")):
        sh([vit, "train", "--config", pre7_cfg, "--out", pre7])
    m7 = os.path.join(pre7, "model.safetensors")
    at28 = json.loads(sh([vit, "eval", "--model", m7, "--dataset", "fashion-mnist", "--json",
                          "--confusion", os.path.join(a.out, "pre7-cm.png")])[0])["top1"]
    at42 = json.loads(sh([vit, "eval", "--model", m7, "--dataset", "fashion-mnist", "--json", "--image-size", "42",
                          "--confusion", os.path.join(a.out, "pre7-42-cm.png")])[0])["top1"]
    ft42 = os.path.join(a.out, "ft42")
    if not os.path.exists(os.path.join(ft42, "model.safetensors")):
        sh([vit, "finetune", "--from", m7, "--dataset", "fashion-mnist", "--image-size", "42", "--epochs", "1",
            "--keep-head", "--hflip", "--out", ft42])
    after = last_eval(ft42)
    print("\n## Resolution (patch 7: 4x4 patches at 28 px, 6x6 at 42 px)\n")
    print("| model | test top-1 |")
    print("|---|---|")
    print(f"| pre-trained at 28 px, evaluated at 28 px | {at28 * 100:.2f} % |")
    print(f"| same weights at 42 px (position embeddings interpolated, no training) | {at42 * 100:.2f} % |")
    print(f"| fine-tuned at 42 px for 1 epoch (SGD, pre-trained head kept) | {after * 100:.2f} % |")


if __name__ == "__main__":
    main()
