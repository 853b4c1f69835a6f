//! Hugging Face transformers ViT checkpoints (`ViTForImageClassification`, bare `ViTModel`).
//!
//! Two key layouts exist and both are read: the one transformers 4.x wrote (what most hub
//! checkpoints hold: `encoder.layer.{i}.attention.attention.query`, ...) and the one
//! transformers 5.x writes (`layers.{i}.attention.q_proj`, ...). Separate q/k/v projections
//! are fused into timm's `attn.qkv` (rows q, then k, then v).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{read_json, read_weights, Checkpoint, Format, LoadReport};
use crate::config::{Gelu, Head, NormPlacement, Pool, ViTConfig};
use crate::error::{Error, Result};
use crate::preprocess::{Interpolation, Preprocess};
use crate::tensor::Tensor;

/// Where a Hugging Face key goes.
enum Target {
    /// A canonical timm name.
    Name(String),
    /// One third of a fused qkv tensor: (block, 0 = q / 1 = k / 2 = v, "weight" | "bias").
    Qkv(usize, usize, &'static str),
    /// Known but unused (e.g. the masked-image-modelling mask token).
    Ignore,
}

/// Maps one (prefix-stripped) Hugging Face key.
fn map_key(key: &str) -> Option<Target> {
    let (stem, kind) = key.rsplit_once('.')?;
    let kind: &'static str = match kind {
        "weight" => "weight",
        "bias" => "bias",
        _ => return simple(key),
    };
    // Block parameters: `layers.{i}.` (transformers 5) or `encoder.layer.{i}.` (transformers 4).
    let block = stem
        .strip_prefix("layers.")
        .or_else(|| stem.strip_prefix("encoder.layer."))
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(i, rest)| i.parse::<usize>().ok().map(|i| (i, rest)));
    if let Some((i, rest)) = block {
        let qkv = |w: usize| Some(Target::Qkv(i, w, kind));
        let name = |n: &str| Some(Target::Name(format!("blocks.{i}.{n}.{kind}")));
        return match rest {
            "attention.q_proj" | "attention.attention.query" => qkv(0),
            "attention.k_proj" | "attention.attention.key" => qkv(1),
            "attention.v_proj" | "attention.attention.value" => qkv(2),
            "attention.o_proj" | "attention.output.dense" => name("attn.proj"),
            "layernorm_before" => name("norm1"),
            "layernorm_after" => name("norm2"),
            "mlp.fc1" | "intermediate.dense" => name("mlp.fc1"),
            "mlp.fc2" | "output.dense" => name("mlp.fc2"),
            _ => None,
        };
    }
    let name = |n: &str| Some(Target::Name(format!("{n}.{kind}")));
    match stem {
        "embeddings.patch_embeddings.projection" => name("patch_embed.proj"),
        "layernorm" => name("norm"),
        "pooler.dense" => name("pre_logits.fc"),
        "classifier" => name("head"),
        _ => None,
    }
}

fn simple(key: &str) -> Option<Target> {
    match key {
        "embeddings.cls_token" => Some(Target::Name("cls_token".into())),
        "embeddings.position_embeddings" => Some(Target::Name("pos_embed".into())),
        "embeddings.mask_token" => Some(Target::Ignore),
        _ => None,
    }
}

/// Renames HF tensors to timm names and fuses q/k/v.
fn convert(
    raw: BTreeMap<String, Tensor>,
    report: &mut LoadReport,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut parts: BTreeMap<(usize, &'static str), [Option<Tensor>; 3]> = BTreeMap::new();
    let (mut legacy, mut renamed) = (false, 0usize);
    for (key, t) in raw {
        // ViTForImageClassification nests the encoder under `vit.`; ViTModel has no prefix.
        let k = key.strip_prefix("vit.").unwrap_or(&key);
        legacy |= k.starts_with("encoder.layer.");
        match map_key(k) {
            Some(Target::Name(n)) => {
                renamed += 1;
                out.insert(n, t);
            }
            Some(Target::Qkv(i, which, kind)) => {
                parts.entry((i, kind)).or_default()[which] = Some(t);
            }
            Some(Target::Ignore) => report
                .conversions
                .push(format!("ignored `{key}` (not used for classification)")),
            None => {
                out.insert(key.clone(), t);
            }
        }
    }
    let fused = parts.len();
    for ((i, kind), [q, k, v]) in parts {
        let name = format!("blocks.{i}.attn.qkv.{kind}");
        let (Some(q), Some(k), Some(v)) = (q, k, v) else {
            return Err(Error::MissingTensor {
                name: format!("layer {i} query/key/value {kind}"),
                hint: Some("all three of q, k and v are needed to build timm's fused qkv".into()),
            });
        };
        if q.shape().is_empty() || q.shape() != k.shape() || q.shape() != v.shape() {
            return Err(Error::ShapeMismatch {
                name: format!("layer {i} key/value {kind} (vs query)"),
                expected: q.shape().to_vec(),
                got: if q.shape() != k.shape() {
                    k.shape()
                } else {
                    v.shape()
                }
                .to_vec(),
            });
        }
        // Stack along the output axis: (D, ·) x3 -> (3D, ·).
        let mut shape = q.shape().to_vec();
        shape[0] *= 3;
        let data = [q.data(), k.data(), v.data()].concat();
        out.insert(name, Tensor::new(shape, data)?);
    }
    report.conversions.push(format!(
        "renamed {renamed} tensor(s) from the transformers {} layout to timm names; fused {fused} q/k/v triple(s) into attn.qkv",
        if legacy { "4.x" } else { "5.x" }
    ));
    Ok(out)
}

fn get_usize(v: &Value, key: &str, default: Option<usize>, path: &Path) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| {
            Error::malformed(
                path,
                "Hugging Face config.json",
                format!("`{key}` must be a non-negative integer, got {x}"),
            )
        }),
        None => default.ok_or_else(|| {
            Error::malformed(path, "Hugging Face config.json", format!("missing `{key}`"))
        }),
    }
}

/// An int or `[h, w]`.
fn get_hw(v: &Value, key: &str, default: usize, path: &Path) -> Result<(usize, usize)> {
    match v.get(key) {
        Some(Value::Array(a)) if a.len() == 2 => {
            let h = a[0].as_u64();
            let w = a[1].as_u64();
            match (h, w) {
                (Some(h), Some(w)) => Ok((h as usize, w as usize)),
                _ => Err(Error::malformed(
                    path,
                    "Hugging Face config.json",
                    format!("`{key}` must hold integers"),
                )),
            }
        }
        Some(_) => get_usize(v, key, None, path).map(|s| (s, s)),
        None => Ok((default, default)),
    }
}

/// Builds the [`ViTConfig`] from `config.json` and the tensors present.
fn config_from(
    v: &Value,
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(ViTConfig, Vec<String>)> {
    let mut notes = vec![];
    let bad = |r: String| Error::malformed(path, "Hugging Face config.json", r);
    let (ih, iw) = get_hw(v, "image_size", 224, path)?;
    let (ph, pw) = get_hw(v, "patch_size", 16, path)?;
    if ph != pw {
        return Err(bad(format!(
            "non-square patches {ph}x{pw} are not supported"
        )));
    }
    let width = get_usize(v, "hidden_size", Some(768), path)?;
    let act = v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    let gelu = match act {
        "gelu" => Gelu::Exact,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gelu::Tanh,
        other => {
            return Err(bad(format!(
                "hidden_act `{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh)"
            )))
        }
    };
    if let Some(a) = v.get("pooler_act").and_then(Value::as_str) {
        if a != "tanh" {
            return Err(bad(format!("pooler_act `{a}` is not supported (tanh)")));
        }
    }
    let has = |n: &str| tensors.contains_key(n);
    let num_classes = tensors
        .get("head.weight")
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(0);
    // ViTForImageClassification ignores the pooler; a bare ViTModel's output is the pooler's.
    let head = if num_classes == 0 && has("pre_logits.fc.weight") {
        notes.push(
            "bare ViTModel: the output is pooler_output (dense + tanh on the class token)".into(),
        );
        Head::PreLogits {
            hidden: get_usize(v, "pooler_output_size", Some(width), path)?,
        }
    } else {
        Head::Linear
    };
    let cfg = ViTConfig {
        image_height: ih,
        image_width: iw,
        patch_size: ph,
        channels: get_usize(v, "num_channels", Some(3), path)?,
        width,
        depth: get_usize(v, "num_hidden_layers", Some(12), path)?,
        heads: get_usize(v, "num_attention_heads", Some(12), path)?,
        mlp_dim: get_usize(v, "intermediate_size", Some(3072), path)?,
        num_classes,
        pool: Pool::Cls,
        head,
        norm: NormPlacement::Pre,
        gelu,
        fc_norm: false,
        qkv_bias: v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
        // transformers' ViTConfig default.
        layer_norm_eps: v
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12) as f32,
        class_token: true,
        distilled: false,
        reg_tokens: 0,
        no_embed_class: false,
        layer_scale: None,
    };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok((cfg, notes))
}

/// `id2label` as a vector, unless it is transformers' `LABEL_i` placeholder.
fn labels_from(v: &Value, k: usize) -> Option<Vec<String>> {
    let map = v.get("id2label")?.as_object()?;
    let mut labels = vec![String::new(); k];
    for (i, name) in map {
        let i: usize = i.parse().ok()?;
        *labels.get_mut(i)? = name.as_str()?.to_string();
    }
    let placeholder = labels
        .iter()
        .enumerate()
        .all(|(i, l)| *l == format!("LABEL_{i}"));
    (k > 0 && !placeholder && labels.iter().all(|l| !l.is_empty())).then_some(labels)
}

/// `ViTImageProcessor` settings from `preprocessor_config.json`, or its defaults.
fn preprocess_from(dir: &Path, cfg: &ViTConfig, notes: &mut Vec<String>) -> Result<Preprocess> {
    let path = dir.join("preprocessor_config.json");
    // ViTImageProcessor defaults: resize to the model size, bilinear, 1/255, mean = std = 0.5.
    let mut p = Preprocess::resize_to_unit_range(cfg.image_height, cfg.image_width, cfg.channels);
    if !path.is_file() {
        notes.push("no preprocessor_config.json: using ViTImageProcessor defaults (bilinear, mean = std = 0.5)".into());
        return Ok(p);
    }
    let v = read_json(&path)?;
    let bad = |r: String| Error::malformed(&path, "preprocessor_config.json", r);
    if let Some(size) = v.get("size") {
        let h = size.get("height").and_then(Value::as_u64);
        let w = size.get("width").and_then(Value::as_u64);
        if let (Some(h), Some(w)) = (h, w) {
            if (h as usize, w as usize) != (cfg.image_height, cfg.image_width) {
                notes.push(format!(
                    "preprocessor size {h}x{w} differs from the model's {}x{}; resizing to the model's",
                    cfg.image_height, cfg.image_width
                ));
            }
        }
    }
    if v.get("do_resize").and_then(Value::as_bool) == Some(false) {
        notes.push(
            "do_resize is false: images must already be at the model size; resizing anyway".into(),
        );
    }
    if let Some(r) = v.get("resample") {
        p.interpolation = Interpolation::parse(&r.to_string()).ok_or_else(|| {
            bad(format!(
                "resample {r} is not supported (0 nearest, 2 bilinear, 3 bicubic)"
            ))
        })?;
    }
    if v.get("do_rescale").and_then(Value::as_bool) != Some(false) {
        if let Some(f) = v.get("rescale_factor").and_then(Value::as_f64) {
            p.rescale = f as f32;
        }
    } else {
        p.rescale = 1.0;
    }
    let floats = |key: &str| -> Result<Option<Vec<f32>>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| bad(format!("`{key}` must hold numbers")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(x) => x
                .as_f64()
                .map(|x| Some(vec![x as f32; cfg.channels]))
                .ok_or_else(|| bad(format!("bad `{key}`"))),
        }
    };
    if v.get("do_normalize").and_then(Value::as_bool) == Some(false) {
        p.mean = vec![0.0; cfg.channels];
        p.std = vec![1.0; cfg.channels];
    } else {
        if let Some(m) = floats("image_mean")? {
            p.mean = m;
        }
        if let Some(s) = floats("image_std")? {
            p.std = s;
        }
    }
    p.validate().map_err(|e| bad(e.to_string()))?;
    Ok(p)
}

/// Loads a Hugging Face ViT from its weights, directory and parsed `config.json`.
pub(crate) fn load(weights: &Path, dir: &Path, config: Value) -> Result<Checkpoint> {
    let mut report = LoadReport::new(Format::HuggingFace, weights);
    let raw = read_weights(weights, &mut report)?;
    let tensors = convert(raw, &mut report)?;
    let cfg_path = dir.join("config.json");
    let (cfg, notes) = config_from(&config, &tensors, &cfg_path)?;
    report.conversions.extend(notes);
    // ViTForImageClassification does not use the pooler even when the file has one.
    let mut tensors = tensors;
    if cfg.num_classes > 0 {
        for k in ["pre_logits.fc.weight", "pre_logits.fc.bias"] {
            if tensors.remove(k).is_some() {
                report.unexpected.push(format!(
                    "{k} (HF pooler, unused by ViTForImageClassification)"
                ));
            }
        }
    }
    let labels = labels_from(&config, cfg.num_classes);
    let preprocess = preprocess_from(dir, &cfg, &mut report.conversions)?;
    let model = super::build(cfg, tensors, &mut report)?;
    Ok(Checkpoint {
        model,
        preprocess,
        labels,
        report,
    })
}
