//! Batches from a [`Dataset`], built by worker threads (decoding, augmentation, mixing,
//! normalisation) ahead of the training loop with a bounded prefetch queue, so the matrix
//! products never wait for data. Order and augmentation depend only on (seed, epoch,
//! batch index): a run is reproducible and resumable mid-epoch, whatever the thread timing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::augment::{mix_batch, Augment};
use super::Dataset;
use crate::error::{Error, Result};
use crate::model::Rng;
use crate::tensor::Tensor;

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// Position in the epoch.
    pub index: usize,
    /// `(B, C, H, W)`, normalised.
    pub images: Tensor,
    /// `(B)` class indices.
    pub labels: Vec<usize>,
    /// `(B, K)` soft targets when the batch was mixed.
    pub soft: Option<Vec<f32>>,
}

/// How to draw batches.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Leave out the last, incomplete batch (training).
    pub drop_last: bool,
    pub seed: u64,
    pub epoch: u64,
    /// First batch to produce (resuming mid-epoch).
    pub start_batch: usize,
    pub workers: usize,
    /// Batches buffered ahead.
    pub prefetch: usize,
    pub augment: Augment,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Classes, for soft targets.
    pub num_classes: usize,
}

impl LoaderConfig {
    /// Every item once, in order, unaugmented, the last batch kept: evaluation and analysis.
    pub fn in_order(batch_size: usize, mean: &[f32], std: &[f32], num_classes: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            epoch: 0,
            start_batch: 0,
            workers: 1,
            prefetch: 2,
            augment: Augment::default(),
            mean: mean.to_vec(),
            std: std.to_vec(),
            num_classes,
        }
    }
}

/// Mixes the numbers into one seed (SplitMix-style).
pub fn derive_seed(parts: &[u64]) -> u64 {
    let mut r = Rng::new(0x1234_5678_9ABC_DEF0);
    let mut s = 0u64;
    for &p in parts {
        r = Rng::new(r.next_u64() ^ p);
        s = r.next_u64();
    }
    s
}

/// Number of batches in an epoch of `n` items.
pub fn batches_per_epoch(n: usize, batch: usize, drop_last: bool) -> usize {
    if drop_last {
        n / batch.max(1)
    } else {
        n.div_ceil(batch.max(1))
    }
}

pub struct Loader {
    rx: Option<Receiver<(usize, Result<Batch>)>>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    end: usize,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Loader {
    pub fn new(data: Arc<dyn Dataset>, cfg: LoaderConfig) -> Result<Self> {
        let (c, h, w) = data.shape();
        if cfg.mean.len() != c || cfg.std.len() != c {
            return Err(Error::InvalidConfig(format!(
                "normalisation has {} means for {c} channels",
                cfg.mean.len()
            )));
        }
        let end = batches_per_epoch(data.len(), cfg.batch_size, cfg.drop_last);
        let mut order: Vec<usize> = (0..data.len()).collect();
        if cfg.shuffle {
            Rng::new(derive_seed(&[cfg.seed, cfg.epoch, 1])).shuffle(&mut order);
        }
        let order = Arc::new(order);
        let start = cfg.start_batch.min(end);
        let counter = Arc::new(AtomicUsize::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let cfg = Arc::new(cfg);
        let handles = (0..cfg.workers.max(1))
            .map(|_| {
                let (data, order, counter, stop, tx, cfg) = (
                    data.clone(),
                    order.clone(),
                    counter.clone(),
                    stop.clone(),
                    tx.clone(),
                    cfg.clone(),
                );
                std::thread::spawn(move || {
                    let mut tmp = Vec::new();
                    loop {
                        let j = counter.fetch_add(1, Ordering::SeqCst);
                        if j >= end || stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let b = make_batch(&*data, &order, j, &cfg, (c, h, w), &mut tmp);
                        if tx.send((j, b)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Ok(Loader {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: start,
            end,
            stop,
            handles,
        })
    }
}

fn make_batch(
    data: &dyn Dataset,
    order: &[usize],
    j: usize,
    cfg: &LoaderConfig,
    (c, h, w): (usize, usize, usize),
    tmp: &mut Vec<u8>,
) -> Result<Batch> {
    let lo = j * cfg.batch_size;
    let hi = (lo + cfg.batch_size).min(order.len());
    let b = hi - lo;
    let n = c * h * w;
    let mut rng = Rng::new(derive_seed(&[cfg.seed, cfg.epoch, j as u64, 2]));
    let mut images = vec![0.0f32; b * n];
    let mut labels = Vec::with_capacity(b);
    let mut px = vec![0u8; n];
    for (slot, &i) in order[lo..hi].iter().enumerate() {
        data.image(i, &mut px)?;
        cfg.augment.apply(&mut px, (c, h, w), &mut rng, tmp);
        let out = &mut images[slot * n..(slot + 1) * n];
        for ch in 0..c {
            let (m, s) = (cfg.mean[ch], cfg.std[ch]);
            for (o, &p) in out[ch * h * w..(ch + 1) * h * w]
                .iter_mut()
                .zip(&px[ch * h * w..(ch + 1) * h * w])
            {
                *o = (p as f32 / 255.0 - m) / s;
            }
        }
        labels.push(data.label(i));
    }
    let soft = cfg.augment.mixes().then(|| {
        mix_batch(
            &cfg.augment,
            &mut images,
            &labels,
            cfg.num_classes,
            (c, h, w),
            &mut rng,
        )
    });
    Ok(Batch {
        index: j,
        images: Tensor::new(vec![b, c, h, w], images)?,
        labels,
        soft,
    })
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.end {
            return None;
        }
        loop {
            if let Some(b) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(b);
            }
            match self.rx.as_ref()?.recv() {
                Ok((j, b)) => {
                    self.pending.insert(j, b);
                }
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Dropping the receiver unblocks workers waiting to send.
        self.rx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemory;

    fn data(n: usize) -> Arc<dyn Dataset> {
        Arc::new(InMemory {
            c: 1,
            h: 2,
            w: 2,
            pixels: (0..n * 4).map(|i| (i / 4) as u8).collect(),
            labels: (0..n as u32).map(|i| i % 3).collect(),
            classes: vec!["a".into(), "b".into(), "c".into()],
        })
    }

    fn cfg(workers: usize, start: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 4,
            shuffle: true,
            drop_last: true,
            seed: 7,
            epoch: 3,
            start_batch: start,
            workers,
            prefetch: 2,
            augment: Augment::default(),
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
            num_classes: 3,
        }
    }

    #[test]
    fn order_is_deterministic_whatever_the_workers_and_resumes_mid_epoch() {
        let firsts = |w: usize, s: usize| -> Vec<f32> {
            Loader::new(data(30), cfg(w, s))
                .unwrap()
                .map(|b| b.unwrap().images.data()[0])
                .collect()
        };
        let one = firsts(1, 0);
        assert_eq!(one.len(), 7); // 30 items, batches of 4, last dropped
        assert_eq!(one, firsts(3, 0));
        assert_eq!(&one[2..], &firsts(2, 2)[..]);
        // A permutation: every item appears at most once per epoch.
        let all: Vec<f32> = Loader::new(data(30), cfg(2, 0))
            .unwrap()
            .flat_map(|b| b.unwrap().images.into_data())
            .collect();
        let mut items: Vec<u32> = all.chunks(4).map(|c| c[0].round() as u32).collect();
        items.sort();
        items.dedup();
        assert_eq!(items.len(), 28);
    }

    #[test]
    fn dropping_early_stops_the_workers() {
        let mut l = Loader::new(
            data(1000),
            LoaderConfig {
                batch_size: 1,
                ..cfg(2, 0)
            },
        )
        .unwrap();
        assert!(l.next().is_some());
        drop(l);
    }
}
