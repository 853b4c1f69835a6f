//! The compute threads' fork/join: [`for_each`] runs `f(0..count)` on a team of threads that
//! wait for the next operation by spinning, not sleeping.
//!
//! A forward pass is a chain of short parallel operations (a ViT-Ti block at batch 1 is seven
//! of them, 100–300 µs each). Rayon's workers go to sleep a few microseconds after their work
//! runs out, and a caller outside the pool sleeps while it waits: every operation paid three
//! context switches and a wake-up of a halted virtual CPU (`perf`: a fifth of the samples of
//! `vit bench --model Ti/16` in the scheduler). Here the caller takes part in the work, and
//! the team's workers wait for the next operation for 2 ms (spinning, then yielding the
//! CPU to any other thread that wants it) before they park, so inside a
//! forward or a training step an operation starts in well under a microsecond — what an
//! OpenMP runtime does with its block time.
//!
//! One caller at a time holds the team. A caller that finds it taken (another thread's model,
//! tests running side by side) and a call from inside a rayon pool (`ThreadPool::install`, whose
//! thread count the kernels then plan for) fall back to rayon; a call nested in a team task
//! (on a worker, or on the caller among its tasks) runs inline, and [`threads`] tells the
//! kernels so (inference image by image runs a whole forward pass per task). The result never
//! depends on which threads ran it.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::SyncPtr;

/// How long an idle worker waits for the next operation before it parks: spinning for the
/// first [`SPIN_HOT`], then yielding its CPU between looks.
const SPIN: Duration = Duration::from_millis(2);
const SPIN_HOT: Duration = Duration::from_micros(100);

thread_local! {
    /// Set while this thread runs tasks of a [`for_each`]: always on the team's own workers,
    /// and on a caller while it claims its operation's tasks. A nested [`for_each`] there
    /// runs inline.
    static ON_TEAM: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as running tasks of a [`for_each`] until dropped (also when a
/// task panics), then restores what it was.
struct InTask(bool);

impl InTask {
    fn enter() -> Self {
        InTask(ON_TEAM.with(|t| t.replace(true)))
    }
}

impl Drop for InTask {
    fn drop(&mut self) {
        ON_TEAM.with(|t| t.set(self.0));
    }
}

/// The threads a kernel called here may split its work over: 1 inside a task of
/// [`for_each`] (a nested one runs inline, on that thread), rayon's pool's otherwise.
pub fn threads() -> usize {
    if ON_TEAM.with(Cell::get) {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `f(i)` for every `i` in `0..count`, each exactly once, on the compute threads (the
/// calling thread among them), and returns when all have run. A panic in `f` is re-raised
/// here once every index has finished.
pub fn for_each(count: usize, f: impl Fn(usize) + Sync) {
    if count == 0 {
        return;
    }
    if count == 1 || ON_TEAM.with(Cell::get) {
        return (0..count).for_each(f);
    }
    // Inside a rayon pool (whose thread count the kernels planned for), or with the team
    // held by another caller: rayon.
    if rayon::current_thread_index().is_some() || global().try_run(count, &f).is_err() {
        (0..count).into_par_iter().for_each(&f);
    }
}

/// `f(i, chunk)` for every `chunk`-long piece `i` of `data` (the last may be shorter), in
/// parallel as [`for_each`].
pub fn for_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = data.len();
    let base = SyncPtr(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: the pieces are disjoint and inside `data`, which is borrowed mutably for
        // the whole call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, piece)
    });
}

/// The process's team: one worker per thread of rayon's global pool but one (the caller is
/// the last), started on first use.
fn global() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team::new(rayon::current_num_threads().saturating_sub(1)))
}

/// The team was held by another caller.
#[derive(Debug)]
pub(crate) struct Busy;

/// A fixed set of worker threads and the operation they are running.
pub(crate) struct Team {
    shared: Arc<Shared>,
    workers: usize,
    /// Held by the caller whose operation runs.
    owner: Mutex<()>,
}

/// The operation of one [`Team::try_run`] as the workers see it.
struct Shared {
    /// Epoch (high 32 bits) and next unclaimed index (low 32): a worker claims index `i` of
    /// epoch `e` by moving `(e, i)` to `(e, i + 1)`, so it can never claim an index of an
    /// operation other than the one whose job it then reads.
    state: AtomicU64,
    /// The operation: its epoch (high 32 bits) and `count` (low 32), and the address of
    /// `f: &(dyn Fn(usize) + Sync)` on the caller's stack. Written before the epoch is
    /// published; `count` is read before a claim, `data` after a successful one. The epoch
    /// beside the count lets a worker still looking at a finished operation tell its count
    /// from the next operation's, being written (see `claim_all`).
    count: AtomicU64,
    data: AtomicUsize,
    /// Indices finished in this epoch.
    done: AtomicUsize,
    /// A task panicked in this epoch.
    panicked: AtomicBool,
    /// Parked workers, and where they park.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

impl Team {
    /// A team of `workers` threads besides its callers.
    pub(crate) fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            count: AtomicU64::new(0),
            data: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for i in 0..workers {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("vitrs-team-{i}"))
                .spawn(move || s.work());
            // Without the thread (a process at its limit), the team is smaller: the caller
            // claims whatever no worker does.
            if spawned.is_ok() {
                started += 1;
            }
        }
        Team {
            shared,
            workers: started,
            owner: Mutex::new(()),
        }
    }

    /// Runs `f(0..count)` on the team and the calling thread, or `Busy` when another caller
    /// holds the team.
    pub(crate) fn try_run(&self, count: usize, f: &(dyn Fn(usize) + Sync)) -> Result<(), Busy> {
        let _held = match self.owner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return Err(Busy),
            // A caller panicked while holding it; the state is consistent between operations.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if self.workers == 0 || count > u32::MAX as usize {
            let _task = InTask::enter();
            (0..count).for_each(f);
            return Ok(());
        }
        let s = &*self.shared;
        let fref: &&(dyn Fn(usize) + Sync) = &f;
        let epoch = (s.state.load(Relaxed) >> 32).wrapping_add(1) & 0xFFFF_FFFF;
        s.count.store((epoch << 32) | count as u64, Relaxed);
        s.data.store(fref as *const _ as usize, Relaxed);
        s.done.store(0, Relaxed);
        s.panicked.store(false, Relaxed);
        // Publishes the job above (Release; SeqCst also orders it before reading `sleepers`,
        // against a worker that checks the epoch and then parks).
        s.state.store(epoch << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        // The caller's tasks run as the workers' do: anything they split runs inline.
        let task = InTask::enter();
        s.claim_all(epoch);
        drop(task);
        // Every index claimed; wait for the workers' ones to finish (they read `f`, which
        // lives on this stack frame).
        let mut spins = 0u32;
        while s.done.load(Acquire) < count {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if s.panicked.load(Relaxed) {
            resume_unwind(Box::new("a parallel task panicked (see the message above)"));
        }
        Ok(())
    }
}

impl Shared {
    /// Claims and runs indices of operation `epoch` until none are left.
    fn claim_all(&self, epoch: u64) {
        let mut cur = self.state.load(Acquire);
        loop {
            if cur >> 32 != epoch {
                return;
            }
            // The count of this epoch's operation. Once its last index is claimed, its caller
            // may return and the next operation's be written here before its epoch is: read
            // as this one's, a larger count let a late worker claim index `count` (the state
            // still this epoch's) and run the next operation's task before it was published,
            // or this one's past its end on a stack frame gone. The epoch beside it says whose
            // count it is (an operation with unclaimed indices is still this epoch's).
            let i = (cur & 0xFFFF_FFFF) as usize;
            let c = self.count.load(Relaxed);
            if c >> 32 != epoch || i >= (c & 0xFFFF_FFFF) as usize {
                return;
            }
            match self
                .state
                .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
            {
                Ok(_) => {
                    let data = self.data.load(Relaxed) as *const &(dyn Fn(usize) + Sync);
                    // SAFETY: index i of this epoch is unfinished, so the caller is still
                    // waiting and `f` (behind `data`) alive.
                    let f = unsafe { *data };
                    if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                        self.panicked.store(true, Relaxed);
                    }
                    self.done.fetch_add(1, Release);
                    cur = self.state.load(Acquire);
                }
                Err(now) => cur = now,
            }
        }
    }

    /// A worker's life: wait for a new epoch (spinning, then parked), take part in it.
    fn work(&self) {
        ON_TEAM.with(|t| t.set(true));
        let mut seen = self.state.load(Acquire) >> 32;
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            let epoch = loop {
                let e = self.state.load(Acquire) >> 32;
                if e != seen {
                    break e;
                }
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(256) {
                    std::hint::spin_loop();
                    continue;
                }
                let idle = start.elapsed();
                if idle < SPIN_HOT {
                    continue;
                }
                if idle < SPIN {
                    // Still close to the last operation, but let a thread that shares this
                    // CPU run (another MPI rank, a data loader).
                    std::thread::yield_now();
                    continue;
                }
                // Park until the next epoch.
                let mut g = self.park.lock().unwrap_or_else(|p| p.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                while self.state.load(SeqCst) >> 32 == seen {
                    g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                self.sleepers.fetch_sub(1, SeqCst);
                drop(g);
            };
            seen = epoch;
            self.claim_all(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once() {
        for workers in [0, 1, 3] {
            let team = Team::new(workers);
            for count in [1, 2, 5, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                team.try_run(count, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                })
                .unwrap();
                assert!(
                    hits.iter().all(|h| h.load(Relaxed) == 1),
                    "{workers} {count}"
                );
            }
        }
    }

    #[test]
    fn back_to_back_and_after_parking() {
        let team = Team::new(1);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            if round == 1000 {
                // Long enough for the worker to park.
                std::thread::sleep(SPIN * 3);
            }
            team.try_run(4, &|i| {
                total.fetch_add(i + 1, Relaxed);
            })
            .unwrap();
        }
        assert_eq!(total.load(Relaxed), 2000 * 10);
    }

    #[test]
    fn a_late_worker_never_claims_past_the_end_of_a_finished_operation() {
        // A short operation and then a longer one, over and over: a worker still looking at
        // the finished short one (its last index claimed) must not read the longer one's count
        // as the short one's and claim "index `count`" of it: that ran the new operation's
        // task before it was published (so twice) or the old one's past its end, on a stack
        // frame already gone (a crash in the training tests, once in a few runs). Each task
        // checks its index and counts its runs.
        let team = Team::new(2);
        for round in 0..300_000 {
            let count = if round % 2 == 0 { 2 } else { 40 };
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            team.try_run(count, &|i| {
                assert!(i < count, "index {i} of an operation of {count}");
                hits[i].fetch_add(1, Relaxed);
            })
            .unwrap();
            assert!(
                hits.iter().all(|h| h.load(Relaxed) == 1),
                "round {round}: every index once"
            );
        }
    }

    #[test]
    fn a_second_caller_is_turned_away_and_falls_back() {
        // Callers on several threads at once through the public entry point: each result is
        // complete whichever path it took.
        std::thread::scope(|sc| {
            for t in 0..4 {
                sc.spawn(move || {
                    for _ in 0..200 {
                        let mut v = vec![0usize; 100];
                        for_chunks_mut(&mut v, 7, |i, c| {
                            c.iter_mut()
                                .enumerate()
                                .for_each(|(j, x)| *x = i * 7 + j + t)
                        });
                        assert!(v.iter().enumerate().all(|(j, &x)| x == j + t));
                    }
                });
            }
        });
    }

    #[test]
    fn nested_calls_run_inline() {
        let total = AtomicUsize::new(0);
        for_each(4, |_| {
            for_each(3, |j| {
                total.fetch_add(j, Relaxed);
            })
        });
        assert_eq!(total.load(Relaxed), 4 * 3);
    }

    #[test]
    fn inside_a_task_kernels_plan_for_one_thread() {
        // The caller and the worker alike, and a team without workers (the caller runs every
        // task): what a task splits runs on its own thread.
        for workers in [1, 0] {
            let team = Team::new(workers);
            let seen = Mutex::new(Vec::new());
            team.try_run(8, &|_| seen.lock().unwrap().push(threads()))
                .unwrap();
            assert_eq!(*seen.lock().unwrap(), vec![1; 8], "{workers} workers");
            assert_eq!(threads(), rayon::current_num_threads());
        }
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_team_recovers() {
        let team = Team::new(1);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.try_run(8, &|i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        team.try_run(8, &|_| {
            n.fetch_add(1, Relaxed);
        })
        .unwrap();
        assert_eq!(n.load(Relaxed), 8);
    }
}
