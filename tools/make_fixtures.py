#!/usr/bin/env python3
"""Generate the tiny random-weight reference fixtures under tests/fixtures/.

Usage (from the repository root, with the venv described in tools/requirements.txt):

    /path/to/venv/bin/python tools/make_fixtures.py

Six models are produced (three Hugging Face `transformers` ViT layouts and three
`timm` hub layouts).  Every parameter is re-initialised from a fixed seed so that
no tensor is trivially 0 or 1, the models are saved in their native on-disk
formats, re-loaded from disk, and reference outputs are computed with the
re-loaded model.  Re-running the script produces byte-identical files (CPU,
one thread).
"""

import json
import math
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import safetensors  # noqa: E402
import timm  # noqa: E402
import timm.data  # noqa: E402
import transformers  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

try:  # transformers >= 5: the slow PIL processor has its own class name
    from transformers import ViTImageProcessorPil as SlowViTImageProcessor
except ImportError:  # transformers 4.x: ViTImageProcessor is the slow PIL one
    from transformers import ViTImageProcessor as SlowViTImageProcessor

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
LARGE_IMAGE_WH = (71, 53)  # odd, non-proportional (W, H)
BATCH = 2

VERSIONS = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "timm": timm.__version__,
    "transformers": transformers.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "pillow": Image.__version__,
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Deterministically re-initialise every parameter with non-trivial random values.

    * LayerNorm weight: 1 + 0.1 * randn, LayerNorm bias: 0.1 * randn
    * Linear / Conv weight: randn / sqrt(fan_in)  (keeps activations O(1) and makes the
      attention maps clearly non-uniform), bias: 0.1 * randn
    * everything else (cls token, position embeddings, mask token): 0.5 * randn
    Finally every parameter gets an extra 0.05 * randn so nothing is exactly structured.
    """
    g = torch.Generator().manual_seed(seed)

    def rn(p):
        return torch.randn(p.shape, generator=g, dtype=p.dtype)

    done = set()
    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(m, torch.nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(1.0 + 0.1 * rn(m.weight))
                    done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.copy_(0.1 * rn(m.bias))
                    done.add(id(m.bias))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(rn(m.weight) / math.sqrt(fan_in))
                done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.copy_(0.1 * rn(m.bias))
                    done.add(id(m.bias))
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(p) not in done:
                p.copy_(0.5 * rn(p))
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.add_(0.05 * rn(p))
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert not torch.any(p == 0) and not torch.any(p == 1), f"trivial value in {name}"


def synthetic_image(width: int, height: int, phase: float = 0.0) -> Image.Image:
    """Smooth colourful pattern (scales with the image, not noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u = (x + 0.5) / width
    v = (y + 0.5) / height
    r = 0.5 + 0.5 * np.sin(2 * np.pi * (1.3 * u + 0.4 * v) + phase)
    gch = 0.5 + 0.5 * np.cos(2 * np.pi * (0.5 * u - 1.1 * v) + 0.7 + phase)
    b = np.clip(1.0 - 1.2 * np.hypot(u - 0.6, v - 0.35), 0.0, 1.0)
    rgb = np.stack([r, gch, b], axis=-1)
    arr = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False, compress_level=9)


def save_npy(arr, path: Path) -> None:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(arr, dtype="<f4"))
    np.save(path, arr, allow_pickle=False)


def random_input(seed: int, c: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, c, h, w)).astype("<f4")


def fresh_dir(name: str) -> Path:
    d = FIXTURES / name
    if d.exists():
        shutil.rmtree(d)
    (d / "ref").mkdir(parents=True)
    return d


def write_json(obj, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_images(ref: Path, h: int, w: int, seed: int):
    img = synthetic_image(w, h, phase=0.1 * seed)
    big = synthetic_image(*LARGE_IMAGE_WH, phase=0.1 * seed)
    save_png(img, ref / "image.png")
    save_png(big, ref / "image_large.png")
    # always feed the processors the images as they were written to disk
    return Image.open(ref / "image.png").convert("RGB"), Image.open(ref / "image_large.png").convert("RGB")


# --------------------------------------------------------------------------------------
# Hugging Face fixtures
# --------------------------------------------------------------------------------------

def make_hf(name: str, seed: int, cfg_kwargs: dict, bare: bool, description: str) -> None:
    d = fresh_dir(name)
    ref = d / "ref"
    torch.manual_seed(seed)
    config = ViTConfig(**cfg_kwargs)
    cls = ViTModel if bare else ViTForImageClassification
    model = ViTModel(config, add_pooling_layer=True) if bare else cls(config)
    perturb_(model, seed)
    model.eval()
    model.save_pretrained(d)

    image_size = config.image_size
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    c = config.num_channels

    processor = SlowViTImageProcessor(
        do_resize=True,
        size={"height": h, "width": w},
        resample=Image.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor.save_pretrained(d)

    # reload from disk: checks the round trip and makes references come from the saved files
    if bare:
        loaded = ViTModel.from_pretrained(d, attn_implementation="eager", add_pooling_layer=True)
    else:
        loaded = ViTForImageClassification.from_pretrained(d, attn_implementation="eager")
    loaded.eval()
    reloaded_cfg = loaded.config
    assert reloaded_cfg.image_size == cfg_kwargs["image_size"] or list(reloaded_cfg.image_size) == list(
        cfg_kwargs["image_size"]), (reloaded_cfg.image_size, cfg_kwargs["image_size"])
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k

    x = random_input(seed, c, h, w)
    save_npy(x, ref / "input.npy")
    with torch.no_grad():
        out = loaded(pixel_values=torch.from_numpy(x), output_attentions=True)
        out_orig = model(pixel_values=torch.from_numpy(x))
    logits = out.pooler_output if bare else out.logits
    logits_orig = out_orig.pooler_output if bare else out_orig.logits
    assert torch.allclose(logits, logits_orig, atol=1e-5), "eager vs default attention mismatch"
    attn = torch.stack(list(out.attentions), 0)
    n_tok = (h // config.patch_size) * (w // config.patch_size) + 1
    assert attn.shape == (config.num_hidden_layers, BATCH, config.num_attention_heads, n_tok, n_tok), attn.shape
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    save_npy(logits, ref / "logits.npy")
    save_npy(attn, ref / "attentions.npy")

    img, big = write_images(ref, h, w, seed)
    reloaded_proc = SlowViTImageProcessor.from_pretrained(d)
    for pil, fname in ((img, "pixels.npy"), (big, "pixels_large.npy")):
        pv = reloaded_proc(images=pil, return_tensors="pt")["pixel_values"]
        assert tuple(pv.shape) == (1, c, h, w), pv.shape
        save_npy(pv, ref / fname)
    # For information only: how far the default (torchvision-backed) ViTImageProcessor is from the
    # PIL one that produced pixels*.npy. Both are saved as "image_processor_type": "ViTImageProcessor".
    backend_diff = {}
    try:
        from transformers import ViTImageProcessor as FastViTImageProcessor
        if FastViTImageProcessor is not SlowViTImageProcessor:
            fast = FastViTImageProcessor.from_pretrained(d)
            for pil, fname in ((img, "pixels.npy"), (big, "pixels_large.npy")):
                pv_fast = fast(images=pil, return_tensors="pt")["pixel_values"].numpy()
                backend_diff[fname] = float(np.abs(pv_fast - np.load(ref / fname)).max())
    except Exception as e:  # pragma: no cover - informational only
        backend_diff = {"error": repr(e)}

    info = {
        "name": name,
        "library": "transformers",
        "description": description,
        "model_class": type(loaded).__name__,
        "image_processor_class": SlowViTImageProcessor.__name__,
        "input_hw": [h, w],
        "seed": seed,
        "references": {
            "input.npy": f"float32 {list(x.shape)} standard normal input (already normalised)",
            "logits.npy": ("float32 pooler_output (tanh(dense(CLS))) of ViTModel on input.npy"
                           if bare else "float32 logits of ViTForImageClassification on input.npy"),
            "attentions.npy": "float32 [layers, batch, heads, tokens, tokens] softmax probabilities "
                              "(output_attentions=True, eager attention)",
            "image.png": f"8-bit RGB synthetic pattern, {w}x{h} (WxH)",
            "image_large.png": "8-bit RGB synthetic pattern, %dx%d (WxH)" % LARGE_IMAGE_WH,
            "pixels.npy": "float32 [1,C,H,W] pixel_values of the saved preprocessor applied to image.png",
            "pixels_large.npy": "float32 [1,C,H,W] pixel_values of the saved preprocessor applied to image_large.png",
        },
        "max_abs_diff_torchvision_backend_vs_pil": backend_diff,
        "versions": VERSIONS,
    }
    write_json(info, ref / "info.json")
    print(f"{name}: logits {tuple(logits.shape)} attn {tuple(attn.shape)}")


# --------------------------------------------------------------------------------------
# timm fixtures
# --------------------------------------------------------------------------------------

def timm_attentions(model, x: torch.Tensor):
    """Run the model with unfused attention and capture the softmax probabilities.

    timm's `Attention.forward` computes `attn = softmax(q*scale @ k^T)` then
    `attn = self.attn_drop(attn)` then `x = attn @ v` when `fused_attn` is False,
    so a forward hook on `attn_drop` (an identity Dropout in eval) sees exactly the
    probabilities that multiply V.
    """
    captured = []
    handles = []
    for blk in model.blocks:
        assert hasattr(blk.attn, "fused_attn") and hasattr(blk.attn, "attn_drop")
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(
            lambda mod, inp, out: captured.append(out.detach().clone())))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    assert len(captured) == len(model.blocks)
    return logits, torch.stack(captured, 0)


def explicit_attentions(model, x: torch.Tensor):
    """Independent re-computation of the attention probabilities from q, k (cross-check)."""
    out = []
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.patch_drop(t)
        t = model.norm_pre(t)
        for blk in model.blocks:
            a = blk.attn
            y = blk.norm1(t)
            B, N, C = y.shape
            qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            q, k = a.q_norm(q), a.k_norm(k)
            out.append(((q * a.scale) @ k.transpose(-2, -1)).softmax(-1))
            t = blk(t)
    return torch.stack(out, 0)


def make_timm(name: str, seed: int, arch: str, kwargs: dict, description: str) -> None:
    d = fresh_dir(name)
    ref = d / "ref"
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    perturb_(model, seed)
    model.eval()

    data_config = {
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": tuple(IMAGENET_MEAN),
        "std": tuple(IMAGENET_STD),
    }
    save_for_hf(model, str(d), safe_serialization=True, data_config=data_config)
    with open(d / "config.json") as f:
        hub_cfg = json.load(f)
    # sanity: the hub config must carry everything needed to rebuild the model
    assert hub_cfg["architecture"] == arch, hub_cfg
    for k, v in kwargs.items():
        got = hub_cfg["model_args"].get(k)
        want = list(v) if isinstance(v, tuple) else v
        if k == "img_size" and isinstance(v, int):
            want = [v, v]  # timm records the current (H, W), always as a pair
        assert got == want, (k, got, want)
    pc = hub_cfg["pretrained_cfg"]
    assert pc["interpolation"] == "bicubic" and pc["crop_pct"] == 0.875, pc
    assert list(pc["mean"]) == IMAGENET_MEAN and list(pc["std"]) == IMAGENET_STD, pc

    # rebuild exactly like a user would: timm's own local hub-folder loader (config.json +
    # model.safetensors, model_args applied on top of the named architecture)
    rebuilt = timm.create_model(f"local-dir:{d}", pretrained=True)
    rebuilt.eval()
    sd0, sd1 = model.state_dict(), rebuilt.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k

    c, h, w = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    x_np = random_input(seed, c, h, w)
    save_npy(x_np, ref / "input.npy")
    x = torch.from_numpy(x_np)
    with torch.no_grad():
        logits_fused = rebuilt(x)
    logits, attn = timm_attentions(rebuilt, x)
    attn_explicit = explicit_attentions(rebuilt, x)
    assert torch.allclose(logits, logits_fused, atol=1e-5), (logits - logits_fused).abs().max()
    assert torch.allclose(attn, attn_explicit, atol=1e-6), (attn - attn_explicit).abs().max()
    gh, gw = rebuilt.patch_embed.grid_size
    n_tok = gh * gw + rebuilt.num_prefix_tokens
    assert attn.shape == (len(rebuilt.blocks), BATCH, rebuilt.blocks[0].attn.num_heads, n_tok, n_tok), attn.shape
    save_npy(logits, ref / "logits.npy")
    save_npy(attn, ref / "attentions.npy")

    img, big = write_images(ref, h, w, seed)
    # the model loaded from the hub folder carries the exported pretrained_cfg
    resolved = timm.data.resolve_data_config({}, model=rebuilt)
    assert resolved["interpolation"] == "bicubic" and resolved["crop_pct"] == 0.875, resolved
    assert tuple(resolved["input_size"]) == (c, h, w), resolved
    transform = timm.data.create_transform(**resolved)
    for pil, fname in ((img, "pixels.npy"), (big, "pixels_large.npy")):
        pv = transform(pil).unsqueeze(0)
        assert tuple(pv.shape) == (1, c, h, w), pv.shape
        save_npy(pv, ref / fname)

    info = {
        "name": name,
        "library": "timm",
        "description": description,
        "architecture": arch,
        "create_model_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
        "input_hw": [h, w],
        "seed": seed,
        "structure": {
            "global_pool": rebuilt.global_pool,
            "final_norm": type(rebuilt.norm).__name__,
            "fc_norm": type(rebuilt.fc_norm).__name__,
            "embed_dim": rebuilt.embed_dim,
            "num_heads": rebuilt.blocks[0].attn.num_heads,
            "qkv_bias": rebuilt.blocks[0].attn.qkv.bias is not None,
            "grid_size": [gh, gw],
            "num_prefix_tokens": rebuilt.num_prefix_tokens,
            "mlp_hidden": rebuilt.blocks[0].mlp.fc1.out_features,
            "layer_norm_eps": rebuilt.blocks[0].norm1.eps,
            "act_layer": type(rebuilt.blocks[0].mlp.act).__name__,
        },
        "eval_data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolved.items()},
        "eval_transform": repr(transform),
        "references": {
            "input.npy": f"float32 {list(x_np.shape)} standard normal input (already normalised)",
            "logits.npy": "float32 model(input) logits",
            "attentions.npy": "float32 [layers, batch, heads, tokens, tokens] softmax probabilities "
                              "(forward hook on blocks[i].attn.attn_drop with fused_attn=False; "
                              "cross-checked against an explicit q.k softmax)",
            "image.png": f"8-bit RGB synthetic pattern, {w}x{h} (WxH)",
            "image_large.png": "8-bit RGB synthetic pattern, %dx%d (WxH)" % LARGE_IMAGE_WH,
            "pixels.npy": "float32 [1,C,H,W] timm eval transform (resolve_data_config + create_transform) of image.png",
            "pixels_large.npy": "float32 [1,C,H,W] timm eval transform of image_large.png",
        },
        "versions": VERSIONS,
    }
    write_json(info, ref / "info.json")
    print(f"{name}: logits {tuple(logits.shape)} attn {tuple(attn.shape)} "
          f"pool={rebuilt.global_pool} norm={type(rebuilt.norm).__name__} fc_norm={type(rebuilt.fc_norm).__name__}")


# --------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------
# Variants of the fixtures above, testing one loader feature each (weights + refs only)
# --------------------------------------------------------------------------------------

def make_hf_v5_names() -> None:
    """hf_cls's weights under the key names transformers 5 uses in memory
    (`vit.layers.{i}.attention.q_proj`, ...). `save_pretrained` still writes the 4.x names
    found on the hub, but `safetensors.torch.save_file(model.state_dict())` writes these."""
    from safetensors.torch import save_file
    src = FIXTURES / "hf_cls"
    d = fresh_dir("hf_v5_names")
    model = ViTForImageClassification.from_pretrained(src, attn_implementation="eager").eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(".layers.0.attention.q_proj." in k for k in sd), list(sd)[:8]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", d / "config.json")
    shutil.copy(src / "preprocessor_config.json", d / "preprocessor_config.json")
    ref = d / "ref"
    shutil.copy(src / "ref" / "input.npy", ref / "input.npy")
    x = torch.from_numpy(np.load(ref / "input.npy"))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    save_npy(logits, ref / "logits.npy")
    write_json({"name": "hf_v5_names", "library": "transformers",
                "description": "hf_cls saved with safetensors.torch.save_file(model.state_dict()): "
                               "transformers 5 in-memory key names", "versions": VERSIONS}, ref / "info.json")
    print("hf_v5_names: keys like", next(k for k in sd if "q_proj" in k))


def make_timm_resample() -> None:
    """timm_tiny_named's weights (2x2 patch grid at 32 px) with a config asking for 48 px
    (3x3 grid): the position table must be resampled. Reference: what timm itself does,
    `create_model("local-dir:...", pretrained=True, img_size=48)` (its checkpoint filter
    calls resample_abs_pos_embed, bicubic with antialiasing)."""
    src = FIXTURES / "timm_tiny_named"
    d = fresh_dir("timm_resample")
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    with open(src / "config.json") as f:
        cfg = json.load(f)
    cfg["model_args"]["img_size"] = [48, 48]
    cfg["pretrained_cfg"]["input_size"] = [3, 48, 48]
    write_json(cfg, d / "config.json")
    model = timm.create_model(f"local-dir:{src}", pretrained=True, img_size=48).eval()
    assert tuple(model.pos_embed.shape) == (1, 10, 48), model.pos_embed.shape
    ref = d / "ref"
    x_np = random_input(2004, 3, 48, 48)
    save_npy(x_np, ref / "input.npy")
    with torch.no_grad():
        logits = model(torch.from_numpy(x_np))
    save_npy(logits, ref / "logits.npy")
    save_npy(model.pos_embed.detach(), ref / "pos_embed.npy")
    write_json({"name": "timm_resample", "library": "timm",
                "description": "timm_tiny_named weights (2x2 grid) loaded at img_size 48 (3x3 grid); "
                               "pos_embed.npy is timm's resampled table", "versions": VERSIONS}, ref / "info.json")
    print("timm_resample: logits", tuple(logits.shape))


# --------------------------------------------------------------------------------------
# Gradient references for the training backward pass
# --------------------------------------------------------------------------------------
# A post-norm ViT (the original Transformer's block), which no library ships: built from
# timm's VisionTransformer with its own block_fn, saved in vitrs' native format
# --------------------------------------------------------------------------------------

class PostNormBlock(torch.nn.Module):
    """The original Transformer's block (Vaswani et al. 2017), vitrs' `norm = "post"`:
    x = LN1(x + γ1·attn(x)), then x = LN2(x + γ2·mlp(x)); timm's submodules and names
    (norm1, attn, ls1, norm2, mlp, ls2), built with the arguments timm's VisionTransformer
    passes to its `block_fn`."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, init_values=None,
                 act_layer=torch.nn.GELU, norm_layer=torch.nn.LayerNorm, **_unused):
        super().__init__()
        from timm.layers import LayerScale, Mlp
        from timm.models.vision_transformer import Attention
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else torch.nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values else torch.nn.Identity()

    def forward(self, x, attn_mask=None):
        x = self.norm1(x + self.ls1(self.attn(x)))
        return self.norm2(x + self.ls2(self.mlp(x)))


def make_native_postnorm() -> None:
    """`native_postnorm/model.safetensors`: post-norm blocks with LayerScale, tanh GELU, no
    final norm (the last block ends on its LN2), class-token pooling, in vitrs' native format
    (the architecture in the file's metadata), with logits, attentions and gradients."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer
    name, seed = "native_postnorm", 3001
    d = fresh_dir(name)
    ref = d / "ref"
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=24, patch_size=8, in_chans=3, num_classes=4, embed_dim=24,
                              depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True, init_values=0.3,
                              act_layer="gelu_tanh", block_fn=PostNormBlock, final_norm=False)
    perturb_(model, seed)
    model.eval()
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.Identity)
    config = {
        "image_height": 24, "image_width": 24, "patch_size": 8, "channels": 3, "width": 24,
        "depth": 2, "heads": 2, "mlp_dim": 48, "num_classes": 4, "pool": "cls", "head": "linear",
        "norm": "post", "gelu": "tanh", "fc_norm": False, "qkv_bias": True,
        "layer_norm_eps": model.blocks[0].norm1.eps, "class_token": True, "distilled": False,
        "reg_tokens": 0, "no_embed_class": False, "layer_scale": 0.3,
    }
    preprocess = {"height": 24, "width": 24, "channels": 3, "resize": {"kind": "exact"},
                  "interpolation": "bilinear", "rescale": 1.0 / 255.0,
                  "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    metadata = {"format": "vitrs", "vitrs.config": json.dumps(config),
                "vitrs.preprocess": json.dumps(preprocess)}
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"), metadata=metadata)

    x_np = random_input(seed, 3, 24, 24)
    save_npy(x_np, ref / "input.npy")
    x = torch.from_numpy(x_np)
    with torch.no_grad():
        logits_fused = model(x)
    logits, attn = timm_attentions(model, x)
    assert torch.allclose(logits, logits_fused, atol=1e-5), (logits - logits_fused).abs().max()
    save_npy(logits, ref / "logits.npy")
    save_npy(attn, ref / "attentions.npy")
    write_json({
        "name": name,
        "library": "timm (VisionTransformer with a post-norm block_fn) -> vitrs native safetensors",
        "description": make_native_postnorm.__doc__,
        "config": config,
        "seed": seed,
        "versions": VERSIONS,
    }, ref / "info.json")
    print(f"{name}: logits {tuple(logits.shape)} attn {tuple(attn.shape)}")
    add_grads(name, model, hf=False)


# --------------------------------------------------------------------------------------

GRAD_SMOOTHING = 0.1


def hf_to_timm_grads(named: dict) -> dict:
    """transformers 5 in-memory parameter names -> timm names, q/k/v fused as timm does."""
    out, qkv = {}, {}
    for k, g in named.items():
        k = k.removeprefix("vit.")
        parts = k.split(".")
        if k == "embeddings.cls_token":
            out["cls_token"] = g
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = g
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + parts[-1]] = g
        elif parts[0] == "layers":
            i, rest, kind = parts[1], ".".join(parts[2:-1]), parts[-1]
            if rest in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                qkv.setdefault((i, kind), {})[rest[10]] = g
                continue
            name = {"attention.o_proj": "attn.proj", "layernorm_before": "norm1",
                    "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[rest]
            out[f"blocks.{i}.{name}.{kind}"] = g
        elif parts[0] == "layernorm":
            out["norm." + parts[-1]] = g
        elif parts[0] == "classifier":
            out["head." + parts[-1]] = g
        else:
            raise KeyError(k)
    for (i, kind), d in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([d["q"], d["k"], d["v"]], 0)
    return out


def add_grads(name: str, model: torch.nn.Module, hf: bool) -> None:
    """Loss (cross-entropy, label smoothing 0.1) on ref/input.npy and every parameter's
    gradient, saved under timm names in ref/grads.safetensors."""
    from safetensors.torch import save_file
    ref = FIXTURES / name / "ref"
    x = torch.from_numpy(np.load(ref / "input.npy"))
    model.eval()
    model.zero_grad()
    logits = model(pixel_values=x).logits if hf else model(x)
    k = logits.shape[1]
    labels = torch.tensor([1 % k, 3 % k])
    loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=GRAD_SMOOTHING)
    loss.backward()
    named = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads = hf_to_timm_grads(named) if hf else named
    save_file({n: g.contiguous() for n, g in grads.items()}, str(ref / "grads.safetensors"))
    write_json({"labels": labels.tolist(), "label_smoothing": GRAD_SMOOTHING, "loss": float(loss)},
               ref / "grads.json")
    print(f"{name}: loss {float(loss):.6f}, {len(grads)} gradient tensors")


def make_grads() -> None:
    for name in ("hf_cls", "hf_nonsquare"):
        add_grads(name, ViTForImageClassification.from_pretrained(FIXTURES / name, attn_implementation="eager"), hf=True)
    for name in ("timm_tiny_named", "timm_mean_nonsquare", "timm_p8_nobias", "timm_deit_distilled",
                 "timm_deit3", "timm_reg_gap", "timm_siglip_map"):
        add_grads(name, timm.create_model(f"local-dir:{FIXTURES / name}", pretrained=True), hf=False)


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)

    make_hf("hf_cls", 1001, dict(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, hidden_act="gelu", qkv_bias=True,
        layer_norm_eps=1e-12, num_labels=5,
        id2label={0: "cat", 1: "dog", 2: "bird", 3: "fish", 4: "frog"},
        label2id={"cat": 0, "dog": 1, "bird": 2, "fish": 3, "frog": 4},
    ), bare=False, description="HF ViTForImageClassification, 32x32, patch 8, hidden 32, 2 layers, "
                               "4 heads, MLP 64, exact GELU, qkv bias, 5 labels (id2label cat/dog/...)")

    make_hf("hf_nonsquare", 1002, dict(
        image_size=[24, 40], patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=3,
        num_attention_heads=3, intermediate_size=96, hidden_act="gelu_pytorch_tanh", qkv_bias=False,
        num_labels=4,
    ), bare=False, description="HF ViTForImageClassification, non-square image_size [H=24, W=40], patch 8 "
                               "(3x5 grid), hidden 48, 3 layers, 3 heads, MLP 96, tanh-approximate GELU "
                               "(gelu_pytorch_tanh), no qkv bias, 4 labels (default LABEL_i names)")

    make_hf("hf_bare", 1003, dict(
        image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48,
    ), bare=True, description="HF bare ViTModel with pooler (add_pooling_layer=True), 16x16, patch 4, "
                              "hidden 24, 2 layers, 2 heads, MLP 48; logits.npy holds pooler_output")

    # NOTE: vit_tiny_patch16_224 with only img_size/depth/num_classes overridden would keep embed_dim 192,
    # and its weights alone would be ~4 MB; embed_dim is overridden to keep the fixtures
    # small. patch_size (16), num_heads (3), mlp_ratio (4) and qkv_bias (True) still come from the name.
    make_timm("timm_tiny_named", 2001, "vit_tiny_patch16_224",
              dict(img_size=32, depth=2, num_classes=7, embed_dim=48),
              "timm vit_tiny_patch16_224 resolved by name (patch 16, 3 heads, mlp_ratio 4, qkv bias) "
              "with model_args img_size=32, depth=2, embed_dim=48, num_classes=7; token pooling")

    make_timm("timm_mean_nonsquare", 2002, "vit_small_patch16_224",
              dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                   global_pool="avg", num_classes=6),
              "timm vit_small_patch16_224 overridden to non-square img_size (H=32, W=48), patch 8 (4x6 grid), "
              "embed 32, depth 2, 4 heads, mlp_ratio 2, global_pool='avg' (mean over patch tokens, "
              "fc_norm LayerNorm, final norm Identity), 6 classes")

    make_timm("timm_p8_nobias", 2003, "vit_base_patch8_224",
              dict(img_size=24, patch_size=8, embed_dim=24, depth=3, num_heads=3, mlp_ratio=4.0,
                   qkv_bias=False, num_classes=3),
              "timm vit_base_patch8_224 overridden to img_size 24, patch 8 (3x3 grid), embed 24, depth 3, "
              "3 heads, mlp_ratio 4, qkv_bias=False, 3 classes; token pooling")

    # Later timm families: the token layout, pooling and LayerScale come from the architecture
    # name (only sizes are overridden), so the Rust side must know each name's defaults.
    make_timm("timm_deit_distilled", 2004, "deit_tiny_distilled_patch16_224",
              dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_classes=5),
              "timm deit_tiny_distilled_patch16_224 (VisionTransformerDistilled: cls + dist tokens, "
              "pos_embed of N+2 rows, head and head_dist averaged in eval) with img_size 32, patch 8 "
              "(4x4 grid), embed 24, depth 2, 3 heads (name), 5 classes")

    make_timm("timm_deit3", 2005, "deit3_small_patch16_224",
              dict(img_size=24, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=4),
              "timm deit3_small_patch16_224 (no_embed_class: pos_embed covers the 9 patches only; "
              "LayerScale ls1/ls2.gamma, init_values 1e-6 from the name, perturbed) with img_size 24, "
              "patch 8, embed 24, depth 2, 2 heads, 4 classes")

    make_timm("timm_reg_gap", 2006, "vit_base_patch16_reg4_gap_256",
              dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                   init_values=0.1, num_classes=3),
              "timm vit_base_patch16_reg4_gap_256 (4 register tokens, no class token, no_embed_class, "
              "global_pool avg -> fc_norm, all from the name) plus LayerScale init_values 0.1, img_size 32, "
              "patch 8, embed 32, depth 2, 4 heads, mlp_ratio 2, 3 classes")

    make_timm("timm_siglip_map", 2007, "vit_base_patch16_siglip_224",
              dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                   num_classes=3),
              "timm vit_base_patch16_siglip_224 (no class token, global_pool map: AttentionPoolLatent "
              "with latent query, q, kv, proj, norm, mlp; from the name) with img_size 32, patch 8, "
              "embed 32, depth 2, 4 heads, mlp_ratio 2, 3 classes")

    make_hf_v5_names()
    make_timm_resample()
    make_grads()
    make_native_postnorm()

    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"total size of {FIXTURES.relative_to(ROOT)}: {total} bytes")
    assert total < 6 * 1024 * 1024, "fixtures grew beyond 6 MB"


if __name__ == "__main__":
    main()
