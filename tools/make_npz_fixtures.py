#!/usr/bin/env python3
"""Fixtures for the Google `.npz` loader: tiny random ViTs saved in the two JAX layouts, with
reference logits computed by JAX (jax.numpy, following Flax's module semantics: LayerNorm eps
1e-6, GELU tanh form, MultiHeadDotProductAttention with per-head (D, nh, hd) kernels and the
query scaled by 1/sqrt(hd), a VALID conv patch embedding in NHWC).

  npz-vit/       google-research/vision_transformer layout: `encoderblock_{i}/{LayerNorm_0,
                 MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`, `pre_logits`, f32.
  npz-bigvision/ big_vision layout: `params/` prefix, top-level `pos_embedding`, scan-stacked
                 `encoderblock/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
                 MlpBlock_0}` with a leading layer axis, weights stored as bfloat16.
  npz-bigvision-gap/ big_vision without a class token (pool_type 'gap': mean of all tokens
                 after encoder_norm), position table of the patches only, f32.
  npz-bigvision-map/ big_vision without a class token, pool_type 'map': `MAPHead_0/{probe,
                 MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}`, scan-stacked, f32.
Each directory holds model.npz, input.npy (B, C, H, W) f32 already normalised to [-1, 1],
and logits.npy (B, K).

Usage: python tools/make_npz_fixtures.py [--out tests/fixtures]
Needs numpy and jax (CPU) from PyPI; ml_dtypes (a jax dependency) provides bfloat16.
"""
import argparse
import os

import numpy as np


def init(rng, cfg):
    d, m, p, c, nh = cfg["width"], cfg["mlp"], cfg["patch"], cfg["channels"], cfg["heads"]
    hd = d // nh
    pool = cfg.get("pool", "tok")
    n = (cfg["image"] // p) ** 2 + (pool == "tok")
    r = lambda *s, std=0.2: (rng.standard_normal(s) * std).astype(np.float32)
    params = {
        "embedding/kernel": r(p, p, c, d),
        "embedding/bias": r(d),
        # drawn in this order so the class-token fixtures keep their values
        **({"cls": r(1, 1, d)} if pool == "tok" else {}),
        "pos_embedding": r(1, n, d),
        "encoder_norm/scale": 1 + r(d),
        "encoder_norm/bias": r(d),
        "head/kernel": r(cfg.get("pre_logits") or d, cfg["classes"]),
        "head/bias": r(cfg["classes"]),
        "blocks": [],
    }
    if pool == "map":
        params["map"] = {
            "probe": r(1, 1, d),
            "q/kernel": r(d, nh, hd), "q/bias": r(nh, hd),
            "k/kernel": r(d, nh, hd), "k/bias": r(nh, hd),
            "v/kernel": r(d, nh, hd), "v/bias": r(nh, hd),
            "out/kernel": r(nh, hd, d), "out/bias": r(d),
            "ln/scale": 1 + r(d), "ln/bias": r(d),
            "fc1/kernel": r(d, m), "fc1/bias": r(m),
            "fc2/kernel": r(m, d), "fc2/bias": r(d),
        }
    if cfg.get("pre_logits"):
        params["pre_logits/kernel"] = r(d, cfg["pre_logits"])
        params["pre_logits/bias"] = r(cfg["pre_logits"])
    for _ in range(cfg["depth"]):
        params["blocks"].append({
            "ln1/scale": 1 + r(d), "ln1/bias": r(d),
            "q/kernel": r(d, nh, hd), "q/bias": r(nh, hd),
            "k/kernel": r(d, nh, hd), "k/bias": r(nh, hd),
            "v/kernel": r(d, nh, hd), "v/bias": r(nh, hd),
            "out/kernel": r(nh, hd, d), "out/bias": r(d),
            "ln2/scale": 1 + r(d), "ln2/bias": r(d),
            "fc1/kernel": r(d, m), "fc1/bias": r(m),
            "fc2/kernel": r(m, d), "fc2/bias": r(d),
        })
    return params


def forward(params, x_nhwc, cfg):
    import jax
    import jax.numpy as jnp

    def ln(x, s, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-6) * s + b

    y = jax.lax.conv_general_dilated(
        x_nhwc, params["embedding/kernel"], (cfg["patch"],) * 2, "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["embedding/bias"]
    b = y.shape[0]
    y = y.reshape(b, -1, y.shape[-1])
    def mhdpa(xq, xkv, a):
        q = jnp.einsum("bnd,dhk->bnhk", xq, a["q/kernel"]) + a["q/bias"]
        k = jnp.einsum("bnd,dhk->bnhk", xkv, a["k/kernel"]) + a["k/bias"]
        v = jnp.einsum("bnd,dhk->bnhk", xkv, a["v/kernel"]) + a["v/bias"]
        q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        w = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k), axis=-1)
        o = jnp.einsum("bhqs,bshk->bqhk", w, v)
        return jnp.einsum("bqhk,hkd->bqd", o, a["out/kernel"])  # out/bias added by the caller

    def mlp(h, a):
        h = jax.nn.gelu(h @ a["fc1/kernel"] + a["fc1/bias"], approximate=True)
        return h @ a["fc2/kernel"]  # fc2/bias added by the caller

    if "cls" in params:
        y = jnp.concatenate([jnp.tile(params["cls"], (b, 1, 1)), y], axis=1)
    y = y + params["pos_embedding"]
    for blk in params["blocks"]:
        h = ln(y, blk["ln1/scale"], blk["ln1/bias"])
        y = y + mhdpa(h, h, blk) + blk["out/bias"]
        y = y + mlp(ln(y, blk["ln2/scale"], blk["ln2/bias"]), blk) + blk["fc2/bias"]
    y = ln(y, params["encoder_norm/scale"], params["encoder_norm/bias"])
    pool = cfg.get("pool", "tok")
    if pool == "tok":
        y = y[:, 0]
    elif pool == "gap":
        y = y.mean(axis=1)
    else:  # big_vision MAPHead: probe attends over all tokens, then x + MLP(LN(x)), token 0
        a = params["map"]
        x = mhdpa(jnp.tile(a["probe"], (b, 1, 1)), y, a) + a["out/bias"]
        x = x + mlp(ln(x, a["ln/scale"], a["ln/bias"]), a) + a["fc2/bias"]
        y = x[:, 0]
    if "pre_logits/kernel" in params:
        y = jnp.tanh(y @ params["pre_logits/kernel"] + params["pre_logits/bias"])
    return np.asarray(y @ params["head/kernel"] + params["head/bias"], dtype=np.float32)


def flat_original(params):
    out = {"embedding/kernel": params["embedding/kernel"], "embedding/bias": params["embedding/bias"],
           "cls": params["cls"], "Transformer/posembed_input/pos_embedding": params["pos_embedding"],
           "Transformer/encoder_norm/scale": params["encoder_norm/scale"],
           "Transformer/encoder_norm/bias": params["encoder_norm/bias"],
           "head/kernel": params["head/kernel"], "head/bias": params["head/bias"]}
    for k in ("pre_logits/kernel", "pre_logits/bias"):
        if k in params:
            out[k] = params[k]
    names = {"ln1": "LayerNorm_0", "q": "MultiHeadDotProductAttention_1/query",
             "k": "MultiHeadDotProductAttention_1/key", "v": "MultiHeadDotProductAttention_1/value",
             "out": "MultiHeadDotProductAttention_1/out", "ln2": "LayerNorm_2",
             "fc1": "MlpBlock_3/Dense_0", "fc2": "MlpBlock_3/Dense_1"}
    for i, blk in enumerate(params["blocks"]):
        for k, v in blk.items():
            mod, leaf = k.split("/")
            out[f"Transformer/encoderblock_{i}/{names[mod]}/{leaf}"] = v
    return out


def flat_big_vision(params, dtype):
    out = {"params/embedding/kernel": params["embedding/kernel"], "params/embedding/bias": params["embedding/bias"],
           **({"params/cls": params["cls"]} if "cls" in params else {}),
           "params/pos_embedding": params["pos_embedding"],
           "params/Transformer/encoder_norm/scale": params["encoder_norm/scale"],
           "params/Transformer/encoder_norm/bias": params["encoder_norm/bias"],
           "params/head/kernel": params["head/kernel"], "params/head/bias": params["head/bias"]}
    if "map" in params:
        heads = {"probe": "probe", "q": "MultiHeadDotProductAttention_0/query",
                 "k": "MultiHeadDotProductAttention_0/key", "v": "MultiHeadDotProductAttention_0/value",
                 "out": "MultiHeadDotProductAttention_0/out", "ln": "LayerNorm_0",
                 "fc1": "MlpBlock_0/Dense_0", "fc2": "MlpBlock_0/Dense_1"}
        for k, v in params["map"].items():
            mod, _, leaf = k.partition("/")
            out["params/MAPHead_0/" + heads[mod] + ("/" + leaf if leaf else "")] = v
    names = {"ln1": "LayerNorm_0", "q": "MultiHeadDotProductAttention_0/query",
             "k": "MultiHeadDotProductAttention_0/key", "v": "MultiHeadDotProductAttention_0/value",
             "out": "MultiHeadDotProductAttention_0/out", "ln2": "LayerNorm_1",
             "fc1": "MlpBlock_0/Dense_0", "fc2": "MlpBlock_0/Dense_1"}
    for k in params["blocks"][0]:
        mod, leaf = k.split("/")
        out[f"params/Transformer/encoderblock/{names[mod]}/{leaf}"] = np.stack([b[k] for b in params["blocks"]])
    return {k: v.astype(dtype) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    a = ap.parse_args()
    import jax
    import ml_dtypes

    jax.config.update("jax_enable_x64", False)
    rng = np.random.default_rng(7)
    for name, cfg, layout in [
        ("npz-vit", dict(image=16, patch=4, channels=3, width=16, depth=2, heads=2, mlp=32, classes=5,
                         pre_logits=12), "original"),
        ("npz-bigvision", dict(image=12, patch=4, channels=3, width=24, depth=3, heads=3, mlp=48, classes=4),
         "big_vision"),
        ("npz-bigvision-gap", dict(image=12, patch=4, channels=3, width=16, depth=2, heads=2, mlp=32, classes=3,
                                   pool="gap"), "big_vision_f32"),
        ("npz-bigvision-map", dict(image=12, patch=4, channels=3, width=16, depth=2, heads=2, mlp=32, classes=3,
                                   pool="map"), "big_vision_f32"),
    ]:
        params = init(rng, cfg)
        if layout == "big_vision":
            # Stored as bfloat16: the reference runs on the rounded weights.
            def rnd(v):
                return v.astype(ml_dtypes.bfloat16).astype(np.float32)
            params = {k: ([{kk: rnd(vv) for kk, vv in b.items()} for b in v] if k == "blocks" else rnd(v))
                      for k, v in params.items()}
            flat = flat_big_vision(params, ml_dtypes.bfloat16)
        elif layout == "big_vision_f32":
            flat = flat_big_vision(params, np.float32)
        else:
            flat = flat_original(params)
        x = rng.uniform(-1, 1, (2, cfg["image"], cfg["image"], cfg["channels"])).astype(np.float32)
        logits = forward(params, x, cfg)
        d = os.path.join(a.out, name)
        os.makedirs(d, exist_ok=True)
        np.savez(os.path.join(d, "model.npz"), **flat)
        np.save(os.path.join(d, "input.npy"), np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        np.save(os.path.join(d, "logits.npy"), logits)
        print(name, {k: v.shape for k, v in list(flat.items())[:3]}, "logits", logits.shape,
              "jax", jax.__version__)


if __name__ == "__main__":
    main()
