//! Transfer, as in the paper: a pre-trained model's classifier (with its tanh pre-logits layer
//! when it has one) is replaced by a single zero-initialised linear layer for the new classes,
//! and its position embeddings are resampled in 2-D to the new patch grid (the class-token
//! row kept). Optionally the first blocks are frozen and deeper layers learn faster
//! (layer-wise learning-rate decay), both expressed as per-parameter learning-rate scales.

use crate::checkpoint::posembed::resample_pos_embed;
use crate::config::Head;
use crate::error::{Error, Result};
use crate::model::resnet::ResNet;
use crate::model::{Net, Params, ViT};
use crate::train::optim::OptimizerKind;
use crate::train::RunConfig;

/// The paper's fine-tuning recipe (§3.1 and App. B.1.1: SGD with momentum 0.9, no weight
/// decay, global-norm gradient clipping at 1, linear warm-up then cosine decay; here lr 0.01,
/// batch 64, 10 epochs). `vit finetune` starts from it unless given a `--config`; its flags
/// and the `[finetune]` section override it.
pub const RECIPE: &str = r#"
[data]
dataset = "-"

[train]
epochs = 10
batch_size = 64
lr = 0.01
min_lr = 0.0
warmup_steps = 50
schedule = "cosine"
optimizer = { kind = "sgd", momentum = 0.9, weight_decay = 0.0 }
grad_clip = 1.0
seed = 0
log_every = 20
checkpoint_every = 500
"#;

/// [`RECIPE`] as a run config, its dataset still to be set.
pub fn recipe() -> Result<RunConfig> {
    RunConfig::from_toml(RECIPE, "the default fine-tuning recipe")
}

/// The optimisers fine-tuning offers, each with the hyper-parameters it fine-tunes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinetuneOptimizer {
    /// SGD, momentum 0.9, no weight decay, lr 0.01: the paper's.
    Sgd,
    /// AdamW, PyTorch's β and ε, weight decay 0.05, lr 5e-4: DeiT's fine-tuning.
    AdamW,
}

impl FinetuneOptimizer {
    pub fn kind(self) -> OptimizerKind {
        match self {
            FinetuneOptimizer::Sgd => OptimizerKind::sgd(0.0),
            FinetuneOptimizer::AdamW => OptimizerKind::adamw(0.05),
        }
    }

    /// The peak learning rate this optimiser fine-tunes with unless told otherwise.
    pub fn lr(self) -> f32 {
        match self {
            FinetuneOptimizer::Sgd => 0.01,
            FinetuneOptimizer::AdamW => 5e-4,
        }
    }
}

/// A model ready for fine-tuning, and what was changed (one line each, for the user).
pub struct Adapted<M = ViT> {
    pub model: M,
    pub changes: Vec<String>,
}

impl<M: Into<Net>> Adapted<M> {
    fn into_net(self) -> Adapted<Net> {
        Adapted {
            model: self.model.into(),
            changes: self.changes,
        }
    }
}

/// A pre-trained model of either architecture for images `(C, H, W)`: with a new
/// zero-initialised head for `classes` classes, or with `keep` its own (the caller checks
/// that the classes agree).
pub fn adapt_net(
    source: &Net,
    shape: (usize, usize, usize),
    classes: usize,
    keep: bool,
) -> Result<Adapted<Net>> {
    let new_head = (!keep).then_some(classes);
    let mut a = match source {
        Net::ViT(m) => rebuild(m, shape, new_head)?.into_net(),
        Net::ResNet(m) => adapt_resnet(m, shape, new_head)?.into_net(),
    };
    if keep {
        a.changes.insert(0, "pre-trained head kept".into());
    }
    Ok(a)
}

/// [`at_resolution`] for a model of either architecture (a ResNet only changes geometry).
pub fn at_resolution_net(source: &Net, (h, w): (usize, usize)) -> Result<Adapted<Net>> {
    let (c, _, _) = source.input();
    Ok(match source {
        Net::ViT(m) => rebuild(m, (c, h, w), None)?.into_net(),
        Net::ResNet(m) => adapt_resnet(m, (c, h, w), None)?.into_net(),
    })
}

/// Adapts `source` to images `(C, H, W)` and `classes` classes (a new zero head).
pub fn adapt(source: &ViT, shape: (usize, usize, usize), classes: usize) -> Result<Adapted> {
    rebuild(source, shape, Some(classes))
}

/// `source` for images `(C, H, W)` with its head kept (same classes, e.g. a new resolution).
pub fn adapt_keep_head(source: &ViT, shape: (usize, usize, usize)) -> Result<Adapted> {
    let mut a = rebuild(source, shape, None)?;
    a.changes.insert(0, "pre-trained head kept".into());
    Ok(a)
}

/// A pre-trained ResNet for images `(C, H, W)`: the same weights and running statistics at
/// the new size (convolutions and global average pooling take any size), and with
/// `new_head` a new zero-initialised classifier for that many classes. The input channels
/// must match.
pub fn adapt_resnet(
    source: &ResNet,
    (c, h, w): (usize, usize, usize),
    new_head: Option<usize>,
) -> Result<Adapted<ResNet>> {
    let sc = source.config();
    if sc.channels != c {
        return Err(Error::BadInput(format!(
            "the pre-trained ResNet takes {}-channel images and the data has {c} channel(s); \
             fine-tune on data with {0} channel(s)",
            sc.channels
        )));
    }
    let mut changes = vec![];
    let mut m = if (sc.image_height, sc.image_width) != (h, w) {
        changes.push(format!(
            "input {}x{} -> {h}x{w} (same convolutions; global average pooling takes any size)",
            sc.image_height, sc.image_width
        ));
        source.with_input((h, w))?
    } else {
        source.clone()
    };
    if let Some(classes) = new_head {
        m.reset_head(classes)?;
        changes.push(format!(
            "new zero-initialised classifier `fc` for {classes} classes (was {})",
            sc.num_classes
        ));
    }
    Ok(Adapted { model: m, changes })
}

/// `source` at another resolution, head kept: only the position embeddings are resampled
/// (evaluating a model at the size it will be fine-tuned at, before fine-tuning).
pub fn at_resolution(source: &ViT, (h, w): (usize, usize)) -> Result<Adapted> {
    rebuild(source, (source.config().channels, h, w), None)
}

fn rebuild(
    source: &ViT,
    (c, h, w): (usize, usize, usize),
    new_head: Option<usize>,
) -> Result<Adapted> {
    let old = source.config();
    if c != old.channels {
        return Err(Error::BadInput(format!(
            "the data has {c} channel(s) but the pre-trained model takes {}; fine-tune on \
             data with the model's channel count",
            old.channels
        )));
    }
    if h % old.patch_size != 0 || w % old.patch_size != 0 {
        return Err(Error::BadInput(format!(
            "images of {h}x{w} do not divide into the model's {p}x{p} patches; resize to a \
             multiple of {p} (e.g. --image-size {})",
            h.div_ceil(old.patch_size) * old.patch_size,
            p = old.patch_size
        )));
    }
    let mut cfg = old.clone();
    cfg.image_height = h;
    cfg.image_width = w;
    let mut changes = vec![];
    if let Some(classes) = new_head {
        cfg.num_classes = classes;
        cfg.head = Head::Linear;
        if let Head::PreLogits { hidden } = old.head {
            changes.push(format!(
                "pre-training head dropped (tanh layer of {hidden} units)"
            ));
        }
        changes.push(format!(
            "new head: {} -> {classes} classes, zero-initialised",
            old.num_classes
        ));
    }
    let mut model = ViT::zeros(cfg.clone())?;
    let (og, ng) = (old.grid(), cfg.grid());
    let src = source.params();
    let names: Vec<String> = model
        .params()
        .entries()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    for name in names {
        if new_head.is_some() && (name.starts_with("head.") || name.starts_with("head_dist.")) {
            continue; // zero-initialised
        }
        let from = src.get(&name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            hint: Some("the pre-trained model lacks a tensor its own config implies".into()),
        })?;
        let value = if name == "pos_embed" && og != ng {
            changes.push(format!(
                "position embeddings resampled from a {}x{} to a {}x{} grid (bicubic, prefix-token rows kept)",
                og.0, og.1, ng.0, ng.1
            ));
            resample_pos_embed(from, cfg.width, cfg.pos_prefix_tokens(), og, ng)?
        } else {
            from.to_vec()
        };
        let Some(dst) = model.params_mut().get_mut(&name) else {
            continue; // unreachable: the name came from this model's own entries
        };
        if dst.len() != value.len() {
            return Err(Error::ShapeMismatch {
                name,
                expected: vec![dst.len()],
                got: vec![value.len()],
            });
        }
        dst.copy_from_slice(&value);
    }
    Ok(Adapted { model, changes })
}

/// Depth index of a parameter for layer-wise decay and freezing: 0 for the embeddings (class,
/// distillation and register tokens, position embedding, patch projection), `i + 1` for block `i`, `depth + 1` for the
/// rest (final norms, pre-logits, head).
pub fn layer_id(name: &str, depth: usize) -> usize {
    if matches!(name, "cls_token" | "dist_token" | "reg_token" | "pos_embed")
        || name.starts_with("patch_embed.")
    {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("blocks.") {
        if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
            return i + 1;
        }
    }
    depth + 1
}

/// Per-element learning-rate scales: `layer_decay^(depth + 1 − layer_id)`, and 0 for the
/// embeddings and the first `freeze_blocks` blocks when freezing. `None` when every scale
/// would be 1.
pub fn lr_scales(
    params: &Params,
    depth: usize,
    freeze_blocks: usize,
    layer_decay: f32,
) -> Option<Vec<f32>> {
    if freeze_blocks == 0 && layer_decay == 1.0 {
        return None;
    }
    let mut s = vec![1.0f32; params.count()];
    for e in params.entries() {
        let id = layer_id(&e.name, depth);
        let scale = if freeze_blocks > 0 && id <= freeze_blocks.min(depth) {
            0.0
        } else {
            layer_decay.powi((depth + 1 - id) as i32)
        };
        s[e.range.clone()].fill(scale);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ViTConfig;

    fn source() -> ViT {
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        (c.image_height, c.image_width, c.channels, c.patch_size) = (28, 28, 1, 4);
        (c.width, c.depth, c.heads, c.mlp_dim, c.num_classes) = (8, 2, 2, 16, 5);
        c.head = Head::PreLogits { hidden: 8 };
        ViT::random(c, 3).unwrap()
    }

    #[test]
    fn adapt_replaces_the_head_and_resamples_positions() {
        let src = source();
        let a = adapt(&src, (1, 40, 36), 3).unwrap();
        let cfg = a.model.config();
        assert_eq!(
            (cfg.grid(), cfg.num_classes, cfg.head),
            ((10, 9), 3, Head::Linear)
        );
        let p = a.model.params();
        assert!(p.get("head.weight").unwrap().iter().all(|&v| v == 0.0));
        assert!(p.get("head.bias").unwrap().iter().all(|&v| v == 0.0));
        assert!(p.get("pre_logits.fc.weight").is_none());
        // Blocks are copied exactly; the class-token row of the position table is kept.
        let k = "blocks.1.mlp.fc1.weight";
        assert_eq!(p.get(k), src.params().get(k));
        assert_eq!(
            p.get("pos_embed").unwrap()[..8],
            src.params().get("pos_embed").unwrap()[..8]
        );
        assert_eq!(p.get("pos_embed").unwrap().len(), (1 + 90) * 8);
        assert_eq!(a.changes.len(), 3, "{:?}", a.changes);
        // Same grid: the table is copied, not resampled.
        let same = adapt(&src, (1, 28, 28), 5).unwrap();
        assert_eq!(
            same.model.params().get("pos_embed"),
            src.params().get("pos_embed")
        );
        // Wrong channels or a size off the patch grid are clear errors.
        assert!(adapt(&src, (3, 28, 28), 5).is_err());
        let e = adapt(&src, (1, 30, 30), 5).err().unwrap().to_string();
        assert!(e.contains("--image-size 32"), "{e}");
    }

    #[test]
    fn adapt_a_deit_with_registers_keeps_every_prefix_row() {
        let mut c = ViTConfig::preset("deit_tiny_distilled_patch16_224").unwrap();
        (c.image_height, c.image_width, c.channels, c.patch_size) = (16, 16, 1, 4);
        (c.width, c.depth, c.heads, c.mlp_dim, c.num_classes) = (8, 2, 2, 16, 5);
        c.reg_tokens = 2;
        c.layer_scale = Some(0.1);
        let src = ViT::random(c, 4).unwrap();
        let a = adapt(&src, (1, 24, 24), 3).unwrap();
        let p = a.model.params();
        for k in ["head.weight", "head_dist.weight", "head_dist.bias"] {
            assert!(p.get(k).unwrap().iter().all(|&v| v == 0.0), "{k}");
        }
        // 4 prefix rows (class, distillation, 2 registers) kept, 4x4 -> 6x6 patches resampled.
        let pe = p.get("pos_embed").unwrap();
        assert_eq!(pe.len(), (4 + 36) * 8);
        assert_eq!(pe[..32], src.params().get("pos_embed").unwrap()[..32]);
        for k in ["dist_token", "reg_token", "blocks.1.ls2.gamma"] {
            assert_eq!(p.get(k), src.params().get(k), "{k}");
        }
        let s = lr_scales(p, 2, 1, 1.0).unwrap();
        for k in ["dist_token", "reg_token", "blocks.0.ls1.gamma"] {
            assert_eq!(s[p.entry(k).unwrap().range.start], 0.0, "{k} frozen");
        }
    }

    #[test]
    fn at_resolution_keeps_the_head() {
        let src = source();
        let a = at_resolution(&src, (36, 36)).unwrap();
        assert_eq!(a.model.config().grid(), (9, 9));
        assert_eq!(a.model.config().head, src.config().head);
        for k in [
            "head.weight",
            "pre_logits.fc.weight",
            "blocks.0.attn.qkv.weight",
        ] {
            assert_eq!(a.model.params().get(k), src.params().get(k), "{k}");
        }
        assert_eq!(a.changes.len(), 1, "{:?}", a.changes);
    }

    #[test]
    fn scales_freeze_and_decay_by_depth() {
        let src = source();
        let p = src.params();
        assert!(lr_scales(p, 2, 0, 1.0).is_none());
        let s = lr_scales(p, 2, 1, 0.5).unwrap();
        let at = |n: &str| s[p.entry(n).unwrap().range.start];
        assert_eq!(at("pos_embed"), 0.0);
        assert_eq!(at("blocks.0.attn.qkv.weight"), 0.0);
        assert_eq!(at("blocks.1.attn.qkv.weight"), 0.5);
        assert_eq!(at("head.weight"), 1.0);
        let s = lr_scales(p, 2, 0, 0.5).unwrap();
        let at = |n: &str| s[p.entry(n).unwrap().range.start];
        assert_eq!(at("patch_embed.proj.weight"), 0.125);
        assert_eq!(at("blocks.0.norm1.weight"), 0.25);
        assert_eq!(at("norm.weight"), 1.0);
    }
}
