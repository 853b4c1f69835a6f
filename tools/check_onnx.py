#!/usr/bin/env python3
"""`vit export --format onnx` against ONNX Runtime: every fixture family exported, checked by
onnx.checker, run by ONNX Runtime on its reference input, and compared with the logits vitrs
computes (`vit predict --logits`) and with the reference logits of the library that made the
fixture (PyTorch or JAX). Prints the parity table; `--bless` also (re)writes the structural
expectations CI compares without Python (tests/fixtures/onnx/<fixture>.json, from
`vit export` itself, written only when ONNX Runtime agrees).

Usage (repository root, after `cargo build --release`; onnx + onnxruntime from
tools/requirements.txt):
    python tools/check_onnx.py [--vit target/release/vit] [--opsets 17,18,21] [--bless]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

# (fixture, model path inside it, reference input, reference logits, what it covers)
CASES = [
    ("hf_cls", "", "ref/input.npy", "ref/logits.npy", "HF ViT, exact GELU"),
    ("hf_nonsquare", "", "ref/input.npy", "ref/logits.npy", "HF, 24x40, tanh GELU, no qkv bias"),
    ("hf_bare", "", "ref/input.npy", "ref/logits.npy", "HF ViTModel: pooler features"),
    ("timm_tiny_named", "", "ref/input.npy", "ref/logits.npy", "timm ViT"),
    ("timm_mean_nonsquare", "", "ref/input.npy", "ref/logits.npy", "timm mean pooling + fc_norm"),
    ("timm_deit_distilled", "", "ref/input.npy", "ref/logits.npy", "DeiT distilled (two heads)"),
    ("timm_deit3", "", "ref/input.npy", "ref/logits.npy", "DeiT III LayerScale, no_embed_class"),
    ("timm_reg_gap", "", "ref/input.npy", "ref/logits.npy", "registers, no class token, LayerScale"),
    ("timm_siglip_map", "", "ref/input.npy", "ref/logits.npy", "attention pooling (MAP)"),
    ("native_postnorm", "model.safetensors", "ref/input.npy", "ref/logits.npy", "post-norm + LayerScale"),
    ("npz-vit", "model.npz", "input.npy", "logits.npy", "Google JAX .npz"),
    ("npz-bigvision-map", "model.npz", "input.npy", "logits.npy", "big_vision MAP head"),
]


def vit_logits(vit, model, x_path):
    out = subprocess.run([vit, "predict", "--model", model, "--json", "--logits", x_path],
                         check=True, capture_output=True, text=True).stdout
    return np.array([json.loads(l)["logits"] for l in out.splitlines()], dtype=np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vit", default=os.path.join(ROOT, "target", "release", "vit"))
    ap.add_argument("--opsets", default="17,18,21")
    ap.add_argument("--bless", action="store_true")
    a = ap.parse_args()
    import onnx
    import onnxruntime as ort

    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, sub, x_rel, y_rel, what in CASES:
            d = os.path.join(FIX, name)
            model = os.path.join(d, sub) if sub else d
            x = np.load(os.path.join(d, x_rel)).astype(np.float32)
            ref = np.load(os.path.join(d, y_rel)).astype(np.float32)
            ours = vit_logits(a.vit, model, os.path.join(d, x_rel))
            for opset in [int(o) for o in a.opsets.split(",")]:
                path = os.path.join(tmp, f"{name}-{opset}.onnx")
                subprocess.run([a.vit, "export", "--model", model, "--out", path, "--opset", str(opset),
                                "--dynamic-batch"], check=True, capture_output=True)
                onnx.checker.check_model(onnx.load(path), full_check=True)
                sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                got = sess.run(None, {"pixel_values": x})[0]
                d_vit = float(np.abs(got - ours).max())
                d_ref = float(np.abs(got - ref).max())
                worst = max(worst, d_vit)
                rows.append((name, what, opset, d_vit, d_ref))
                print(f"{name} opset {opset}: |ORT - vitrs| {d_vit:.2e}, |ORT - reference| {d_ref:.2e}",
                      file=sys.stderr)
                if a.bless and opset == 17 and d_vit < 1e-4:
                    fixed = os.path.join(tmp, f"{name}-fixed.onnx")
                    subprocess.run([a.vit, "export", "--model", model, "--out", fixed], check=True,
                                   capture_output=True)
                    os.makedirs(os.path.join(FIX, "onnx"), exist_ok=True)
                    m = onnx.load(fixed)
                    dims = lambda v: [d.dim_value if not d.dim_param else -1
                                      for d in v.type.tensor_type.shape.dim]
                    summary = {
                        "opset": m.opset_import[0].version,
                        "inputs": [[v.name, dims(v)] for v in m.graph.input],
                        "outputs": [[v.name, dims(v)] for v in m.graph.output],
                        "nodes": [n.op_type for n in m.graph.node],
                        "initializers": [[t.name, list(t.dims)] for t in m.graph.initializer],
                        "metadata": [p.key for p in m.metadata_props],
                    }
                    with open(os.path.join(FIX, "onnx", f"{name}.json"), "w") as f:
                        json.dump(summary, f, indent=1)
                        f.write("\n")
    print("| fixture | what it covers | opset | max abs(ONNX Runtime - vitrs) | max abs(ONNX Runtime - PyTorch/JAX reference) |")
    print("|---|---|---|---|---|")
    for name, what, opset, d_vit, d_ref in rows:
        print(f"| `{name}` | {what} | {opset} | {d_vit:.1e} | {d_ref:.1e} |")
    print(f"\nonnx {onnx.__version__}, onnxruntime {ort.__version__}; worst {worst:.1e} (bound 1e-4)")
    if worst >= 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
