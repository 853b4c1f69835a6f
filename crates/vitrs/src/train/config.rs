//! The run configuration: one TOML file (`configs/*.toml`) with `[model]`, `[data]`,
//! `[augment]` and `[train]` tables; every field has a default or is required with a reason.

use serde::{Deserialize, Serialize};

use super::optim::OptimizerKind;
use super::schedule::Decay;
use crate::config::{Gelu, Head, NormPlacement, Pool, Sizes, ViTConfig};
use crate::data::augment::Augment;
use crate::error::{Error, Result};
use crate::model::resnet::ResNetConfig;
use crate::model::NetConfig;

/// The model of a run: a preset, explicit dimensions, or a preset with overrides. Image size,
/// channels and classes default to the dataset's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// `"vit"` (the default) or `"resnet"`: the CIFAR ResNet baseline, sized by `depth`
    /// (6n + 2 layers, 20 by default) and `width` (channels of its first stage, 16).
    pub arch: Option<Arch>,
    pub preset: Option<String>,
    pub image_size: Option<usize>,
    /// Input channels and classes; normally taken from the dataset (set them for `vit bench`).
    pub channels: Option<usize>,
    pub num_classes: Option<usize>,
    pub patch_size: Option<usize>,
    pub width: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    pub mlp_dim: Option<usize>,
    pub pool: Option<Pool>,
    /// Width of the pre-training head's tanh layer (`Head::PreLogits`); absent: linear head.
    pub pre_logits: Option<usize>,
    pub norm: Option<NormPlacement>,
    pub gelu: Option<Gelu>,
    pub qkv_bias: Option<bool>,
    pub layer_norm_eps: Option<f32>,
    /// `false` for a model without a \[class\] token (pool `mean` or `map`).
    pub class_token: Option<bool>,
    /// Register tokens (Darcet et al. 2024).
    pub reg_tokens: Option<usize>,
    /// Position embeddings on the patches only.
    pub no_embed_class: Option<bool>,
    /// LayerScale with this initial gain.
    pub layer_scale: Option<f32>,
}

/// The architecture of `[model]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[default]
    Vit,
    Resnet,
}

impl ModelSpec {
    /// The model for images `(C, H, W)` and `classes` classes, of either architecture.
    pub fn resolve_net(&self, shape: (usize, usize, usize), classes: usize) -> Result<NetConfig> {
        match self.arch.unwrap_or_default() {
            Arch::Vit => self.resolve(shape, classes).map(NetConfig::ViT),
            Arch::Resnet => self.resolve_resnet(shape, classes).map(NetConfig::ResNet),
        }
    }

    /// The ResNet of `depth` and `width` (ResNet-20, width 16 by default); the ViT's fields
    /// are refused by name rather than ignored.
    fn resolve_resnet(
        &self,
        (c, h, w): (usize, usize, usize),
        classes: usize,
    ) -> Result<ResNetConfig> {
        let vit_only = [
            ("preset", self.preset.is_some()),
            ("patch_size", self.patch_size.is_some()),
            ("heads", self.heads.is_some()),
            ("mlp_dim", self.mlp_dim.is_some()),
            ("pool", self.pool.is_some()),
            ("pre_logits", self.pre_logits.is_some()),
            ("norm", self.norm.is_some()),
            ("gelu", self.gelu.is_some()),
            ("qkv_bias", self.qkv_bias.is_some()),
            ("layer_norm_eps", self.layer_norm_eps.is_some()),
            ("class_token", self.class_token.is_some()),
            ("reg_tokens", self.reg_tokens.is_some()),
            ("no_embed_class", self.no_embed_class.is_some()),
            ("layer_scale", self.layer_scale.is_some()),
        ];
        if let Some((field, _)) = vit_only.iter().find(|(_, set)| *set) {
            return Err(Error::InvalidConfig(format!(
                "[model] `{field}` is a ViT setting; a ResNet (arch = \"resnet\") takes only \
                 depth, width, image_size, channels and num_classes"
            )));
        }
        let size = self.image_size.map_or((h, w), |s| (s, s));
        let cfg = ResNetConfig::cifar(
            self.depth.unwrap_or(20),
            self.width.unwrap_or(16),
            self.channels.unwrap_or(c),
            size,
            self.num_classes.unwrap_or(classes),
        );
        cfg.validate()?;
        Ok(cfg)
    }

    /// The full ViT config for images `(C, H, W)` and `classes` classes (refused for
    /// `arch = "resnet"`: see [`ModelSpec::resolve_net`]).
    pub fn resolve(&self, (c, h, w): (usize, usize, usize), classes: usize) -> Result<ViTConfig> {
        if self.arch == Some(Arch::Resnet) {
            return Err(Error::InvalidConfig(
                "[model] arch = \"resnet\" describes a ResNet; this needs a ViT".into(),
            ));
        }
        let mut cfg = match &self.preset {
            Some(p) => ViTConfig::preset(p)?,
            None => ViTConfig::paper(Sizes {
                image: (h, w),
                channels: self.channels.unwrap_or(c),
                patch: self.patch_size.ok_or_else(|| need("patch_size"))?,
                width: self.width.ok_or_else(|| need("width"))?,
                depth: self.depth.ok_or_else(|| need("depth"))?,
                heads: self.heads.ok_or_else(|| need("heads"))?,
                // Set from the width below unless given.
                mlp: 0,
                classes,
            }),
        };
        cfg.channels = self.channels.unwrap_or(c);
        cfg.num_classes = self.num_classes.unwrap_or(classes);
        (cfg.image_height, cfg.image_width) = match self.image_size {
            Some(s) => (s, s),
            None => (h, w),
        };
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { cfg.$f = v; })* };
        }
        set!(
            patch_size,
            width,
            depth,
            heads,
            mlp_dim,
            pool,
            norm,
            gelu,
            qkv_bias,
            layer_norm_eps,
            class_token,
            reg_tokens,
            no_embed_class
        );
        if let Some(g) = self.layer_scale {
            cfg.layer_scale = Some(g);
        }
        if cfg.mlp_dim == 0 {
            // The paper's MLP ratio of 4.
            cfg.mlp_dim = 4 * cfg.width;
        }
        cfg.fc_norm = cfg.pool == Pool::Mean && cfg.norm == NormPlacement::Pre;
        if let Some(hid) = self.pre_logits {
            cfg.head = Head::PreLogits { hidden: hid };
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn need(field: &str) -> Error {
    Error::InvalidConfig(format!("[model] needs `{field}` (or a `preset`)"))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `fashion-mnist`, `mnist`, `cifar10`, `cifar100`, a directory (IDX, CIFAR, an image
    /// folder, or shards written by `vit data pack`), or shard files (`data/train-*.tar`,
    /// comma-separated for several).
    pub dataset: String,
    /// Hold out this fraction of the training set (stratified: the same share of every
    /// class, at least one image of each) for evaluation instead of the test split. Unset: 0
    /// for datasets with a test split, 0.1 for a flat image folder (one sub-folder per class
    /// and no `train/`, `val/` or `test/`); 0 for such a folder evaluates on its training
    /// images, and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f32>,
    /// Normalisation; default: 0.5 / 0.5 per channel.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// Loader threads building batches.
    #[serde(default = "one")]
    pub workers: usize,
    /// Use only these classes of the dataset, renumbered 0.. in this order (e.g.
    /// `[5, 6, 7, 8, 9]`), in training and evaluation alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<usize>>,
    /// Keep only this many training images per class (a seeded choice); evaluation is untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<usize>,
    /// Resize every image to `[height, width]` (bilinear) before augmentation: fine-tuning at
    /// a higher resolution than the data comes in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<[usize; 2]>,
    /// Image folders and shards: fail on a file or sample that is not a readable image
    /// instead of skipping it (skipped ones are counted and reported).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
    /// Sharded datasets (`vit data pack`): the shuffle buffer, in images (default 10 000).
    /// The shards are read in a seeded order, one after the other, through this buffer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle_buffer: Option<usize>,
}

fn one() -> usize {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub epochs: u64,
    /// Wall-clock budget in minutes: before the run, `epochs` is replaced by as many as fit at
    /// this machine's measured speed (see `Trainer::fit_to_budget`); absent: `epochs` it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_budget_min: Option<f64>,
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the effective batch is their product).
    #[serde(default = "one")]
    pub accum_steps: usize,
    pub lr: f32,
    #[serde(default)]
    pub min_lr: f32,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "cosine")]
    pub schedule: Decay,
    /// Default: AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default)]
    pub label_smoothing: f32,
    /// Global-norm gradient clipping (0: off).
    #[serde(default)]
    pub grad_clip: f32,
    /// Dropout on the attention and MLP branch outputs (0: off).
    #[serde(default)]
    pub dropout: f32,
    /// Stochastic depth: branch drop rate at the last block, rising linearly from 0 (0: off).
    #[serde(default)]
    pub drop_path: f32,
    #[serde(default)]
    pub seed: u64,
    /// Optimizer steps between progress/metrics lines.
    #[serde(default = "fifty")]
    pub log_every: u64,
    /// Optimizer steps between checkpoints (0: only at epoch ends and the end).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Keep an exponential moving average of the weights with this decay per optimizer step
    /// (e.g. 0.9998; warmed up as `min(decay, (1 + t)/(10 + t))`); the evaluations and the final
    /// `model.safetensors` then use the average (the checkpoint holds both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f32>,
    /// Data parallel over several ranks: the gradients are summed in buckets of at least this
    /// many MB, each started as soon as the backward has finished it (default 0.125).
    #[serde(default = "bucket_mb")]
    pub bucket_mb: f32,
}

fn bucket_mb() -> f32 {
    (crate::train::dist::BUCKET_BYTES as f64 / 1048576.0) as f32
}

fn cosine() -> Decay {
    Decay::Cosine
}
fn fifty() -> u64 {
    50
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub augment: Augment,
    pub train: TrainSpec,
    /// Start from a trained checkpoint instead of random weights (`vit finetune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneSpec>,
}

/// Transfer from a pre-trained model: its head is replaced by a zero-initialised linear layer
/// for the new classes and its position embeddings are resampled to the new patch grid; the
/// `[model]` section is then ignored (the architecture is the checkpoint's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// Any checkpoint `vit` reads (native, Hugging Face, timm).
    pub from: String,
    /// Freeze the embeddings and the first k blocks (0: train everything).
    #[serde(default)]
    pub freeze_blocks: usize,
    /// Layer-wise learning-rate decay: block i of L trains at `lr · decay^(L − i)` (blocks
    /// counted from 1, embeddings at `decay^(L+1)`, head and final norm at `lr`); 1: off.
    #[serde(default = "one_f32")]
    pub layer_decay: f32,
    /// Keep the pre-trained head (and pre-logits layer) instead of a new zero one; the data
    /// must have the model's number of classes (fine-tuning at a new resolution).
    #[serde(default)]
    pub keep_head: bool,
}

fn one_f32() -> f32 {
    1.0
}

impl RunConfig {
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        let cfg: RunConfig = toml::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("{source}: {}", e.to_string().trim())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The run config as TOML (`RUN_DIR/config.toml`, and inside training checkpoints).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::serialize("the run config", e))
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let bad = |m: &str| Err(Error::InvalidConfig(m.to_string()));
        if let Some(f) = &self.finetune {
            if !(f.layer_decay > 0.0 && f.layer_decay <= 1.0) {
                return bad("[finetune] layer_decay must be in (0, 1]");
            }
        }
        if let Some(cs) = &self.data.classes {
            crate::data::check_classes(cs, "[data] classes (or --classes)")?;
        }
        if self.data.per_class == Some(0) {
            return bad("[data] per_class must be at least 1");
        }
        if let Some([h, w]) = self.data.resize {
            if h == 0 || w == 0 || h > 4096 || w > 4096 {
                return bad("[data] resize sides must be between 1 and 4096");
            }
        }
        if t.batch_size == 0 || t.accum_steps == 0 || t.epochs == 0 {
            return bad("[train] batch_size, accum_steps and epochs must be at least 1");
        }
        if let Some(m) = t.time_budget_min {
            if !(m > 0.0 && m <= 525_600.0) {
                return bad(&format!(
                    "[train] time_budget_min is {m}: give minutes between 0 and 525600 (a year)"
                ));
            }
        }
        if let Some(d) = t.ema_decay {
            if !(d > 0.0 && d < 1.0) {
                return bad(&format!(
                    "[train] ema_decay is {d}: it must be between 0 and 1 (e.g. 0.9998)"
                ));
            }
        }
        if !(t.bucket_mb > 0.0 && t.bucket_mb <= 4096.0) {
            return bad(&format!(
                "[train] bucket_mb is {}: give the all-reduce bucket size in MB, above 0 and \
                 at most 4096 (default 0.125)",
                t.bucket_mb
            ));
        }
        if t.batch_size > 65_536 {
            return bad("[train] batch_size above 65536 is not supported");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) || t.min_lr < 0.0 || t.min_lr > t.lr {
            return bad("[train] needs 0 <= min_lr <= lr and lr > 0");
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return bad("[train] label_smoothing must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&t.dropout) || !(0.0..1.0).contains(&t.drop_path) {
            return bad("[train] dropout and drop_path must be in [0, 1)");
        }
        if self
            .data
            .val_fraction
            .is_some_and(|f| !(0.0..1.0).contains(&f))
        {
            return bad("[data] val_fraction must be in [0, 1)");
        }
        if self.data.workers == 0 || self.data.workers > 64 {
            return bad("[data] workers must be 1..=64");
        }
        if let Err(e) = self.augment.validate() {
            return bad(&format!("[augment] {e}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_config_reads_and_resolves() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let run = RunConfig::from_toml(&text, &path.display().to_string())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                run.model
                    .resolve_net((1, 28, 28), 10)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "only {n} configs found in {}", dir.display());
    }

    #[test]
    fn parses_a_config_and_names_unknown_fields() {
        let text = r#"
            [model]
            patch_size = 4
            width = 32
            depth = 2
            heads = 2
            [data]
            dataset = "fashion-mnist"
            [augment]
            crop_padding = 2
            hflip = true
            [train]
            epochs = 1
            batch_size = 64
            lr = 1e-3
            optimizer = { kind = "adamw", weight_decay = 0.05 }
        "#;
        let c = RunConfig::from_toml(text, "x.toml").unwrap();
        let m = c.model.resolve((1, 28, 28), 10).unwrap();
        assert_eq!((m.mlp_dim, m.num_classes, m.grid()), (128, 10, (7, 7)));
        assert_eq!(
            RunConfig::from_toml(&c.to_toml().unwrap(), "round trip").unwrap(),
            c
        );
        let e = RunConfig::from_toml(&text.replace("hflip", "hflop"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("hflop"), "{e}");
        let e = RunConfig::from_toml(
            &text.replace("lr = 1e-3", "lr = 1e-3\nema_decay = 1.0"),
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ema_decay is 1"), "{e}");
        // Without an optimizer: AdamW with PyTorch's defaults.
        let bare = text.replace("optimizer = { kind = \"adamw\", weight_decay = 0.05 }", "");
        let c = RunConfig::from_toml(&bare, "bare.toml").unwrap();
        assert_eq!(
            c.train.optimizer,
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01
            }
        );
        assert_eq!(c.train.optimizer, OptimizerKind::default());
        // `kind = "adamw"` alone means the same defaults.
        let named = text.replace(", weight_decay = 0.05 }", " }");
        let c = RunConfig::from_toml(&named, "named.toml").unwrap();
        assert_eq!(c.train.optimizer, OptimizerKind::default());
    }
}
