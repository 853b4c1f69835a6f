//! `vit`: inspect, run and convert Vision Transformer checkpoints.
//!
//! The CLI only parses flags, calls the library and prints; every number is computed in `vitrs`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

mod attention;
mod finetune;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use vitrs::checkpoint::safetensors::SaveDtype;
use vitrs::infer::{expand_inputs, Predictor};
use vitrs::kernels::loss::Targets;
use vitrs::model::TrainWorkspace;
use vitrs::train::optim::{Optimizer, OptimizerKind};
use vitrs::train::trainer::Outcome;
use vitrs::train::{EvalResult, Hooks, Progress, RunConfig, Trainer};
use vitrs::viz::confusion::plot_confusion;
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
    /// Train a ViT from a TOML run config (or continue a run with --resume).
    Train(TrainArgs),
    /// Fine-tune a pre-trained model on new data: new zero-initialised head, position
    /// embeddings resampled to a new resolution, the paper's SGD recipe by default.
    Finetune(finetune::FinetuneArgs),
    /// Attention maps over images (rollout, one layer's heads averaged, or single heads), or
    /// with --distance the mean attention distance per head and layer over a dataset.
    Attention(attention::AttentionArgs),
    /// Train a small ViT on Fashion-MNIST for about two minutes, evaluate it, classify a few
    /// test images, and write the curve, confusion matrix and predictions into a folder.
    Demo {
        /// Output folder.
        #[arg(long, value_name = "DIR", default_value = "demo-out")]
        out: PathBuf,
    },
    /// Evaluate a model on a dataset's test split: top-1, top-5, per class, confusion matrix.
    Eval {
        /// The model: a checkpoint path, as for `vit predict`.
        #[arg(long, value_name = "PATH")]
        model: PathBuf,
        /// `fashion-mnist`, `mnist`, `cifar10`, `cifar100`, or a directory.
        #[arg(long)]
        dataset: String,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Where to write the confusion-matrix PNG.
        #[arg(long, value_name = "FILE", default_value = "confusion.png")]
        confusion: PathBuf,
        /// One JSON object {"top1", "top5", "n", "per_class"} instead of text.
        #[arg(long)]
        json: bool,
        /// Evaluate at another resolution (`42` or `48x64`): the images are resized and the
        /// position embeddings resampled; the head is kept.
        #[arg(long, value_name = "H[xW]")]
        image_size: Option<String>,
        /// Only these classes of the dataset, renumbered from 0 (as the model was trained).
        #[arg(long, value_name = "LIST")]
        classes: Option<String>,
        /// Image folders: stop on a file that is not a readable image instead of skipping it.
        #[arg(long)]
        strict: bool,
        /// From a training checkpoint of a run with `ema_decay`, evaluate the weights being
        /// trained instead of their moving average (which the run evaluated and saved).
        #[arg(long)]
        trained_weights: bool,
    },
    /// Measure speed on this machine: inference, or with --train a full training step
    /// (forward, backward, AdamW), on random weights and inputs.
    Bench {
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
        // A damaged dataset file is an input problem, not a model one.
        Some(vitrs::Error::Malformed {
            what: "IDX file" | "IDX dataset" | "CIFAR batch" | "gzip data",
            ..
        }) => EXIT_INPUT,
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
        Command::Train(args) => train(args),
        Command::Finetune(args) => finetune::finetune(args),
        Command::Attention(args) => attention::attention(args),
        Command::Demo { out } => demo(&out),
        Command::Eval {
            model,
            dataset,
            batch_size,
            confusion,
            json,
            image_size,
            classes,
            strict,
            trained_weights,
        } => eval(
            &model,
            &dataset,
            batch_size,
            &confusion,
            json,
            strict,
            trained_weights,
            image_size.as_deref(),
            classes.as_deref(),
        ),
        Command::Bench {
            model,
            train,
            batch_size,
            iters,
            warmup,
            json,
        } => bench(&model, train, batch_size, iters, warmup, json),
    }
}

pub(crate) fn load(path: &Path) -> Result<Checkpoint> {
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
    println!("tokens:        {}", cfg.token_summary());
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
    vitrs::infer::check_batch_memory(ck.model.config(), batch.min(files.len()))?;
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
    // The process exits next: leave the weights and buffers to the OS, which takes them back
    // at once, instead of unmapping them page by page (ViT-B's 330 MB: ~35 ms, a tenth of a
    // one-image run).
    std::mem::forget(predictor);
    std::mem::forget(ck);
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

fn bench(
    model: &str,
    train: bool,
    batch: usize,
    iters: usize,
    warmup: usize,
    as_json: bool,
) -> Result<u8> {
    let p = Path::new(model);
    let (vit, optimizer) = if p.extension().is_some_and(|e| e == "toml") {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let run = RunConfig::from_toml(&text, model)?;
        // Without the data at hand, take the shape of a dataset known by name.
        let (shape, classes) =
            vitrs::data::known_shape(&run.data.dataset).unwrap_or(((3, 224, 224), 1000));
        let cfg = run.model.resolve(shape, classes)?;
        (ViT::random(cfg, 0)?, run.train.optimizer)
    } else if p.exists() {
        (
            load(p)?.model,
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
            },
        )
    } else {
        let cfg = ViTConfig::preset(model)?;
        (
            ViT::random(cfg, 0)?,
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
            },
        )
    };
    let mut vit = vit;
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
    let k = cfg.num_classes.max(1);
    let labels: Vec<usize> = (0..batch).map(|i| i % k).collect();
    let mut ws = Workspace::new();
    let mut tw = TrainWorkspace::new();
    let mut opt = Optimizer::new(optimizer, vit.params());
    let mut once = |vit: &mut ViT| -> Result<()> {
        if train {
            tw.zero_grads();
            vit.forward_backward(
                &x,
                Targets::Labels {
                    labels: &labels,
                    smoothing: 0.0,
                },
                &mut tw,
            )?;
            opt.step(vit.params_mut().flat_mut(), tw.grads(), 1e-4);
        } else {
            vit.forward(&x, Capture::default(), &mut ws)?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        once(&mut vit)?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        once(&mut vit)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let ips = batch as f64 / median;
    // A training step costs about three forwards (forward, and backward to inputs and weights).
    let flops = cfg.flops_per_image() * if train { 3.0 } else { 1.0 };
    let gflops = ips * flops / 1e9;
    let threads = rayon::current_num_threads();
    let what = if train { "training step" } else { "inference" };
    if as_json {
        println!(
            "{}",
            json!({"images_per_sec": ips, "gflops_per_sec": gflops, "batch_size": batch, "threads": threads,
                   "median_batch_seconds": median, "iters": times.len(), "train": train})
        );
    } else {
        println!(
            "{model} ({what}): batch {batch}, {threads} thread(s): {ips:.2} images/s, {:.1} ms per batch (median of {}), {gflops:.1} GFLOP/s",
            median * 1e3,
            times.len()
        );
    }
    Ok(0)
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Run configuration (see configs/*.toml).
    #[arg(long, value_name = "FILE", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Run directory: checkpoint, final model.safetensors, metrics.jsonl, curve.png.
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many optimizer steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override the dataset (a name or a directory).
    #[arg(long)]
    dataset: Option<String>,
    #[command(flatten)]
    recipe: RecipeOverrides,
}

/// Flags that override a run config's recipe, shared by `vit train` and `vit finetune`.
#[derive(clap::Args)]
pub(crate) struct RecipeOverrides {
    /// Override the number of epochs.
    #[arg(long, conflicts_with = "time_budget")]
    pub(crate) epochs: Option<u64>,
    /// Train for as many epochs as fit in this many minutes of wall time, measured on this
    /// machine before the run starts (replaces the config's epochs).
    #[arg(long, value_name = "MIN")]
    pub(crate) time_budget: Option<f64>,
    /// Override the batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override the peak learning rate.
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Override the seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Use only these classes of the dataset, renumbered from 0 (e.g. `0-4` or `0,2,4`); a new
    /// head gets one output per class.
    #[arg(long, value_name = "LIST")]
    classes: Option<String>,
    /// Train on this many images per class (a seeded choice).
    #[arg(long, value_name = "N")]
    per_class: Option<usize>,
    /// Image folders: stop on a file that is not a readable image instead of skipping it.
    #[arg(long)]
    strict: bool,
}

impl RecipeOverrides {
    /// Writes the given flags into `run` (a lower peak lr pulls `min_lr` down with it).
    pub(crate) fn apply(&self, run: &mut RunConfig) -> Result<()> {
        if let Some(e) = self.epochs {
            run.train.epochs = e;
            run.train.time_budget_min = None;
        }
        if let Some(m) = self.time_budget {
            run.train.time_budget_min = Some(m);
        }
        if let Some(b) = self.batch_size {
            run.train.batch_size = b;
        }
        if let Some(lr) = self.lr {
            run.train.lr = lr;
            run.train.min_lr = run.train.min_lr.min(lr);
        }
        if let Some(s) = self.seed {
            run.train.seed = s;
        }
        if let Some(c) = &self.classes {
            run.data.classes = Some(parse_classes(c)?);
        }
        if let Some(k) = self.per_class {
            run.data.per_class = Some(k);
        }
        if self.strict {
            run.data.strict = true;
        }
        Ok(())
    }
}

/// `5-9`, `0,2,4` or a mix (`0-2,7`) as class indices, in the order given.
pub(crate) fn parse_classes(s: &str) -> Result<Vec<usize>> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |t: &str| {
            t.trim().parse::<usize>().with_context(|| {
                format!("`{s}`: `{t}` is not a class index (e.g. `5-9` or `0,2,4`)")
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 100_000 {
                    bail!("`{s}`: `{part}` is not an increasing range");
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    if out.is_empty() {
        bail!("--classes `{s}` names no class");
    }
    let mut seen = out.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != out.len() {
        bail!("--classes `{s}` names a class twice");
    }
    Ok(out)
}

/// Progress on stderr: one rewritten line on a terminal, a line per report otherwise.
pub(crate) struct Bar {
    pub(crate) tty: bool,
}

fn hms(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl Hooks for Bar {
    fn progress(&mut self, p: &Progress) {
        let frac = p.step as f64 / p.total_steps.max(1) as f64;
        let filled = (frac * 20.0) as usize;
        let acc = if p.accuracy.is_finite() {
            format!("{:.1}%", 100.0 * p.accuracy)
        } else {
            "-".into()
        };
        let line = format!(
            "[{}{}] epoch {}/{} step {}/{} loss {:.4} acc {acc} lr {:.2e} {:.0} img/s elapsed {} ETA {}",
            "#".repeat(filled),
            ".".repeat(20 - filled),
            p.epoch + 1,
            p.epochs,
            p.step,
            p.total_steps,
            p.loss,
            p.lr,
            p.images_per_sec,
            hms(p.elapsed_s),
            hms(p.eta_s)
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    fn evaluated(&mut self, epoch: u64, r: &EvalResult) {
        if self.tty {
            eprintln!();
        }
        eprintln!(
            "epoch {epoch}: eval top-1 {:.2}% top-5 {:.2}% loss {:.4} ({} images)",
            100.0 * r.top1,
            100.0 * r.top5,
            r.loss,
            r.n
        );
    }

    fn note(&mut self, msg: &str) {
        if self.tty {
            eprintln!();
        }
        eprintln!("{msg}");
    }
}

fn train(a: TrainArgs) -> Result<u8> {
    let trainer = match (&a.resume, &a.config, &a.out) {
        (Some(dir), _, _) => {
            if a.recipe.time_budget.is_some() {
                bail!(
                    "--time-budget fits the epochs when a run starts; a resumed run keeps the \
                     ones it was started with (change them with --epochs N)"
                );
            }
            Trainer::resume(dir, a.recipe.epochs)
                .with_context(|| format!("cannot resume {}", dir.display()))?
        }
        (None, Some(cfg), Some(out)) => {
            let text = std::fs::read_to_string(cfg)
                .with_context(|| format!("cannot read {}", cfg.display()))?;
            let mut run = RunConfig::from_toml(&text, &cfg.display().to_string())?;
            a.recipe.apply(&mut run)?;
            if let Some(d) = a.dataset {
                run.data.dataset = d;
            }
            run.validate()?;
            Trainer::new(run, out)?
        }
        _ => bail!("give --config FILE --out RUN_DIR, or --resume RUN_DIR"),
    };
    drive(trainer, a.max_steps)
}

/// Runs a built trainer to the end (or a stop): Ctrl-C handling, progress, the final summary.
pub(crate) fn drive(mut trainer: Trainer, max_steps: Option<u64>) -> Result<u8> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is being written ends the process at once.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step; the checkpoint will be saved (Ctrl-C again to abort)"
            );
        });
    }
    let mut bar = Bar {
        tty: std::io::stderr().is_terminal(),
    };
    trainer.fit_to_budget(&mut bar)?;
    let cfg = trainer.model.config().clone();
    eprintln!(
        "training D={} L={} heads={} patch={} on {} images ({} held for evaluation: {}), {} parameters, {} steps, run dir {}",
        cfg.width,
        cfg.depth,
        cfg.heads,
        cfg.patch_size,
        trainer.train_len(),
        trainer.eval_len(),
        trainer.eval_source,
        trainer.model.params().count(),
        trainer.total_steps(),
        trainer.dir().display()
    );
    for note in &trainer.notes {
        eprintln!("note: {note}");
    }
    let (plain, epochs) = (
        trainer.run.augment.plain_last_epochs,
        trainer.run.train.epochs,
    );
    if plain > 0 {
        eprintln!(
            "note: the last {} of {epochs} epoch(s) train on plain images (flip only)",
            plain.min(epochs)
        );
    }
    if trainer.pos.step > 0 {
        eprintln!(
            "resuming at step {} (epoch {}, batch {})",
            trainer.pos.step, trainer.pos.epoch, trainer.pos.batch
        );
    }
    let outcome = trainer.run(&mut bar, &stop, max_steps)?;
    let dir = trainer.dir().to_path_buf();
    match outcome {
        Outcome::Finished(r) => {
            println!(
                "done: test top-1 {:.2}% ({}), model {}, curve {}, metrics {}",
                100.0 * r.top1,
                trainer.eval_source,
                dir.join(vitrs::train::trainer::MODEL).display(),
                dir.join(vitrs::train::trainer::CURVE).display(),
                dir.join(vitrs::train::trainer::METRICS).display()
            );
            Ok(0)
        }
        Outcome::Stopped { step } => {
            println!(
                "stopped at step {step}; continue with: vit train --resume {}",
                dir.display()
            );
            Ok(if stop.load(Ordering::SeqCst) { 130 } else { 0 })
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn eval(
    path: &Path,
    dataset: &str,
    batch: usize,
    confusion: &Path,
    as_json: bool,
    strict: bool,
    trained_weights: bool,
    image_size: Option<&str>,
    classes: Option<&str>,
) -> Result<u8> {
    use vitrs::data::Resized;
    let which = if trained_weights {
        vitrs::Weights::Trained
    } else {
        vitrs::Weights::Average
    };
    let mut ck = vitrs::load_weights(path, which).context("cannot load model")?;
    // Which of a training checkpoint's two sets of weights this is (to stderr: --json
    // keeps stdout to one object).
    for c in &ck.report.conversions {
        if c.contains("moving average") {
            eprintln!("{}: {c}", path.display());
        }
    }
    if let Some(s) = image_size {
        let [h, w] = finetune::parse_size(s)?;
        let a = vitrs::train::transfer::at_resolution(&ck.model, (h, w))?;
        for note in &a.changes {
            eprintln!("eval at {h}x{w}: {note}");
        }
        ck.model = a.model;
        (ck.preprocess.height, ck.preprocess.width) = (h, w);
    }
    let cfg = ck.model.config();
    let size = (cfg.channels, cfg.image_height, cfg.image_width);
    let mut data = vitrs::data::open_with(dataset, vitrs::data::Split::Test, size, strict)?;
    if data.skipped() > 0 {
        eprintln!(
            "warning: skipped {} file(s) that are not readable images (--strict stops on them)",
            data.skipped()
        );
    }
    if let Some(c) = classes {
        data = vitrs::data::select_classes(data, &parse_classes(c)?, dataset)?;
    }
    if image_size.is_some() && data.shape() != size {
        data = Arc::new(Resized::new(data, (size.1, size.2))?);
    }
    if data.shape() != size {
        bail!(
            "dataset images are {:?} (C, H, W) but the model takes {size:?}; evaluate a model trained at the dataset's size",
            data.shape()
        );
    }
    if data.classes().len() != cfg.num_classes {
        bail!(
            "the dataset has {} classes, the model {}",
            data.classes().len(),
            cfg.num_classes
        );
    }
    let labels: Vec<String> = (0..cfg.num_classes).map(|i| ck.label(i)).collect();
    let r = vitrs::train::evaluate(
        &ck.model,
        data,
        batch.max(1),
        &ck.preprocess.mean,
        &ck.preprocess.std,
        1,
    )?;
    plot_confusion(
        confusion,
        &r.confusion,
        &labels,
        &format!("{dataset} test split"),
    )?;
    if as_json {
        println!(
            "{}",
            json!({"top1": r.top1, "top5": r.top5, "n": r.n, "per_class": r.per_class})
        );
    } else {
        println!(
            "top-1 {:.2}%  top-5 {:.2}%  ({} images, mean loss {:.4})",
            100.0 * r.top1,
            100.0 * r.top5,
            r.n,
            r.loss
        );
        for (i, a) in r.per_class.iter().enumerate() {
            println!("  {:>3} {:<24} {:.2}%", i, labels[i], 100.0 * a);
        }
        println!("confusion matrix: {}", confusion.display());
    }
    Ok(0)
}

/// The demo's run config (embedded, so `vit demo` works from anywhere).
const DEMO_CONFIG: &str = include_str!("../../../configs/demo.toml");
/// Fashion-MNIST's official test split (MIT licence, Zalando SE), bundled so the demo runs on a
/// fresh clone with nothing installed.
const SAMPLE_IMAGES: &[u8] =
    include_bytes!("../../../assets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz");
const SAMPLE_LABELS: &[u8] =
    include_bytes!("../../../assets/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz");

fn demo(out: &Path) -> Result<u8> {
    use vitrs::data::{Dataset, Split, Subset};
    let mut run = RunConfig::from_toml(DEMO_CONFIG, "configs/demo.toml")?;
    let full = vitrs::data::open("fashion-mnist", Split::Train, (1, 28, 28)).and_then(|tr| {
        Ok((
            tr,
            vitrs::data::open("fashion-mnist", Split::Test, (1, 28, 28))?,
        ))
    });
    let (train, test, source): (Arc<dyn Dataset>, Arc<dyn Dataset>, String) = match full {
        Ok((tr, te)) => (
            tr,
            te,
            "the full Fashion-MNIST (60,000 training images), 1 epoch".into(),
        ),
        Err(_) => {
            let (ip, lp) = (
                Path::new("t10k-images (bundled)"),
                Path::new("t10k-labels (bundled)"),
            );
            let all = vitrs::data::idx::pair(
                ip,
                &vitrs::data::idx::gunzip(ip, SAMPLE_IMAGES)?,
                lp,
                &vitrs::data::idx::gunzip(lp, SAMPLE_LABELS)?,
                true,
            )?;
            let all: Arc<dyn Dataset> = Arc::new(all);
            run.train.epochs = 8;
            (
                Arc::new(Subset::new(all.clone(), (0..8000).collect())),
                Arc::new(Subset::new(all, (8000..10_000).collect())),
                "the bundled sample (8,000 training / 2,000 test images of the official test split), 8 epochs; \
                 `apt-get install dataset-fashion-mnist` for the full set"
                    .into(),
            )
        }
    };
    if out.join(vitrs::train::trainer::CHECKPOINT).exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    eprintln!("vit demo: training a small ViT on {source}");
    let mut trainer = Trainer::with_data(run, out, train, test.clone(), "test split".into())?;
    let mut bar = Bar {
        tty: std::io::stderr().is_terminal(),
    };
    let stop = AtomicBool::new(false);
    let Outcome::Finished(r) = trainer.run(&mut bar, &stop, None)? else {
        bail!("the demo run stopped early");
    };
    // Classify the first test image of each class, and keep the images to look at.
    let imgs = out.join("images");
    std::fs::create_dir_all(&imgs).with_context(|| format!("cannot create {}", imgs.display()))?;
    // The weights the run evaluated (their moving average, when the config keeps one).
    let model = trainer.result_model();
    let mut preds = vec![];
    let mut seen = vec![false; test.classes().len()];
    let mut px = vec![0u8; 28 * 28];
    for i in 0..test.len() {
        let y = test.label(i);
        if seen[y] {
            continue;
        }
        seen[y] = true;
        test.image(i, &mut px)?;
        let file = imgs.join(format!(
            "{:02}_{}.png",
            y,
            trainer.labels[y].replace(['/', ' '], "-").to_lowercase()
        ));
        vitrs::preprocess::save_gray_png(&file, &px, 28, 28)?;
        let x = trainer.preprocess.load(&file)?;
        let logits = model.logits(&x)?;
        let (best, p) = vitrs::infer::top_k(logits.data(), 1)[0];
        println!(
            "{:<28} true {:<12} predicted {:<12} ({:.2}){}",
            file.display().to_string(),
            trainer.labels[y],
            trainer.labels[best],
            p,
            if best == y { "" } else { "  <- wrong" }
        );
        preds.push(json!({"image": file, "true": trainer.labels[y], "predicted": trainer.labels[best], "prob": p}));
    }
    // Where the model looked: attention rollout over the same images.
    let rollout = [(
        "rollout".to_string(),
        vitrs::attnmap::Method::Rollout {
            fusion: vitrs::attnmap::HeadFusion::Mean,
            discard_ratio: 0.0,
        },
    )];
    let files: Vec<PathBuf> = preds
        .iter()
        .filter_map(|p| p["image"].as_str().map(PathBuf::from))
        .collect();
    let labels = trainer.labels.clone();
    let label_of = |i: usize| {
        labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("class_{i}"))
    };
    let rows = attention::figure_rows(
        &model,
        &trainer.preprocess,
        &label_of,
        &files,
        &rollout,
        0.5,
        None,
    )?;
    vitrs::viz::heatmap::plot_rows(
        &out.join("attention.png"),
        "attention rollout: where the class token looks",
        &rows,
    )?;
    let pj = out.join("predictions.json");
    std::fs::write(&pj, serde_json::to_string_pretty(&preds)?)
        .with_context(|| format!("cannot write {}", pj.display()))?;
    println!("\ntest top-1 {:.2}% on {} images", 100.0 * r.top1, r.n);
    for (what, f) in [
        ("training curve", vitrs::train::trainer::CURVE),
        ("confusion matrix", vitrs::train::trainer::CONFUSION),
        ("model", vitrs::train::trainer::MODEL),
        ("predictions", "predictions.json"),
        ("attention maps", "attention.png"),
        ("metrics", vitrs::train::trainer::METRICS),
    ] {
        println!("{what:<17} {}", out.join(f).display());
    }
    println!(
        "try: vit predict --model {} {}",
        out.join(vitrs::train::trainer::MODEL).display(),
        imgs.display()
    );
    Ok(0)
}
