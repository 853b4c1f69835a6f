//! Evaluation over a dataset: top-1, top-5, per-class accuracy, the confusion matrix and the
//! mean loss.

use std::sync::Arc;

use serde::Serialize;

use crate::data::loader::{Loader, LoaderConfig};
use crate::data::Dataset;
use crate::error::Result;
use crate::kernels::loss::{cross_entropy, Targets};
use crate::model::{Net, NetWorkspace};

#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub top1: f64,
    pub top5: f64,
    pub n: usize,
    /// Accuracy per true class (NaN-free: a class with no examples scores 0).
    pub per_class: Vec<f64>,
    /// `confusion[true · K + predicted]`.
    #[serde(skip)]
    pub confusion: Vec<u64>,
    pub loss: f64,
}

/// Runs `model` over every item of `data`, normalised with `mean`/`std`.
pub fn evaluate(
    model: &Net,
    data: Arc<dyn Dataset>,
    batch_size: usize,
    mean: &[f32],
    std: &[f32],
    workers: usize,
) -> Result<EvalResult> {
    let k = model.num_classes();
    let loader = Loader::new(
        data,
        LoaderConfig {
            workers,
            ..LoaderConfig::in_order(batch_size, mean, std, k)
        },
    )?;
    let mut ws = NetWorkspace::for_net(model);
    let (mut n, mut top1, mut top5, mut loss) = (0usize, 0usize, 0usize, 0.0f64);
    let mut confusion = vec![0u64; k * k];
    let mut scratch = vec![];
    for batch in loader {
        let batch = batch?;
        let logits = model.logits(&batch.images, &mut ws)?;
        let b = batch.labels.len();
        scratch.resize(b * k, 0.0);
        loss += cross_entropy(
            logits,
            k,
            Targets::Labels {
                labels: &batch.labels,
                smoothing: 0.0,
            },
            &mut scratch,
        )? as f64
            * b as f64;
        for (row, &y) in logits.chunks_exact(k).zip(&batch.labels) {
            let mut idx: Vec<usize> = (0..k).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            top1 += (idx[0] == y) as usize;
            top5 += idx.iter().take(5).any(|&i| i == y) as usize;
            confusion[y * k + idx[0]] += 1;
        }
        n += b;
    }
    let per_class = (0..k)
        .map(|c| {
            let total: u64 = confusion[c * k..(c + 1) * k].iter().sum();
            if total == 0 {
                0.0
            } else {
                confusion[c * k + c] as f64 / total as f64
            }
        })
        .collect();
    let nf = n.max(1) as f64;
    Ok(EvalResult {
        top1: top1 as f64 / nf,
        top5: top5 as f64 / nf,
        n,
        per_class,
        confusion,
        loss: loss / nf,
    })
}
