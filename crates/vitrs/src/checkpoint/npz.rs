//! Google's `.npz` checkpoints (a ZIP of `.npy` arrays with `/`-joined Flax names), as
//! released by google-research/vision_transformer and big_vision, converted to the canonical
//! (timm) names and layouts:
//!
//! | Flax | canonical |
//! |---|---|
//! | `embedding/kernel (P, P, C, D)` (HWIO) | `patch_embed.proj.weight (D, C, P, P)` |
//! | `cls (1, 1, D)` | `cls_token` |
//! | `Transformer/posembed_input/pos_embedding` or `pos_embedding` | `pos_embed` |
//! | `…/MultiHeadDotProductAttention_*/{query,key,value}/kernel (D, nh, hd)` | fused `attn.qkv.weight (3D, D)` |
//! | `…/MultiHeadDotProductAttention_*/out/kernel (nh, hd, D)` | `attn.proj.weight (D, D)` |
//! | `…/MlpBlock_*/Dense_{0,1}/kernel (in, out)` | `mlp.fc{1,2}.weight (out, in)` |
//! | `LayerNorm_*/scale`, `encoder_norm` | `norm*.weight`, `norm` |
//! | `pre_logits/kernel`, `head/kernel` | `pre_logits.fc`, `head` |
//!
//! Layouts: the original (`encoderblock_{i}` holding `LayerNorm_0`, `MultiHeadDotProductAttention_1`,
//! `LayerNorm_2`, `MlpBlock_3`) and big_vision's (`params/` prefix, top-level `pos_embedding`,
//! `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, and the
//! scan-stacked `encoderblock/…` with a leading layer axis). Flax's defaults hold for both:
//! GELU in its tanh form and LayerNorm eps 1e-6; inputs are scaled to [-1, 1].

use std::collections::BTreeMap;
use std::path::Path;

use super::zip::ZipArchive;
use super::{Checkpoint, Format, LoadReport};
use crate::config::{Gelu, Head, NormPlacement, Pool, ViTConfig};
use crate::error::{Error, Result};
use crate::preprocess::Preprocess;
use crate::tensor::Tensor;

/// Reads every `.npy` member of an `.npz` file under its name without the extension.
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let zip = ZipArchive::open(path)?;
    let mut out = BTreeMap::new();
    for e in zip.entries() {
        let Some(name) = e.name.strip_suffix(".npy") else {
            continue;
        };
        let bytes = zip.read(e)?;
        let member = path.join(&e.name);
        out.insert(name.to_string(), crate::npy::parse_npy(&member, &bytes)?);
    }
    Ok(out)
}

/// The names of one encoder block's sub-modules in a layout.
struct BlockNames {
    ln1: &'static str,
    attn: &'static str,
    ln2: &'static str,
    mlp: &'static str,
}

const ORIGINAL: BlockNames = BlockNames {
    ln1: "LayerNorm_0",
    attn: "MultiHeadDotProductAttention_1",
    ln2: "LayerNorm_2",
    mlp: "MlpBlock_3",
};
const BIG_VISION: BlockNames = BlockNames {
    ln1: "LayerNorm_0",
    attn: "MultiHeadDotProductAttention_0",
    ln2: "LayerNorm_1",
    mlp: "MlpBlock_0",
};

/// `(r, c)` → `(c, r)`.
fn transpose(t: &Tensor, r: usize, c: usize) -> Vec<f32> {
    let d = t.data();
    let mut out = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = d[i * c + j];
        }
    }
    out
}

pub(crate) fn load(path: &Path) -> Result<Checkpoint> {
    let bad = |r: String| Error::malformed(path, "Google .npz checkpoint", r);
    let raw = read_npz(path)?;
    let mut report = LoadReport::new(Format::GoogleNpz, path);
    // big_vision prefixes everything with `params/`.
    let big_vision_prefix = raw.keys().all(|k| k.starts_with("params/"));
    let raw: BTreeMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, v)| {
            let k = if big_vision_prefix {
                k["params/".len()..].to_string()
            } else {
                k
            };
            (k, v)
        })
        .collect();
    let get = |k: &str| -> Result<&Tensor> {
        raw.get(k)
            .ok_or_else(|| bad(format!("array `{k}` is missing; is this a ViT checkpoint?")))
    };
    // Which layout: block sub-module names, and whether blocks are scan-stacked.
    let scanned = raw.contains_key("Transformer/encoderblock/LayerNorm_0/scale");
    let block_prefix = |i: usize| {
        if scanned {
            "Transformer/encoderblock".to_string()
        } else {
            format!("Transformer/encoderblock_{i}")
        }
    };
    let (names, original) = if raw.contains_key(&format!(
        "{}/{}/query/kernel",
        block_prefix(0),
        ORIGINAL.attn
    )) {
        (&ORIGINAL, true)
    } else if raw.contains_key(&format!(
        "{}/{}/query/kernel",
        block_prefix(0),
        BIG_VISION.attn
    )) {
        (&BIG_VISION, false)
    } else {
        return Err(bad(
            "no encoder block found (expected Transformer/encoderblock_0/MultiHeadDotProductAttention_1 \
             or big_vision's MultiHeadDotProductAttention_0)"
                .into(),
        ));
    };
    let layout = match (original, scanned) {
        (true, _) => "vision_transformer",
        (false, false) => "big_vision",
        (false, true) => "big_vision, scan-stacked blocks",
    };
    report
        .conversions
        .push(format!("read {} arrays ({layout} layout)", raw.len()));

    // Architecture from the shapes.
    let emb = get("embedding/kernel")?;
    let [kh, kw, c, d] = emb.shape() else {
        return Err(bad(format!(
            "embedding/kernel has shape {:?}, expected (P, P, C, D)",
            emb.shape()
        )));
    };
    let (kh, kw, c, d) = (*kh, *kw, *c, *d);
    if kh != kw {
        return Err(bad(format!(
            "non-square patches ({kh}x{kw}) are not supported"
        )));
    }
    let depth = if scanned {
        get("Transformer/encoderblock/LayerNorm_0/scale")?.shape()[0]
    } else {
        (0..)
            .take_while(|i| {
                raw.contains_key(&format!("Transformer/encoderblock_{i}/LayerNorm_0/scale"))
            })
            .count()
    };
    let q0 = get(&format!("{}/{}/query/kernel", block_prefix(0), names.attn))?;
    let qs = q0.shape();
    let heads = if scanned { qs.get(2) } else { qs.get(1) }
        .copied()
        .ok_or_else(|| {
            bad(format!(
                "query kernel has shape {qs:?}, expected (D, heads, head_dim)"
            ))
        })?;
    let fc1 = get(&format!("{}/{}/Dense_0/kernel", block_prefix(0), names.mlp))?;
    let mlp_dim = *fc1.shape().last().unwrap_or(&0);
    // big_vision adds a class token only for pool_type 'tok'; without one it pools with the
    // mean of all tokens ('gap') or a MAPHead ('map').
    let class_token = raw.contains_key("cls");
    let map_head = raw.contains_key("MAPHead_0/probe");
    let pos_key = if raw.contains_key("Transformer/posembed_input/pos_embedding") {
        "Transformer/posembed_input/pos_embedding"
    } else {
        "pos_embedding"
    };
    let pos = get(pos_key)?;
    let tokens = pos.shape().get(1).copied().unwrap_or(0);
    let (gh, gw) = super::posembed::square_grid(tokens, class_token as usize).ok_or_else(|| {
        bad(format!(
            "position table of {tokens} rows is not {}a square grid",
            if class_token {
                "a class token plus "
            } else {
                ""
            }
        ))
    })?;
    let pre_logits = raw
        .get("pre_logits/kernel")
        .map(|t| *t.shape().last().unwrap_or(&0));
    let num_classes = raw
        .get("head/kernel")
        .map_or(0, |t| *t.shape().last().unwrap_or(&0));
    let qkv_bias = raw.contains_key(&format!("{}/{}/query/bias", block_prefix(0), names.attn));
    let mut cfg = ViTConfig::preset("Ti/16")?;
    (
        cfg.image_height,
        cfg.image_width,
        cfg.patch_size,
        cfg.channels,
    ) = (gh * kh, gw * kh, kh, c);
    (
        cfg.width,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.num_classes,
    ) = (d, depth, heads, mlp_dim, num_classes);
    cfg.class_token = class_token;
    cfg.pool = match (class_token, map_head) {
        (true, _) => Pool::Cls,
        (false, true) => Pool::Map,
        (false, false) => Pool::Mean,
    };
    cfg.fc_norm = false;
    cfg.norm = NormPlacement::Pre;
    cfg.head = match pre_logits {
        Some(hidden) => Head::PreLogits { hidden },
        None => Head::Linear,
    };
    cfg.gelu = Gelu::Tanh;
    cfg.qkv_bias = qkv_bias;
    cfg.layer_norm_eps = 1e-6;
    cfg.validate()?;
    report
        .conversions
        .push("GELU in its tanh form and LayerNorm eps 1e-6 (Flax defaults)".into());

    // Tensors under canonical names.
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    let put = |t: &mut BTreeMap<String, Tensor>,
               k: &str,
               shape: Vec<usize>,
               data: Vec<f32>|
     -> Result<()> {
        t.insert(k.to_string(), Tensor::new(shape, data)?);
        Ok(())
    };
    // HWIO (P, P, C, D) -> OIHW (D, C, P, P).
    let p = kh;
    let mut w = vec![0.0; d * c * p * p];
    for y in 0..p {
        for x in 0..p {
            for ci in 0..c {
                for o in 0..d {
                    w[((o * c + ci) * p + y) * p + x] = emb.data()[((y * p + x) * c + ci) * d + o];
                }
            }
        }
    }
    put(&mut t, "patch_embed.proj.weight", vec![d, c, p, p], w)?;
    put(
        &mut t,
        "patch_embed.proj.bias",
        vec![d],
        get("embedding/bias")?.data().to_vec(),
    )?;
    if class_token {
        put(
            &mut t,
            "cls_token",
            vec![1, 1, d],
            get("cls")?.data().to_vec(),
        )?;
    } else {
        report.conversions.push(format!(
            "no class token: {} of every token after encoder_norm",
            if map_head {
                "MAPHead attention pooling"
            } else {
                "mean ('gap')"
            }
        ));
    }
    put(&mut t, "pos_embed", vec![1, tokens, d], pos.data().to_vec())?;
    report.conversions.push(format!(
        "patch kernel HWIO -> OIHW, dense kernels transposed, per-head q/k/v fused into qkv ({})",
        if scanned {
            "blocks split from the scan axis"
        } else {
            "per block"
        }
    ));
    // One block's array: a slice of the stacked array when scanned.
    let block = |i: usize, rest: &str| -> Result<Tensor> {
        let a = get(&format!("{}/{rest}", block_prefix(i)))?;
        if !scanned {
            return Ok(a.clone());
        }
        let s = a.shape();
        if s.first() != Some(&depth) {
            return Err(bad(format!(
                "stacked array {rest} has shape {s:?}, expected a leading axis of {depth}"
            )));
        }
        let per = a.numel() / depth;
        Tensor::new(s[1..].to_vec(), a.data()[i * per..(i + 1) * per].to_vec())
    };
    for i in 0..depth {
        let pre = format!("blocks.{i}");
        for (flax, ours) in [(names.ln1, "norm1"), (names.ln2, "norm2")] {
            put(
                &mut t,
                &format!("{pre}.{ours}.weight"),
                vec![d],
                block(i, &format!("{flax}/scale"))?.into_data(),
            )?;
            put(
                &mut t,
                &format!("{pre}.{ours}.bias"),
                vec![d],
                block(i, &format!("{flax}/bias"))?.into_data(),
            )?;
        }
        // q/k/v kernels (D, nh, hd) are (in, out) matrices; qkv.weight rows are [q; k; v] outputs.
        let mut qkv_w = Vec::with_capacity(3 * d * d);
        let mut qkv_b = Vec::with_capacity(3 * d);
        for which in ["query", "key", "value"] {
            let k = block(i, &format!("{}/{which}/kernel", names.attn))?;
            if k.numel() != d * d {
                return Err(bad(format!(
                    "block {i} {which} kernel has shape {:?}",
                    k.shape()
                )));
            }
            qkv_w.extend(transpose(&k, d, d));
            if qkv_bias {
                qkv_b.extend(block(i, &format!("{}/{which}/bias", names.attn))?.into_data());
            }
        }
        put(
            &mut t,
            &format!("{pre}.attn.qkv.weight"),
            vec![3 * d, d],
            qkv_w,
        )?;
        if qkv_bias {
            put(&mut t, &format!("{pre}.attn.qkv.bias"), vec![3 * d], qkv_b)?;
        }
        // out kernel (nh, hd, D) is an (in = D, out = D) matrix.
        let o = block(i, &format!("{}/out/kernel", names.attn))?;
        put(
            &mut t,
            &format!("{pre}.attn.proj.weight"),
            vec![d, d],
            transpose(&o, d, d),
        )?;
        put(
            &mut t,
            &format!("{pre}.attn.proj.bias"),
            vec![d],
            block(i, &format!("{}/out/bias", names.attn))?.into_data(),
        )?;
        for (j, (rows, cols)) in [(0usize, (d, mlp_dim)), (1, (mlp_dim, d))] {
            let k = block(i, &format!("{}/Dense_{j}/kernel", names.mlp))?;
            if k.numel() != rows * cols {
                return Err(bad(format!(
                    "block {i} Dense_{j} kernel has shape {:?}",
                    k.shape()
                )));
            }
            put(
                &mut t,
                &format!("{pre}.mlp.fc{}.weight", j + 1),
                vec![cols, rows],
                transpose(&k, rows, cols),
            )?;
            put(
                &mut t,
                &format!("{pre}.mlp.fc{}.bias", j + 1),
                vec![cols],
                block(i, &format!("{}/Dense_{j}/bias", names.mlp))?.into_data(),
            )?;
        }
    }
    if map_head {
        map_head_tensors(&raw, &mut t, d, mlp_dim).map_err(|e| match e {
            Error::MissingTensor { name, .. } => bad(format!("MAPHead array `{name}` is missing")),
            e => e,
        })?;
    }
    put(
        &mut t,
        "norm.weight",
        vec![d],
        get("Transformer/encoder_norm/scale")?.data().to_vec(),
    )?;
    put(
        &mut t,
        "norm.bias",
        vec![d],
        get("Transformer/encoder_norm/bias")?.data().to_vec(),
    )?;
    let mut feat = d;
    if let Some(hidden) = pre_logits {
        let k = get("pre_logits/kernel")?;
        put(
            &mut t,
            "pre_logits.fc.weight",
            vec![hidden, d],
            transpose(k, d, hidden),
        )?;
        put(
            &mut t,
            "pre_logits.fc.bias",
            vec![hidden],
            get("pre_logits/bias")?.data().to_vec(),
        )?;
        report
            .conversions
            .push(format!("pre-logits layer kept ({hidden} units, tanh)"));
        feat = hidden;
    }
    if num_classes > 0 {
        let k = get("head/kernel")?;
        if k.numel() != feat * num_classes {
            return Err(bad(format!(
                "head/kernel has shape {:?}, expected ({feat}, {num_classes})",
                k.shape()
            )));
        }
        put(
            &mut t,
            "head.weight",
            vec![num_classes, feat],
            transpose(k, feat, num_classes),
        )?;
        put(
            &mut t,
            "head.bias",
            vec![num_classes],
            get("head/bias")?.data().to_vec(),
        )?;
    }
    let model = super::build(cfg.clone(), t, &mut report)?;
    let preprocess =
        Preprocess::resize_to_unit_range(cfg.image_height, cfg.image_width, cfg.channels);
    Ok(Checkpoint {
        model,
        preprocess,
        labels: None,
        report,
    })
}

/// big_vision's `MAPHead_0` (probe, `MultiHeadDotProductAttention_0`, `LayerNorm_0`,
/// `MlpBlock_0`) under timm's `attn_pool.*` names: the probe is the latent query; query
/// kernel `(D, nh, hd)` -> `q (D, D)`; key and value kernels stacked into `kv (2D, D)`; out
/// kernel `(nh, hd, D)` -> `proj`; dense kernels transposed.
fn map_head_tensors(
    raw: &BTreeMap<String, Tensor>,
    t: &mut BTreeMap<String, Tensor>,
    d: usize,
    mlp_dim: usize,
) -> Result<()> {
    let get = |k: &str| -> Result<&Tensor> {
        raw.get(&format!("MAPHead_0/{k}"))
            .ok_or_else(|| Error::MissingTensor {
                name: format!("MAPHead_0/{k}"),
                hint: None,
            })
    };
    let sized = |k: &str, n: usize| -> Result<Vec<f32>> {
        let a = get(k)?;
        if a.numel() != n {
            return Err(Error::ShapeMismatch {
                name: format!("MAPHead_0/{k}"),
                expected: vec![n],
                got: a.shape().to_vec(),
            });
        }
        Ok(a.data().to_vec())
    };
    let mut put = |k: &str, shape: Vec<usize>, data: Vec<f32>| -> Result<()> {
        t.insert(format!("attn_pool.{k}"), Tensor::new(shape, data)?);
        Ok(())
    };
    let attn = "MultiHeadDotProductAttention_0";
    put("latent", vec![1, 1, d], sized("probe", d)?)?;
    let kernel = |which: &str| -> Result<Vec<f32>> {
        let k = sized(&format!("{attn}/{which}/kernel"), d * d)?;
        Ok(transpose(&Tensor::new(vec![d, d], k)?, d, d))
    };
    put("q.weight", vec![d, d], kernel("query")?)?;
    put("q.bias", vec![d], sized(&format!("{attn}/query/bias"), d)?)?;
    let mut kv = kernel("key")?;
    kv.extend(kernel("value")?);
    put("kv.weight", vec![2 * d, d], kv)?;
    let mut kvb = sized(&format!("{attn}/key/bias"), d)?;
    kvb.extend(sized(&format!("{attn}/value/bias"), d)?);
    put("kv.bias", vec![2 * d], kvb)?;
    put("proj.weight", vec![d, d], kernel("out")?)?;
    put("proj.bias", vec![d], sized(&format!("{attn}/out/bias"), d)?)?;
    put("norm.weight", vec![d], sized("LayerNorm_0/scale", d)?)?;
    put("norm.bias", vec![d], sized("LayerNorm_0/bias", d)?)?;
    for (j, (rows, cols)) in [(0usize, (d, mlp_dim)), (1, (mlp_dim, d))] {
        let k = sized(&format!("MlpBlock_0/Dense_{j}/kernel"), rows * cols)?;
        let w = transpose(&Tensor::new(vec![rows, cols], k)?, rows, cols);
        put(&format!("mlp.fc{}.weight", j + 1), vec![cols, rows], w)?;
        let b = sized(&format!("MlpBlock_0/Dense_{j}/bias"), cols)?;
        put(&format!("mlp.fc{}.bias", j + 1), vec![cols], b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::zip::stored_zip;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/npz-bigvision-map/model.npz")
    }

    /// The fixture's members, with `edit` applied (None drops a member).
    fn rebuilt(edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
        let zip = ZipArchive::open(&fixture()).unwrap();
        let members: Vec<(String, Vec<u8>)> = zip
            .entries()
            .iter()
            .filter_map(|e| edit(&e.name, zip.read(e).unwrap()).map(|b| (e.name.clone(), b)))
            .collect();
        let refs: Vec<(&str, &[u8])> = members
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        stored_zip(&refs)
    }

    fn load_bytes(name: &str, bytes: Vec<u8>) -> Result<Checkpoint> {
        let p = std::env::temp_dir().join(format!("vitrs-npz-{}-{name}.npz", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let r = load(&p);
        std::fs::remove_file(&p).ok();
        r
    }

    #[test]
    fn the_rebuilt_fixture_loads_with_attention_pooling() {
        let ck = load_bytes("same", rebuilt(|_, b| Some(b))).unwrap();
        assert_eq!(ck.model.config().pool, Pool::Map);
        assert!(ck.report.missing.is_empty() && ck.report.unexpected.is_empty());
    }

    #[test]
    fn damaged_map_heads_are_named_errors() {
        let e = load_bytes(
            "missing",
            rebuilt(|n, b| (!n.contains("MAPHead_0/MlpBlock_0/Dense_1/kernel")).then_some(b)),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("MAPHead_0/MlpBlock_0/Dense_1/kernel") && e.contains("missing"),
            "{e}"
        );
        // A probe of the wrong width.
        let mut short = vec![];
        let t = Tensor::new(vec![1, 1, 3], vec![0.5; 3]).unwrap();
        let p = std::env::temp_dir().join(format!("vitrs-npz-probe-{}.npy", std::process::id()));
        crate::npy::write_npy(&p, &t).unwrap();
        short.extend(std::fs::read(&p).unwrap());
        std::fs::remove_file(&p).ok();
        let e = load_bytes(
            "probe",
            rebuilt(|n, b| {
                Some(if n.ends_with("MAPHead_0/probe.npy") {
                    short.clone()
                } else {
                    b
                })
            }),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("MAPHead_0/probe"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = std::fs::read(fixture()).unwrap();
        for cut in (0..bytes.len()).step_by(97) {
            assert!(
                load_bytes("cut", bytes[..cut].to_vec()).is_err(),
                "cut at {cut}"
            );
        }
    }
}
