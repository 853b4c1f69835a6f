//! `vit convert`: any checkpoint `vit` reads to one native `.safetensors` file that carries its
//! architecture, preprocessing and labels.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use vitrs::checkpoint::safetensors::SaveDtype;

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

#[derive(clap::Args)]
pub(crate) struct ConvertArgs {
    /// Checkpoint: a native .safetensors file, a Hugging Face / timm directory, or a hub id
    /// (`ORG/NAME[@REVISION]`) found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Output file, e.g. model.safetensors.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Storage precision of the weights (computation is always f32).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
}

pub(crate) fn run(a: ConvertArgs) -> Result<u8> {
    let ck = crate::load(&a.model)?;
    let dt = match a.dtype {
        Dtype::F32 => SaveDtype::F32,
        Dtype::F16 => SaveDtype::F16,
        Dtype::Bf16 => SaveDtype::BF16,
    };
    vitrs::checkpoint::save_native(&a.out, &ck.model, &ck.preprocess, ck.labels.as_deref(), dt)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "wrote {} ({} format -> native, {} parameters)",
        a.out.display(),
        ck.report.format,
        ck.model.params().count()
    );
    for c in &ck.report.conversions {
        println!("  {c}");
    }
    Ok(0)
}
