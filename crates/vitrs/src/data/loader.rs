//! Batches from a [`Dataset`], built by worker threads (decoding, augmentation, mixing,
//! normalisation) ahead of the training loop with a bounded prefetch queue, so the matrix
//! products never wait for data. Order and augmentation depend only on (seed, epoch,
//! batch index): a run is reproducible and resumable mid-epoch, whatever the thread timing.
//!
//! A sharded dataset ([`Dataset::shards`]) is shuffled the way streaming loaders do it: the
//! shards in a seeded order, read one after the other, through a seeded shuffle buffer of
//! `shuffle_buffer` items; reads stay sequential within a shard. A sample that cannot be
//! decoded is left out of its batch and counted ([`Loader::skipped`]) when `skip_unreadable`
//! is set, and is an error naming it otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Items in the shuffle buffer of a sharded dataset.
    pub shuffle_buffer: usize,
    /// Leave an undecodable item out of its batch (and count it) instead of failing.
    pub skip_unreadable: bool,
    /// Data parallel training: this process takes the `rank`-th of `world` equal shares of
    /// every batch of `batch_size` images (the global batch); 0 of 1 takes all of it.
    pub rank: usize,
    pub world: usize,
}

/// The default shuffle buffer of a sharded dataset, in items.
pub const DEFAULT_SHUFFLE_BUFFER: usize = 10_000;

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
            shuffle_buffer: DEFAULT_SHUFFLE_BUFFER,
            skip_unreadable: false,
            rank: 0,
            world: 1,
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

/// The order of an epoch's items: everything in order, a permutation, or for a sharded
/// dataset the shards in a seeded order through a seeded shuffle buffer of `buffer` items.
pub fn epoch_order(
    data: &dyn Dataset,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    buffer: usize,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    if !shuffle {
        return order;
    }
    let Some(mut shards) = data.shards() else {
        Rng::new(derive_seed(&[seed, epoch, 1])).shuffle(&mut order);
        return order;
    };
    Rng::new(derive_seed(&[seed, epoch, 3])).shuffle(&mut shards);
    let mut rng = Rng::new(derive_seed(&[seed, epoch, 4]));
    let cap = buffer.max(1);
    let mut buf = Vec::with_capacity(cap.min(data.len()));
    order.clear();
    for i in shards.into_iter().flatten() {
        if buf.len() < cap {
            buf.push(i);
            continue;
        }
        let k = rng.below(cap);
        order.push(std::mem::replace(&mut buf[k], i));
    }
    rng.shuffle(&mut buf);
    order.extend(buf);
    order
}

pub struct Loader {
    rx: Option<Receiver<(usize, Result<Batch>)>>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    end: usize,
    stop: Arc<AtomicBool>,
    /// The next batch the consumer returns, which the workers stay within `window` of.
    returned: Arc<(Mutex<usize>, Condvar)>,
    handles: Vec<JoinHandle<()>>,
    skipped: Arc<Mutex<Skips>>,
}

/// Items left out: how many, and the messages of the first few.
#[derive(Default)]
struct Skips {
    count: usize,
    first: Vec<String>,
}

impl Loader {
    /// Items left out of their batches because they could not be decoded, and why (the
    /// messages of the first few).
    pub fn skipped(&self) -> (usize, Vec<String>) {
        let s = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        (s.count, s.first.clone())
    }
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
        let order = Arc::new(epoch_order(
            &*data,
            cfg.shuffle,
            cfg.seed,
            cfg.epoch,
            cfg.shuffle_buffer,
        ));
        let skipped = Arc::new(Mutex::new(Skips::default()));
        let start = cfg.start_batch.min(end);
        let counter = Arc::new(AtomicUsize::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        // Batches made ahead of the one the consumer waits for, at most: those in the channel
        // and one a worker. Without it, a worker stalled on a batch (descheduled, or decoding
        // a large file) left the others running on, their batches held in `pending` until it
        // caught up: a training run on 2 cores peaked at 80-90 MiB instead of 45 on some runs.
        let window = cfg.prefetch.max(1) + cfg.workers.max(1);
        let returned = Arc::new((Mutex::new(start), Condvar::new()));
        let cfg = Arc::new(cfg);
        let handles = (0..cfg.workers.max(1))
            .map(|_| {
                let (data, order, counter, stop, tx, cfg, skipped, returned) = (
                    data.clone(),
                    order.clone(),
                    counter.clone(),
                    stop.clone(),
                    tx.clone(),
                    cfg.clone(),
                    skipped.clone(),
                    returned.clone(),
                );
                std::thread::spawn(move || {
                    let mut tmp = Vec::new();
                    loop {
                        let j = counter.fetch_add(1, Ordering::SeqCst);
                        if j >= end || stop.load(Ordering::SeqCst) {
                            return;
                        }
                        // Batch `j` waits until it is within `window` of the consumer.
                        let (lock, cv) = &*returned;
                        let mut at = lock.lock().unwrap_or_else(|e| e.into_inner());
                        while j >= *at + window && !stop.load(Ordering::SeqCst) {
                            at = cv.wait(at).unwrap_or_else(|e| e.into_inner());
                        }
                        drop(at);
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let b = make_batch(&*data, &order, j, &cfg, (c, h, w), &mut tmp, &skipped);
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
            returned,
            handles,
            skipped,
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
    skipped: &Mutex<Skips>,
) -> Result<Batch> {
    let (mut lo, mut hi) = (j * cfg.batch_size, (j + 1) * cfg.batch_size);
    // This rank's share of the global batch, and augmentation draws of its own.
    let mut rng = if cfg.world > 1 {
        let share = cfg.batch_size / cfg.world;
        lo += cfg.rank * share;
        hi = lo + share;
        Rng::new(derive_seed(&[
            cfg.seed,
            cfg.epoch,
            j as u64,
            2,
            cfg.rank as u64 + 1,
        ]))
    } else {
        Rng::new(derive_seed(&[cfg.seed, cfg.epoch, j as u64, 2]))
    };
    let hi = hi.min(order.len());
    let lo = lo.min(hi);
    let n = c * h * w;
    let mut images = vec![0.0f32; (hi - lo) * n];
    let mut labels = Vec::with_capacity(hi - lo);
    let mut px = vec![0u8; n];
    for &i in &order[lo..hi] {
        if let Err(e) = data.image(i, &mut px) {
            if !cfg.skip_unreadable {
                return Err(e);
            }
            let mut s = skipped.lock().unwrap_or_else(|e| e.into_inner());
            s.count += 1;
            if s.first.len() < 3 {
                s.first.push(e.to_string());
            }
            continue;
        }
        cfg.augment.apply(&mut px, (c, h, w), &mut rng, tmp);
        let slot = labels.len();
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
    let b = labels.len();
    if b == 0 {
        let s = skipped.lock().unwrap_or_else(|e| e.into_inner());
        return Err(Error::BadInput(format!(
            "no item of batch {j} could be decoded (e.g. {})",
            s.first.first().cloned().unwrap_or_default()
        )));
    }
    images.truncate(b * n);
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
                let (lock, cv) = &*self.returned;
                *lock.lock().unwrap_or_else(|e| e.into_inner()) = self.next;
                cv.notify_all();
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
        // Wakes the workers waiting for their turn (under the lock, so that none misses it
        // between its test of `stop` and its wait)...
        {
            let (lock, cv) = &*self.returned;
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            cv.notify_all();
        }
        // ...and dropping the receiver unblocks those waiting to send.
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

    /// `n` items of 2 × 2 pixels holding the item's index, in 3 classes.
    fn in_memory(n: usize) -> InMemory {
        InMemory {
            c: 1,
            h: 2,
            w: 2,
            pixels: (0..n * 4).map(|i| (i / 4) as u8).collect(),
            labels: (0..n as u32).map(|i| i % 3).collect(),
            classes: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    fn data(n: usize) -> Arc<dyn Dataset> {
        Arc::new(in_memory(n))
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
            shuffle_buffer: 8,
            skip_unreadable: false,
            rank: 0,
            world: 1,
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

    /// [`in_memory`]'s items, with a few things a real dataset does: an item that cannot be
    /// decoded, one slow to read, shards; and the furthest item asked for, recorded.
    struct Hooked {
        items: InMemory,
        bad: Option<usize>,
        slow: Option<usize>,
        shard_len: Option<usize>,
        furthest: AtomicUsize,
    }

    impl Hooked {
        fn new(n: usize) -> Self {
            Hooked {
                items: in_memory(n),
                bad: None,
                slow: None,
                shard_len: None,
                furthest: AtomicUsize::new(0),
            }
        }
    }

    impl Dataset for Hooked {
        fn len(&self) -> usize {
            self.items.len()
        }
        fn shape(&self) -> (usize, usize, usize) {
            self.items.shape()
        }
        fn classes(&self) -> &[String] {
            self.items.classes()
        }
        fn label(&self, i: usize) -> usize {
            self.items.label(i)
        }
        fn image(&self, i: usize, out: &mut [u8]) -> Result<()> {
            if self.bad == Some(i) {
                return Err(Error::BadInput(format!("item {i}: not an image")));
            }
            if self.slow == Some(i) {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            self.furthest.fetch_max(i, Ordering::SeqCst);
            self.items.image(i, out)
        }
        fn shards(&self) -> Option<Vec<std::ops::Range<usize>>> {
            let len = self.shard_len?;
            Some(
                (0..self.len())
                    .step_by(len)
                    .map(|s| s..(s + len).min(self.len()))
                    .collect(),
            )
        }
    }

    /// While one worker is stuck on a batch, the others make at most the prefetch window's
    /// batches past it (they used to run on to the end of the epoch, each batch held until
    /// the stuck one arrived), and the batches still come in order.
    #[test]
    fn workers_stay_within_the_prefetch_window_of_a_slow_batch() {
        let n = 200;
        let slow = Arc::new(Hooked {
            slow: Some(0),
            ..Hooked::new(n)
        });
        let mut c = cfg(2, 0);
        c.shuffle = false;
        let (window, batch) = (c.prefetch + c.workers, c.batch_size);
        let mut loader = Loader::new(slow.clone(), c).unwrap();
        let first = loader.next().unwrap().unwrap();
        assert_eq!(first.images.data()[0], 0.0);
        // Batch 0 returned, a worker may have started batch `window` since.
        let furthest = slow.furthest.load(Ordering::SeqCst);
        assert!(
            furthest < (window + 1) * batch,
            "item {furthest} read while batch 0 was still being made (window: {window} batches of {batch})"
        );
        // Each batch's first item (its pixels hold its index), in order.
        let rest: Vec<usize> = loader
            .map(|b| b.unwrap().images.data()[0].round() as usize)
            .collect();
        let want: Vec<usize> = (1..n / batch).map(|k| k * batch).collect();
        assert_eq!(rest, want);
    }

    #[test]
    fn sharded_data_is_read_shard_by_shard_through_a_buffer() {
        // Shards of 10 items; item 13 cannot be decoded.
        let ds = Hooked {
            bad: Some(13),
            shard_len: Some(10),
            ..Hooked::new(100)
        };
        let order = epoch_order(&ds, true, 7, 0, 8);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "not a permutation");
        assert_eq!(order, epoch_order(&ds, true, 7, 0, 8), "not deterministic");
        assert_ne!(
            order,
            epoch_order(&ds, true, 7, 1, 8),
            "the same in every epoch"
        );
        // Streaming: consecutive draws mostly come from the same shard (a permutation of all
        // 100 items puts one pair in ten in the same shard).
        let same =
            |o: &[usize]| o.windows(2).filter(|p| p[0] / 10 == p[1] / 10).count() as f32 / 99.0;
        assert!(same(&order) > 0.3, "{order:?}");
        assert!(same(&epoch_order(&*data(100), true, 7, 0, 8)) < 0.25);
        // Not in shard order within a shard either.
        assert!(order
            .windows(2)
            .any(|p| p[1] != p[0] + 1 && p[0] / 10 == p[1] / 10));
        assert_eq!(
            epoch_order(&ds, false, 7, 0, 8),
            (0..100).collect::<Vec<_>>()
        );

        // The undecodable item is left out of its batch and counted, or stops the loader.
        let ds: Arc<dyn Dataset> = Arc::new(ds);
        let c = LoaderConfig {
            batch_size: 10,
            skip_unreadable: true,
            ..cfg(2, 0)
        };
        let mut l = Loader::new(ds.clone(), c.clone()).unwrap();
        let sizes: Vec<usize> = l.by_ref().map(|b| b.unwrap().labels.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 99);
        assert_eq!(sizes.iter().filter(|&&s| s == 9).count(), 1);
        let (n, why) = l.skipped();
        assert_eq!((n, why.len()), (1, 1));
        assert!(why[0].contains("item 13"));
        let strict = Loader::new(
            ds,
            LoaderConfig {
                skip_unreadable: false,
                ..c
            },
        )
        .unwrap();
        assert!(strict.into_iter().any(|b| b.is_err()));
    }

    /// Two ranks together draw exactly the batches one process draws.
    #[test]
    fn ranks_share_every_batch() {
        let all: Vec<Vec<f32>> = Loader::new(data(30), cfg(1, 0))
            .unwrap()
            .map(|b| b.unwrap().images.into_data())
            .collect();
        let share = |rank| -> Vec<Vec<f32>> {
            Loader::new(
                data(30),
                LoaderConfig {
                    rank,
                    world: 2,
                    ..cfg(2, 0)
                },
            )
            .unwrap()
            .map(|b| b.unwrap().images.into_data())
            .collect()
        };
        let (a, b) = (share(0), share(1));
        assert_eq!(a.len(), all.len());
        for ((x, y), whole) in a.iter().zip(&b).zip(&all) {
            assert_eq!([x.as_slice(), y.as_slice()].concat(), *whole);
        }
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
