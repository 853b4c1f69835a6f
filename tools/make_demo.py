#!/usr/bin/env python3
"""Train the tiny Fashion-MNIST ViT used by the README demo and write assets/demo/.

Data: the Debian package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist),
which installs the original IDX files under /usr/share/datasets/fashion-mnist/.
Fashion-MNIST is (c) 2017 Zalando SE, MIT licence, https://github.com/zalandoresearch/fashion-mnist

Usage (from the repository root):

    /path/to/venv/bin/python tools/make_demo.py [--epochs N] [--data DIR]
    /path/to/venv/bin/python tools/make_demo.py --time-steps 50   # only time 50 training steps

Everything runs on one CPU thread with fixed seeds.
"""

import argparse
import gzip
import json
import math
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)

import timm  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "demo"
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")

LABEL_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530
ARCH = "vit_tiny_patch16_224"
MODEL_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                    mlp_ratio=2.0, num_classes=10)
BATCH = 128
LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_STEPS = 200
SEED = 0
N_DEMO_IMAGES = 8


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------

def _open(path: Path) -> bytes:
    """Read an IDX file, gzipped or plain (either `name` or `name.gz` may exist)."""
    for p in (path, Path(str(path) + ".gz")):
        if p.exists():
            with open(p, "rb") as f:
                raw = f.read()
            return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    raise FileNotFoundError(f"{path}[.gz] not found (apt-get install -y dataset-fashion-mnist)")


def read_idx(path: Path) -> np.ndarray:
    raw = _open(path)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0 and dtype_code == 0x08, f"{path}: not an unsigned-byte IDX file"
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    assert data.size == int(np.prod(dims)), f"{path}: size mismatch"
    return data.reshape(dims)


def load_split(data_dir: Path, prefix: str):
    x = read_idx(data_dir / f"{prefix}-images-idx3-ubyte")
    y = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte")
    assert x.shape[0] == y.shape[0] and x.shape[1:] == (28, 28)
    return x, y.astype(np.int64)


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28): the user-facing pipeline."""
    x = images_u8.astype(np.float32) / 255.0
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(x).unsqueeze(1)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------

def make_model() -> torch.nn.Module:
    return timm.create_model(ARCH, pretrained=False, **MODEL_KWARGS)


@torch.no_grad()
def evaluate(model, x_u8, y, batch=1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(to_input(x_u8[i:i + batch]))
        correct += int((logits.argmax(-1).numpy() == y[i:i + batch]).sum())
    return correct / len(y)


def train(model, x_u8, y, epochs: int, max_steps: int = 0):
    steps_per_epoch = math.ceil(len(y) / BATCH)
    total = steps_per_epoch * epochs
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)

    def lr_at(step):
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        t = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(SEED)
    loss_fn = torch.nn.CrossEntropyLoss()
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = rng.permutation(len(y))
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            xb = to_input(x_u8[idx])
            yb = torch.from_numpy(y[idx])
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if (i + 1) % 100 == 0:
                print(f"epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {running / 100:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
                running = 0.0
            if max_steps and step >= max_steps:
                return time.perf_counter() - t0
    return time.perf_counter() - t0


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--time-steps", type=int, default=0,
                    help="only time this many training steps and exit (nothing is written)")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    x_train, y_train = load_split(args.data, "train")
    x_test, y_test = load_split(args.data, "t10k")
    print(f"train {x_train.shape} test {x_test.shape}")

    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ARCH} {MODEL_KWARGS}: {n_params} parameters")

    if args.time_steps:
        secs = train(model, x_train, y_train, epochs=1, max_steps=args.time_steps)
        per_epoch = secs / args.time_steps * math.ceil(len(y_train) / BATCH)
        print(f"{args.time_steps} steps: {secs:.1f}s -> ~{per_epoch:.0f}s per epoch")
        return

    train_secs = train(model, x_train, y_train, epochs=args.epochs)
    model.eval()
    acc = evaluate(model, x_test, y_test)
    print(f"test accuracy {acc:.4f}, training time {train_secs:.0f}s for {args.epochs} epochs")

    # ---- save model in timm hub layout ----------------------------------------------
    if OUT.exists():
        shutil.rmtree(OUT)
    model_dir = OUT / "model"
    img_dir = OUT / "images"
    img_dir.mkdir(parents=True)
    save_for_hf(
        model, str(model_dir), safe_serialization=True,
        model_config={"label_names": LABEL_NAMES, "pretrained_cfg": {"label_names": LABEL_NAMES}},
        data_config={"interpolation": "bilinear", "crop_pct": 1.0, "mean": (MEAN,), "std": (STD,)},
    )
    with open(model_dir / "config.json") as f:
        cfg = json.load(f)
    pc = cfg["pretrained_cfg"]
    # save_config_for_hf drops pretrained_cfg.label_names because the architecture's default
    # pretrained_cfg has num_classes 1000 != 10, so add them back (it keeps the top-level copy).
    if pc.get("label_names") != LABEL_NAMES:
        pc["label_names"] = LABEL_NAMES
        with open(model_dir / "config.json", "w") as f:
            json.dump(cfg, f, indent=2)
    assert cfg["label_names"] == LABEL_NAMES and pc["label_names"] == LABEL_NAMES, cfg
    assert pc["input_size"] == [1, 28, 28] and pc["interpolation"] == "bilinear" and pc["crop_pct"] == 1.0, pc
    assert pc["mean"] == [MEAN] and pc["std"] == [STD], pc
    assert (model_dir / "model.safetensors").stat().st_size < 1024 * 1024

    # reload exactly as a user of timm would and use that model for the expected outputs
    loaded = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()

    # ---- demo images: the first test image of each of the first 8 distinct classes in test order
    picks = []
    seen = set()
    for i, c in enumerate(y_test):
        if int(c) not in seen:
            seen.add(int(c))
            picks.append(i)
        if len(picks) == N_DEMO_IMAGES:
            break
    expected = {}
    for n, i in enumerate(picks):
        label = int(y_test[i])
        fname = f"{n:02d}_{slug(LABEL_NAMES[label])}.png"
        Image.fromarray(x_test[i], mode="L").save(img_dir / fname, format="PNG")
        back = np.asarray(Image.open(img_dir / fname).convert("L"), dtype=np.uint8)
        assert np.array_equal(back, x_test[i])
        x = (back.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
        with torch.no_grad():
            logits = loaded(torch.from_numpy(x)[None, None])[0]
        pred = int(logits.argmax())
        expected[fname] = {
            "test_index": int(i),
            "label": label,
            "label_name": LABEL_NAMES[label],
            "logits": [float(v) for v in logits.tolist()],
            "argmax": pred,
            "argmax_name": LABEL_NAMES[pred],
        }
        print(f"{fname}: label {LABEL_NAMES[label]!r} predicted {LABEL_NAMES[pred]!r}")
    with open(OUT / "expected.json", "w") as f:
        json.dump({
            "preprocessing": "PIL L-mode PNG -> float32 / 255 -> (x - 0.2860) / 0.3530, shape (1, 1, 28, 28)",
            "images": expected,
        }, f, indent=2)
        f.write("\n")

    n_correct = sum(e["argmax"] == e["label"] for e in expected.values())
    readme = f"""# Demo model: tiny ViT trained on Fashion-MNIST

`model/` is a timm hub-layout checkpoint (`config.json` + `model.safetensors`) of
`{ARCH}` built with `model_args` {json.dumps(MODEL_KWARGS)}
({n_params} parameters, {(model_dir / 'model.safetensors').stat().st_size} bytes), trained from scratch
on the 60 000 Fashion-MNIST training images by `tools/make_demo.py`.

| | |
|---|---|
| test accuracy (10 000 test images) | **{acc * 100:.2f}%** |
| training | {args.epochs} epochs, batch {BATCH}, AdamW lr {LR} wd {WEIGHT_DECAY}, {WARMUP_STEPS}-step warm-up + cosine, no augmentation |
| training time | {train_secs:.0f} s on one CPU thread ({train_secs / 60:.1f} min) |
| preprocessing | grayscale 28x28, `x / 255`, mean {MEAN}, std {STD} |
| versions | torch {torch.__version__}, timm {timm.__version__} |

`images/` holds {len(expected)} test-set images (the first test image of each of the first
{N_DEMO_IMAGES} distinct classes, in test-set order) as 8-bit grayscale PNGs; `expected.json` has
PyTorch's logits and argmax for each, computed from the PNG read back from disk
(the model gets {n_correct}/{len(expected)} of them right).

Regenerate (needs `apt-get install -y dataset-fashion-mnist`):

    /path/to/venv/bin/python tools/make_demo.py --epochs {args.epochs}

## Data source and licence

Fashion-MNIST, Zalando Research: https://github.com/zalandoresearch/fashion-mnist
(Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747, 2017). Obtained from the Debian package
`dataset-fashion-mnist`. The images in `images/` and the trained weights are derived from it.

```
The MIT License (MIT) Copyright © [2017] Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the “Software”), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED “AS IS”, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
```
"""
    (OUT / "README.md").write_text(readme)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
