//! `vit eval`: top-1, top-5, per-class accuracy and the confusion matrix on a test split, for
//! a ViT or a ResNet.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use vitrs::data::{open_for_model, ForModel, Split};
use vitrs::model::Net;
use vitrs::viz::confusion::plot_confusion;

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    /// The model: a checkpoint path or hub id, as for `vit predict`.
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
}

pub(crate) fn run(a: EvalArgs) -> Result<u8> {
    let which = if a.trained_weights {
        vitrs::Weights::Trained
    } else {
        vitrs::Weights::Average
    };
    let mut ck =
        vitrs::checkpoint::load_net_weights(&a.model, which).context("cannot load model")?;
    // Which of a training checkpoint's two sets of weights this is (to stderr: --json
    // keeps stdout to one object).
    for c in &ck.report.conversions {
        if c.contains("moving average") {
            eprintln!("{}: {c}", a.model.display());
        }
    }
    if let Some(s) = &a.image_size {
        let [h, w] = crate::finetune::parse_size(s)?;
        let adapted = vitrs::train::transfer::at_resolution_net(&ck.model, (h, w))?;
        for note in &adapted.changes {
            eprintln!("eval at {h}x{w}: {note}");
        }
        ck.model = adapted.model;
        (ck.preprocess.height, ck.preprocess.width) = (h, w);
    }
    // Many forwards of the same weights: pack them once for the GEMM kernel.
    if let Net::ViT(m) = &mut ck.model {
        m.pack_weights();
    }
    let k = ck.model.num_classes();
    let classes = a
        .classes
        .as_deref()
        .map(vitrs::data::parse_classes)
        .transpose()
        .context("--classes")?;
    let opts = ForModel {
        strict: a.strict,
        classes,
        resize: a.image_size.is_some(),
        same_classes: true,
    };
    let data = open_for_model(&a.dataset, Split::Test, (ck.model.input(), k), &opts)?;
    if data.skipped() > 0 {
        eprintln!(
            "warning: skipped {} file(s) that are not readable images (--strict stops on them)",
            data.skipped()
        );
    }
    let labels: Vec<String> = (0..k).map(|i| ck.label(i)).collect();
    let (mean, std) = (&ck.preprocess.mean, &ck.preprocess.std);
    let r = vitrs::train::evaluate(&ck.model, data, a.batch_size.max(1), mean, std, 1)?;
    let title = format!("{} test split", a.dataset);
    plot_confusion(&a.confusion, &r.confusion, &labels, &title)?;
    if a.json {
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
        for (i, acc) in r.per_class.iter().enumerate() {
            println!("  {:>3} {:<24} {:.2}%", i, labels[i], 100.0 * acc);
        }
        println!("confusion matrix: {}", a.confusion.display());
    }
    Ok(0)
}
