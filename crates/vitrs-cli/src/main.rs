//! `vit`: inspect, run and convert Vision Transformer checkpoints.
//!
//! The CLI only parses flags, calls the library and prints; every number is computed in `vitrs`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use vitrs::checkpoint::safetensors::SaveDtype;
use vitrs::infer::{expand_inputs, Predictor};
use vitrs::{Capture, Checkpoint, Tensor, ViT, ViTConfig, Workspace};

/// Exit codes, distinct per failure kind.
const EXIT_FAILURE: u8 = 1;
const EXIT_MODEL: u8 = 3;
const EXIT_INPUT: u8 = 4;

#[derive(Parser)]
#[command(
    name = "vit",
    version,
    about = "Vision Transformer (ViT) inference and checkpoint tools, on the CPU"
)]
struct Cli {
    /// Worker threads for the compute kernels (default: one per core).
    #[arg(long, global = true, value_name = "T")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a checkpoint's format, architecture, size, cost and preprocessing.
    Info {
        /// Checkpoint: a native .safetensors file, or a Hugging Face / timm directory.
        #[arg(long, value_name = "PATH")]
        model: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Classify images (PNG, JPEG, GIF, BMP) or preprocessed .npy arrays.
    Predict {
        /// Checkpoint: a native .safetensors file, or a Hugging Face / timm directory.
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
    },
    /// Convert any supported checkpoint to the native format (one .safetensors file).
    Convert {
        #[arg(long, value_name = "PATH")]
        model: PathBuf,
        /// Output file, e.g. model.safetensors.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Storage precision of the weights (computation is always f32).
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
    },
    /// Measure inference speed on this machine (random weights for a preset).
    Bench {
        /// A preset such as `B/16`, `S/16@384`, `vit_tiny_patch16_224`, or a checkpoint path.
        #[arg(long, value_name = "PRESET|PATH")]
        model: String,
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
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = vitrs::init_threads(cli.threads) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprint!("error: {e}");
            for cause in e.chain().skip(1) {
                eprint!(": {cause}");
            }
            eprintln!();
            if let Some(hint) = hint_for(&e) {
                eprintln!("HINT: {hint}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<vitrs::Error>() {
        Some(vitrs::Error::Image { .. } | vitrs::Error::BadInput(_)) => EXIT_INPUT,
        Some(_) => EXIT_MODEL,
        None => EXIT_FAILURE,
    }
}

fn hint_for(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<vitrs::Error>()? {
        vitrs::Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
            Some("check the path; --model takes a .safetensors file or a directory with config.json + model.safetensors")
        }
        vitrs::Error::Malformed { what: "safetensors file", .. } => {
            Some("the weights file is damaged or incomplete (an interrupted download?); copy it again")
        }
        vitrs::Error::UnknownFormat { .. } => Some(
            "vit reads Hugging Face or timm directories (config.json + model.safetensors) and files written by `vit convert`",
        ),
        vitrs::Error::LoadMismatch(_) => Some("the weights and config.json come from different models"),
        vitrs::Error::Image { .. } => Some("inputs must be PNG, JPEG, GIF or BMP images, or float32 .npy arrays"),
        _ => None,
    }
}

fn run(cmd: Command) -> Result<u8> {
    match cmd {
        Command::Info { model, json } => info(&model, json),
        Command::Predict {
            model,
            top_k,
            json,
            logits,
            batch_size,
            inputs,
        } => predict(&model, top_k, json, logits, batch_size, &inputs),
        Command::Convert { model, out, dtype } => convert(&model, &out, dtype),
        Command::Bench {
            model,
            batch_size,
            iters,
            warmup,
            json,
        } => bench(&model, batch_size, iters, warmup, json),
    }
}

fn load(path: &Path) -> Result<Checkpoint> {
    // vitrs errors name the file themselves.
    vitrs::load(path).context("cannot load model")
}

fn info(path: &Path, as_json: bool) -> Result<u8> {
    let ck = load(path)?;
    let cfg = ck.model.config();
    let gflops = cfg.flops_per_image() / 1e9;
    let params = ck.model.params().count();
    if as_json {
        let v = json!({
            "format": ck.report.format,
            "weights": ck.report.weights,
            "config": cfg,
            "parameters": params,
            "gflops_per_image": gflops,
            "preprocess": ck.preprocess,
            "labels": ck.labels,
            "conversions": ck.report.conversions,
            "unexpected": ck.report.unexpected,
        });
        println!("{v}");
        return Ok(0);
    }
    let (gh, gw) = cfg.grid();
    println!("format:        {}", ck.report.format);
    println!("weights:       {}", ck.report.weights.display());
    println!(
        "architecture:  D={} L={} heads={} MLP={} patch={} ({}x{} grid, {} tokens)",
        cfg.width,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.patch_size,
        gh,
        gw,
        cfg.num_tokens()
    );
    println!(
        "input:         {}x{}x{} (C x H x W)",
        cfg.channels, cfg.image_height, cfg.image_width
    );
    println!(
        "options:       pool={:?} head={:?} norm={:?} gelu={:?} qkv_bias={} fc_norm={} eps={:e}",
        cfg.pool, cfg.head, cfg.norm, cfg.gelu, cfg.qkv_bias, cfg.fc_norm, cfg.layer_norm_eps
    );
    println!("classes:       {}", cfg.num_classes);
    println!("parameters:    {params} ({:.2} M)", params as f64 / 1e6);
    println!("cost:          {gflops:.3} GFLOP per image");
    let p = &ck.preprocess;
    println!(
        "preprocess:    {:?}, {:?}, rescale {:.6}, mean {:?}, std {:?}",
        p.resize, p.interpolation, p.rescale, p.mean, p.std
    );
    if let Some(l) = &ck.labels {
        let shown: Vec<&str> = l.iter().take(5).map(String::as_str).collect();
        println!(
            "labels:        {}{}",
            shown.join(", "),
            if l.len() > 5 { ", ..." } else { "" }
        );
    }
    for c in &ck.report.conversions {
        println!("conversion:    {c}");
    }
    for u in &ck.report.unexpected {
        println!("unused:        {u}");
    }
    Ok(0)
}

fn predict(
    path: &Path,
    top_k: usize,
    as_json: bool,
    with_logits: bool,
    batch: usize,
    inputs: &[PathBuf],
) -> Result<u8> {
    let ck = load(path)?;
    let (files, skipped) = expand_inputs(inputs)?;
    if skipped > 0 {
        eprintln!("warning: skipped {skipped} file(s) that are not images or .npy arrays");
    }
    if files.is_empty() {
        bail!(
            "no input images found in {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut failures = 0usize;
    let mut predictor = Predictor::new(&ck, batch, top_k);
    predictor.run(&files, |res| match res {
        Ok(p) => {
            if as_json {
                let mut v = json!({"input": p.input, "top": p.top});
                if with_logits {
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
                if with_logits {
                    println!("  logits: {:?}", p.logits);
                }
            }
        }
        Err(e) => {
            failures += 1;
            eprintln!("error: {e}");
        }
    });
    if failures > 0 {
        eprintln!("{failures} of the inputs failed");
        return Ok(EXIT_INPUT);
    }
    Ok(0)
}

fn convert(path: &Path, out: &Path, dtype: Dtype) -> Result<u8> {
    let ck = load(path)?;
    let dt = match dtype {
        Dtype::F32 => SaveDtype::F32,
        Dtype::F16 => SaveDtype::F16,
        Dtype::Bf16 => SaveDtype::BF16,
    };
    vitrs::checkpoint::save_native(out, &ck.model, &ck.preprocess, ck.labels.as_deref(), dt)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "wrote {} ({} format -> native, {} parameters)",
        out.display(),
        ck.report.format,
        ck.model.params().count()
    );
    for c in &ck.report.conversions {
        println!("  {c}");
    }
    Ok(0)
}

fn bench(model: &str, batch: usize, iters: usize, warmup: usize, as_json: bool) -> Result<u8> {
    let p = Path::new(model);
    let vit = if p.exists() {
        load(p)?.model
    } else {
        let cfg = ViTConfig::preset(model)?;
        ViT::random(cfg, 0)?
    };
    let cfg = vit.config().clone();
    let batch = batch.max(1);
    let shape = vec![batch, cfg.channels, cfg.image_height, cfg.image_width];
    let numel: usize = shape.iter().product();
    let x = Tensor::new(
        shape,
        (0..numel)
            .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
            .collect(),
    )?;
    let mut ws = Workspace::new();
    for _ in 0..warmup {
        vit.forward(&x, Capture::default(), &mut ws)?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        vit.forward(&x, Capture::default(), &mut ws)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let ips = batch as f64 / median;
    let gflops = ips * cfg.flops_per_image() / 1e9;
    let threads = rayon::current_num_threads();
    if as_json {
        println!(
            "{}",
            json!({"images_per_sec": ips, "gflops_per_sec": gflops, "batch_size": batch, "threads": threads,
                   "median_batch_seconds": median, "iters": times.len()})
        );
    } else {
        println!(
            "{model}: batch {batch}, {threads} thread(s): {ips:.2} images/s, {:.1} ms per batch (median of {}), {gflops:.1} GFLOP/s",
            median * 1e3,
            times.len()
        );
    }
    Ok(0)
}
