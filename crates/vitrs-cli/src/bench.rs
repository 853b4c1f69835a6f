//! `vit bench`: images per second and GFLOP/s of inference or a training step on this machine.

use anyhow::Result;
use vitrs::bench::{run as measure, Workload};

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// A preset such as `B/16`, `S/16@384`, `vit_tiny_patch16_224`, a checkpoint path, or a
    /// run config (.toml) whose [model] is used.
    #[arg(long, value_name = "PRESET|PATH")]
    model: String,
    /// Time a training step instead of inference.
    #[arg(long)]
    train: bool,
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch_size: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed warm-up repetitions.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: BenchArgs) -> Result<u8> {
    let mut w = Workload::from_spec(&a.model)?;
    let r = measure(&mut w, a.train, a.batch_size, a.iters, a.warmup)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let what = if a.train {
            "training step"
        } else {
            "inference"
        };
        println!(
            "{} ({what}): batch {}, {} thread(s), {} kernels: {:.2} images/s, {:.1} ms per batch (median of {}), {:.1} GFLOP/s",
            a.model,
            r.batch_size,
            r.threads,
            r.kernels,
            r.images_per_sec,
            r.median_batch_seconds * 1e3,
            r.iters,
            r.gflops_per_sec
        );
    }
    Ok(0)
}
