#!/usr/bin/env python3
"""The bad-input corpus: files a stranger could hand vitrs, each paired with what the user
must see. Writes tests/bad_inputs/<case files> and tests/bad_inputs/cases.tsv, which
crates/vitrs-cli/tests/bad_inputs.rs runs through the `vit` binary (no Python in CI).

cases.tsv columns (tab-separated):
  name      the case
  case      its file or directory, relative to tests/bad_inputs
  args      `vit` arguments; {case} is this case's file or directory, {model} a valid model
  exit      the exit code the user must get (0 for valid-but-unusual inputs)
  expect    a substring of stderr (or of stdout for exit 0) the user must see

Usage: python tools/make_bad_inputs.py   (numpy and Pillow; deterministic output)
"""
import gzip
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "bad_inputs"
GOOD = ROOT / "tests" / "fixtures" / "hf_cls"
CASES = []
LAST = [None]  # the file or directory the next case is about


def case(name, args, exit_code, expect):
    CASES.append((name, str(LAST[0].relative_to(OUT)), args, str(exit_code), expect))


def write(rel, data: bytes):
    p = OUT / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    LAST[0] = p
    return p


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def hf_dir(rel, weights: bytes, config_edit=None, config_text=None):
    """A Hugging Face directory: hf_cls's config (edited) beside the given weights."""
    d = OUT / rel
    d.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((GOOD / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (d / "config.json").write_text(config_text if config_text is not None else json.dumps(cfg, indent=1))
    (d / "model.safetensors").write_bytes(weights)
    LAST[0] = d
    return d


def good_weights() -> bytes:
    return (GOOD / "model.safetensors").read_bytes()


def reencode(dtype: str) -> bytes:
    """hf_cls's weights with every tensor stored as `dtype` (F16, BF16 or F64)."""
    raw = good_weights()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out_header, chunks, off = {}, [], 0
    for k, v in header.items():
        if k == "__metadata__":
            out_header[k] = v
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype="<f4")
        if dtype == "F16":
            enc = arr.astype("<f2").tobytes()
        elif dtype == "F64":
            enc = arr.astype("<f8").tobytes()
        else:  # BF16: the top half of each f32, rounded to nearest even
            u = arr.view("<u4").astype(np.uint64)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
            enc = u.tobytes()
        out_header[k] = {"dtype": dtype, "shape": v["shape"], "data_offsets": [off, off + len(enc)]}
        chunks.append(enc)
        off += len(enc)
    return safetensors_bytes(out_header, b"".join(chunks))


def with_nan() -> bytes:
    raw = bytearray(good_weights())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a, _ = header["classifier.bias"]["data_offsets"]
    raw[8 + n + a:8 + n + a + 4] = struct.pack("<f", float("nan"))
    return bytes(raw)


def png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG", **kw)
    return b.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=90)
    return b.getvalue()


def idx_bytes(dims, data: bytes, magic_type=8) -> bytes:
    return bytes([0, 0, magic_type, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + data


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rng = np.random.default_rng(0)

    # ---- safetensors ------------------------------------------------------------------
    one = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    write("st_zero_bytes.safetensors", b"")
    case("safetensors: zero bytes", "info --model {case}", 3, "only 0 bytes")
    write("st_truncated_header.safetensors", safetensors_bytes(one, b"\0" * 8)[:20])
    case("safetensors: truncated header", "info --model {case}", 3, "larger than the file")
    write("st_header_longer_than_file.safetensors", struct.pack("<Q", 1 << 40) + b"{}")
    case("safetensors: header length larger than the file", "info --model {case}", 3, "larger than the file")
    write("st_offsets_outside.safetensors",
          safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8))
    case("safetensors: offsets outside the file", "info --model {case}", 3, "fall outside")
    write("st_overlapping.safetensors", safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12))
    case("safetensors: overlapping tensors", "info --model {case}", 3, "overlap")
    write("st_unknown_dtype.safetensors",
          safetensors_bytes({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
    case("safetensors: unknown dtype", "info --model {case}", 3, "unknown dtype `Q7`")
    write("st_size_disagrees.safetensors",
          safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8))
    case("safetensors: byte size disagrees with shape", "info --model {case}", 3, "needs 12 bytes")
    for dt in ("F16", "BF16", "F64"):
        hf_dir(f"st_{dt.lower()}_weights", reencode(dt))
        case(f"safetensors: {dt} weights (valid: converted to f32, said so)", "info --model {case}", 0,
             f"{dt} tensor(s) to f32")
    hf_dir("st_nan_weights", with_nan())
    case("safetensors: NaN in weights (valid, warned)", "info --model {case}", 0, "NaN or Inf")

    # ---- configs ----------------------------------------------------------------------
    hf_dir("cfg_missing_field", good_weights(),
           config_edit=lambda c: c.pop("hidden_size") and c.pop("num_attention_heads"))
    case("config: missing fields (defaults that disagree with the weights)", "info --model {case}", 3,
         "config expects [1, 1, 768], weights have [1, 1, 32]")
    hf_dir("cfg_wrong_type", good_weights(), config_edit=lambda c: c.update(hidden_size="thirty-two"))
    case("config: wrong type", "info --model {case}", 3, "`hidden_size` must be a non-negative integer")
    hf_dir("cfg_heads_do_not_divide", good_weights(), config_edit=lambda c: c.update(num_attention_heads=5))
    case("config: width not divisible by heads", "info --model {case}", 3, "not divisible by heads 5")
    hf_dir("cfg_image_not_multiple_of_patch", good_weights(), config_edit=lambda c: c.update(image_size=30))
    case("config: image size not divisible by patch", "info --model {case}", 3, "multiple of patch size")
    hf_dir("cfg_disagrees_with_weights", good_weights(), config_edit=lambda c: c.update(intermediate_size=80))
    case("config: disagrees with the weights (names the tensor)", "info --model {case}", 3, "fc1")
    hf_dir("cfg_not_json", good_weights(), config_text="{ this is not json")
    case("config: not JSON", "info --model {case}", 3, "config.json")
    hf_dir("cfg_lying_size", good_weights(),
           config_edit=lambda c: c.update(hidden_size=4096, num_attention_heads=32, intermediate_size=16384,
                                          num_hidden_layers=48))
    case("config: claims a huge model over small weights (refused before allocating)", "info --model {case}",
         3, "does not belong to these weights")

    # ---- images -----------------------------------------------------------------------
    pic = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), "RGB")
    write("img_zero_bytes.png", b"")
    case("image: zero bytes", "predict --model {model} {case}", 4, "cannot decode image")
    write("img_truncated.png", png_bytes(pic)[:200])
    case("image: truncated PNG", "predict --model {model} {case}", 4, "cannot decode image")
    write("img_truncated.jpg", jpeg_bytes(pic)[:300])
    case("image: truncated JPEG", "predict --model {model} {case}", 4, "cannot decode image")
    write("img_16bit.png", png_bytes(Image.fromarray(
        rng.integers(0, 65535, (20, 20), dtype=np.uint16))))
    case("image: 16-bit PNG (valid: converted)", "predict --model {model} --json {case}", 0, '"top"')
    cmyk = Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8), "CMYK")
    write("img_cmyk.jpg", jpeg_bytes(cmyk))
    case("image: CMYK JPEG (valid: converted)", "predict --model {model} --json {case}", 0, '"top"')
    write("img_gray.png", png_bytes(pic.convert("L")))
    case("image: grayscale (valid: converted)", "predict --model {model} --json {case}", 0, '"top"')
    write("img_rgba.png", png_bytes(pic.convert("RGBA")))
    case("image: RGBA (valid: alpha dropped)", "predict --model {model} --json {case}", 0, '"top"')
    frames = [Image.fromarray(np.full((16, 16, 3), v, dtype=np.uint8), "RGB") for v in (10, 200, 90)]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    write("img_animated.gif", b.getvalue())
    case("image: animated GIF (valid: first frame)", "predict --model {model} --json {case}", 0, '"top"')
    # A PNG header claiming 100000 x 100000 pixels and no data.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    import zlib
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    write("img_huge_header.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    case("image: header claiming 100000x100000 (refused before allocating)", "predict --model {model} {case}",
         4, "limit")
    # vitrs-fuzz's finding: 573 bytes of GIF claiming 13361 x 13364.
    bomb = ROOT / "fuzz" / "regressions" / "image-gif-13361x13364.bin"
    if bomb.exists():
        write("img_gif_bomb.gif", bomb.read_bytes())
        case("image: 573-byte GIF claiming 13361x13364 (found by vitrs-fuzz)", "predict --model {model} {case}",
             4, "limit")
    write("img_not_an_image.jpg", b"%PDF-1.4 this is a pdf\n")
    case("image: a PDF named .jpg", "predict --model {model} {case}", 4, "cannot decode image")

    # ---- datasets ---------------------------------------------------------------------
    imgs = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8).tobytes()
    labs = bytes([0, 1, 2, 3, 4, 5])

    def idx_dir(rel, images: bytes, labels: bytes):
        d = OUT / rel
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "t10k"):
            (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images, mtime=0))
            (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, mtime=0))
        LAST[0] = d
        return d

    idx_dir("ds_idx_bad_magic", idx_bytes([6, 28, 28], imgs, magic_type=9), idx_bytes([6], labs))
    case("dataset: IDX with a wrong magic number", "eval --model {model} --dataset {case}", 4, "element type 0x09")
    idx_dir("ds_idx_count_mismatch", idx_bytes([60, 28, 28], imgs), idx_bytes([6], labs))
    case("dataset: IDX count disagrees with the file size", "eval --model {model} --dataset {case}", 4,
         "47040 bytes of data, the file holds 4704")
    d = OUT / "ds_cifar_truncated"
    d.mkdir()
    (d / "test_batch.bin").write_bytes(bytes(3073 * 2 + 100))
    LAST[0] = d
    case("dataset: truncated CIFAR batch", "eval --model {model} --dataset {case}", 4, "truncated")
    # Folders with the model's five classes (hf_cls: cat, dog, bird, fish, frog).
    classes = ("bird", "cat", "dog", "fish", "frog")
    d = OUT / "ds_folder_empty_class"
    for c in classes:
        (d / c).mkdir(parents=True)
        if c != "frog":
            (d / c / "a.png").write_bytes(png_bytes(pic))
        else:  # git keeps no empty directories: the class holds a non-image file only
            (d / c / "readme.txt").write_text("no images here\n")
    LAST[0] = d
    case("dataset: ImageFolder with an empty class", "eval --model {model} --dataset {case}", 4,
         "frog: class folder holds no images")
    d = OUT / "ds_folder_non_images"
    for c in classes:
        (d / c).mkdir(parents=True)
        (d / c / "a.png").write_bytes(png_bytes(pic))
    (d / "cat" / "notes.txt").write_text("not an image\n")
    (d / "dog" / "notes.txt").write_text("not an image\n")
    (d / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    LAST[0] = d
    case("dataset: non-image and unreadable files (skipped, counted)", "eval --model {model} --dataset {case} --json",
         0, "skipped 3")
    case("dataset: the same with --strict (fails, names the file)",
         "eval --model {model} --dataset {case} --json --strict", 4, "not an image (strict mode)")

    with open(OUT / "cases.tsv", "w") as f:
        f.write("# name\tcase\targs\texit\texpect  (generated by tools/make_bad_inputs.py)\n")
        for row in CASES:
            assert all("\t" not in x and "\n" not in x for x in row), row
            f.write("\t".join(row) + "\n")
    print(f"{len(CASES)} cases in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
