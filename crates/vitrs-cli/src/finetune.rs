//! `vit finetune`: transfer a pre-trained model to a new dataset, class set or resolution.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use vitrs::train::config::FinetuneSpec;
use vitrs::train::optim::OptimizerKind;
use vitrs::train::{RunConfig, Trainer};

/// The paper's fine-tuning recipe (SGD with momentum 0.9, no weight decay, global-norm clip 1,
/// linear warm-up then cosine), used when no --config is given; flags override it.
const DEFAULT_RECIPE: &str = r#"
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

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Opt {
    /// SGD with momentum 0.9, no weight decay, lr 0.01 unless --lr (the paper's fine-tuning optimiser).
    Sgd,
    /// AdamW (β 0.9/0.999, weight decay 0.05 unless --weight-decay, lr 5e-4 unless --lr).
    Adamw,
}

#[derive(clap::Args)]
pub(crate) struct FinetuneArgs {
    /// Pre-trained checkpoint: a native .safetensors file or a Hugging Face / timm directory.
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// Dataset to fine-tune on: `fashion-mnist`, `mnist`, `cifar10`, `cifar100`, or a directory.
    #[arg(long)]
    dataset: String,
    /// Run directory (checkpoint, model.safetensors, metrics, curve); resume with
    /// `vit train --resume RUN_DIR`.
    #[arg(long, value_name = "RUN_DIR")]
    out: PathBuf,
    /// A run config (.toml) with the whole recipe; the flags below override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Fine-tune at this resolution (`42` or `48x64`): images are resized and the position
    /// embeddings resampled to the new patch grid.
    #[arg(long, value_name = "H[xW]")]
    image_size: Option<String>,
    #[arg(long, value_enum)]
    optimizer: Option<Opt>,
    /// Override the weight decay of the chosen optimiser.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Linear warm-up steps before the cosine decay (default 50).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Freeze the embeddings and the first K blocks.
    #[arg(long, value_name = "K")]
    freeze: Option<usize>,
    /// Layer-wise learning-rate decay (e.g. 0.75): deeper blocks learn faster; 1 turns it off.
    #[arg(long, value_name = "R")]
    layer_decay: Option<f32>,
    /// Keep the pre-trained head (same classes, e.g. fine-tuning at a new resolution) instead
    /// of a new zero-initialised one.
    #[arg(long)]
    keep_head: bool,
    /// Mirror images left-right at random while training.
    #[arg(long)]
    hflip: bool,
    /// Stop (with a checkpoint) after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    #[command(flatten)]
    recipe: crate::RecipeOverrides,
}

/// `48` or `48x64` as (height, width).
pub(crate) fn parse_size(s: &str) -> Result<[usize; 2]> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .with_context(|| format!("--image-size `{s}`: expected H or HxW, e.g. 42 or 48x64"))
    };
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (num(h)?, num(w)?),
        None => (num(s)?, num(s)?),
    };
    Ok([h, w])
}

pub(crate) fn finetune(a: FinetuneArgs) -> Result<u8> {
    let mut run = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            RunConfig::from_toml(&text, &p.display().to_string())?
        }
        None => RunConfig::from_toml(DEFAULT_RECIPE, "the default fine-tuning recipe")?,
    };
    run.data.dataset = a.dataset.clone();
    if let Some(s) = &a.image_size {
        run.data.resize = Some(parse_size(s)?);
    }
    match a.optimizer {
        Some(Opt::Sgd) => {
            run.train.optimizer = OptimizerKind::Sgd {
                momentum: 0.9,
                weight_decay: 0.0,
            };
        }
        Some(Opt::Adamw) => {
            run.train.optimizer = OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
            };
            if a.recipe.lr.is_none() && a.config.is_none() {
                run.train.lr = 5e-4;
            }
        }
        None => {}
    }
    if let Some(wd) = a.weight_decay {
        match &mut run.train.optimizer {
            OptimizerKind::Sgd { weight_decay, .. } | OptimizerKind::AdamW { weight_decay, .. } => {
                *weight_decay = wd;
            }
        }
    }
    a.recipe.apply(&mut run)?;
    run.train.min_lr = run.train.min_lr.min(run.train.lr);
    if let Some(w) = a.warmup_steps {
        run.train.warmup_steps = w;
    }
    if a.hflip {
        run.augment.hflip = true;
    }
    let mut ft = run.finetune.take().unwrap_or(FinetuneSpec {
        from: String::new(),
        freeze_blocks: 0,
        layer_decay: 1.0,
        keep_head: false,
    });
    ft.from = a.from.display().to_string();
    if let Some(k) = a.freeze {
        ft.freeze_blocks = k;
    }
    if let Some(r) = a.layer_decay {
        ft.layer_decay = r;
    }
    if a.keep_head {
        ft.keep_head = true;
    }
    run.finetune = Some(ft);
    if run.train.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    run.validate()?;
    let trainer = Trainer::new(run, &a.out).with_context(|| {
        format!(
            "cannot start fine-tuning {} on {}",
            a.from.display(),
            a.dataset
        )
    })?;
    crate::drive(trainer, a.max_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("42").unwrap(), [42, 42]);
        assert_eq!(parse_size("48x64").unwrap(), [48, 64]);
        assert!(parse_size("4 8").is_err());
        assert!(RunConfig::from_toml(DEFAULT_RECIPE, "x").is_ok());
    }
}
