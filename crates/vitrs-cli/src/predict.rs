//! `vit predict`: classify images or preprocessed arrays, as text or one JSON line per input.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vitrs::infer::{expand_inputs, Predictor};
use vitrs::model::Net;

#[derive(clap::Args)]
pub(crate) struct PredictArgs {
    /// Checkpoint: a native .safetensors file, a Hugging Face / timm directory, or a hub id
    /// (`ORG/NAME[@REVISION]`) found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// How many classes to show per input.
    #[arg(long, default_value_t = 5, value_name = "K")]
    top_k: usize,
    /// One JSON object per input per line.
    #[arg(long)]
    json: bool,
    /// Include the raw logits in the output.
    #[arg(long)]
    logits: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_name = "N")]
    batch_size: usize,
    /// Image files, .npy arrays (C,H,W) or (B,C,H,W), or directories of them.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
}

pub(crate) fn run(a: PredictArgs) -> Result<u8> {
    let mut ck = vitrs::checkpoint::load_net(&a.model).context("cannot load model")?;
    let (files, skipped) = expand_inputs(&a.inputs)?;
    if skipped > 0 {
        eprintln!("warning: skipped {skipped} file(s) that are not images or .npy arrays");
    }
    if files.is_empty() {
        bail!(
            "no input images found in {}",
            a.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    vitrs::infer::check_batch_memory(&ck.model, a.batch_size.min(files.len()))?;
    if let (true, Net::ViT(m)) = (files.len() > a.batch_size.max(1), &mut ck.model) {
        // More than one forward: packing the weights once beats packing them every time.
        m.pack_weights();
    }
    let mut failures = 0usize;
    let mut predictor = Predictor::new(&ck, a.batch_size, a.top_k);
    predictor.run(&files, |res| match res {
        Ok(p) => {
            if a.json {
                let mut v = json!({"input": p.input, "top": p.top});
                if a.logits {
                    v["logits"] = json!(p.logits);
                }
                println!("{v}");
            } else {
                let top: Vec<String> = p
                    .top
                    .iter()
                    .map(|c| format!("{} ({:.4})", c.label, c.prob))
                    .collect();
                if top.is_empty() {
                    println!("{}: features of dim {}", p.input, p.logits.len());
                } else {
                    println!("{}: {}", p.input, top.join(", "));
                }
                if a.logits {
                    println!("  logits: {:?}", p.logits);
                }
            }
        }
        Err(e) => {
            failures += 1;
            eprintln!("error: {e}");
        }
    });
    // The process exits next: leave the weights and buffers to the OS, which takes them back
    // at once, instead of unmapping them page by page (ViT-B's 330 MB: ~35 ms, a tenth of a
    // one-image run).
    std::mem::forget(predictor);
    std::mem::forget(ck);
    if failures > 0 {
        eprintln!("{failures} of the inputs failed");
        return Ok(crate::EXIT_INPUT);
    }
    Ok(0)
}
