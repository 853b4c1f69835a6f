//! `vit`: train, fine-tune, evaluate, inspect and run Vision Transformers on the CPU.
//!
//! Thin by design: `main` parses the command line and dispatches to one module per command;
//! each turns its flags into the library's validated configs, calls `vitrs`, and prints.
//! Every number is computed in the library.

use std::process::ExitCode;

/// Returns a [`Usage`] error (a bad command line: exit code 2) from the enclosing function,
/// the message `format!`-style.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err($crate::Usage(format!($($arg)*)).into())
    };
}

mod attention;
mod bench;
mod convert;
mod data;
mod demo;
mod eval;
mod export;
mod finetune;
mod info;
#[cfg(feature = "mpi")]
mod mpi;
mod predict;
mod progress;
#[cfg(feature = "serve")]
mod serve;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vitrs::{Checkpoint, ErrorKind};

/// Large blocks (activations, gradients) start on a cache line: see `vitrs::alloc`.
#[global_allocator]
static ALLOC: vitrs::alloc::CacheAligned = vitrs::alloc::CacheAligned;

/// Exit codes, distinct per failure kind: 2, a bad command line, is clap's, and also ours for
/// one clap cannot see (see [`Usage`]).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_MODEL: u8 = 3;
const EXIT_INPUT: u8 = 4;

#[derive(Parser)]
#[command(
    name = "vit",
    version,
    about = "Vision Transformer (ViT): train, fine-tune, evaluate, explain and run it on the CPU"
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
    /// Train a small ViT on Fashion-MNIST for about two minutes, evaluate it, classify a few
    /// test images, and write the curve, confusion matrix and predictions into a folder.
    Demo(demo::DemoArgs),
    /// Train a ViT from a TOML run config (or continue a run with --resume). Built with
    /// `--features mpi`, `mpirun -np N vit train ...` trains on N data-parallel ranks.
    Train(train::TrainArgs),
    /// Fine-tune a pre-trained model on new data: new zero-initialised head, position
    /// embeddings resampled to a new resolution, the paper's SGD recipe by default.
    Finetune(finetune::FinetuneArgs),
    /// Evaluate a model on a dataset's test split: top-1, top-5, per class, confusion matrix.
    Eval(eval::EvalArgs),
    /// Classify images (PNG, JPEG, GIF, BMP) or preprocessed .npy arrays.
    Predict(predict::PredictArgs),
    /// Attention maps over images (rollout, one layer's heads averaged, or single heads), or
    /// with --distance the mean attention distance per head and layer over a dataset.
    Attention(attention::AttentionArgs),
    /// Show a checkpoint's format, architecture, size, cost and preprocessing.
    Info(info::InfoArgs),
    /// Convert any supported checkpoint to the native format (one .safetensors file).
    Convert(convert::ConvertArgs),
    /// Export a model to ONNX (graph and weights; preprocessing in its metadata).
    Export(export::ExportArgs),
    /// Measure speed on this machine: inference, or with --train a full training step
    /// (forward, backward, AdamW), on random weights and inputs; the matrix products alone
    /// (--gemm), the FMA peak (--peak), or the data loader alone (--data).
    Bench(bench::BenchArgs),
    /// Datasets: `vit data pack` writes one as tar shards that training streams.
    Data(data::DataArgs),
    /// Serve models over HTTP: a web page, a JSON API, the Open Inference Protocol (v2) and
    /// Prometheus metrics, batching concurrent requests.
    #[cfg(feature = "serve")]
    Serve(serve::ServeArgs),
}

/// Lets a closed standard output end the process quietly, as it ends other command-line
/// tools (`vit bench --peak | head -1`): Rust ignores `SIGPIPE`, so the next `println!`
/// panicked with a backtrace instead. Not for `vit serve`, whose clients may hang up on it.
fn quit_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal, before any thread but this one
    // writes to a pipe or a socket.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "serve")]
    let serving = matches!(cli.command, Command::Serve(_));
    #[cfg(not(feature = "serve"))]
    let serving = false;
    if !serving {
        quit_on_closed_pipe();
    }
    if let Err(e) = vitrs::init_threads(cli.threads) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Train(a) => train::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Attention(a) => attention::run(a),
        Command::Info(a) => info::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Data(a) => data::run(a),
        #[cfg(feature = "serve")]
        Command::Serve(a) => serve::run(a),
    };
    match result {
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

/// A bad command line that parsing cannot see: a value out of its range, flags that do not go
/// together. Reported like any error, with clap's exit code for a bad command line.
#[derive(Debug)]
pub(crate) struct Usage(pub(crate) String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// The exit code of a failure: a bad command line's, or from the kind of the library error
/// behind it.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Usage>().is_some() {
        return EXIT_USAGE;
    }
    match e.downcast_ref::<vitrs::Error>().map(vitrs::Error::kind) {
        Some(ErrorKind::Input) => EXIT_INPUT,
        Some(ErrorKind::Model | ErrorKind::Io | ErrorKind::Serialize) => EXIT_MODEL,
        None => EXIT_FAILURE,
    }
}

fn hint_for(e: &anyhow::Error) -> Option<String> {
    let hint = match e.downcast_ref::<vitrs::Error>()? {
        vitrs::Error::NotCached { fetch, .. } => {
            return Some(format!(
                "fetch it on a machine with a network (`{fetch}`), then copy the cache here or point HF_HUB_CACHE at it"
            ))
        }
        vitrs::Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
            "check the path; --model takes a .safetensors file, a directory with config.json + model.safetensors, or a hub id in the Hugging Face cache"
        }
        vitrs::Error::Malformed { what: "safetensors file", .. } => {
            "the weights file is damaged or incomplete (an interrupted download?); copy it again"
        }
        vitrs::Error::UnknownFormat { .. } => {
            "vit reads Hugging Face or timm directories (config.json + model.safetensors) and files written by `vit convert`"
        }
        vitrs::Error::LoadMismatch(_) => "the weights and config.json come from different models",
        vitrs::Error::Image { .. } => "inputs must be PNG, JPEG, GIF or BMP images, or float32 .npy arrays",
        _ => return None,
    };
    Some(hint.to_string())
}

/// Loads a model as every command does (library errors name the file themselves).
pub(crate) fn load(path: &std::path::Path) -> Result<Checkpoint> {
    vitrs::load(path).context("cannot load model")
}
