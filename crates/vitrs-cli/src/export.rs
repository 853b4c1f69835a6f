//! `vit export`: a model to ONNX, for the runtimes that take it (ONNX Runtime, TensorRT,
//! OpenVINO, browsers, phones).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use vitrs::checkpoint::onnx::{save, OnnxOptions};

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// ONNX: the graph with its weights; preprocessing in the model's metadata.
    Onnx,
}

#[derive(clap::Args)]
pub(crate) struct ExportArgs {
    /// Checkpoint: a native .safetensors file, a Hugging Face / timm directory, a Google .npz,
    /// or a hub id (`ORG/NAME[@REVISION]`) found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Onnx)]
    format: Format,
    /// Output file, e.g. model.onnx.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// ONNX opset: 17 (the first with LayerNormalization) to 21.
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// A symbolic batch dimension instead of a fixed batch of 1.
    #[arg(long)]
    dynamic_batch: bool,
}

pub(crate) fn run(a: ExportArgs) -> Result<u8> {
    let ck = crate::load(&a.model)?;
    let opts = OnnxOptions {
        opset: a.opset,
        dynamic_batch: a.dynamic_batch,
    };
    match a.format {
        Format::Onnx => save(
            &a.out,
            &ck.model,
            &ck.preprocess,
            ck.labels.as_deref(),
            opts,
        )
        .with_context(|| format!("cannot export to {}", a.out.display()))?,
    }
    let cfg = ck.model.config();
    println!(
        "wrote {} (ONNX opset {}, input pixel_values ({}, {}, {}, {}), output {} ({}, {}); \
         preprocessing in its metadata: {:?}, mean {:?}, std {:?})",
        a.out.display(),
        a.opset,
        if a.dynamic_batch { "batch" } else { "1" },
        cfg.channels,
        cfg.image_height,
        cfg.image_width,
        if cfg.num_classes > 0 {
            "logits"
        } else {
            "features"
        },
        if a.dynamic_batch { "batch" } else { "1" },
        if cfg.num_classes > 0 {
            cfg.num_classes
        } else {
            cfg.feature_dim()
        },
        ck.preprocess.resize,
        ck.preprocess.mean,
        ck.preprocess.std
    );
    Ok(0)
}
