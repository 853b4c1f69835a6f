#!/usr/bin/env python3
"""The same training recipe run with PyTorch/timm, for the side-by-side rows of docs/results.md.

Reads a vitrs run config (configs/*.toml), builds the same ViT with timm's VisionTransformer,
and trains it on Fashion-MNIST the same way: AdamW (no decay on biases, norms, position
embedding and class token) or SGD, linear warm-up then cosine/linear decay per step, label
smoothing, global-norm clipping, horizontal flip, random crop with zero padding and random
erasing (off in the last `plain_last_epochs`), batch normalisation by the config's mean/std, the last partial batch dropped. It
evaluates on the 10,000 test images after every epoch and stops at the wall-clock budget,
counting everything after the data is in memory (model creation, training, evaluation), as
`vit train` does.

Usage (repository root; torch and timm from PyPI; dataset from `apt-get install -y
dataset-fashion-mnist` or --data DIR):
    python bench/train_budget.py --config configs/fashion-mnist.toml --budget-min 30 \
        --out runs/torch-fashion-mnist.jsonl
    # --fit-budget: first time 30 steps and part of an evaluation (counted in the budget), then
    # choose the number of epochs that fits the rest of it at PyTorch's own speed, 3 % kept
    # back, so its cosine schedule completes too (the rule of `vit train --time-budget`).
Writes one JSON line per epoch {"epoch", "elapsed_s", "test_top1", "train_loss", "lr"} to --out
and prints a summary line.
"""
import argparse
import gzip
import json
import math
import os
import sys
import time
import tomllib

import numpy as np


def read_idx(path):
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):
            return p
    sys.exit(f"error: {stem}[.gz] not found in {data_dir}\n"
             "HINT: apt-get install -y dataset-fashion-mnist, or pass --data DIR")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", default=os.environ.get("VITRS_DATA_FASHION",
                                                     "/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-min", type=float, default=30.0)
    ap.add_argument("--fit-budget", action="store_true",
                    help="choose the epoch count that fits the budget at PyTorch's speed")
    ap.add_argument("--epochs", type=int, help="override the config's epochs")
    ap.add_argument("--out", help="JSON lines, one per epoch")
    a = ap.parse_args()

    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    m, d, aug, t = cfg["model"], cfg["data"], cfg.get("augment", {}), cfg["train"]
    unsupported = [k for k in aug
                   if k not in ("hflip", "crop_padding", "random_erasing", "plain_last_epochs")]
    if unsupported:
        sys.exit(f"error: augment options {unsupported} are not mirrored by this script")
    if m.get("preset"):
        sys.exit("error: explicit model dims are needed (no presets in this script)")

    import torch
    import torch.nn.functional as F
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.set_num_threads(a.threads)
    seed = t.get("seed", 0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    xtr = read_idx(find(a.data, "train-images-idx3-ubyte"))
    ytr = read_idx(find(a.data, "train-labels-idx1-ubyte")).astype(np.int64)
    xte = read_idx(find(a.data, "t10k-images-idx3-ubyte"))
    yte = read_idx(find(a.data, "t10k-labels-idx1-ubyte")).astype(np.int64)
    mean = d.get("mean", [0.5])[0]
    std = d.get("std", [0.5])[0]
    # (N, 1, 28, 28) float, normalised; padding (crop) is applied to normalised zeros' image
    # value, i.e. black = (0 - mean) / std, as vitrs pads the raw image with 0 before normalising.
    norm = lambda x: (torch.from_numpy(x.copy()).float().div(255.0).sub(mean).div(std)).unsqueeze(1)
    xtr_t, xte_t = norm(xtr), norm(xte)
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    pad = int(aug.get("crop_padding", 0))
    hflip = bool(aug.get("hflip", False))
    reprob = float(aug.get("random_erasing", 0.0))
    plain_last = int(aug.get("plain_last_epochs", 0))
    black = (0.0 - mean) / std

    width = m["width"]
    pool = m.get("pool", "cls")

    def build():
        return VisionTransformer(
            img_size=m.get("image_size", 28), patch_size=m["patch_size"], in_chans=m.get("channels", 1),
            num_classes=m.get("num_classes", 10), embed_dim=width, depth=m["depth"],
            num_heads=m["heads"], mlp_ratio=m["mlp_dim"] / width, qkv_bias=m.get("qkv_bias", True),
            global_pool="token" if pool == "cls" else "avg",
            drop_rate=t.get("dropout", 0.0), drop_path_rate=t.get("drop_path", 0.0))

    batch = t["batch_size"]
    steps_per_epoch = len(xtr) // batch
    epochs = a.epochs or t["epochs"]
    budget_s = a.budget_min * 60

    def make_opt(model):
        decay, no_decay = [], []
        skip = model.no_weight_decay()
        for name, p in model.named_parameters():
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        o = t.get("optimizer", {"kind": "adamw"})
        groups = [{"params": decay, "weight_decay": o.get("weight_decay", 0.0)},
                  {"params": no_decay, "weight_decay": 0.0}]
        if o.get("kind", "adamw") == "adamw":
            return torch.optim.AdamW(groups, lr=t["lr"], betas=(o.get("beta1", 0.9), o.get("beta2", 0.999)),
                                     eps=o.get("eps", 1e-8))
        return torch.optim.SGD(groups, lr=t["lr"], momentum=o.get("momentum", 0.9))

    def augment(xb, plain=False):
        # plain: the last `plain_last_epochs` epochs keep only the flip (as Augment::for_epoch).
        if pad and not plain:
            n = xb.shape[0]
            padded = F.pad(xb, (pad, pad, pad, pad), value=black)
            ox = rng.integers(0, 2 * pad + 1, n)
            oy = rng.integers(0, 2 * pad + 1, n)
            xb = torch.stack([padded[i, :, oy[i]:oy[i] + 28, ox[i]:ox[i] + 28] for i in range(n)])
        if hflip:
            flip = torch.from_numpy(rng.random(xb.shape[0]) < 0.5)
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        if reprob > 0 and not plain:
            # As crates/vitrs/src/data/augment.rs `erase` (timm's RandomErasing, mode "pixel"):
            # one rectangle of 2-33 % of the image, aspect 0.3-3.3, uniform random 8-bit values
            # (normalised like the image).
            xb = xb.clone()
            _, c, h, w = xb.shape
            for i in range(xb.shape[0]):
                if rng.random() >= reprob:
                    continue
                for _ in range(10):
                    area = h * w * rng.uniform(0.02, 1 / 3)
                    aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                    eh, ew = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                    if 1 <= eh < h and 1 <= ew < w:
                        y0, x0 = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
                        vals = rng.integers(0, 256, (c, eh, ew)).astype(np.float32)
                        xb[i, :, y0:y0 + eh, x0:x0 + ew] = torch.from_numpy((vals / 255.0 - mean) / std)
                        break
        return xb

    def train_step(model, opt, xb, yb, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb, label_smoothing=t.get("label_smoothing", 0.0))
        loss.backward()
        if t.get("grad_clip", 0.0) > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        return loss.item()

    # The budget's clock: the measurement below counts against it, as in `vit train --time-budget`.
    start = time.perf_counter()
    if a.fit_budget:
        probe = build()
        popt = make_opt(probe)
        probe.train()
        idx = torch.from_numpy(rng.permutation(len(xtr))[:batch])
        train_step(probe, popt, augment(xtr_t[idx]), ytr_t[idx], 1e-4)
        t0 = time.perf_counter()
        for _ in range(30):
            train_step(probe, popt, augment(xtr_t[idx]), ytr_t[idx], 1e-4)
        per_step = (time.perf_counter() - t0) / 30
        with torch.inference_mode():
            probe.eval()
            t0 = time.perf_counter()
            probe(xte_t[:1000])
            eval_s = (time.perf_counter() - t0) * 10
        epoch_s = per_step * steps_per_epoch + eval_s
        left = max(budget_s - (time.perf_counter() - start), 0.0)
        epochs = max(1, int(left * 0.97 // epoch_s))
        print(f"fit-budget: {batch / per_step:.0f} img/s training, {epoch_s:.0f} s per epoch "
              f"-> {epochs} epochs in {a.budget_min:g} min", file=sys.stderr, flush=True)
        del probe, popt
        torch.manual_seed(seed)

    total = epochs * steps_per_epoch
    warm = t.get("warmup_steps", 0)
    base, floor = t["lr"], t.get("min_lr", 0.0)
    decay_kind = t.get("schedule", "cosine")

    def lr_at(step):  # as crates/vitrs/src/train/schedule.rs
        if step < warm:
            return base * (step + 1) / warm
        tt = min((step - warm) / max(total - warm, 1), 1.0)
        frac = {"cosine": 0.5 * (1 + math.cos(math.pi * tt)), "linear": 1 - tt, "constant": 1.0}[decay_kind]
        return floor + (base - floor) * frac

    model = build()
    opt = make_opt(model)
    # [train] ema_decay: as crates/vitrs/src/train/optim.rs `Ema` (timm's ModelEma with the
    # warm-up min(decay, (1 + t) / (10 + t))); evaluations use the average.
    ema_decay = t.get("ema_decay")
    ema = None
    if ema_decay:
        ema = build()
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    out = open(a.out, "w") if a.out else None
    step, last = 0, None
    for epoch in range(1, epochs + 1):
        model.train()
        plain = plain_last > 0 and epoch > epochs - plain_last
        perm = torch.from_numpy(rng.permutation(len(xtr)))
        losses = []
        over = False
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            losses.append(train_step(model, opt, augment(xtr_t[idx], plain), ytr_t[idx], lr_at(step)))
            if ema is not None:
                d = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.mul_(d).add_(pm, alpha=1 - d)
            step += 1
            if time.perf_counter() - start > budget_s:
                over = True
                break
        judged = ema if ema is not None else model
        judged.eval()
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(xte), 500):
                correct += (judged(xte_t[i:i + 500]).argmax(-1) == yte_t[i:i + 500]).sum().item()
        top1 = correct / len(xte)
        elapsed = time.perf_counter() - start
        last = {"epoch": epoch, "steps": step, "elapsed_s": round(elapsed, 1), "test_top1": top1,
                "train_loss": float(np.mean(losses)), "lr": lr_at(step - 1)}
        print(json.dumps(last), flush=True)
        if out:
            out.write(json.dumps(last) + "\n")
            out.flush()
        if over:
            break
    print(f"torch {torch.__version__}, timm {timm.__version__}, {a.threads} threads: "
          f"{last['test_top1'] * 100:.2f} % after {last['epoch']} epoch(s) ({last['steps']} steps) "
          f"in {last['elapsed_s'] / 60:.1f} min (budget {a.budget_min:g} min)")


if __name__ == "__main__":
    main()
