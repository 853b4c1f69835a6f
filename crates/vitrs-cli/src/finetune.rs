//! `vit finetune`: transfer a pre-trained model to a new dataset, class set or resolution.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use vitrs::train::config::FinetuneSpec;
use vitrs::train::transfer::FinetuneOptimizer;
use vitrs::train::{RunConfig, Trainer};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Opt {
    /// SGD with momentum 0.9, no weight decay, lr 0.01 unless --lr (the paper's fine-tuning optimiser).
    Sgd,
    /// AdamW (β 0.9/0.999, weight decay 0.05 unless --weight-decay, lr 5e-4 unless --lr).
    Adamw,
}

impl From<Opt> for FinetuneOptimizer {
    fn from(o: Opt) -> Self {
        match o {
            Opt::Sgd => FinetuneOptimizer::Sgd,
            Opt::Adamw => FinetuneOptimizer::AdamW,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct FinetuneArgs {
    /// Pre-trained checkpoint: a native .safetensors file, a Hugging Face / timm directory,
    /// or a hub id (`ORG/NAME[@REVISION]`) found in the local Hugging Face cache.
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
    recipe: crate::train::RecipeOverrides,
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

pub(crate) fn run(a: FinetuneArgs) -> Result<u8> {
    let mut run = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            RunConfig::from_toml(&text, &p.display().to_string())?
        }
        None => vitrs::train::transfer::recipe()?,
    };
    run.data.dataset = a.dataset.clone();
    if let Some(s) = &a.image_size {
        run.data.resize = Some(parse_size(s)?);
    }
    if let Some(o) = a.optimizer.map(FinetuneOptimizer::from) {
        run.train.optimizer = o.kind();
        // The recipe's learning rate goes with its optimiser; a config or --lr sets its own.
        if a.recipe.lr.is_none() && a.config.is_none() {
            run.train.lr = o.lr();
        }
    }
    if let Some(wd) = a.weight_decay {
        *run.train.optimizer.weight_decay_mut() = wd;
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
        usage!("--epochs must be at least 1");
    }
    run.validate()?;
    let trainer = Trainer::new(run, &a.out).with_context(|| {
        format!(
            "cannot start fine-tuning {} on {}",
            a.from.display(),
            a.dataset
        )
    })?;
    crate::train::drive(trainer, a.max_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("42").unwrap(), [42, 42]);
        assert_eq!(parse_size("48x64").unwrap(), [48, 64]);
        assert!(parse_size("4 8").is_err());
    }
}
