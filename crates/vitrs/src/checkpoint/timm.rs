//! timm checkpoints in the hub layout: `config.json` with `architecture` (e.g.
//! `vit_base_patch16_224.augreg_in21k`), `num_classes`, `global_pool`, `pretrained_cfg`
//! (input size, interpolation, crop_pct, mean, std) and optional `model_args` overriding the
//! architecture's defaults; `model.safetensors` already uses the canonical names.

use serde_json::{Map, Value};

use std::path::Path;

use super::{read_weights, Checkpoint, Format, LoadReport};
use crate::config::{Gelu, Pool, ViTConfig};
use crate::error::{Error, Result};
use crate::preprocess::{Interpolation, Preprocess, Resize};

/// `model_args` keys that change nothing at inference (dropout rates, init schemes).
const INFERENCE_NEUTRAL: &[&str] = &[
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
    "dynamic_img_pad",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
];

/// Builds the config from the architecture name and overrides.
fn config_from(v: &Value, path: &std::path::Path) -> Result<ViTConfig> {
    let bad = |r: String| Error::malformed(path, "timm config.json", r);
    let arch = v
        .get("architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`architecture` must be a string".into()))?;
    let mut cfg = ViTConfig::preset(arch).map_err(|e| {
        bad(format!(
            "architecture `{arch}` is not one vitrs builds ({e}); supported: vit_SIZE_patchP_RES, with _regN, _gap or _siglip, deit_SIZE[_distilled]_patchP_RES and deit3_SIZE_patchP_RES (SIZE tiny/small/base/large/huge, P 8/14/16/32)"
        ))
    })?;
    let empty = Map::new();
    let args = v
        .get("model_args")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let uint = |k: &str, x: &Value| {
        x.as_u64().map(|x| x as usize).ok_or_else(|| {
            bad(format!(
                "model_args.{k} must be a non-negative integer, got {x}"
            ))
        })
    };
    let mut mlp_ratio = None;
    let mut global_pool = v
        .get("global_pool")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut fc_norm: Option<bool> = None;
    let boolean = |k: &str, x: &Value| {
        x.as_bool()
            .ok_or_else(|| bad(format!("model_args.{k} must be true or false, got {x}")))
    };
    for (k, x) in args {
        match k.as_str() {
            "img_size" => {
                let (h, w) = match x {
                    Value::Array(a) if a.len() == 2 => (uint(k, &a[0])?, uint(k, &a[1])?),
                    _ => {
                        let s = uint(k, x)?;
                        (s, s)
                    }
                };
                cfg.image_height = h;
                cfg.image_width = w;
            }
            "patch_size" => cfg.patch_size = uint(k, x)?,
            "in_chans" => cfg.channels = uint(k, x)?,
            "embed_dim" => cfg.width = uint(k, x)?,
            "depth" => cfg.depth = uint(k, x)?,
            "num_heads" => cfg.heads = uint(k, x)?,
            "num_classes" => cfg.num_classes = uint(k, x)?,
            "mlp_ratio" => {
                mlp_ratio = Some(
                    x.as_f64()
                        .ok_or_else(|| bad("model_args.mlp_ratio must be a number".into()))?,
                )
            }
            "qkv_bias" => {
                cfg.qkv_bias = x
                    .as_bool()
                    .ok_or_else(|| bad("model_args.qkv_bias must be a bool".into()))?
            }
            "global_pool" => global_pool = x.as_str().map(str::to_string),
            "fc_norm" => fc_norm = x.as_bool(),
            "act_layer" => {
                cfg.gelu = match x.as_str() {
                    Some("gelu") => Gelu::Exact,
                    Some("gelu_tanh") => Gelu::Tanh,
                    _ => {
                        return Err(bad(format!(
                            "model_args.act_layer {x} is not supported (gelu, gelu_tanh)"
                        )))
                    }
                }
            }
            "class_token" => cfg.class_token = boolean(k, x)?,
            "no_embed_class" => cfg.no_embed_class = boolean(k, x)?,
            "reg_tokens" => cfg.reg_tokens = uint(k, x)?,
            "init_values" => {
                cfg.layer_scale = match x {
                    Value::Null => None,
                    _ => Some(x.as_f64().ok_or_else(|| {
                        bad(format!(
                            "model_args.init_values must be a number or null, got {x}"
                        ))
                    })? as f32),
                }
            }
            // Defaults that we implement; anything else is a feature we do not have.
            "pre_norm" | "qk_norm" if x.as_bool() == Some(false) => {}
            k if INFERENCE_NEUTRAL.contains(&k) => {}
            _ => {
                return Err(bad(format!(
                "model_args.{k} = {x} is not supported by vitrs yet (the norm before the blocks, \
                     q/k normalisation and other pooling or block kinds are not implemented)"
            )))
            }
        }
    }
    if let Some(r) = mlp_ratio {
        cfg.mlp_dim = (cfg.width as f64 * r) as usize;
    } else if args.contains_key("embed_dim") {
        // timm's default mlp_ratio is 4.
        cfg.mlp_dim = cfg.width.saturating_mul(4);
    }
    if !args.contains_key("num_classes") {
        if let Some(k) = v.get("num_classes") {
            cfg.num_classes = uint("num_classes", k)?;
        }
    }
    // The architecture name sets a pool (e.g. `_gap` -> avg, `_siglip` -> map) unless the
    // config names one.
    match global_pool.as_deref() {
        None => {}
        Some("token") => cfg.pool = Pool::Cls,
        Some("avg") => cfg.pool = Pool::Mean,
        Some("map") => cfg.pool = Pool::Map,
        Some(p) => {
            return Err(bad(format!(
                "global_pool `{p}` is not supported (token, avg, map)"
            )))
        }
    }
    // timm: `use_fc_norm = global_pool in ('avg', ...) if fc_norm is None`.
    cfg.fc_norm = fc_norm.unwrap_or(cfg.pool == Pool::Mean);
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

fn preprocess_from(
    v: &Value,
    cfg: &ViTConfig,
    path: &std::path::Path,
    notes: &mut Vec<String>,
) -> Result<Preprocess> {
    let mut p = Preprocess::timm_default(cfg.image_height, cfg.image_width, cfg.channels);
    let Some(pc) = v.get("pretrained_cfg").and_then(Value::as_object) else {
        notes.push(
            "no pretrained_cfg: using timm's defaults (bicubic, crop_pct 0.9, ImageNet mean/std)"
                .into(),
        );
        return Ok(p);
    };
    let bad =
        |r: String| Error::malformed(path, "timm config.json", format!("pretrained_cfg: {r}"));
    if let Some(s) = pc.get("input_size").and_then(Value::as_array) {
        let dims: Vec<u64> = s.iter().filter_map(Value::as_u64).collect();
        if dims.len() == 3
            && (dims[1] as usize, dims[2] as usize) != (cfg.image_height, cfg.image_width)
        {
            notes.push(format!(
                "pretrained_cfg input_size {}x{} differs from the model's {}x{}; preprocessing to the model's",
                dims[1], dims[2], cfg.image_height, cfg.image_width
            ));
        }
    }
    if let Some(i) = pc.get("interpolation").and_then(Value::as_str) {
        p.interpolation = Interpolation::parse(i)
            .ok_or_else(|| bad(format!("interpolation `{i}` is not supported")))?;
    }
    if let Some(c) = pc.get("crop_pct").and_then(Value::as_f64) {
        p.resize = Resize::ShorterThenCrop { crop_pct: c as f32 };
    }
    if let Some(m) = pc.get("crop_mode").and_then(Value::as_str) {
        if m != "center" {
            return Err(bad(format!("crop_mode `{m}` is not supported (center)")));
        }
    }
    let floats = |k: &str| -> Result<Option<Vec<f32>>> {
        match pc.get(k) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| bad(format!("`{k}` must hold numbers")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            _ => Ok(None),
        }
    };
    if let Some(m) = floats("mean")? {
        p.mean = m;
    }
    if let Some(s) = floats("std")? {
        p.std = s;
    }
    p.validate().map_err(|e| bad(e.to_string()))?;
    Ok(p)
}

/// Class names: `label_names` at the top level or in `pretrained_cfg`.
fn labels_from(v: &Value, k: usize) -> Option<Vec<String>> {
    let l = v
        .get("label_names")
        .or_else(|| v.get("pretrained_cfg").and_then(|p| p.get("label_names")))?
        .as_array()?;
    let names: Vec<String> = l
        .iter()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    (names.len() == k && k > 0).then_some(names)
}

/// Loads a timm ViT from its weights and parsed `config.json`.
pub(crate) fn load(weights: &Path, config: Value) -> Result<Checkpoint> {
    let cfg_path = weights.with_file_name("config.json");
    let mut report = LoadReport::new(Format::Timm, weights);
    let cfg = config_from(&config, &cfg_path)?;
    let mut tensors = read_weights(weights, &mut report)?;
    // Checkpoints saved from a DataParallel/DDP wrapper prefix every key with `module.`.
    if tensors.keys().all(|k| k.starts_with("module.")) {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| (k["module.".len()..].to_string(), t))
            .collect();
        report
            .conversions
            .push("stripped the `module.` prefix (DataParallel)".into());
    }
    let preprocess = preprocess_from(&config, &cfg, &cfg_path, &mut report.conversions)?;
    let labels = labels_from(&config, cfg.num_classes);
    let model = super::build(cfg, tensors, &mut report)?;
    Ok(Checkpoint {
        model,
        preprocess,
        labels,
        report,
    })
}
