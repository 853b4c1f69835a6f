//! `vit data pack`: a dataset into tar shards (the WebDataset layout) that `vit train` streams.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub(crate) struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand)]
enum DataCommand {
    /// Write a dataset as tar shards (`KEY.png|jpg` + `KEY.cls` per sample): OUT/train/,
    /// OUT/test/ when the dataset has a test split, and OUT/info.json. Train from them with
    /// `dataset = "OUT"` in `[data]`.
    Pack(PackArgs),
}

#[derive(clap::Args)]
struct PackArgs {
    /// A dataset name (fashion-mnist, mnist, cifar10, cifar100), an IDX or CIFAR directory,
    /// or an image folder (one sub-folder per class; train/ and test/ or val/ when split).
    #[arg(long, value_name = "DATASET|DIR")]
    from: String,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 5000, value_name = "N")]
    shard_size: usize,
    /// Seed of the order the training samples are written in (shuffled, so that every shard
    /// holds every class).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub(crate) fn run(a: DataArgs) -> Result<u8> {
    match a.command {
        DataCommand::Pack(p) => pack(p),
    }
}

fn pack(a: PackArgs) -> Result<u8> {
    let tty = std::io::stderr().is_terminal();
    let mut last = std::time::Instant::now();
    let info = vitrs::data::shards::pack(
        &a.from,
        &a.out,
        a.shard_size,
        a.seed,
        &mut |split, done, total| {
            if tty && (done == total || last.elapsed().as_millis() >= 200) {
                last = std::time::Instant::now();
                eprint!("\r{split}: {done}/{total} samples");
                if done == total {
                    eprintln!();
                }
                let _ = std::io::stderr().flush();
            }
        },
    )
    .with_context(|| format!("cannot pack {} into {}", a.from, a.out.display()))?;
    for (split, s) in &info.splits {
        println!(
            "{split}: {} samples in {} shard(s) in {}",
            s.samples,
            s.shards.len(),
            a.out.join(split).display()
        );
    }
    println!(
        "{} classes; {}; index: {}",
        info.classes.len(),
        match info.shape {
            Some([c, h, w]) => format!("images {c}x{h}x{w} stored as PNG"),
            None => "image files stored as they are (resized to the model when read)".into(),
        },
        a.out.join("info.json").display()
    );
    println!(
        "train from them with `dataset = \"{}\"` in [data]",
        a.out.display()
    );
    Ok(0)
}
