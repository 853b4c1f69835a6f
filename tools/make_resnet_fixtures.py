#!/usr/bin/env python3
"""PyTorch references for the ResNet baseline (crates/vitrs/src/model/resnet.rs).

Usage (from the repository root, with the venv of tools/requirements.txt):

    /path/to/venv/bin/python tools/make_resnet_fixtures.py

Writes tests/fixtures/resnet/<name>.safetensors for small random CIFAR ResNets (He et al.
2016, section 4.2, option A shortcuts), each holding:

- `param.<name>` / `buffer.<name>`: the initial parameters and running statistics (PyTorch
  names; every value non-trivial: batch-norm scales 1 + 0.1 randn, shifts and running means
  0.1 randn, running variances uniform in [0.5, 1.5]);
- `x` (B, C, H, W), `labels` (B, as float);
- `eval.logits`: evaluation mode (running statistics) before any training;
- `train.logits`, `train.loss`, `grad.<name>`: one training-mode forward (batch statistics)
  and backward of the mean cross-entropy;
- `train.buffer.<name>`: the running statistics after that forward;
- `steps.buffer.<name>`, `steps.param.<name>`, `steps.eval.logits`: after `STEPS` plain SGD
  steps (p -= LR * grad) on the same batch, the first being the step above.

For `resnet14_rgb_odd` also `<name>_state_dict.safetensors`: the model after those steps as
PyTorch users save it (`save_file(model.state_dict())`, `num_batches_tracked` included), whose
evaluation logits are `steps.eval.logits`.

Re-running it gives byte-identical files (CPU, one thread, deterministic algorithms).
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

STEPS = 3
LR = 0.05
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "resnet"


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            # Option A: subsample, then zero channels on both sides.
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNet(nn.Module):
    def __init__(self, depth, width, channels, classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for s in range(3):
            cout = width << s
            blocks = []
            for i in range(n):
                blocks.append(Block(cin, cout, 2 if s > 0 and i == 0 else 1))
                cin = cout
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make(name, depth, width, channels, hw, classes, batch, seed, state_dict=False):
    g = torch.Generator().manual_seed(seed)
    m = ResNet(depth, width, channels, classes)
    with torch.no_grad():
        for k, p in m.named_parameters():
            if "bn" in k and k.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
        for k, b in m.named_buffers():
            if k.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif k.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    x = torch.randn((batch, channels, *hw), generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    bufs = lambda: {k: v.clone() for k, v in m.named_buffers() if "running" in k}  # noqa: E731

    out = {f"param.{k}": v.detach().clone() for k, v in m.named_parameters()}
    out.update({f"buffer.{k}": v for k, v in bufs().items()})
    out["x"], out["labels"] = x, labels.float()
    m.eval()
    with torch.no_grad():
        out["eval.logits"] = m(x)
    m.train()
    for step in range(STEPS):
        m.zero_grad()
        logits = m(x)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if step == 0:
            out["train.logits"] = logits.detach().clone()
            out["train.loss"] = loss.detach().reshape(1)
            out.update({f"grad.{k}": p.grad.clone() for k, p in m.named_parameters()})
            out.update({f"train.buffer.{k}": v for k, v in bufs().items()})
        with torch.no_grad():
            for p in m.parameters():
                p -= LR * p.grad
    out.update({f"steps.buffer.{k}": v for k, v in bufs().items()})
    out.update({f"steps.param.{k}": v.detach().clone() for k, v in m.named_parameters()})
    m.eval()
    with torch.no_grad():
        out["steps.eval.logits"] = m(x)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / f"{name}.safetensors")
    if state_dict:
        # What a PyTorch user has: the trained model's state_dict (num_batches_tracked
        # included), as `safetensors.torch.save_file(model.state_dict(), ...)` writes it.
        save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                  OUT / f"{name}_state_dict.safetensors")
    n = sum(p.numel() for p in m.parameters())
    print(f"{name}: ResNet-{depth} width {width}, {channels}x{hw[0]}x{hw[1]}, {classes} classes, "
          f"batch {batch}, {n} parameters, loss {out['train.loss'].item():.4f}")


if __name__ == "__main__":
    # Set here, not on import: bench/train_compare.py imports the model and times it on its
    # own thread count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    make("resnet8_gray", depth=8, width=4, channels=1, hw=(12, 10), classes=3, batch=4, seed=1)
    make("resnet14_rgb_odd", depth=14, width=6, channels=3, hw=(9, 9), classes=5, batch=3, seed=2,
         state_dict=True)
