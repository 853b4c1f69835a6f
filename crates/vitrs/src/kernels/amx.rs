//! The SGEMM on Intel's AMX tiles, at fp32 accuracy: each f32 operand is split into three
//! bf16 pieces, `x = h + m + l` (`h` the nearest bf16 to `x`, `m` the nearest to `x − h`, `l`
//! to `x − h − m`: 24 significant bits in all, as many as f32 has), and
//! `A·B = Σ Aᵢ·Bⱼ` over the six piece products down to the `2⁻¹⁶` terms (`hh, hm, hl, mh, mm,
//! lh`; the three dropped ones are below `2⁻²⁴` of the result, f32's own rounding). Each
//! piece product is exact in f32 and the tile unit accumulates in f32, so the result carries
//! f32's error, not bf16's — the way GPUs emulate FP32 GEMMs on bf16 tensor cores.
//!
//! One `TDPBF16PS` multiplies a 16 × 32 bf16 tile of A by a 32 × 16 one of B into 16 × 16 f32:
//! 8192 multiply-adds, one every 16 cycles per core on Sapphire Rapids — 512 per cycle, 16 times
//! the 32 of two AVX-512 FMA units. Six of them per f32 product would leave 2.7 times the
//! AVX-512 peak for a kernel that kept the tile unit busy. Measured on an AVX-512 Xeon, this
//! kernel is bound by its tile loads (56–67 cycles each, 16 loads per 24 products) at 42–48 %
//! of the unit's peak, 1.1–1.2× the FMA peak per core, and its products run 1.2–2.0×
//! PyTorch's SGEMM on the ViT-B/16 shapes (docs/perf.md).
//!
//! # Layout
//! The register tile is 32 × 32 of C in four tile registers (`tmm0..3`, C rows 0–15 and
//! 16–31 × columns 0–15 and 16–31), with two A tiles (`tmm4, 5`) and two B tiles (`tmm6, 7`).
//! Operands are packed per **step** of 32 along the inner dimension, into six 1 KiB tiles each
//! (piece-major, then half): A's micro-panel `[step][piece h,m,l][rows 0–15, 16–31][16][32
//! bf16]`, B's `[step][piece][columns 0–15, 16–31][16 pairs of rows][16 × 2 bf16]` (the pair
//! interleaving `TDPBF16PS` reads: row `r` of a B tile holds `B(2r, j), B(2r+1, j)` for its
//! 16 columns `j`). Shapes are zero-padded to whole tiles and steps.
//!
//! # Enabling
//! Linux hands out the tile registers only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XTILEDATA)`), made once per process by [`enabled`]; each product loads the tile
//! configuration on its thread and releases the tiles at the end. `VITRS_AMX=0` (or
//! [`set_enabled`]) keeps the AVX-512 FMA kernel.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use super::sgemm::{Aligned, MatRef, Out};

/// Rows and columns of the register tile (2 × 2 tiles of 16 × 16 f32).
pub(crate) const MR: usize = 32;
pub(crate) const NR: usize = 32;
/// Steps of the inner dimension per tile product.
const KS: usize = 32;
/// bf16 elements of one tile (16 rows × 64 bytes).
const TILE: usize = 512;
/// bf16 elements of one step of a micro-panel: three pieces × two halves.
const STEP: usize = 6 * TILE;
/// Rows of a row-major B read ahead while [`pack_b`] packs the current pair (two pairs ahead:
/// on an AVX-512 Xeon the packing's samples sat on the loads of B's rows; asking for rows 4
/// and 5 ahead ran `dw:6400x768x192` 9 % faster than none, 8 and 9 ahead 5 %).
const PF: isize = 4;

/// The engine's state, one value so that a reader never sees half of a change: [`UNDECIDED`]
/// until the first question; [`OFF`] or [`ON`] where pinned (`VITRS_AMX=0` or `1`,
/// [`set_enabled`], or no tile unit); [`AUTO_OFF`] or [`AUTO_ON`] while it follows the tile
/// unit's speed ([`adapt`]).
static STATE: AtomicU8 = AtomicU8::new(UNDECIDED);
const UNDECIDED: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
const AUTO_OFF: u8 = 3;
const AUTO_ON: u8 = 4;

/// [`STATE`], decided from `VITRS_AMX` and the CPU on the first call.
fn state() -> u8 {
    match STATE.load(Relaxed) {
        UNDECIDED => {
            let var = std::env::var("VITRS_AMX").unwrap_or_default();
            let decided = if var == "0" || var == "off" || !supported() {
                OFF
            } else if var == "1" || var == "on" {
                ON
            } else {
                AUTO_ON
            };
            let _ = STATE.compare_exchange(UNDECIDED, decided, Relaxed, Relaxed);
            STATE.load(Relaxed)
        }
        s => s,
    }
}

/// Whether the products take the AMX path now: the CPU has AMX-TILE and AMX-BF16 (and
/// AVX-512 F + BW + BF16, for the packing), Linux granted the tile data, `VITRS_AMX=0` (or
/// [`set_enabled`]`(false)`) did not turn it off, and — unless `VITRS_AMX=1` (or
/// [`set_enabled`]`(true)`) pinned it on — [`adapt`]'s last look at the tile unit found it
/// faster than the FMA kernel.
pub fn enabled() -> bool {
    if let Some(on) = HERE.with(std::cell::Cell::get) {
        return on;
    }
    matches!(state(), ON | AUTO_ON)
}

/// Whether the tile unit may run the products at all: [`supported`], and not turned off by
/// `VITRS_AMX=0` or [`set_enabled`]`(false)` (it may be off for now, see [`adapt`]).
pub fn available() -> bool {
    state() != OFF
}

/// Whether the engine follows the tile unit's speed ([`adapt`]), as by default on a CPU with
/// the tiles.
pub fn adaptive() -> bool {
    matches!(state(), AUTO_OFF | AUTO_ON)
}

/// Turns the AMX path on (where the CPU and OS allow it) or off, for the whole process, as
/// [`super::set_isa`] does for the rung (weights packed under the other setting are then
/// packed again for the engine now on, see [`super::gemm::PackedLinear`]);
/// the choice stays until the next call ([`adapt`] no longer changes it). Returns whether it
/// is on now.
pub fn set_enabled(on: bool) -> bool {
    let on = on && supported();
    STATE.store(if on { ON } else { OFF }, Relaxed);
    on
}

/// The tile unit's speed over the FMA units' at which [`adapt`] turns it on (off, below
/// [`TILES_OFF_BELOW`]), as [`super::peak::tile_advantage`] measures it: the tile unit's f32
/// rate (its bf16 products' over the six each f32 product takes) over the AVX-512 FMA rate,
/// in a fraction of a millisecond on each compute thread, the slowest thread's. The tile
/// engine reaches a smaller share of its peak than the FMA kernel does of its own. On a Xeon
/// whose tile unit swung between two speeds seconds at a time (2.2 and 0.9–1.0 times the FMA
/// peak in one-second runs; 1.4–2.0 and 0.75–1.1 in this look), ViT-B/16 at batch 1 ran 1.6
/// times faster on the tiles at the high one and 0.7 times at the low one (docs/perf.md,
/// 2026-12-05).
pub const TILES_ON_FROM: f64 = 1.4;
/// See [`TILES_ON_FROM`]; the gap between the two keeps a ratio near the break-even point
/// from switching engines at every look.
pub const TILES_OFF_BELOW: f64 = 1.2;
/// The shortest time between two looks of [`adapt`].
const ADAPT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether the engine should run on the tiles, on now or not, given the tile unit's measured
/// advantage (see [`TILES_ON_FROM`]).
pub(crate) fn choose(on: bool, advantage: f64) -> bool {
    if on {
        advantage >= TILES_OFF_BELOW
    } else {
        advantage >= TILES_ON_FROM
    }
}

/// How many times as long as packing the inference weights for the other engine would take
/// ([`super::gemm::move_cost`]) the looks must have found that engine faster before the
/// products move there. At the thresholds the slower engine loses about a third of the time
/// (the tiles at 1.4 times the FMA units' rate: 1 − 1/1.4 ≈ 0.3), so staying that long loses
/// about what the packing costs — the ski-rental rule: rent until the rent paid reaches the
/// price, then buy. A process that runs a few forwards (a one-off `vit predict`, a benchmark
/// of one timed forward) then keeps the engine its weights were packed for instead of packing
/// them again midway (ViT-B/16: 85 M weights, 0.1–0.2 s, more than a batch-1 forward on
/// either engine); one that runs on (`vit serve`) moves after a fraction of a second.
pub const MOVE_PATIENCE: u32 = 3;

/// Since when the looks have chosen the other engine than the one the products run on, a
/// move waiting out its packing's cost (there being two engines, which one is never in
/// doubt).
type Favoured = Option<std::time::Instant>;

/// The engine to run on, `on` the tiles now, after a look that chose `want`: a move that
/// packs nothing (`cost` zero) at once; one that does only after the looks have chosen it,
/// without a break (`favoured` keeps since when), for [`MOVE_PATIENCE`] times its cost.
pub(crate) fn patient(
    favoured: &mut Favoured,
    on: bool,
    want: bool,
    now: std::time::Instant,
    cost: impl FnOnce() -> std::time::Duration,
) -> bool {
    if want == on {
        *favoured = None;
        return on;
    }
    let cost = cost();
    let since = *favoured.get_or_insert(now);
    if cost.is_zero() || now.duration_since(since) >= cost * MOVE_PATIENCE {
        *favoured = None;
        want
    } else {
        on
    }
}

/// Where the engine follows the tile unit's speed ([`adaptive`]), looks at it — at most every
/// 100 ms, 0.1–0.25 ms on each compute thread ([`super::peak::tile_advantage`]) — and runs
/// the products on it or on the AVX-512 FMA kernel, whichever is faster now. A tile unit
/// shared with a busy neighbour (a hyperthread of another virtual machine), or throttled,
/// can run at half its speed for seconds at a time, slower than the FMA kernel. Called at the
/// start of a forward pass and of a training step, so that one runs on one engine (a pass
/// image by image then lets each thread follow its own core's tile unit: [`follow_here`]);
/// every product checks which engine its packed weights are for, so a call from elsewhere
/// changes speed, never results' correctness. A move to the engine that packed inference
/// weights lack a packing for waits until the looks have found it faster for
/// [`MOVE_PATIENCE`] times as long as that packing takes. Returns whether the tiles are on
/// now.
pub fn adapt() -> bool {
    if !adaptive() {
        return enabled();
    }
    // The last look, and a move waiting out its packing's cost (see `patient`).
    static LAST: std::sync::Mutex<(Option<std::time::Instant>, Favoured)> =
        std::sync::Mutex::new((None, None));
    let Ok(mut last) = LAST.try_lock() else {
        // Another thread is looking now.
        return enabled();
    };
    if last.0.is_some_and(|t| t.elapsed() < ADAPT_EVERY) {
        return enabled();
    }
    let at = std::time::Instant::now();
    last.0 = Some(at);
    let Some(advantage) = super::peak::tile_advantage() else {
        return enabled();
    };
    let now = state();
    let on = now == AUTO_ON;
    let want = choose(on, advantage);
    let next = if patient(&mut last.1, on, want, at, || super::gemm::move_cost(want)) {
        AUTO_ON
    } else {
        AUTO_OFF
    };
    drop(last);
    // Only from a state that still follows the tile unit: a pinning call since the look
    // above wins.
    if matches!(now, AUTO_OFF | AUTO_ON) {
        let _ = STATE.compare_exchange(now, next, Relaxed, Relaxed);
    }
    enabled()
}

/// A thread's last look at its core's tile unit ([`follow_here`]): when, and whether it chose
/// the tiles.
#[derive(Clone, Copy)]
struct Look {
    at: std::time::Instant,
    on: bool,
    /// A move this thread's looks favoured, waiting out its packing's cost (see [`patient`]).
    favoured: Favoured,
}

thread_local! {
    /// Set while this thread runs a task on its own engine ([`follow_here`]), to whether that
    /// is the tile unit: it overrides the process's engine for the products this thread runs.
    static HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// This thread's last look, kept between its tasks.
    static LAST_LOOK: std::cell::Cell<Option<Look>> = const { std::cell::Cell::new(None) };
}

/// Tasks that ran on their thread's own engine ([`follow_here`]): on the FMA kernel, on the
/// tiles.
static OWN_ENGINE_TASKS: [std::sync::atomic::AtomicU64; 2] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 2];

/// How many tasks have run on their thread's own engine ([`follow_here`]) so far: `(on the
/// FMA kernel, on the tiles)`, for a report of what ran the products.
pub fn own_engine_tasks() -> (u64, u64) {
    let [fma, tiles] = &OWN_ENGINE_TASKS;
    (fma.load(Relaxed), tiles.load(Relaxed))
}

/// The calling thread's own engine until dropped (see [`follow_here`]).
pub struct FollowHere {
    /// Whether the guard's thread runs its products on the tile unit.
    on: bool,
    /// The thread's override before this guard, put back when it drops.
    before: Option<bool>,
}

impl FollowHere {
    /// Whether this guard put its thread's products on the tile unit.
    pub fn on(&self) -> bool {
        self.on
    }
}

impl Drop for FollowHere {
    fn drop(&mut self) {
        HERE.with(|h| h.set(self.before));
    }
}

/// Where the engine follows the tile unit's speed ([`adaptive`]), picks the engine for the
/// products the calling thread runs until the guard drops: for a task that runs a whole
/// forward pass on one thread (inference image by image, see `model::forward`). Each core's
/// tile unit can be held back on its own (a busy neighbour on its hyperthread), and [`adapt`]
/// judges all the compute threads by the slowest, so one core's slow tile unit kept both on
/// the FMA kernel. Looks at this core's tile unit at most every 100 ms
/// (`peak::tile_advantage_here`, 0.1–0.25 ms), with [`adapt`]'s thresholds, and
/// keeps its last choice between looks; `None` (nothing changed) where the engine is pinned
/// or there are no tiles.
pub fn follow_here() -> Option<FollowHere> {
    if !adaptive() {
        return None;
    }
    let now = std::time::Instant::now();
    let last = LAST_LOOK.with(std::cell::Cell::get);
    let on = match last {
        Some(l) if now.duration_since(l.at) < ADAPT_EVERY => l.on,
        _ => {
            let was = last.map_or(state() == AUTO_ON, |l| l.on);
            let mut favoured = last.and_then(|l| l.favoured);
            let advantage = super::peak::tile_advantage_on_this_thread()?;
            let want = choose(was, advantage);
            let cost = || super::gemm::move_cost(want);
            let on = patient(&mut favoured, was, want, now, cost);
            LAST_LOOK.with(|l| {
                l.set(Some(Look {
                    at: now,
                    on,
                    favoured,
                }))
            });
            on
        }
    };
    Some(hold(on))
}

/// Runs the calling thread's products on the tile unit (`on`) or the FMA kernel until the
/// guard drops, whatever the process's engine (see [`follow_here`]).
fn hold(on: bool) -> FollowHere {
    OWN_ENGINE_TASKS[usize::from(on)].fetch_add(1, Relaxed);
    let before = HERE.with(|h| h.replace(Some(on)));
    FollowHere { on, before }
}

/// The CPU has the tile unit with bf16 and the OS lets this process use it (asked once).
pub fn supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use std::arch::x86_64::__cpuid_count;
            use std::is_x86_feature_detected as has;
            if !(has!("avx512f") && has!("avx512bw") && has!("avx512bf16") && has!("xsave")) {
                return false;
            }
            // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512.
            #[allow(unused_unsafe)]
            let edx = unsafe { __cpuid_count(7, 0) }.edx;
            let (tile, bf16) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1);
            if !(tile && bf16) {
                return false;
            }
            // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18) only
            // changes this process's permission; it returns 0 or a negative errno.
            let r: i64;
            unsafe {
                std::arch::asm!(
                    "syscall",
                    inlateout("rax") 158i64 => r,
                    in("rdi") 0x1023i64,
                    in("rsi") 18i64,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack)
                );
            }
            r == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// `B (k, n)` packed once into the micro-panels of [`gemm`]: `[panel][step][6 tiles]`, a
/// model's weight for inference.
pub(crate) struct PackedB {
    steps: usize,
    data: Aligned<u16>,
}

impl PackedB {
    /// Packs `b`, a `(k, n)` matrix with its strides, into `data` (grown as needed; a buffer
    /// reused from an earlier packing, or a new one).
    ///
    /// # Safety
    /// `b` must address a `(k, n)` matrix with its strides; [`supported`] must be true.
    pub(crate) unsafe fn new_in(b: MatRef, k: usize, n: usize, mut data: Aligned<u16>) -> Self {
        let steps = k.div_ceil(KS);
        let panels = n.div_ceil(NR);
        data.ensure(panels * steps * STEP);
        pack_b(b, k, n, steps, data.slice_mut().as_mut_ptr());
        PackedB { steps, data }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.data.slice().len() * 2
    }

    /// The packing's buffer, for [`Self::new_in`].
    pub(crate) fn into_data(self) -> Aligned<u16> {
        self.data
    }
}

thread_local! {
    /// Per-thread packing buffers (A block, B block), grown on demand and reused.
    static BUFFERS: RefCell<(Aligned<u16>, Aligned<u16>)> = RefCell::new(Default::default());
}

/// The `A` operand of [`gemm`].
#[derive(Clone, Copy)]
pub(crate) enum A {
    /// Packed by [`gemm`], block by block.
    Mat(MatRef),
    /// All of its rows already in pieces, by [`pack_rows`] (a product with one block of rows,
    /// [`one_block`]): A packed once for the threads that split the product's columns.
    Pieces(*const u16),
}

/// Whether a product with `m` rows runs as one block of rows (and can take [`A::Pieces`]).
pub(crate) fn one_block(m: usize) -> bool {
    RowBlocks::new(m).count == 1
}

/// Elements (`u16`) of [`pack_rows`]' output for an `(m, k)` A.
pub(crate) fn pieces_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * k.div_ceil(KS) * STEP
}

/// Packs the row tiles `g0..g1` of the `(m, k)` matrix `a` (tiles of [`MR`] rows) into `out`,
/// which holds all of A's pieces as [`gemm`] reads them ([`A::Pieces`]): the block of steps
/// starting at step `s0` at `s0 · tiles · STEP`, its tile `g` at `g · steps · STEP` — the
/// layout `gemm` packs one block into. Threads packing disjoint tiles fill it together.
///
/// # Safety
/// `a` addresses an `(m, k)` matrix; `out` holds [`pieces_len`]`(m, k)` elements, of which no
/// other thread writes these tiles'; `g0 < g1 ≤ ⌈m / MR⌉`; [`enabled`] must be true.
pub(crate) unsafe fn pack_rows(
    a: MatRef,
    m: usize,
    k: usize,
    (g0, g1): (usize, usize),
    out: *mut u16,
) {
    let (total, tiles) = (k.div_ceil(KS), m.div_ceil(MR));
    let (r0, r1) = (g0 * MR, (g1 * MR).min(m));
    for s0 in (0..total).step_by(KB) {
        let steps = KB.min(total - s0);
        let p0 = s0 * KS;
        let part = MatRef {
            ptr: a.ptr.offset(r0 as isize * a.rs + p0 as isize * a.cs),
            ..a
        };
        let at = out.add(s0 * tiles * STEP + g0 * steps * STEP);
        pack_a(part, r1 - r0, (steps * KS).min(k - p0), steps, at, None);
    }
}

/// The `B` operand of [`gemm`].
#[derive(Clone, Copy)]
pub(crate) enum B<'a> {
    Mat(MatRef),
    /// Columns `c0..` of a packed matrix (`c0` a multiple of [`NR`]).
    Packed(&'a PackedB, usize),
}

/// Steps of the inner dimension per block (768 floats): a ViT-B/16 product's whole inner
/// dimension (768) or a quarter of it (3072), so C is read and written once or four times.
/// On an AVX-512 Xeon (2 MiB L2), 768 ran the ViT-B/16 forward products 5–10 % faster than
/// 512, and 256 or 384 lost 15–25 % at batch 16 (more passes over C).
const KB: usize = 24;

/// Rows of A per packed block, about (`MC · 768 · 6` bytes, 864 KiB, in L2 while the panels
/// of B pass). On the same Xeon, 128–256 rows ran the ViT-B/16 batch-16 forward within noise
/// of each other (13.4–14.7 images/s), 512 and 1024 at 9.7–10.1 (the block out of L2's
/// reach). A product's rows are cut into blocks of about this many ([`RowBlocks`]).
const MC: usize = 192;

/// The blocks of rows of a product with `m` rows: `m / MC` of them rounded to the nearest (at
/// least one), the tiles of rows shared evenly (block `i` starts at tile `i · tiles /
/// blocks`). Every block streams all of B's panels, so a last block of a few rows (one
/// image's 197 = 192 + 5) read B a second time for them: ViT-B/16 at batch 16, whose images
/// run one per thread and whose weights stream from L3, ran 7–9 % faster with one 197-row
/// block (AVX-512 Xeon).
#[derive(Clone, Copy)]
struct RowBlocks {
    tiles: usize,
    count: usize,
}

impl RowBlocks {
    fn new(m: usize) -> Self {
        RowBlocks {
            tiles: m.div_ceil(MR),
            count: ((m + MC / 2) / MC).max(1),
        }
    }

    /// Rows of the largest block.
    fn max_rows(&self) -> usize {
        self.tiles.div_ceil(self.count) * MR
    }

    /// Block `i`'s rows `(r0, r1)` of `m`.
    fn get(&self, i: usize, m: usize) -> (usize, usize) {
        let t = |i: usize| i * self.tiles / self.count * MR;
        (t(i), t(i + 1).min(m))
    }
}

use super::sgemm::Edge;

/// `C (m, n) = A (m, k) · B (k, n)` (+ bias, + C) on the calling thread, on the tile unit.
/// With `sums`, also `sums[i] += Σ_p A(i, p)` for every row of A, added up as the packing
/// reads A (a weight gradient's `dYᵀ`, whose row sums are the bias gradient). With `edge`,
/// also its rows and columns, in the same pass over B.
///
/// # Safety
/// As [`super::sgemm::gemm`], and [`enabled`] must be true; `m, n, k > 0`; `sums` only with
/// A's columns contiguous (`rs == 1, cs != 1`), addressing `m` floats no other thread
/// touches; `edge` only without `sums`, with fewer than [`MR`] rows, its `c` addressing its
/// rows and columns of C, which no other thread touches.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: A,
    b: B,
    c: Out,
    sums: Option<*mut f32>,
    edge: Option<Edge>,
) {
    debug_assert!(edge.is_none_or(|e| sums.is_none() && e.rows < MR && e.cols.0 % NR == 0));
    debug_assert!(matches!(a, A::Mat(_)) || (one_block(m) && sums.is_none()));
    if c.accumulate && c.bias.is_some() {
        // C + bias: add the bias first, then accumulate onto it (a rare combination).
        super::sgemm::bias_into(m, n, c);
        if let (Some(e), Some(bias)) = (edge, c.bias) {
            let (c0, c1) = e.cols;
            let at = Out {
                ptr: e.c.add(c0),
                bias: Some(bias.add(c0)),
                ..c
            };
            super::sgemm::bias_into(e.rows, c1 - c0, at);
        }
        return gemm(m, n, k, a, b, Out { bias: None, ..c }, sums, edge);
    }
    let (mut abuf, mut bbuf) = BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
    config();
    let steps_total = k.div_ceil(KS);
    let panels = n.div_ceil(NR);
    let blocks = RowBlocks::new(m);
    let mc_max = blocks.max_rows();
    // The edge's micro-panel after the largest block of A's.
    let edge_at = mc_max.div_ceil(MR) * KB.min(steps_total) * STEP;
    abuf.ensure(
        edge_at
            + if edge.is_some() {
                KB.min(steps_total) * STEP
            } else {
                0
            },
    );
    for s0 in (0..steps_total).step_by(KB) {
        let steps = KB.min(steps_total - s0);
        let p0 = s0 * KS;
        let kc = (steps * KS).min(k - p0);
        // Panel jp of this block: `steps` steps from `bp + jp · pstride`.
        let (bp, pstride): (*const u16, usize) = match b {
            B::Packed(pb, c0) => {
                debug_assert!(c0 % NR == 0);
                let first = pb
                    .data
                    .slice()
                    .as_ptr()
                    .add((c0 / NR) * pb.steps * STEP + s0 * STEP);
                (first, pb.steps * STEP)
            }
            B::Mat(bm) => {
                bbuf.ensure(panels * steps * STEP);
                let part = MatRef {
                    ptr: bm.ptr.offset(p0 as isize * bm.rs),
                    ..bm
                };
                pack_b(part, kc, n, steps, bbuf.slice_mut().as_mut_ptr());
                (bbuf.slice().as_ptr(), steps * STEP)
            }
        };
        let first = s0 == 0;
        let init_at = |j0: usize| {
            if c.accumulate || !first {
                Init::Load
            } else if let Some(bias) = c.bias {
                Init::Bias(bias.add(j0))
            } else {
                Init::Zero
            }
        };
        if let Some(e) = edge {
            let part = MatRef {
                ptr: e.a.ptr.offset(p0 as isize * e.a.cs),
                ..e.a
            };
            pack_a(
                part,
                e.rows,
                kc,
                steps,
                abuf.slice_mut().as_mut_ptr().add(edge_at),
                None,
            );
        }
        for bi in 0..blocks.count {
            let (ic, end) = blocks.get(bi, m);
            let mc = end - ic;
            let tiles = mc.div_ceil(MR);
            let prefetch =
                matches!(b, B::Packed(..)) && blocks.count == 1 && tiles >= PREFETCH_TILES;
            // This block's micro-panels of A, `steps · STEP` apart.
            let ap = match a {
                A::Mat(a) => {
                    let part = MatRef {
                        ptr: a.ptr.offset(ic as isize * a.rs + p0 as isize * a.cs),
                        ..a
                    };
                    let out = abuf.slice_mut().as_mut_ptr();
                    pack_a(part, mc, kc, steps, out, sums.map(|p| p.add(ic)));
                    abuf.slice().as_ptr()
                }
                // One block: all of A's tiles, block of steps `s0` (see `pack_rows`).
                A::Pieces(p) => p.add(s0 * tiles * STEP),
            };
            for jp in 0..panels {
                let j0 = jp * NR;
                let cols = NR.min(n - j0);
                let bpanel = bp.add(jp * pstride);
                // The next packed panel is fetched while this one's later tiles run, when
                // they are enough to hide it (see `PREFETCH_TILES`).
                let ahead = (prefetch && jp + 1 < panels).then(|| bp.add((jp + 1) * pstride));
                for ir in (0..mc).step_by(MR) {
                    let pf = match ahead {
                        Some(next) if ir > 0 => {
                            Prefetch::share(next, steps, ir / MR - 1, tiles - 1)
                        }
                        _ => Prefetch::NONE,
                    };
                    let rows = MR.min(mc - ir);
                    let apanel = ap.add((ir / MR) * steps * STEP);
                    let cptr = c.ptr.offset((ic + ir) as isize * c.rs + j0 as isize);
                    let init = init_at(j0);
                    tile(apanel, bpanel, steps, cptr, c.rs, rows, cols, init, pf);
                }
                match edge {
                    Some(e) if ic + mc == m && j0 >= e.cols.0 && j0 < e.cols.1 => {
                        let apanel = abuf.slice().as_ptr().add(edge_at);
                        let cols = NR.min(e.cols.1 - j0);
                        let cptr = e.c.add(j0);
                        let (init, none) = (init_at(j0), Prefetch::NONE);
                        tile(apanel, bpanel, steps, cptr, c.rs, e.rows, cols, init, none);
                    }
                    _ => {}
                }
            }
        }
    }
    release();
    BUFFERS.with(|b| *b.borrow_mut() = (abuf, bbuf));
}

/// Tiles of rows a packed weight's panel must run over for the next panel to be fetched
/// meanwhile, into L2, by the tiles after the first: [`PREFETCH_PER_STEP`] lines before each
/// of their steps, from the panel's start. A product with one block of rows streams each
/// panel of a packed weight once, from L3 or memory (the first tile), then reads it from L2
/// (the others); the prefetches give the next panel's first tile a head start. With 7 tiles
/// (197 rows, a weight the threads split by columns: `gemm::TILE_COLUMNS_MIN`) they fetch all
/// of a ViT-B/16 panel (2304 lines, 24 steps): its batch-1 qkv and fc1, weights out of cache,
/// 5–7 % faster on an AVX-512 Xeon. With 3 (a thread's half of 197 rows, split by rows) they
/// fetch two thirds of it: ViT-Ti/16 at batch 1 +3 to +11 %, B/16 0 to +3 % (four A/Bs of
/// 6–10 interleaved rounds), S/16 level. Not with several blocks of rows (batch 16 image by
/// image, each block streaming the weight): two A/Bs there gave B/16 −3 % and +3 %, Ti/16
/// −2 % and −1.5 % — no gain for the prefetches' cost.
const PREFETCH_TILES: usize = 3;

/// The most prefetches before a tile's step: 8, 16 or 24 ran alike; 48 (all of a panel over
/// 2 tiles) ran ViT-B/16's batch-1 products 4–8 % slower, the prefetches competing with the
/// tiles' own loads from L2.
const PREFETCH_PER_STEP: usize = 16;

/// Lines of the next panel a tile asks into L2: `per_step` of them before each of its steps,
/// from `from` on.
#[derive(Clone, Copy)]
struct Prefetch {
    from: *const u8,
    per_step: usize,
}

impl Prefetch {
    const NONE: Prefetch = Prefetch {
        from: std::ptr::null(),
        per_step: 0,
    };

    /// Share `part` of `parts` of the panel at `next` (`steps` steps of [`STEP`] pieces):
    /// the panel's lines from its start, as many a step as it takes to cover it over the
    /// parts, at most [`PREFETCH_PER_STEP`].
    fn share(next: *const u16, steps: usize, part: usize, parts: usize) -> Prefetch {
        let lines = steps * STEP * 2 / 64;
        let per_step = lines.div_ceil(parts * steps).min(PREFETCH_PER_STEP);
        let first = (part * per_step * steps).min(lines);
        Prefetch {
            from: next.cast::<u8>().wrapping_add(first * 64),
            per_step: per_step.min((lines - first).div_ceil(steps)),
        }
    }
}

/// How a tile's accumulators start.
#[derive(Clone, Copy)]
enum Init {
    Zero,
    /// From C.
    Load,
    /// Every row the `(cols)` bias.
    Bias(*const f32),
}

/// Loads the tile configuration: palette 1, eight registers of 16 rows × 64 bytes.
unsafe fn config() {
    #[repr(C, align(64))]
    struct Cfg([u8; 64]);
    let mut cfg = Cfg([0; 64]);
    cfg.0[0] = 1;
    for t in 0..8 {
        cfg.0[16 + 2 * t] = 64;
        cfg.0[48 + t] = 16;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
}

unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// One 32 × 32 tile of C (`rows × cols` of it valid) over `steps` steps of packed A and B.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
unsafe fn tile(
    a: *const u16,
    b: *const u16,
    steps: usize,
    c: *mut f32,
    ldc: isize,
    rows: usize,
    cols: usize,
    init: Init,
    pf: Prefetch,
) {
    if rows == MR && cols == NR {
        let stride = ldc as usize * 4;
        start(c, stride, init);
        run(a, b, steps, pf);
        finish(c, stride);
        return;
    }
    // An edge tile, through a whole one in a buffer.
    #[repr(C, align(64))]
    struct Whole([f32; MR * NR]);
    let mut buf = Whole([0.0; MR * NR]);
    for i in 0..rows {
        let dst = &mut buf.0[i * NR..i * NR + cols];
        match init {
            Init::Zero => {}
            Init::Load => {
                dst.copy_from_slice(std::slice::from_raw_parts(c.offset(i as isize * ldc), cols))
            }
            Init::Bias(bias) => dst.copy_from_slice(std::slice::from_raw_parts(bias, cols)),
        }
    }
    let p = buf.0.as_mut_ptr();
    if rows <= 16 {
        half(a, b, steps, p, NR * 4);
    } else {
        start(p, NR * 4, Init::Load);
        run(a, b, steps, pf);
        finish(p, NR * 4);
    }
    for i in 0..rows {
        std::slice::from_raw_parts_mut(c.offset(i as isize * ldc), cols)
            .copy_from_slice(&buf.0[i * NR..i * NR + cols]);
    }
}

/// Sets the four accumulator tiles from `c` (row stride `stride` bytes), a bias or zero.
#[inline(always)]
unsafe fn start(c: *mut f32, stride: usize, init: Init) {
    use std::arch::asm;
    match init {
        Init::Zero => asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        ),
        Init::Load => load_c(c, stride),
        // A row stride of 0: every row of the tiles is the bias.
        Init::Bias(bias) => load_c(bias, 0),
    }
}

/// Loads the accumulator tiles from `c` (row stride `stride` bytes).
#[inline(always)]
unsafe fn load_c(c: *const f32, stride: usize) {
    std::arch::asm!(
        "tileloadd tmm0, [{c} + {s}*1]",
        "tileloadd tmm1, [{c} + {s}*1 + 64]",
        "tileloadd tmm2, [{d} + {s}*1]",
        "tileloadd tmm3, [{d} + {s}*1 + 64]",
        c = in(reg) c,
        d = in(reg) c.cast::<u8>().add(16 * stride),
        s = in(reg) stride,
        options(nostack, readonly)
    );
}

/// Stores the accumulator tiles to `c` (row stride `stride` bytes).
#[inline(always)]
unsafe fn finish(c: *mut f32, stride: usize) {
    std::arch::asm!(
        "tilestored [{c} + {s}*1], tmm0",
        "tilestored [{c} + {s}*1 + 64], tmm1",
        "tilestored [{d} + {s}*1], tmm2",
        "tilestored [{d} + {s}*1 + 64], tmm3",
        c = in(reg) c,
        d = in(reg) c.cast::<u8>().add(16 * stride),
        s = in(reg) stride,
        options(nostack)
    );
}

/// The four products of the A tiles in `tmm4, 5` and the B tiles in `tmm6, 7` into the
/// accumulators, as one asm template line each.
macro_rules! four_products {
    () => {
        concat!(
            "tdpbf16ps tmm0, tmm4, tmm6\n",
            "tdpbf16ps tmm1, tmm4, tmm7\n",
            "tdpbf16ps tmm2, tmm5, tmm6\n",
            "tdpbf16ps tmm3, tmm5, tmm7\n",
        )
    };
}

/// The six piece products of every step: A tiles at `a + step · STEP`, piece `p`, half `h`
/// at `(2p + h) · TILE`; B likewise. Tiles are loaded so that each A or B piece serves as
/// many products as it can before it is replaced (16 loads per 24 products), and each load
/// comes as soon as the products that read its register's last contents are issued: the two
/// products of each group that read the register replaced first run first, and the next
/// step's first tiles load during this step's last products. Against loading each group's
/// tiles together before its four products (the loads then waiting on all of the group
/// before): +2.5–4.4 % on bench-train's products and ViT-B/16's `3152x768x768` on an
/// AVX-512 Xeon (2 threads, 40 pairs alternating within one process), the bench-train step
/// +3.6 %.
#[inline(always)]
unsafe fn run(a: *const u16, b: *const u16, steps: usize, pf: Prefetch) {
    // First step's operands.
    std::arch::asm!(
        "tileloadd tmm4, [{a} + {s}*1]",
        "tileloadd tmm6, [{b} + {s}*1]",
        "tileloadd tmm5, [{a} + {s}*1 + 1024]",
        "tileloadd tmm7, [{b} + {s}*1 + 1024]",
        a = in(reg) a,
        b = in(reg) b,
        s = in(reg) 64usize,
        options(nostack, readonly)
    );
    for s in 0..steps {
        for i in s * pf.per_step..(s + 1) * pf.per_step {
            _mm_prefetch::<_MM_HINT_T1>(pf.from.wrapping_add(i * 64).cast());
        }
        // The next step's (this one's on the last: loaded again, unused).
        let n = if s + 1 < steps { s + 1 } else { s };
        std::arch::asm!(
            // h·h
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm7, [{b} + {s}*1 + 3072]",
            // h·m
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b} + {s}*1 + 4096]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm7, [{b} + {s}*1 + 5120]",
            // h·l
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a} + {s}*1 + 2048]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 3072]",
            "tileloadd tmm7, [{b} + {s}*1 + 3072]",
            // m·m
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            // m·h
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a} + {s}*1 + 4096]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 5120]",
            // l·h, the next step's h·h loaded as each register frees
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{nb} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{na} + {s}*1]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm5, [{na} + {s}*1 + 1024]",
            "tileloadd tmm7, [{nb} + {s}*1 + 1024]",
            a = in(reg) a.add(s * STEP),
            b = in(reg) b.add(s * STEP),
            na = in(reg) a.add(n * STEP),
            nb = in(reg) b.add(n * STEP),
            s = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
}

/// Runs `trips` trips of eight `TDPBF16PS` (four independent accumulators, `tmm0..3`, each
/// taking two products a trip) on the calling thread, with nothing else in the loop: the
/// tile unit's peak, for [`super::peak::amx_peak`]. The operand tiles are loaded once with
/// ordinary values (A's in `[1, 2)`, B's in `[2⁻³⁰, 2⁻²⁹)`), as the unit runs slower on
/// real data than on zeros; each accumulator grows by less than `2⁻²²` a trip.
///
/// # Safety
/// [`enabled`] must be true.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
pub(crate) unsafe fn peak_loop(trips: u64) {
    #[repr(C, align(64))]
    struct Tiles([u16; 4 * TILE]);
    let mut t = Tiles([0; 4 * TILE]);
    for (i, e) in t.0.iter_mut().enumerate() {
        let v = if i < 2 * TILE {
            1.0 + (i % 97) as f32 / 97.0
        } else {
            (1.0 + (i % 89) as f32 / 89.0) * (-30f32).exp2()
        };
        *e = (v.to_bits() >> 16) as u16;
    }
    config();
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tileloadd tmm4, [{p} + {s}*1]",
        "tileloadd tmm5, [{p} + {s}*1 + 1024]",
        "tileloadd tmm6, [{p} + {s}*1 + 2048]",
        "tileloadd tmm7, [{p} + {s}*1 + 3072]",
        p = in(reg) t.0.as_ptr(),
        s = in(reg) 64usize,
        options(nostack, readonly)
    );
    for _ in 0..trips {
        std::arch::asm!(four_products!(), four_products!(), options(nostack, nomem));
    }
    release();
}

/// `TDPBF16PS` a trip of [`peak_loop`].
pub(crate) const PEAK_PRODUCTS: u64 = 8;
/// bf16 FLOPs of one `TDPBF16PS`: 16 × 16 outputs, 32 multiply-adds each.
pub(crate) const PRODUCT_FLOPS: u64 = 16 * 16 * 32 * 2;
/// Tile products per f32 product on this engine (see the module doc).
pub(crate) const PIECE_PRODUCTS: u64 = 6;

/// Half a tile, C rows 0–15 at `c` (row stride `stride` bytes; loaded and stored in place),
/// for the last rows of a product when 16 or fewer are left (the last 5 of a batch-1
/// forward's 197): two accumulators and A's first half, with B's three pieces held in
/// `tmm2, 3` (medium), `tmm6, 7` (high) and `tmm5` (low, one half at a time), so a step takes
/// 9 tile loads for its 12 products, about 0.56 of a whole tile's time (its 16 loads bound
/// it) instead of all of it.
unsafe fn half(a: *const u16, b: *const u16, steps: usize, c: *mut f32, stride: usize) {
    std::arch::asm!(
        "tileloadd tmm0, [{c} + {s}*1]",
        "tileloadd tmm1, [{c} + {s}*1 + 64]",
        c = in(reg) c,
        s = in(reg) stride,
        options(nostack, readonly)
    );
    for s in 0..steps {
        std::arch::asm!(
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1]",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tileloadd tmm2, [{b} + {s}*1 + 2048]",
            "tileloadd tmm3, [{b} + {s}*1 + 3072]",
            "tileloadd tmm5, [{b} + {s}*1 + 4096]",
            // h·h, h·m, h·l
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm0, tmm4, tmm2",
            "tdpbf16ps tmm1, tmm4, tmm3",
            "tdpbf16ps tmm0, tmm4, tmm5",
            "tileloadd tmm5, [{b} + {s}*1 + 5120]",
            "tdpbf16ps tmm1, tmm4, tmm5",
            // m·m, m·h
            "tileloadd tmm4, [{a} + {s}*1 + 2048]",
            "tdpbf16ps tmm0, tmm4, tmm2",
            "tdpbf16ps tmm1, tmm4, tmm3",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            // l·h
            "tileloadd tmm4, [{a} + {s}*1 + 4096]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            a = in(reg) a.add(s * STEP),
            b = in(reg) b.add(s * STEP),
            s = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    std::arch::asm!(
        "tilestored [{c} + {s}*1], tmm0",
        "tilestored [{c} + {s}*1 + 64], tmm1",
        c = in(reg) c,
        s = in(reg) stride,
        options(nostack)
    );
}

/// The three bf16 pieces of `x` (see the module doc), reference version: round to nearest
/// even on the bits, as `vcvtneps2bf16` does for finite values.
#[cfg(test)]
pub(crate) fn split_ref(x: f32) -> [u16; 3] {
    let rne = |v: f32| -> u32 {
        let b = v.to_bits();
        (b.wrapping_add(0x7fff + ((b >> 16) & 1))) & 0xffff_0000
    };
    let h = rne(x);
    let r1 = x - f32::from_bits(h);
    let m = rne(r1);
    let r2 = r1 - f32::from_bits(m);
    let l = rne(r2);
    [(h >> 16) as u16, (m >> 16) as u16, (l >> 16) as u16]
}

use std::arch::x86_64::*;

/// bf16 (in the low half of each 32-bit lane) back to f32.
#[inline(always)]
unsafe fn widen(v: __m256i) -> (__m512i, __m512) {
    let z = _mm512_cvtepu16_epi32(v);
    (z, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(z)))
}

/// The three pieces of 16 floats, 16 bf16 each: `VCVTNEPS2BF16` rounds to nearest even (as
/// [`split_ref`]; it reads and writes subnormals as zero, as the tile unit does), each
/// remainder exact in f32. Also returns the pieces zero-extended to 32-bit lanes.
#[inline(always)]
unsafe fn split16(x: __m512) -> ([__m256i; 3], [__m512i; 3]) {
    let bf = |v: __m512| -> __m256i { std::mem::transmute(_mm512_cvtneps_pbh(v)) };
    let h = bf(x);
    let (hz, hf) = widen(h);
    let r1 = _mm512_sub_ps(x, hf);
    let m = bf(r1);
    let (mz, mf) = widen(m);
    let l = bf(_mm512_sub_ps(r1, mf));
    ([h, m, l], [hz, mz, _mm512_cvtepu16_epi32(l)])
}

/// Splits 16 floats of one A tile row and stores their three pieces, 16 bf16 each, at `dst`
/// (the first piece's place; the others `2 · TILE` apart, past the other half's tile).
#[inline(always)]
unsafe fn store_pieces(dst: *mut u16, x: __m512) {
    for (piece, v) in split16(x).0.iter().enumerate() {
        _mm256_storeu_si256(dst.add(piece * 2 * TILE).cast::<__m256i>(), *v);
    }
}

/// Splits one A tile row of 32 floats (`x0` its first 16 steps, `x1` the next 16) and stores
/// its three pieces, one 64-byte tile row each, at `dst` (the first piece's place; the others
/// `2 · TILE` apart). Two vectors to one conversion (`VCVTNE2PS2BF16`, rounding as
/// [`split16`]), whole-line stores: half the conversions and stores of two [`store_pieces`].
#[inline(always)]
unsafe fn store_row32(dst: *mut u16, x0: __m512, x1: __m512) {
    let bf =
        |lo: __m512, hi: __m512| -> __m512i { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo)) };
    // The 32 bf16 of `v` back to f32, 16 and 16.
    let back = |v: __m512i| {
        let lo = _mm512_castsi512_si256(v);
        let hi = _mm512_extracti64x4_epi64::<1>(v);
        (widen(lo).1, widen(hi).1)
    };
    let h = bf(x0, x1);
    let (h0, h1) = back(h);
    let (r0, r1) = (_mm512_sub_ps(x0, h0), _mm512_sub_ps(x1, h1));
    let m = bf(r0, r1);
    let (m0, m1) = back(m);
    let l = bf(_mm512_sub_ps(r0, m0), _mm512_sub_ps(r1, m1));
    for (piece, v) in [h, m, l].into_iter().enumerate() {
        _mm512_storeu_si512(dst.add(piece * 2 * TILE).cast(), v);
    }
}

/// Splits rows `p` (`lo`) and `p + 1` (`hi`) of 16 columns of B and stores their pieces as
/// one B tile row each at `dst` (the first piece's place; the others `2 · TILE` apart): lane
/// `j` holds `B(p, j)` in its low half and `B(p + 1, j)` in its high half.
#[inline(always)]
unsafe fn store_row_pair(dst: *mut u16, lo: __m512, hi: __m512) {
    let (sl, sh) = (split16(lo).1, split16(hi).1);
    for piece in 0..3 {
        let v = _mm512_or_si512(sl[piece], _mm512_slli_epi32::<16>(sh[piece]));
        _mm512_storeu_si512(dst.add(piece * 2 * TILE).cast(), v);
    }
}

/// The transpose of a 16 × 16 block of f32 (row `i` in `r[i]`).
#[inline(always)]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved by 32 bits, then by 64, then 128-bit lanes gathered across
    // four rows' worth and eight.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let base = i / 4 * 4;
        let (a, b) = match i % 4 {
            0 | 1 => (t[base], t[base + 2]),
            _ => (t[base + 1], t[base + 3]),
        };
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_castpd_ps(if i % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let base = i / 8 * 8;
        let j = i % 4;
        let (a, b) = (u[base + j], u[base + 4 + j]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    std::array::from_fn(|i| {
        let j = i % 8;
        let (a, b) = (v[j], v[8 + j]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    })
}

/// Loads 16 floats from `p`, masked to the `valid` first of them (zeros past).
#[inline(always)]
unsafe fn load16(p: *const f32, valid: usize) -> __m512 {
    if valid == 0 {
        _mm512_setzero_ps()
    } else if valid >= 16 {
        _mm512_loadu_ps(p)
    } else {
        _mm512_maskz_loadu_ps(((1u32 << valid) - 1) as u16, p)
    }
}

/// Packs `A (mc, kc)` (with its strides) into micro-panels of [`MR`] rows,
/// `[panel][step][piece][half][16][32]`, zero-padded to `steps` steps and whole panels. With
/// `sums` (only for A with contiguous columns), `sums[i] += Σ_p A(i, p)` for its `mc` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
#[inline(never)]
unsafe fn pack_a(
    a: MatRef,
    mc: usize,
    kc: usize,
    steps: usize,
    out: *mut u16,
    sums: Option<*mut f32>,
) {
    let panels = mc.div_ceil(MR);
    debug_assert!(sums.is_none() || (a.rs == 1 && a.cs != 1));
    if a.rs == 1 && a.cs != 1 {
        // Columns contiguous (dYᵀ of a weight gradient): 16 × 16 blocks transposed in
        // registers, so each of a tile row's halves is one vector of 16 steps; a tile row's
        // two halves split and stored together (`store_row32`: the bench-train weight
        // gradients +0.5–2.5 % over a half at a time).
        // Blocks in the order of A's memory: 16 columns at a time, down their length (16
        // sequential streams), the block two ahead asked for while this one is transposed.
        for s in 0..steps {
            let p0 = s * KS;
            // Steps of this tile step in A (the rest zeros), its first 16 and the next.
            let ps = KS.min(kc.saturating_sub(p0));
            let (ps0, ps1) = (ps.min(16), ps.saturating_sub(16));
            for (g, half) in (0..panels).flat_map(|g| [(g, 0), (g, 1)]) {
                let step = out.add((g * steps + s) * STEP);
                let i0 = g * MR + half * 16;
                let valid = mc.saturating_sub(i0).min(16);
                if i0 + 32 < mc {
                    for t in 0..ps {
                        let at = a.ptr.offset((i0 + 32) as isize + (p0 + t) as isize * a.cs);
                        _mm_prefetch::<_MM_HINT_T0>(at.cast());
                    }
                }
                // Lane r of lo[t] is A(i0 + r, p0 + t), of hi[t] A(i0 + r, p0 + 16 + t); rows
                // past the end (`valid` 0) stay zero, never addressed.
                let mut lo = [_mm512_setzero_ps(); 16];
                let mut hi = [_mm512_setzero_ps(); 16];
                if valid > 0 {
                    let col = |p: usize| a.ptr.offset(i0 as isize + p as isize * a.cs);
                    for (t, v) in lo.iter_mut().enumerate().take(ps0) {
                        *v = load16(col(p0 + t), valid);
                    }
                    for (t, v) in hi.iter_mut().enumerate().take(ps1) {
                        *v = load16(col(p0 + 16 + t), valid);
                    }
                }
                if let Some(sp) = sums.filter(|_| valid > 0) {
                    let total = lo
                        .iter()
                        .chain(hi.iter())
                        .fold(_mm512_setzero_ps(), |acc, v| _mm512_add_ps(acc, *v));
                    let mask = ((1u32 << valid) - 1) as u16;
                    let at = sp.add(i0);
                    let old = _mm512_maskz_loadu_ps(mask, at);
                    _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(old, total));
                }
                // Row r: A(i0 + r, p0..p0 + 16), then A(i0 + r, p0 + 16..p0 + 32).
                let (lo, hi) = (transpose16(lo), transpose16(hi));
                for (r, (lo, hi)) in lo.into_iter().zip(hi).enumerate() {
                    store_row32(step.add(half * TILE + r * 32), lo, hi);
                }
            }
        }
        return;
    }
    // Row-major A (activations, dY): its whole steps, a step (32 floats) of each real row at a
    // time, each row's three pieces stored as whole lines by `store_row32`; the rest (a
    // partial last step, rows past the end, strided columns) 16 floats at a time below. Step
    // by step, the stores of a step fill its six tiles line after line; row by row, each went
    // to a new line 2 KiB from the last, every one in the same two sets of L1. Against the
    // 16-float loop (an AVX-512 Xeon, the tile unit pinned, alternating within one process):
    // `6400x768x192` +12–18 %, `dx:6400x192x576` +17–18 %, `6400x192x576` +2–3 %,
    // `dx:6400x768x192` +1–3 %.
    let whole = if a.cs == 1 { (kc / KS).min(steps) } else { 0 };
    for g in 0..panels {
        let panel = out.add(g * steps * STEP);
        let real = mc.saturating_sub(g * MR).min(MR);
        for s in 0..whole {
            for rr in 0..real {
                let src = a.ptr.offset((g * MR + rr) as isize * a.rs).add(s * KS);
                let dst = panel.add(s * STEP + (rr / 16) * TILE + (rr % 16) * 32);
                store_row32(dst, _mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
            }
        }
        for rr in 0..MR {
            let i = g * MR + rr;
            let (half, r) = (rr / 16, rr % 16);
            let done = if i < mc { whole } else { 0 };
            for s in done..steps {
                let dst = panel.add(s * STEP + half * TILE + r * 32);
                for q in 0..2 {
                    let p = s * KS + q * 16;
                    let valid = if i < mc {
                        kc.saturating_sub(p).min(16)
                    } else {
                        0
                    };
                    let x = if valid == 0 {
                        _mm512_setzero_ps()
                    } else if a.cs == 1 {
                        load16(a.ptr.offset(i as isize * a.rs + p as isize), valid)
                    } else {
                        let mut v = [0.0f32; 16];
                        for (t, e) in v.iter_mut().enumerate().take(valid) {
                            *e = *a.ptr.offset(i as isize * a.rs + (p + t) as isize * a.cs);
                        }
                        _mm512_loadu_ps(v.as_ptr())
                    };
                    store_pieces(dst.add(q * 16), x);
                }
            }
        }
    }
}

/// Packs `B (kc, n)` (with its strides) into panels of [`NR`] columns,
/// `[panel][step][piece][half][16 row pairs][16 × 2]`, zero-padded.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn pack_b(b: MatRef, kc: usize, n: usize, steps: usize, out: *mut u16) {
    let panels = n.div_ceil(NR);
    let at = |p: usize, j: usize| -> f32 {
        if p < kc && j < n {
            *b.ptr.offset(p as isize * b.rs + j as isize * b.cs)
        } else {
            0.0
        }
    };
    if b.rs == 1 && b.cs != 1 {
        // Columns contiguous (Wᵀ: a weight's rows): 16 columns × 16 steps transposed in
        // registers, each pair of steps then one tile row of pieces.
        for jp in 0..panels {
            for s in 0..steps {
                let step = out.add((jp * steps + s) * STEP);
                let p0 = s * KS;
                let valid = kc - p0.min(kc);
                for half in 0..2 {
                    let j0 = jp * NR + half * 16;
                    let mut lo = [_mm512_setzero_ps(); 16];
                    let mut hi = [_mm512_setzero_ps(); 16];
                    for c in 0..16.min(n.saturating_sub(j0)) {
                        let col = b.ptr.offset((j0 + c) as isize * b.cs + p0 as isize);
                        lo[c] = load16(col, valid.min(16));
                        hi[c] = load16(col.add(16), valid.saturating_sub(16).min(16));
                    }
                    // Row t: B(p0 + t, j0..j0 + 16), then B(p0 + 16 + t, ..).
                    let (lo, hi) = (transpose16(lo), transpose16(hi));
                    for r in 0..16 {
                        let rows = if r < 8 { &lo } else { &hi };
                        let t = 2 * (r % 8);
                        store_row_pair(step.add(half * TILE + r * 32), rows[t], rows[t + 1]);
                    }
                }
            }
        }
        return;
    }
    // Row pairs in memory order: each pair of B's rows read along its length, across the
    // panels (a weight gradient's x, thousands of rows: read a panel at a time, each row
    // was 64 bytes here and there). First every whole 16-column half of a whole pair, in one
    // loop whose source and destination are each one pointer stepped by a constant: with the
    // general loops below doing it all, LLVM kept eight pointers in stack slots (a fifth of
    // this packing's samples; bench-train's `dw:6400x768x192` +7 % without them).
    let whole = if b.cs == 1 { n / 16 } else { 0 };
    for s in 0..steps {
        for r in 0..16 {
            let p = s * KS + 2 * r;
            if p + 1 >= kc || whole == 0 {
                break;
            }
            let mut src = b.ptr.offset(p as isize * b.rs);
            let mut dst = out.add(s * STEP + r * 32);
            // Half q: panel q / 2, tile q % 2 of it.
            let mut q = 0;
            while q < whole {
                let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.offset(b.rs)));
                // The same 16 columns of the pair two pairs on (past the block's end: a hint,
                // never a fault).
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_offset(PF * b.rs).cast());
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_offset((PF + 1) * b.rs).cast());
                store_row_pair(dst.add((q & 1) * TILE), lo, hi);
                src = src.add(16);
                q += 1;
                if q & 1 == 0 {
                    dst = dst.add(steps * STEP);
                }
            }
        }
    }
    for s in 0..steps {
        for r in 0..16 {
            for jp in 0..panels {
                let step = out.add((jp * steps + s) * STEP);
                for half in 0..2 {
                    let j0 = jp * NR + half * 16;
                    // Row pair (p, p + 1) of the 16 columns j0.., element by element: the
                    // rest (a partial last half, an odd last row, strided columns, padding).
                    let p = s * KS + 2 * r;
                    if p + 1 < kc && j0 / 16 < whole {
                        continue;
                    }
                    let mut v = [[0.0f32; 16]; 2];
                    for (t, e) in v.iter_mut().enumerate() {
                        for (jj, x) in e.iter_mut().enumerate() {
                            *x = at(p + t, j0 + jj);
                        }
                    }
                    let (lo, hi) = (
                        _mm512_loadu_ps(v[0].as_ptr()),
                        _mm512_loadu_ps(v[1].as_ptr()),
                    );
                    store_row_pair(step.add(half * TILE + r * 32), lo, hi);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A move to an engine the packed weights lack waits until the looks have chosen it, without
    /// a break, for [`MOVE_PATIENCE`] times the packing's cost; one that packs nothing does not.
    #[test]
    fn a_move_that_packs_waits_out_its_cost() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let free = || Duration::ZERO;
        let cost = || Duration::from_millis(100);
        let mut f = None;
        // Nothing to pack: at once, either way.
        assert!(patient(&mut f, false, true, at(0), free));
        assert!(!patient(&mut f, true, false, at(0), free));
        assert!(f.is_none());
        // 100 ms of packing: 300 ms of looks that choose the tiles first.
        assert!(!patient(&mut f, false, true, at(0), cost));
        assert!(!patient(&mut f, false, true, at(150), cost));
        assert!(!patient(&mut f, false, true, at(299), cost));
        assert!(patient(&mut f, false, true, at(300), cost));
        assert!(f.is_none(), "the wait ends with the move");
        // A look that keeps the engine breaks the wait; the clock starts again.
        assert!(patient(&mut f, true, false, at(400), cost));
        assert!(f.is_some());
        assert!(patient(&mut f, true, true, at(500), cost));
        assert!(f.is_none());
        assert!(patient(&mut f, true, false, at(600), cost));
        assert!(patient(&mut f, true, false, at(800), cost));
        assert!(!patient(&mut f, true, false, at(900), cost));
    }

    /// A thread's own engine ([`hold`], as [`follow_here`] takes it) overrides the process's
    /// on that thread only, nests, and is gone when its guard drops; the tasks are counted.
    #[test]
    fn a_threads_own_engine_is_its_alone_until_the_guard_drops() {
        let process = enabled();
        let counted = own_engine_tasks();
        {
            let outer = hold(!process);
            assert_eq!((outer.on(), enabled()), (!process, !process));
            {
                let inner = hold(process);
                assert_eq!((inner.on(), enabled()), (process, process));
            }
            assert_eq!(enabled(), !process, "the outer guard's engine is back");
            std::thread::scope(|s| {
                s.spawn(|| assert_eq!(HERE.with(std::cell::Cell::get), None));
            });
        }
        assert_eq!(HERE.with(std::cell::Cell::get), None);
        let now = own_engine_tasks();
        assert!(now.0 + now.1 >= counted.0 + counted.1 + 2);
    }

    #[test]
    fn the_engine_moves_only_past_the_gap_between_the_thresholds() {
        const { assert!(TILES_ON_FROM > TILES_OFF_BELOW && TILES_OFF_BELOW > 1.0) };
        // On the tiles: kept down to the lower threshold, left below it.
        assert!(choose(true, 2.2));
        assert!(choose(true, TILES_ON_FROM - 0.05));
        assert!(choose(true, TILES_OFF_BELOW));
        assert!(!choose(true, TILES_OFF_BELOW - 0.01));
        assert!(!choose(true, 0.8));
        // On the FMA kernel: back on the tiles only from the upper one.
        assert!(!choose(false, 0.8));
        assert!(!choose(false, TILES_OFF_BELOW + 0.05));
        assert!(!choose(false, TILES_ON_FROM - 0.01));
        assert!(choose(false, TILES_ON_FROM));
        assert!(choose(false, 2.2));
    }

    #[test]
    fn the_tile_units_advantage_is_measured_where_it_may_run() {
        match crate::kernels::peak::tile_advantage() {
            Some(r) => {
                assert!(available());
                // Anywhere from a throttled unit's fraction to a few times the FMA units.
                assert!(r.is_finite() && r > 0.05 && r < 20.0, "{r}");
                println!("the tile unit runs {r:.2} times the FMA units' rate now");
            }
            None => assert!(!available()),
        }
    }

    /// Floats over many magnitudes and both signs (normal range).
    fn samples() -> Vec<f32> {
        let mut x = 0x1234_5678u32;
        (0..4096usize)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let mant = 1.0 + (x >> 8) as f32 / (1u32 << 24) as f32;
                let exp = (i % 61) as i32 - 30;
                let v = mant * 2f32.powi(exp);
                if i % 2 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect()
    }

    /// The three pieces hold a float to better than f32's own rounding: `|h + m + l − x|
    /// ≤ 2⁻²⁶ |x|`, each piece a bf16 (low half of its f32 bits zero by construction).
    #[test]
    fn three_pieces_hold_an_f32() {
        for x in samples() {
            let [h, m, l] = split_ref(x);
            let f = |b: u16| f32::from_bits((b as u32) << 16) as f64;
            let sum = f(h) + f(m) + f(l);
            let err = (sum - x as f64).abs();
            assert!(
                err <= (x as f64).abs() * 2f64.powi(-26),
                "{x}: {h:04x} {m:04x} {l:04x}"
            );
        }
    }

    #[test]
    fn row_blocks_are_even_and_cover_the_rows() {
        // One image (197 rows): one block, not 192 + 5.
        assert_eq!(RowBlocks::new(197).count, 1);
        assert_eq!(RowBlocks::new(197).max_rows(), 224);
        // 400 rows: 192 + 208, not 192 + 192 + 16.
        let b = RowBlocks::new(400);
        assert_eq!(
            (b.get(0, 400), b.get(1, 400), b.count),
            ((0, 192), (192, 400), 2)
        );
        // A thread's half of 6400 rows: 17 blocks of 6 or 5 tiles.
        assert_eq!(RowBlocks::new(3200).count, 17);
        for m in 1..3000 {
            let b = RowBlocks::new(m);
            let mut next = 0;
            for i in 0..b.count {
                let (r0, r1) = b.get(i, m);
                assert!(
                    r0 == next && r1 > r0 && r1 - r0 <= b.max_rows(),
                    "{m}: block {i}"
                );
                // Whole tiles but the last; blocks of whole tiles differ by one at most.
                assert!(r0 % MR == 0 && (r1 == m || r1 % MR == 0), "{m}: block {i}");
                assert!(r1 - r0 + MR >= b.max_rows() || r1 == m, "{m}: block {i}");
                next = r1;
            }
            assert_eq!(next, m);
            assert!(
                b.count == 1 || b.max_rows() <= MC * 4 / 3,
                "{m}: {}",
                b.max_rows()
            );
        }
    }

    /// Every element of a packed A is its reference split in the documented layout
    /// (`[panel][step][piece][half][16][32]`), zero-padded, for A with contiguous rows and
    /// with contiguous columns: whole and partial steps and panels; and the row sums.
    #[test]
    fn pack_a_is_the_reference_split_in_its_layout() {
        if !supported() {
            return;
        }
        for (mc, kc) in [(32usize, 32usize), (45, 70), (70, 96), (7, 33), (64, 200)] {
            let steps = kc.div_ceil(KS);
            let panels = mc.div_ceil(MR);
            // A (mc, kc) with values of every magnitude `samples` has.
            let xs = samples();
            let a: Vec<f32> = (0..mc * kc).map(|i| xs[(i * 7) % xs.len()]).collect();
            let at: Vec<f32> = (0..kc * mc).map(|i| a[(i % mc) * kc + i / mc]).collect();
            for transposed in [false, true] {
                let am = if transposed {
                    MatRef {
                        ptr: at.as_ptr(),
                        rs: 1,
                        cs: mc as isize,
                    }
                } else {
                    MatRef {
                        ptr: a.as_ptr(),
                        rs: kc as isize,
                        cs: 1,
                    }
                };
                let mut out = vec![0xffffu16; panels * steps * STEP];
                let mut sums = vec![1.0f32; mc];
                let sp = transposed.then_some(sums.as_mut_ptr());
                // SAFETY: A is (mc, kc) with these strides; `out` holds every panel.
                unsafe { pack_a(am, mc, kc, steps, out.as_mut_ptr(), sp) };
                for g in 0..panels {
                    for s in 0..steps {
                        for piece in 0..3 {
                            for rr in 0..MR {
                                for c in 0..KS {
                                    let (i, p) = (g * MR + rr, s * KS + c);
                                    let x = if i < mc && p < kc { a[i * kc + p] } else { 0.0 };
                                    let at = (g * steps + s) * STEP
                                        + piece * 2 * TILE
                                        + (rr / 16) * TILE
                                        + (rr % 16) * 32
                                        + c;
                                    assert_eq!(
                                        out[at],
                                        split_ref(x)[piece],
                                        "{mc}x{kc} transposed={transposed}: A({i}, {p}) piece {piece}"
                                    );
                                }
                            }
                        }
                    }
                }
                if transposed {
                    for (i, &got) in sums.iter().enumerate() {
                        let want = 1.0
                            + a[i * kc..(i + 1) * kc]
                                .iter()
                                .map(|&v| v as f64)
                                .sum::<f64>();
                        let scale = 1.0
                            + a[i * kc..(i + 1) * kc]
                                .iter()
                                .map(|v| v.abs() as f64)
                                .sum::<f64>();
                        assert!(
                            (got as f64 - want).abs() <= kc as f64 * 2f64.powi(-23) * scale,
                            "{mc}x{kc}: sum of row {i}"
                        );
                    }
                }
            }
        }
    }

    /// The packing's vector split is the reference split, bit for bit (checked through a
    /// packed A panel: row 0's first 32 values of each piece).
    #[test]
    fn the_vector_split_is_the_reference() {
        if !supported() {
            return;
        }
        let xs = samples();
        for chunk in xs.chunks_exact(32) {
            let a = MatRef {
                ptr: chunk.as_ptr(),
                rs: 32,
                cs: 1,
            };
            let mut out = vec![0u16; STEP];
            // SAFETY: one row of 32 floats, packed into one panel's single step.
            unsafe { pack_a(a, 1, 32, 1, out.as_mut_ptr(), None) };
            for (p, &x) in chunk.iter().enumerate() {
                let want = split_ref(x);
                for (piece, &w) in want.iter().enumerate() {
                    assert_eq!(out[piece * 2 * TILE + p], w, "{x} piece {piece}");
                }
            }
        }
    }
}
