//! Synchronous data-parallel training across processes: what the trainer needs from a
//! communicator. [`Single`] is one process (every collective a no-op); `vit`'s `mpi` feature
//! supplies one over MPI. Each rank trains on its own share of every global batch, the
//! gradients are averaged over the ranks before each optimizer step, so every rank takes the
//! same step on the same parameters; rank 0 alone reports and writes files.
//!
//! The sum overlaps the backward pass: the backward finishes the gradient buffer in pieces
//! (the head's, then each block's, last to first, then the embedding's:
//! [`ViT::grad_pieces`](crate::ViT::grad_pieces)); [`Buckets`] gathers the pieces into buckets
//! of at least `[train] bucket_mb` ([`BUCKET_BYTES`] by default) and starts each bucket's sum ([`Collective::start_sum`]) while
//! the backward goes on; [`Collective::finish_sums`] waits for them after the last piece.

use std::ops::Range;

/// The collectives synchronous data parallelism needs. Every rank must call each one, in the
/// same order.
pub trait Collective {
    /// This process's index, `0..size()`.
    fn rank(&self) -> usize;
    /// How many processes take part.
    fn size(&self) -> usize;
    /// Replaces `buf` with its element-wise sum over all ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]);

    /// Starts summing `data` — `grads[offset..offset + data.len()]` of the buffer later given
    /// to [`finish_sums`](Self::finish_sums) — over all ranks, without waiting for the result.
    /// A communicator that cannot overlap does nothing here; `finish_sums` then sums it all.
    fn start_sum(&self, offset: usize, data: &[f32]) {
        let _ = (offset, data);
    }

    /// Waits for every sum started since the last call and writes them into `grads`; sums,
    /// blocking, whatever of `grads` was not started. Afterwards all of `grads` is the sum
    /// over the ranks, as after [`all_reduce_sum`](Self::all_reduce_sum).
    fn finish_sums(&self, grads: &mut [f32]) {
        self.all_reduce_sum(grads);
    }

    /// [`finish_sums`](Self::finish_sums), then divides by the number of ranks: `grads` is
    /// the element-wise mean over all ranks (what the optimizer step takes).
    fn finish_means(&self, grads: &mut [f32]) {
        if self.size() > 1 {
            self.finish_sums(grads);
            let s = 1.0 / self.size() as f32;
            grads.iter_mut().for_each(|v| *v *= s);
        }
    }
}

/// The smallest bucket whose sum is started on its own, by default (`[train] bucket_mb`,
/// 0.125 MB): small enough that every block of the demo model (134 KB of gradients) or larger
/// goes as soon as it is done, large enough that a tiny model's pieces do not each pay a
/// message's latency. (On the demo model, 2 ranks on 2 cores, the wait left after the
/// backward was 5.0 ms per step with one bucket, 1.7 ms with one per block.)
pub const BUCKET_BYTES: usize = 1 << 17;

/// Gathers the gradient pieces the backward hands over (contiguous, descending) into buckets
/// of at least `min_elems` and starts each one's sum as it fills.
pub struct Buckets<'a> {
    comm: &'a dyn Collective,
    min_elems: usize,
    /// The bucket being filled: a range of the gradient buffer.
    open: Option<Range<usize>>,
    /// Elements whose sum was started.
    pub started: usize,
}

impl<'a> Buckets<'a> {
    pub fn new(comm: &'a dyn Collective, min_bytes: usize) -> Self {
        Buckets {
            comm,
            min_elems: (min_bytes / 4).max(1),
            open: None,
            started: 0,
        }
    }

    /// Adds the finished piece `grads[piece]`, starting the bucket's sum when it is full.
    pub fn add(&mut self, piece: Range<usize>, grads: &[f32]) {
        let bucket = match self.open.take() {
            // Pieces come last to first: the new one ends where the open bucket starts.
            Some(open) if piece.end == open.start => piece.start..open.end,
            Some(open) => {
                self.start(open, grads);
                piece
            }
            None => piece,
        };
        if bucket.len() >= self.min_elems {
            self.start(bucket, grads);
        } else {
            self.open = Some(bucket);
        }
    }

    /// Starts the sum of what is left in the open bucket.
    pub fn flush(&mut self, grads: &[f32]) {
        if let Some(open) = self.open.take() {
            self.start(open, grads);
        }
    }

    fn start(&mut self, r: Range<usize>, grads: &[f32]) {
        self.started += r.len();
        self.comm.start_sum(r.start, &grads[r]);
    }
}

/// The parts of `0..len` that none of the (disjoint) `started` ranges covers, in order.
pub fn uncovered(len: usize, started: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut sorted: Vec<Range<usize>> = started.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut gaps = vec![];
    let mut at = 0;
    for r in sorted {
        if r.start > at {
            gaps.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < len {
        gaps.push(at..len);
    }
    gaps
}

/// One process: nothing to exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
}

/// Ranks simulated by threads in one process, for tests: `all_reduce_sum` waits for every
/// rank's buffer and gives each the sum.
pub mod threads {
    use super::{uncovered, Collective};
    use std::cell::RefCell;
    use std::sync::{Arc, Barrier, Mutex};

    struct Shared {
        sum: Mutex<Vec<f32>>,
        barrier: Barrier,
    }

    /// One rank of a group made by [`group`].
    pub struct ThreadRank {
        rank: usize,
        size: usize,
        shared: Arc<Shared>,
        /// Sums started by `start_sum`, with where they go.
        started: RefCell<Vec<(usize, Vec<f32>)>>,
    }

    /// `size` ranks that reduce through shared memory; give one to each thread.
    pub fn group(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            sum: Mutex::new(vec![]),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| ThreadRank {
                rank,
                size,
                shared: shared.clone(),
                started: RefCell::default(),
            })
            .collect()
    }

    impl Collective for ThreadRank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            // Ranks add in rank order (one after another), so the sum is the same on every
            // run.
            for r in 0..self.size {
                if r == self.rank {
                    let mut s = self.shared.sum.lock().unwrap_or_else(|e| e.into_inner());
                    if r == 0 {
                        s.clear();
                        s.extend_from_slice(buf);
                    } else {
                        s.iter_mut().zip(buf.iter()).for_each(|(a, b)| *a += b);
                    }
                }
                self.shared.barrier.wait();
            }
            buf.copy_from_slice(&self.shared.sum.lock().unwrap_or_else(|e| e.into_inner()));
            self.shared.barrier.wait();
        }
        // Summed at once (threads have nothing to overlap with) but written back only by
        // `finish_sums`, as a communicator that overlaps would.
        fn start_sum(&self, offset: usize, data: &[f32]) {
            let mut sum = data.to_vec();
            self.all_reduce_sum(&mut sum);
            self.started.borrow_mut().push((offset, sum));
        }
        fn finish_sums(&self, grads: &mut [f32]) {
            let started = std::mem::take(&mut *self.started.borrow_mut());
            let ranges: Vec<_> = started.iter().map(|(o, s)| *o..*o + s.len()).collect();
            for (r, (_, sum)) in ranges.iter().zip(&started) {
                grads[r.clone()].copy_from_slice(sum);
            }
            for gap in uncovered(grads.len(), &ranges) {
                self.all_reduce_sum(&mut grads[gap]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ranks_sum_and_average() {
        let ranks = threads::group(3);
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let mut v = vec![r.rank() as f32, 1.0];
                    r.all_reduce_sum(&mut v);
                    let mut m = vec![r.rank() as f32 * 3.0];
                    r.finish_means(&mut m);
                    (v, m)
                })
            })
            .collect();
        for h in handles {
            let (v, m) = h.join().unwrap();
            assert_eq!(v, vec![3.0, 3.0]);
            assert_eq!(m, vec![3.0]);
        }
        let mut x = vec![2.0];
        Single.finish_means(&mut x);
        assert_eq!(x, vec![2.0]);
    }

    #[test]
    fn uncovered_ranges_are_the_gaps() {
        assert_eq!(uncovered(10, &[6..8, 0..2]), vec![2..6, 8..10]);
        let whole: Vec<Range<usize>> = std::iter::once(0..4).collect();
        assert_eq!(uncovered(4, &[]), whole);
        assert_eq!(uncovered(4, &whole), Vec::<Range<usize>>::new());
    }

    /// Pieces handed over last to first become buckets of at least the minimum (the last one
    /// whatever is left); started and unstarted parts both end up summed.
    #[test]
    fn buckets_gather_pieces_and_every_element_is_summed() {
        let ranks = threads::group(2);
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let n = 20;
                    let mut g: Vec<f32> = (0..n).map(|i| (i * (r.rank() + 1)) as f32).collect();
                    let mut b = Buckets::new(&r, 6 * 4);
                    // Pieces of 4 elements, descending; the first 4 elements never handed over.
                    for start in [16, 12, 8, 4] {
                        b.add(start..start + 4, &g);
                    }
                    b.flush(&g);
                    let started = b.started;
                    r.finish_sums(&mut g);
                    (started, g)
                })
            })
            .collect();
        for h in handles {
            let (started, g) = h.join().unwrap();
            assert_eq!(started, 16);
            let want: Vec<f32> = (0..20).map(|i| (i * 3) as f32).collect();
            assert_eq!(g, want);
        }
    }
}
