#!/usr/bin/env python3
"""Fixtures for the restricted `torch.save` reader (crates/vitrs/src/checkpoint/torch.rs).

Writes tests/fixtures/torch-pth/:
  state_dict.pth     a tiny timm ViT's state_dict, saved with torch.save
  weights.safetensors the same tensors via safetensors (the reference)
  train_ckpt.pth     a training checkpoint: {'model': state_dict, 'optimizer': ..., 'epoch': 3,
                     'args': argparse.Namespace(...)} as DeiT's main.py saves them
  views.pth          f16 and bf16 tensors and a transposed (non-contiguous) view
  views.safetensors  the same, contiguous f32 (the reference)
  evil.pth           an object whose unpickling would call os.system: must never run
  hf-dir/            hf_cls's config files with its weights re-saved as pytorch_model.bin
  timm-dir/          timm_tiny_named's config.json with its weights re-saved as model.pth
                     (torch.save), so the loader's result can be checked against that
                     fixture's reference logits
Usage: python tools/make_torch_fixtures.py   (torch, timm, safetensors from PyPI)
"""
import argparse
import os

import torch
import timm
from safetensors.torch import save_file


class Evil:
    def __reduce__(self):
        return (os.system, ("echo vitrs-must-never-run-this > /tmp/vitrs-pwned",))


def main():
    out = "tests/fixtures/torch-pth"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    sd = model.state_dict()
    torch.save(sd, os.path.join(out, "state_dict.pth"))
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "weights.safetensors"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "args": argparse.Namespace(lr=1e-3, model="deit_tiny")},
               os.path.join(out, "train_ckpt.pth"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "train_weights.safetensors"))
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    views = {"t": base.t(), "half": base.half(), "bf16": base.bfloat16(), "slice": base[1:, 2:],
             "ids": torch.arange(5)}
    torch.save(views, os.path.join(out, "views.pth"))
    save_file({k: v.float().contiguous() for k, v in views.items() if v.is_floating_point()},
              os.path.join(out, "views.safetensors"))
    torch.save({"weights": torch.zeros(2), "payload": Evil()}, os.path.join(out, "evil.pth"))
    import shutil
    from safetensors.torch import load_file
    src = "tests/fixtures/timm_tiny_named"
    os.makedirs(os.path.join(out, "timm-dir"), exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(out, "timm-dir", "config.json"))
    torch.save(load_file(os.path.join(src, "model.safetensors")), os.path.join(out, "timm-dir", "model.pth"))
    # The same for a Hugging Face directory: pytorch_model.bin beside config.json.
    src = "tests/fixtures/hf_cls"
    os.makedirs(os.path.join(out, "hf-dir"), exist_ok=True)
    for f in ("config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(out, "hf-dir", f))
    torch.save(load_file(os.path.join(src, "model.safetensors")), os.path.join(out, "hf-dir", "pytorch_model.bin"))
    print("torch", torch.__version__, "timm", timm.__version__)


if __name__ == "__main__":
    main()
