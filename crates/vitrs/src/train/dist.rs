//! Synchronous data-parallel training across processes: what the trainer needs from a
//! communicator. [`Single`] is one process (every collective a no-op); `vit`'s `mpi` feature
//! supplies one over MPI. Each rank trains on its own share of every global batch, the
//! gradients are averaged over the ranks before each optimizer step, so every rank takes the
//! same step on the same parameters; rank 0 alone reports and writes files.

/// The collectives synchronous data parallelism needs. Every rank must call each one, in the
/// same order.
pub trait Collective {
    /// This process's index, `0..size()`.
    fn rank(&self) -> usize;
    /// How many processes take part.
    fn size(&self) -> usize;
    /// Replaces `buf` with its element-wise sum over all ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]);

    /// Replaces `buf` with its element-wise mean over all ranks.
    fn all_reduce_mean(&self, buf: &mut [f32]) {
        if self.size() > 1 {
            self.all_reduce_sum(buf);
            let s = 1.0 / self.size() as f32;
            buf.iter_mut().for_each(|v| *v *= s);
        }
    }
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
    use super::Collective;
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
                    r.all_reduce_mean(&mut m);
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
        Single.all_reduce_mean(&mut x);
        assert_eq!(x, vec![2.0]);
    }
}
