//! Inference over files: inputs are decoded and preprocessed with the checkpoint's recipe,
//! grouped into batches, run through one reused workspace, and turned into top-k classes.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::kernels::math::softmax_ref;
use crate::model::{Net, NetWorkspace};
use crate::tensor::Tensor;

/// File extensions taken from a directory.
pub const INPUT_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "gif", "bmp", "npy"];

/// One class of a prediction.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Class {
    pub index: usize,
    pub label: String,
    pub prob: f32,
}

/// The outcome for one input (one image, or one item of a `.npy` batch).
#[derive(Clone, Debug)]
pub struct Prediction {
    /// The file, with `[i]` appended for items of a `.npy` batch.
    pub input: String,
    /// Best classes first.
    pub top: Vec<Class>,
    /// Raw logits `(K)` (or features when the model has no classifier).
    pub logits: Vec<f32>,
}

/// Softmax probabilities of one row of logits (computed in f64; rows are short).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    softmax_ref(logits)
}

/// Indices and probabilities of the `k` largest logits, best first (ties: lower index first).
pub fn top_k(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let probs = softmax(logits);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, probs[i])).collect()
}

/// Expands directories into their input files (sorted), counting skipped non-inputs.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    let mut files = vec![];
    let mut skipped = 0;
    for p in inputs {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| e.is_file())
                .collect();
            entries.sort();
            for e in entries {
                let ok = e
                    .extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| INPUT_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
                if ok {
                    files.push(e);
                } else {
                    skipped += 1;
                }
            }
        } else {
            files.push(p.clone());
        }
    }
    Ok((files, skipped))
}

/// Runs a checkpoint over inputs in batches, streaming: at most one batch of images is held.
pub struct Predictor<'a> {
    ckpt: &'a Checkpoint<Net>,
    ws: NetWorkspace,
    batch_size: usize,
    top_k: usize,
}

/// `MemAvailable` from `/proc/meminfo` (Linux); `None` elsewhere, when no check is made.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses an inference batch whose activations cannot fit in the available memory, before
/// allocating, with the estimate and the largest batch that fits.
pub fn check_batch_memory(model: &Net, batch: usize) -> Result<()> {
    let Some(avail) = available_memory() else {
        return Ok(());
    };
    let per = match model {
        Net::ViT(m) => crate::model::Workspace::bytes_per_image(m.config()),
        // A ResNet's evaluation uses the training workspace's buffers.
        Net::ResNet(m) => m.train_bytes_per_image(),
    }
    .max(1);
    // Each image's pixels are held too until its batch runs.
    let (c, h, w) = model.input();
    let per = per + 4 * (c * h * w) as u64;
    let need = per.saturating_mul(batch as u64);
    if need <= avail {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(crate::error::Error::BadInput(format!(
        "a batch of {batch} images needs about {:.1} GiB of activations but {:.1} GiB of memory \
         is available; use --batch-size {} or smaller",
        gib(need),
        gib(avail),
        (avail / per).max(1)
    )))
}

impl<'a> Predictor<'a> {
    pub fn new(ckpt: &'a Checkpoint<Net>, batch_size: usize, top_k: usize) -> Self {
        Predictor {
            ckpt,
            ws: NetWorkspace::for_net(&ckpt.model),
            batch_size: batch_size.max(1),
            top_k: top_k.max(1),
        }
    }

    /// Predicts every file, calling `emit` once per input in order. A file that fails to load
    /// is reported through `emit` as an error and the rest go on.
    pub fn run(&mut self, files: &[PathBuf], mut emit: impl FnMut(Result<Prediction>)) {
        let mut pending: Vec<(String, Tensor)> = vec![];
        for f in files {
            match self.ckpt.preprocess.load(f) {
                Ok(t) => pending.extend(split_batch(f, t)),
                Err(e) => {
                    self.flush(&mut pending, &mut emit);
                    emit(Err(e));
                    continue;
                }
            }
            if pending.len() >= self.batch_size {
                self.flush(&mut pending, &mut emit);
            }
        }
        self.flush(&mut pending, &mut emit);
    }

    fn flush(
        &mut self,
        pending: &mut Vec<(String, Tensor)>,
        emit: &mut impl FnMut(Result<Prediction>),
    ) {
        while !pending.is_empty() {
            let take = pending.len().min(self.batch_size);
            let chunk: Vec<(String, Tensor)> = pending.drain(..take).collect();
            match self.predict_batch(&chunk) {
                Ok(preds) => preds.into_iter().for_each(|p| emit(Ok(p))),
                Err(e) => emit(Err(e)),
            }
        }
    }

    fn predict_batch(&mut self, items: &[(String, Tensor)]) -> Result<Vec<Prediction>> {
        let one = items[0].1.numel();
        let mut data = Vec::with_capacity(one * items.len());
        items
            .iter()
            .for_each(|(_, t)| data.extend_from_slice(t.data()));
        let mut shape = items[0].1.shape().to_vec();
        shape.insert(0, items.len());
        let x = Tensor::new(shape, data)?;
        let logits = self.ckpt.model.logits(&x, &mut self.ws)?;
        // A ViT without a head gives its features.
        let k = (logits.len() / items.len()).max(1);
        let has_head = self.ckpt.model.num_classes() > 0;
        Ok(items
            .iter()
            .zip(logits.chunks_exact(k))
            .map(|((name, _), row)| {
                let top = if has_head {
                    top_k(row, self.top_k)
                        .into_iter()
                        .map(|(index, prob)| Class {
                            index,
                            label: self.ckpt.label(index),
                            prob,
                        })
                        .collect()
                } else {
                    vec![]
                };
                Prediction {
                    input: name.clone(),
                    top,
                    logits: row.to_vec(),
                }
            })
            .collect())
    }
}

/// `(B, C, H, W)` -> B items `(C, H, W)`, named `file` or `file[i]`.
fn split_batch(path: &Path, t: Tensor) -> Vec<(String, Tensor)> {
    let shape = t.shape().to_vec();
    let b = shape[0];
    let per = t.numel() / b.max(1);
    let name = path.display().to_string();
    t.data()
        .chunks_exact(per)
        .enumerate()
        .filter_map(|(i, c)| {
            let n = if b == 1 {
                name.clone()
            } else {
                format!("{name}[{i}]")
            };
            Tensor::new(shape[1..].to_vec(), c.to_vec())
                .ok()
                .map(|t| (n, t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_inference_batch_beyond_memory_is_refused_with_the_estimate() {
        let cfg = crate::config::ViTConfig::preset("B/16").unwrap();
        // 7.9 MB of activations and pixels per ViT-B image: 10 million images cannot fit.
        assert!(crate::model::Workspace::bytes_per_image(&cfg) > 7_000_000);
        let cfg = Net::ViT(crate::model::ViT::zeros(cfg).unwrap());
        if available_memory().is_none() {
            return; // no /proc/meminfo: nothing to check against
        }
        let e = check_batch_memory(&cfg, 10_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GiB of memory is available") && e.contains("--batch-size"),
            "{e}"
        );
        check_batch_memory(&cfg, 1).unwrap();
    }

    use super::*;

    #[test]
    fn top_k_orders_and_normalises() {
        let t = top_k(&[0.0, 3.0, 1.0, 3.0], 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = softmax(&[0.0, 3.0, 1.0, 3.0]).iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((t[0].1 - t[1].1).abs() < 1e-7);
    }
}
