//! Matrix products `Y = X·Wᵀ + b` with a fused epilogue, and their gradients: the heart of the
//! engine.
//!
//! The products run on [`super::sgemm`] (packed panels and one register-tiled micro-kernel per
//! rung of the instruction-set ladder; `matrixmultiply` on the portable rung). Threads split
//! the output into blocks along its larger dimension — columns in whole micro-panels, so each
//! thread reads only its panels of the weight — and each block's epilogue (bias and residual
//! inside the micro-kernel's store; GELU, tanh right after, while the block is in cache) runs
//! on the thread that computed it.
//!
//! Weights are kept in PyTorch's `(out, in)` layout; [`PackedLinear`] holds a weight packed
//! once into the micro-kernel's panels (inference packs a model's weights once).

use super::math::tanh_inplace;
use super::sgemm::{gemm, gemm_gather, gemm_row_sums, BRef, Gather, MatRef, Out, PackedB};
use super::{team, EvenSplit, GuidedSplit, Isa, Split, SyncPtr};
use crate::config::Gelu;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What happens to each output element after the product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// `y = x·Wᵀ + b`
    None,
    /// `y = GELU(x·Wᵀ + b)`
    Gelu(Gelu),
    /// `y = tanh(x·Wᵀ + b)`
    Tanh,
    /// `y += x·Wᵀ + b`: accumulate into the output (the residual connection, in place).
    Accumulate,
}

impl Epilogue {
    /// Every epilogue, both GELU forms: what a check of the products covers.
    pub const ALL: [Epilogue; 5] = [
        Epilogue::None,
        Epilogue::Gelu(Gelu::Exact),
        Epilogue::Gelu(Gelu::Tanh),
        Epilogue::Tanh,
        Epilogue::Accumulate,
    ];
}

/// Below this many multiply-adds a product runs on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// A weight packed for the tile unit of at least this many elements (`k · n`), and at most
/// [`TILE_COLUMNS_MAX_K`] inputs, is split among the threads by columns when the rows are few
/// (batch 1), as on the FMA kernels; other products split the rows. By columns, x is packed
/// into its pieces once, the threads sharing its tiles of rows, and each thread then streams
/// only its own panels of W (6 bytes an element, from L3 or memory) and runs each over all
/// the rows (7 tiles at 197 rows, not 3) — long enough for [`super::amx`] to fetch the next
/// panel meanwhile. On an AVX-512 Xeon at batch 1: ViT-B/16's qkv 9 % and fc1 7 % faster in
/// the model, its forward +4–6 %; ViT-S/16's forward +4 % (qkv and fc1, 0.44 and 0.59 M
/// elements). Not taken where the caller fuses work on each thread's rows after the product
/// (`rows_done`: the residual's LayerNorm after the attention projection).
const TILE_COLUMNS_MIN: usize = 1 << 18;

/// On the FMA kernels, a product whose rows give each thread at least this many row tiles is
/// split by rows, fewer by columns (see `linear_parts`).
const FMA_ROW_TILES_MIN: usize = 4;

/// Products with a longer inner dimension (several blocks of steps on the tile unit: MLP fc2)
/// keep the row split: ViT-B/16's fc2 (3072 inputs) ran no faster by columns, even with x
/// packed once, and 9 % slower with its weight in cache.
const TILE_COLUMNS_MAX_K: usize = 768;

/// The weight gradient splits its sum over rows among the threads from this many rows each.
const DW_MIN_ROWS_PER_THREAD: usize = 256;

/// Parts per thread of a product's rows where they are many (a training step's 6400), and
/// the fewest rows a part keeps: the threads claim the parts as they finish, so a core that
/// runs slower than the other for a while (a tile unit at half speed, a busy neighbour) does
/// fewer of them instead of holding the others up at the end. Split in as many parts as
/// threads, each waited for the slowest; on an AVX-512 Xeon whose two cores' tile units ran
/// at different speeds for seconds at a time, the bench-train products ran up to 1.75× faster
/// in four parts a thread (alternating within one process) and lost 0–4 % where the cores ran
/// alike.
const ROW_PARTS_PER_THREAD: usize = 4;
const ROW_PART_MIN: usize = 256;

/// The fewest panels of columns in a part of a product whose threads split its columns in
/// parts that shrink ([`GuidedSplit`]).
const GUIDED_MIN_PANELS: usize = 2;

/// Rows of the tile unit's register tile: the parts of a product that runs there are whole
/// multiples of it, so that none but the last ends in a partial tile.
const TILE_UNIT_ROWS: usize = 32;

/// The parts of a product's `rows` for `threads` threads that split its rows, where there are
/// more than threads (see [`ROW_PARTS_PER_THREAD`]): whole tiles each, as even as they go, of
/// `align(rows in a part)` rows.
fn row_split(rows: usize, threads: usize, align: impl FnOnce(usize) -> usize) -> Option<EvenSplit> {
    let parts = threads * ROW_PARTS_PER_THREAD;
    (threads > 1 && rows >= parts * ROW_PART_MIN)
        .then(|| EvenSplit::new(rows, parts, align(rows / parts)))
}

/// The row tile of an `(m, n, k)` product's kernel on rung `isa` (B unpacked, or packed by
/// [`shared_packing`]): the tile unit's, or the FMA kernel's.
fn tile_rows(isa: Isa, (m, n, k): (usize, usize, usize)) -> usize {
    if super::sgemm::on_tiles_for(isa, m, n, k) {
        TILE_UNIT_ROWS
    } else {
        super::sgemm::product_geometry(isa, n).mr
    }
}

thread_local! {
    /// The weight packed by the caller for the parts of one product that all read it
    /// ([`with_packing`]), its buffers reused by the next.
    static CALL_PACKED: std::cell::RefCell<Option<PackedB>> = const { std::cell::RefCell::new(None) };
}

/// `f` with `B (k, n)` packed once on the calling thread for the parts of one product (for the
/// tile unit where a product of `rows` rows would run there; [`PackedB::repack`]), into the
/// buffers the last call's packing left; `None` on the portable rung.
///
/// # Safety
/// `b` must address a `(k, n)` matrix with its strides.
unsafe fn with_packing<R>(
    isa: Isa,
    b: MatRef,
    (k, n): (usize, usize),
    rows: usize,
    f: impl FnOnce(Option<&PackedB>) -> R,
) -> R {
    let old = CALL_PACKED.with(|p| p.borrow_mut().take());
    let packed = PackedB::repack(old, isa, b, (k, n), rows);
    let r = f(packed.as_ref());
    CALL_PACKED.with(|p| *p.borrow_mut() = packed);
    r
}

/// [`with_packing`] where the parts of a product of `rows` rows each would run on the tile unit
/// (each part would otherwise convert all of B to the tile unit's pieces itself), else `f`
/// with `None` (the FMA kernels pack their panels per part, a plain copy, and read some
/// products' B in place).
fn shared_packing<R>(
    isa: Isa,
    b: MatRef,
    (k, n): (usize, usize),
    rows: usize,
    f: impl FnOnce(Option<&PackedB>) -> R,
) -> R {
    if !super::sgemm::on_tiles_for(isa, rows, n, k) {
        return f(None);
    }
    // SAFETY: the caller's `b` addresses a `(k, n)` matrix with its strides.
    unsafe { with_packing(isa, b, (k, n), rows, f) }
}

thread_local! {
    /// The calling thread's partial weight gradients of the other threads, reused.
    static DW_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A weight `W (n, k)` packed for the running rung's micro-kernel: `Bᵀ = W` read as `B (k, n)`
/// panels. Made once per model for inference; a product given one that the running rung
/// cannot read (a test switched rungs) uses the plain weight instead. On the AVX-512 rung of
/// a CPU with the tile unit, whose engine moves between the tiles and the FMA kernel
/// ([`super::amx::adapt`]), it is packed a second time for the other engine the first time a
/// product runs there, and both are kept.
#[derive(Debug)]
pub struct PackedLinear {
    packed: PackedB,
    /// The other engine's packing (the FMA kernel's beside one for the tile unit, or the tile
    /// unit's beside one for the FMA kernel), made on first need.
    other: OnceLock<Option<PackedB>>,
    /// Whether [`PACKINGS`] counts this weight (packed on the AVX-512 rung, where the engine
    /// can move).
    counted: bool,
}

/// The packed inference weights of the process, for the cost of moving the AVX-512 rung's
/// products to the engine they are not packed for ([`move_cost`]). Engines by index: 0 the
/// FMA kernel, 1 the tile unit.
pub(crate) struct PackLedger {
    /// Elements of the weights packed for the other engine alone: what a move to this one
    /// packs on its way.
    lacking: [AtomicUsize; 2],
    /// Nanoseconds and elements of the packings made for each engine so far: its speed.
    nanos: [AtomicU64; 2],
    elems: [AtomicU64; 2],
}

impl PackLedger {
    pub(crate) const fn new() -> Self {
        PackLedger {
            lacking: [AtomicUsize::new(0), AtomicUsize::new(0)],
            nanos: [AtomicU64::new(0), AtomicU64::new(0)],
            elems: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// A packing of `elems` elements for the tile unit (`on_tiles`) or the FMA kernel, which
    /// took `took`; `first`: the weight's first packing (the other engine now lacks it), else
    /// its second (neither lacks it any more).
    pub(crate) fn made(&self, on_tiles: bool, elems: usize, took: Duration, first: bool) {
        let e = usize::from(on_tiles);
        self.nanos[e].fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
        self.elems[e].fetch_add(elems as u64, Relaxed);
        if first {
            self.lacking[1 - e].fetch_add(elems, Relaxed);
        } else {
            self.forget(on_tiles, elems);
        }
    }

    /// A weight of `elems` elements that the tile unit (`tiles`) or the FMA kernel lacked is
    /// packed for it now, or dropped.
    pub(crate) fn forget(&self, tiles: bool, elems: usize) {
        let _ = self.lacking[usize::from(tiles)]
            .fetch_update(Relaxed, Relaxed, |l| Some(l.saturating_sub(elems)));
    }

    /// About how long packing the weights that lack it for the tile unit (`to_tiles`) or the
    /// FMA kernel takes: their elements at the speed its packings (else the other engine's)
    /// have run so far. Zero where none lacks it.
    pub(crate) fn cost(&self, to_tiles: bool) -> Duration {
        let e = usize::from(to_tiles);
        let lacking = self.lacking[e].load(Relaxed) as f64;
        let rate = |i: usize| {
            let n = self.elems[i].load(Relaxed);
            (n > 0).then(|| self.nanos[i].load(Relaxed) as f64 / n as f64)
        };
        let ns = rate(e).or_else(|| rate(1 - e)).unwrap_or(0.0);
        Duration::from_nanos((lacking * ns) as u64)
    }
}

/// Every [`PackedLinear`] of the process (see [`PackLedger`]).
static PACKINGS: PackLedger = PackLedger::new();

/// About how long moving the products to the tile unit (`to_tiles`) or to the FMA kernel
/// would spend packing the inference weights packed for the other engine alone (zero where
/// none are): [`super::amx::adapt`] makes such a move only once the other engine has been
/// the faster one for a few times as long (`amx::MOVE_PATIENCE`).
pub fn move_cost(to_tiles: bool) -> Duration {
    PACKINGS.cost(to_tiles)
}

impl Drop for PackedLinear {
    fn drop(&mut self) {
        if self.counted && self.other.get().is_none() {
            let (k, n) = self.packed.shape();
            PACKINGS.forget(!self.packed.on_tiles(), k * n);
        }
    }
}

impl PackedLinear {
    /// Packs `w (n, k)` for the running rung and engine; `None` on the portable rung.
    pub fn new(w: &[f32], (n, k): (usize, usize)) -> Option<Self> {
        super::check_len("PackedLinear: w", w.len(), n * k);
        let isa = super::isa();
        let start = Instant::now();
        // SAFETY: `w` holds (n, k) row-major, so B (k, n) = Wᵀ has these strides.
        let packed = unsafe { PackedB::new(isa, transposed(w, k), k, n) }?;
        let counted = isa == Isa::Avx512;
        if counted {
            PACKINGS.made(packed.on_tiles(), n * k, start.elapsed(), true);
        }
        Some(PackedLinear {
            packed,
            other: OnceLock::new(),
            counted,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.packed.bytes()
            + self
                .other
                .get()
                .and_then(Option::as_ref)
                .map_or(0, PackedB::bytes)
    }

    /// Whether this weight's first packing is for the tile unit.
    pub fn on_tiles(&self) -> bool {
        self.packed.on_tiles()
    }

    /// The packing the running engine reads for a product `B (k, n)` with this weight `w`: the
    /// one made by [`Self::new`], or, where the AVX-512 rung's engine has moved to the other
    /// one since, that engine's (made here the first time). `None` where neither fits
    /// (another rung, another shape).
    fn for_engine(&self, isa: Isa, w: &[f32], (k, n): (usize, usize)) -> Option<&PackedB> {
        let p = &self.packed;
        if p.shape() != (k, n) {
            return None;
        }
        if p.usable(isa) {
            return Some(p);
        }
        if isa != Isa::Avx512 {
            return None;
        }
        debug_assert!(w.len() >= n * k);
        // SAFETY: `w` holds (n, k) row-major (its length checked by the caller, `linear_parts`),
        // read as B (k, n) = Wᵀ.
        self.other
            .get_or_init(|| {
                let start = Instant::now();
                let other = unsafe { PackedB::new(isa, transposed(w, k), k, n) };
                if self.counted {
                    let tiles = !p.on_tiles();
                    PACKINGS.made(tiles, n * k, start.elapsed(), false);
                }
                other
            })
            .as_ref()
            .filter(|o| o.usable(isa))
    }
}

/// `W (n, k)`, row-major, read as `B (k, n) = Wᵀ`.
fn transposed(w: &[f32], k: usize) -> MatRef {
    MatRef {
        ptr: w.as_ptr(),
        rs: 1,
        cs: k as isize,
    }
}

/// `out = epilogue(x·Wᵀ + bias)`.
///
/// # Shapes
/// `x (m, k)`, `w (n, k)` (PyTorch `Linear` layout), `bias (n)`, `out (m, n)`; all row-major.
///
/// # Panics
/// When a slice is shorter than its shape: the product writes through raw pointers, so the
/// lengths are checked in every build, not only in debug ones.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    dims: (usize, usize, usize),
    epilogue: Epilogue,
) {
    linear_packed(x, w, None, bias, out, dims, epilogue);
}

/// [`linear`] with the weight also given packed (`packed`, made from this `w`).
pub fn linear_packed(
    x: &[f32],
    w: &[f32],
    packed: Option<&PackedLinear>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    dims: (usize, usize, usize),
    epilogue: Epilogue,
) {
    linear_parts(x, w, packed, bias, out, dims, epilogue, None, None);
}

/// A training forward's GELU layer: `values = GELU(x·Wᵀ + bias)`, and `grad` GELU's
/// derivative at `x·Wᵀ + bias` (the factor its backward multiplies by), as [`linear`] into
/// `grad` followed by [`super::math::gelu_with_grad`]`(grad, values)` — bit for bit — but
/// evaluated by the FMA kernels on each register tile as it is written, still in L1, instead
/// of in a pass that reads the pre-activations back from memory.
///
/// # Shapes
/// As [`linear`], with `grad` and `values` both `(m, n)`.
///
/// # Panics
/// When a slice is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_with_grad(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    grad: &mut [f32],
    values: &mut [f32],
    dims: (usize, usize, usize),
    kind: Gelu,
) {
    let (m, _, n) = dims;
    super::check_len("linear_gelu_with_grad: values", values.len(), m * n);
    let values = SyncPtr(values.as_mut_ptr());
    let epi = Epilogue::Gelu(kind);
    linear_parts(x, w, None, bias, grad, dims, epi, None, Some(values));
}

/// Called with a part of a product's rows, `(r0, r1)`, and those rows of `out` (`(r1 − r0, n)`),
/// by the task that has just written them whole.
type RowsDone<'a> = &'a (dyn Fn((usize, usize), &[f32]) + Sync);

/// [`linear_packed`], calling `rows_done` on each task's rows right after its product when
/// the tasks hold whole rows (the rows split among the threads, or one task for all);
/// returns the rows it did not call it on, `(r0, r1)`: none (`r0 == r1`) when it did for all,
/// all of them for a split by columns, the last partial tile's when the threads split those
/// by columns ([`edge_split`]).
#[allow(clippy::too_many_arguments)]
fn linear_parts(
    x: &[f32],
    w: &[f32],
    packed: Option<&PackedLinear>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    (m, k, n): (usize, usize, usize),
    epilogue: Epilogue,
    rows_done: Option<RowsDone>,
    gelu_values: Option<SyncPtr>,
) -> (usize, usize) {
    super::check_len("linear: x", x.len(), m * k);
    super::check_len("linear: w", w.len(), n * k);
    super::check_len("linear: out", out.len(), m * n);
    if let Some(b) = bias {
        super::check_len("linear: bias", b.len(), n);
    }
    if m == 0 || n == 0 {
        return (m, m);
    }
    let isa = super::isa();
    let packed = packed.and_then(|p| p.for_engine(isa, w, (k, n)));
    let threads = team::threads();
    let outp = SyncPtr(out.as_mut_ptr());
    let run_with = |packed: Option<&PackedB>,
                    rows: (usize, usize),
                    cols: (usize, usize),
                    edge: Option<Edge>,
                    pieces: Pieces| {
        // SAFETY: the ranges of a `Split` are disjoint, so each task writes its own
        // sub-matrix of `out` (and its own columns of an `EdgeSplit`'s rows); `x`, `w` and
        // `packed` are only read.
        unsafe {
            block(
                isa,
                x,
                w,
                packed,
                bias,
                outp,
                (m, k, n),
                rows,
                cols,
                edge,
                pieces,
                epilogue,
                gelu_values,
            )
        }
        if let (Some(done), (0, c1)) = (rows_done, cols) {
            if c1 == n {
                let (r0, r1) = rows;
                // SAFETY: this task's rows of `out`, written above and owned by it alone.
                done(rows, unsafe {
                    std::slice::from_raw_parts(outp.get().add(r0 * n), (r1 - r0) * n)
                });
            }
        }
    };
    let run = |rows, cols, edge, pieces| run_with(packed, rows, cols, edge, pieces);
    // Few rows: split the columns in whole panels; each thread reads only its panels of W.
    // On the tile unit for a large weight at a small batch (see `TILE_COLUMNS_MIN`); on the
    // FMA kernels only when the rows would give a thread fewer than `FMA_ROW_TILES_MIN` tiles
    // (the classifier at a small batch). Split by rows at batch 1 (197 rows) on the FMA
    // kernels, against by columns (AVX2 and AVX-512 FMA rungs of an AVX-512 Xeon, 2 threads,
    // 4 interleaved rounds, after `WARM_TILES`): ViT-S/16 +2.3 % and +5.3 %, Ti/16 +1.1 % and
    // +1.0 %, B/16 +1.0 % and +3.2 %; each thread streams the whole weight, the two reading
    // the same panels about together, and the projection's rows are then final in its task,
    // which runs LayerNorm on them. Column parts start on the packing's panels
    // (`product_geometry` gives its width).
    let alone = threads == 1 || m * n * k < PARALLEL_MIN_MACS;
    let on_tiles = packed.is_some_and(|p| p.on_tiles());
    let tiles_by_cols = k * n >= TILE_COLUMNS_MIN && k <= TILE_COLUMNS_MAX_K && rows_done.is_none();
    let geometry = super::sgemm::product_geometry(isa, n);
    let few_rows = m < threads * FMA_ROW_TILES_MIN * geometry.mr;
    let by_cols = n >= m && if on_tiles { tiles_by_cols } else { few_rows };
    // Many rows: more parts than threads (see `ROW_PARTS_PER_THREAD`), all reading one packing
    // of the weight.
    let align = |part_rows| match packed {
        Some(p) if p.on_tiles() => TILE_UNIT_ROWS,
        Some(_) => geometry.mr,
        None => tile_rows(isa, (part_rows, n, k)),
    };
    if let Some(s) = row_split(m, threads, align).filter(|_| !alone && !by_cols) {
        let each = |packed: Option<&PackedB>| {
            team::for_each(s.count, |i| run_with(packed, s.get(i), (0, n), None, None));
        };
        match packed {
            Some(p) => each(Some(p)),
            None => shared_packing(isa, transposed(w, k), (k, n), m / s.count, each),
        }
        return (m, m);
    }
    // The rows split among the threads and a partial last tile: its rows split by columns, in
    // the same pass over the weight (see `EdgeSplit`), on the tile unit and on the FMA
    // kernels with a packed weight. On the FMA kernels at batch 1 (197 rows: 32 whole 6-row
    // tiles and 5 rows), splitting the rows alone gave one thread 17 tiles and the other 16.
    #[cfg(target_arch = "x86_64")]
    let tile = match packed {
        Some(_) if on_tiles => Some((super::amx::MR, super::amx::NR)),
        Some(_) => Some((geometry.mr, geometry.nr)),
        None => None,
    };
    #[cfg(target_arch = "x86_64")]
    if let (false, Some((mr, nr)), false) = (alone, tile, by_cols) {
        if let Some(e) =
            edge_split(m, n, threads, (mr, nr)).filter(|_| k > 0 && epilogue != Epilogue::Tanh)
        {
            if threads == 2 {
                // Two threads: the whole tiles cut in proportion to how fast each ran lately
                // (see `PairRates`), each thread taking its own part if the other has not.
                let engine = usize::from(on_tiles);
                let tiles = e.full / mr;
                let cut = PAIR_RATES.cut(engine, tiles) * mr;
                let caller = std::thread::current().id();
                let first_taken = AtomicBool::new(false);
                let second_taken = AtomicBool::new(false);
                team::for_each(2, |_| {
                    let own = usize::from(std::thread::current().id() != caller);
                    // This thread's part if still free, else the other one.
                    let flags = [&first_taken, &second_taken];
                    let part = if !flags[own].swap(true, Relaxed) {
                        own
                    } else {
                        flags[1 - own].store(true, Relaxed);
                        1 - own
                    };
                    let rows = if part == 0 { (0, cut) } else { (cut, e.full) };
                    let cols = e.cols.get(part);
                    let start = Instant::now();
                    run(rows, (0, n), Some(((e.full, m), cols)), None);
                    let macs = ((rows.1 - rows.0) * n + (m - e.full) * (cols.1 - cols.0)) * k;
                    PAIR_RATES.record(engine, own, macs, start.elapsed());
                });
                return (e.full, m);
            }
            team::for_each(threads, |i| {
                run(
                    e.rows.get(i),
                    (0, n),
                    Some(((e.full, m), e.cols.get(i))),
                    None,
                );
            });
            return (e.full, m);
        }
    }
    // Split by columns on the tile unit: x's pieces packed once, the threads sharing its
    // tiles of rows, instead of all of them by every thread (ViT-B/16's qkv at batch 1: 3 %
    // faster than packing x twice, and S/16's products then gain from the split too). The
    // columns go in parts that shrink, claimed as the threads finish ([`GuidedSplit`]): each
    // part reads only its own panels of the weight, so more parts cost little, and a core
    // whose tile unit runs slower for a while does fewer of them. Against one part a thread
    // (alternating within one process, an AVX-512 Xeon, 2 threads, the tile unit pinned, 60
    // forwards each): ViT-B/16 at batch 1 took 0.91 of the time, median +2.2 %, its slowest
    // fifth 1.25–1.36× faster (the two cores' tile units at different speeds); ViT-S/16 −0.9 %
    // where the cores ran alike. Four equal parts a thread lost 2.7 % on S/16 there: the first
    // panel of each part waits on memory.
    #[cfg(target_arch = "x86_64")]
    if !alone && by_cols && on_tiles && super::amx::one_block(m) {
        PIECES.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.ensure(super::amx::pieces_len(m, k));
            let out = SyncPtr(buf.slice_mut().as_mut_ptr());
            let tiles = Split::new(m.div_ceil(super::amx::MR), threads, 1);
            team::for_each(tiles.count, |i| {
                let a = MatRef {
                    ptr: x.as_ptr(),
                    rs: k as isize,
                    cs: 1,
                };
                // SAFETY: `x` is `(m, k)`, `out` holds `pieces_len(m, k)`, the parts' tiles
                // of rows are disjoint, and the tile unit is in use (`on_tiles`).
                unsafe { super::amx::pack_rows(a, m, k, tiles.get(i), out.get()) }
            });
            let parts = GuidedSplit::new(n, threads, geometry.nr, GUIDED_MIN_PANELS);
            team::for_each(parts.count, |i| run((0, m), parts.get(i), None, Some(out)));
        });
        return (0, m);
    }
    for_blocks((m, n), alone, by_cols, geometry, |rows, cols| {
        run(rows, cols, None, None)
    });
    if alone || !by_cols {
        (m, m)
    } else {
        (0, m)
    }
}

/// All of a product's x in the tile unit's pieces, packed by the threads together
/// ([`super::amx::pack_rows`]), for a product whose threads split the columns.
type Pieces = Option<SyncPtr<u16>>;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The caller's buffer for [`Pieces`], grown on demand and reused.
    static PIECES: std::cell::RefCell<super::sgemm::Aligned<u16>> = Default::default();
}

/// Rows `(r0, r1)` of a product and columns `(c0, c1)` of them that a task computes beside
/// its block, in the same pass over the weight (see [`EdgeSplit`]).
type Edge = ((usize, usize), (usize, usize));

/// How the threads share a product (on the tile unit, or on the FMA kernels with a packed
/// weight) whose rows end in a partial tile of `mr` rows: the
/// whole tiles' rows `0..full` split among them (`rows`), the rows left (`full..m`, fewer
/// than a tile's) split by columns (`cols`), each thread computing its part of them in the
/// same pass over the weight as its rows.
#[cfg(target_arch = "x86_64")]
struct EdgeSplit {
    full: usize,
    rows: Split,
    cols: Split,
}

/// How fast the caller (0) and the team's other thread (1) ran their parts of the products
/// split by rows at a small batch ([`EdgeSplit`] on 2 threads), on each engine (0: FMA, 1:
/// the tile unit): multiply-adds per nanosecond, a moving average (`f32` bits; 0 before the
/// first), from which the next product's rows are cut.
///
/// Cut in half, each of the two threads took as long as the slower one: on a cloud host the
/// two virtual CPUs often run at different speeds for seconds at a time (a busy neighbour on
/// one, its tile unit slower), and `perf` then showed the caller waiting for the worker in
/// 10 % of its samples. Moving more weight-panel passes to the faster thread (the rows in
/// parts that shrink, claimed as the threads finish) cost 15 % where they ran alike: each
/// part streams the whole weight. A cut in proportion keeps one pass per thread. Against the
/// even cut (alternating within one process, an AVX-512 Xeon, 2 threads, median new/old
/// speed; the total time over the run): ViT-Ti/16 at batch 1 +15.4 % (1.150; 150 forwards),
/// B/16 +0.8 % (1.044) and S/16 +0.7 % (1.012) on the FMA kernel, B/16 on the tile unit
/// +13.6 % (1.133), and with the engine left to choose +11 % (1.103); no loss where the
/// threads ran alike.
struct PairRates([[AtomicU32; 2]; 2]);

static PAIR_RATES: PairRates = PairRates::new();

impl PairRates {
    /// No rates yet: the first products are cut in half.
    const fn new() -> Self {
        PairRates([
            [AtomicU32::new(0), AtomicU32::new(0)],
            [AtomicU32::new(0), AtomicU32::new(0)],
        ])
    }

    /// Adds a part's `macs` that thread `who` ran in `took` to its average.
    fn record(&self, engine: usize, who: usize, macs: usize, took: Duration) {
        let ns = took.as_nanos() as f32;
        if ns <= 0.0 || macs == 0 {
            return;
        }
        let rate = macs as f32 / ns;
        let cell = &self.0[engine][who];
        let old = f32::from_bits(cell.load(Relaxed));
        let new = if old > 0.0 {
            old + PAIR_RATE_WEIGHT * (rate - old)
        } else {
            rate
        };
        cell.store(new.to_bits(), Relaxed);
    }

    /// Of `tiles` (at least 2) whole row tiles, how many the caller takes ([`pair_cut`]).
    fn cut(&self, engine: usize, tiles: usize) -> usize {
        pair_cut(
            self.0[engine]
                .each_ref()
                .map(|c| f32::from_bits(c.load(Relaxed))),
            tiles,
        )
    }

    /// Sets both threads' rates on both engines (tests: to cut the rows unevenly).
    #[cfg(test)]
    fn set(&self, rates: [f32; 2]) {
        for engine in &self.0 {
            for (cell, r) in engine.iter().zip(rates) {
                cell.store(r.to_bits(), Relaxed);
            }
        }
    }
}

/// Of `tiles` (at least 2) whole row tiles, how many the thread of rate `rates[0]` takes:
/// in proportion to the two rates, rounded, at least one each; half before both have one.
/// Whole tiles make a dead band: threads within a few percent of each other split evenly.
fn pair_cut(rates: [f32; 2], tiles: usize) -> usize {
    let [a, b] = rates;
    let share = if a > 0.0 && b > 0.0 { a / (a + b) } else { 0.5 };
    ((tiles as f32 * share).round() as usize).clamp(1, tiles.saturating_sub(1).max(1))
}

/// The weight of the latest part in [`PairRates`]' averages.
const PAIR_RATE_WEIGHT: f32 = 0.25;

/// The [`EdgeSplit`] of an `(m, n)` product for `threads` threads and an `mr × nr` tile (the
/// columns split in whole `nr`-wide panels), or `None` where its rows are whole tiles, or the
/// whole tiles' rows or the columns do not make one part per thread. A partial tile costs
/// about as much as a whole one (on the tile unit a half tile for up to 16 rows), so
/// splitting the rows alone left one in a thread's part: ViT-B/16 at batch 1 (197 rows) took
/// 3.56 tiles' time per thread on the tile unit where 3.28 are needed, 17 on the AVX2 kernel
/// where 16.4 are.
#[cfg(target_arch = "x86_64")]
fn edge_split(m: usize, n: usize, threads: usize, (mr, nr): (usize, usize)) -> Option<EdgeSplit> {
    let full = m / mr * mr;
    let rows = Split::new(full, threads, mr);
    let cols = Split::new(n, threads, nr);
    (full < m && full > 0 && rows.count == threads && cols.count == threads).then_some(EdgeSplit {
        full,
        rows,
        cols,
    })
}

/// A residual branch and the LayerNorm after it: `out += x·Wᵀ + bias`, then `normed =
/// LayerNorm(out)` with `(gamma, beta, eps)` (a pre-norm block's attention output and its
/// second norm, in inference). When the threads split the rows (many rows: batch > 1), each
/// normalises its own rows as soon as its product has written them, still in its cache and
/// in the same parallel region; otherwise the LayerNorm runs after the product.
///
/// # Shapes
/// As [`linear`] with `out (m, n)`, plus `normed (m, n)`, `gamma`, `beta` `(n)`.
///
/// # Panics
/// When a slice is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn linear_add_norm(
    x: &[f32],
    w: &[f32],
    packed: Option<&PackedLinear>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    (normed, gamma, beta, eps): (&mut [f32], &[f32], &[f32], f32),
    (m, k, n): (usize, usize, usize),
) {
    super::check_len("linear_add_norm: normed", normed.len(), m * n);
    super::check_len("linear_add_norm: gamma", gamma.len(), n);
    super::check_len("linear_add_norm: beta", beta.len(), n);
    let normp = SyncPtr(normed.as_mut_ptr());
    let norm_rows = |(r0, r1): (usize, usize), rows: &[f32]| {
        // SAFETY: rows r0..r1 of `normed` belong to the task that wrote those of `out`.
        let dst = unsafe { std::slice::from_raw_parts_mut(normp.get().add(r0 * n), (r1 - r0) * n) };
        super::layernorm::layernorm_here(rows, dst, gamma, beta, eps);
    };
    let epi = Epilogue::Accumulate;
    let (r0, r1) = linear_parts(
        x,
        w,
        packed,
        bias,
        out,
        (m, k, n),
        epi,
        Some(&norm_rows),
        None,
    );
    if r0 < r1 {
        let rows = r0 * n..r1 * n;
        super::layernorm::layernorm(&out[rows.clone()], &mut normed[rows], gamma, beta, n, eps);
    }
}

/// `out (m, n) = A·Wᵀ + bias` with `A (m, k)` gathered from `base`: `A(i, p) =
/// base[rows[i] + cols[p]]` — a convolution's product without its lowered matrix (see
/// `kernels::conv`). `None` on the portable rung, which cannot gather: lower the input there.
///
/// # Panics
/// When a table or `out` is shorter than its shape, or an offset leaves `base`.
pub(crate) fn linear_gathered(
    base: &[f32],
    (rows, cols): (&[isize], &[isize]),
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    dims: (usize, usize, usize),
) -> Option<()> {
    gathered(base, (rows, cols), w, false, bias, out, dims)
}

/// `out (m, n) += A · B` with `A (m, k)` gathered as in [`linear_gathered`] and `B (k, n)`
/// row-major: a convolution's weight gradient, `dWᵀ += (lowered input)ᵀ · dY`, with the
/// tables swapped so that A is the lowered input transposed.
pub(crate) fn gathered_accumulate(
    base: &[f32],
    (rows, cols): (&[isize], &[isize]),
    b: &[f32],
    out: &mut [f32],
    dims: (usize, usize, usize),
) -> Option<()> {
    gathered(base, (rows, cols), b, true, None, out, dims)
}

/// The product of [`linear_gathered`] (`w (n, k)`, `out` overwritten) or of
/// [`gathered_accumulate`] (`b_kn`: `w` is `B (k, n)` row-major, `out` accumulated).
fn gathered(
    base: &[f32],
    (rows, cols): (&[isize], &[isize]),
    w: &[f32],
    b_kn: bool,
    bias: Option<&[f32]>,
    out: &mut [f32],
    (m, k, n): (usize, usize, usize),
) -> Option<()> {
    let isa = super::isa();
    if isa == Isa::Portable {
        return None;
    }
    super::check_len("linear_gathered: rows", rows.len(), m);
    super::check_len("linear_gathered: cols", cols.len(), k);
    super::check_len("linear_gathered: w", w.len(), n * k);
    super::check_len("linear_gathered: out", out.len(), m * n);
    // Every read stays inside `base`: the largest row and column offsets together.
    let hi =
        rows[..m].iter().max().copied().unwrap_or(0) + cols[..k].iter().max().copied().unwrap_or(0);
    let lo =
        rows[..m].iter().min().copied().unwrap_or(0) + cols[..k].iter().min().copied().unwrap_or(0);
    assert!(
        m == 0 || k == 0 || (lo >= 0 && (hi as usize) < base.len()),
        "linear_gathered: offsets {lo}..={hi} outside a base of {}",
        base.len()
    );
    if let Some(b) = bias {
        super::check_len("linear_gathered: bias", b.len(), n);
    }
    if m == 0 || n == 0 {
        return Some(());
    }
    let outp = SyncPtr(out.as_mut_ptr());
    let run = |(r0, r1): (usize, usize), (c0, c1): (usize, usize)| unsafe {
        // SAFETY: disjoint blocks of `out` (ranges of one `Split`); every gathered read was
        // checked to be inside `base` above.
        let a = Gather {
            base: base.as_ptr(),
            rows: rows.as_ptr().add(r0),
            cols: cols.as_ptr(),
        };
        let b = if b_kn {
            MatRef {
                ptr: w.as_ptr().add(c0),
                rs: n as isize,
                cs: 1,
            }
        } else {
            MatRef {
                ptr: w.as_ptr().add(c0 * k),
                rs: 1,
                cs: k as isize,
            }
        };
        let o = Out {
            accumulate: b_kn,
            bias: bias.map(|b| b.as_ptr().add(c0)),
            ..Out::plain(outp.get().add(r0 * n + c0), n as isize)
        };
        gemm_gather(isa, r1 - r0, c1 - c0, k, a, BRef::Mat(b), o);
    };
    let threads = team::threads();
    let g = super::sgemm::product_geometry(isa, n);
    for_blocks(
        (m, n),
        threads == 1 || m * n * k < PARALLEL_MIN_MACS,
        n >= m,
        g,
        run,
    );
    Some(())
}

/// Runs `run(rows, cols)` over a `(rows, cols)` result: whole on this thread when `alone`,
/// otherwise in parts for the pool's threads, split along the columns in whole `nr`-wide
/// panels when `by_cols`, along the rows in whole `mr`-tall tiles otherwise. The parts are
/// disjoint blocks of the result.
fn for_blocks(
    (rows, cols): (usize, usize),
    alone: bool,
    by_cols: bool,
    g: super::sgemm::Geometry,
    run: impl Fn((usize, usize), (usize, usize)) + Sync,
) {
    let threads = team::threads();
    if alone {
        run((0, rows), (0, cols));
    } else if by_cols {
        let s = Split::new(cols, threads, g.nr);
        team::for_each(s.count, |i| run((0, rows), s.get(i)));
    } else {
        let s = Split::new(rows, threads, g.mr);
        team::for_each(s.count, |i| run(s.get(i), (0, cols)));
    }
}

/// Computes the block `out[r0..r1, c0..c1]`, and with `edge` (a packed weight, not
/// [`Epilogue::Tanh`]) those rows and columns too, in the same pass over the weight.
///
/// # Safety
/// `out` must point to an `(m, n)` buffer, and no other thread may touch this block or the
/// edge's part; `c0` must be a multiple of the packing's panel width.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    packed: Option<&PackedB>,
    bias: Option<&[f32]>,
    out: SyncPtr,
    (_m, k, n): (usize, usize, usize),
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    edge: Option<Edge>,
    pieces: Pieces,
    epilogue: Epilogue,
    gelu_values: Option<SyncPtr>,
) {
    let (bm, bn) = (r1 - r0, c1 - c0);
    let c = out.get().add(r0 * n + c0);
    let rows_of = |r: usize| MatRef {
        ptr: x.as_ptr().add(r * k),
        rs: k as isize,
        cs: 1,
    };
    let a = rows_of(r0);
    // B = Wᵀ restricted to columns c0..c1: B[kk][j] = W[c0 + j][kk].
    let b = match packed {
        Some(p) => BRef::Packed(p, c0),
        None => BRef::Mat(MatRef {
            ptr: w.as_ptr().add(c0 * k),
            rs: 1,
            cs: k as isize,
        }),
    };
    let o = Out {
        accumulate: epilogue == Epilogue::Accumulate,
        bias: bias.map(|b| b.as_ptr().add(c0)),
        gelu: match epilogue {
            Epilogue::Gelu(kind) => Some(kind),
            _ => None,
        },
        gelu_values: gelu_values.map(|v| v.get().add(r0 * n + c0)),
        ..Out::plain(c, n as isize)
    };
    match (edge, packed, pieces) {
        #[cfg(target_arch = "x86_64")]
        (Some(((e0, e1), cols)), Some(p), None) => {
            let edge = super::sgemm::Edge {
                a: rows_of(e0),
                rows: e1 - e0,
                c: out.get().add(e0 * n + c0),
                cols,
            };
            if p.on_tiles() {
                let a = super::amx::A::Mat(a);
                super::sgemm::gemm_tiles_packed(bm, bn, k, a, p, c0, o, Some(edge));
            } else {
                super::sgemm::gemm_edge(isa, bm, bn, k, a, p, o, edge);
            }
        }
        #[cfg(target_arch = "x86_64")]
        (None, Some(p), Some(pieces)) if r0 == 0 => {
            let a = super::amx::A::Pieces(pieces.get());
            super::sgemm::gemm_tiles_packed(bm, bn, k, a, p, c0, o, None);
        }
        (None, _, None) => gemm(isa, bm, bn, k, a, b, o),
        (e, _, pieces) => unreachable!(
            "edge {e:?}, pieces {}: only with a packed weight (pieces: for the tile unit)",
            pieces.is_some()
        ),
    }
    if epilogue == Epilogue::Tanh {
        for r in 0..bm {
            tanh_inplace(std::slice::from_raw_parts_mut(c.add(r * n), bn));
        }
    }
}

super::simd_dispatch! {
    /// `a += b` element-wise.
    pub fn add_assign(a: &mut [f32], b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += *y;
        }
    }
}

/// Gradients of `y = x·Wᵀ + b`, given `dy`.
///
/// `dx = dy·W` (overwritten, when asked for), `dw += dyᵀ·x`, `db += Σ_rows dy` (accumulated,
/// so gradient accumulation and shared parameters work).
///
/// # Shapes
/// `dy (m, n)`, `x (m, k)`, `w (n, k)`, `dx (m, k)`, `dw (n, k)`, `db (n)`.
///
/// # Panics
/// When a slice is shorter than its shape (checked in every build: the products write
/// through raw pointers).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dims: (usize, usize, usize),
) {
    backward(dy, x, w, dx.map(|d| (d, None)), dw, db, dims);
}

/// [`linear_backward`] through an element-wise function of the layer's input: the input
/// gradient multiplied by `times` as it is written, `dx = (dy·W) ⊙ times` — the MLP's fc2
/// backward given GELU's derivative (kept by [`linear_gelu_with_grad`]), in the product's
/// tiles instead of a pass that reads `dx` back from memory.
///
/// # Shapes
/// As [`linear_backward`], and `times (m, k)`.
///
/// # Panics
/// As [`linear_backward`].
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_times(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: &mut [f32],
    times: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dims: (usize, usize, usize),
) {
    backward(dy, x, w, Some((dx, Some(times))), dw, db, dims);
}

/// [`linear_backward`] and [`linear_backward_times`].
#[allow(clippy::type_complexity)]
fn backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: Option<(&mut [f32], Option<&[f32]>)>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    (m, k, n): (usize, usize, usize),
) {
    super::check_len("linear_backward: dy", dy.len(), m * n);
    super::check_len("linear_backward: x", x.len(), m * k);
    super::check_len("linear_backward: w", w.len(), n * k);
    super::check_len("linear_backward: dw", dw.len(), n * k);
    if let Some((dx, times)) = &dx {
        super::check_len("linear_backward: dx", dx.len(), m * k);
        if let Some(t) = times {
            super::check_len("linear_backward: times", t.len(), m * k);
        }
    }
    if let Some(db) = db.as_deref() {
        super::check_len("linear_backward: db", db.len(), n);
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    if let Some((dx, times)) = dx {
        dx_times(dy, w, dx, times, (m, k, n));
    }
    linear_dw_db(dy, x, dw, db, (m, k, n));
}

/// `db (n) += Σ_rows dy (m, n)`: the threads take a share of the columns each, down all the
/// rows (with a large m, one thread summing alone left the others waiting).
fn bias_grad(dy: &[f32], db: &mut [f32], m: usize, n: usize) {
    let threads = team::threads();
    let chunk = if threads == 1 || m * n < PARALLEL_MIN_MACS {
        n
    } else {
        n.div_ceil(threads).next_multiple_of(16)
    };
    team::for_chunks_mut(db, chunk, |c, part| {
        sum_rows_into(part, &dy[..m * n], n, c * chunk)
    });
}

super::simd_dispatch! {
    /// `acc += Σ_rows row[c0..c0 + acc.len()]` over the rows of `rows`, `n` apart (the last
    /// may be cut short after its `c0 + acc.len()` floats).
    pub(crate) fn sum_rows_into(acc: &mut [f32], rows: &[f32], n: usize, c0: usize) {
        let w = acc.len();
        for row in rows.chunks(n) {
            for (a, x) in acc.iter_mut().zip(&row[c0..c0 + w]) {
                *a += *x;
            }
        }
    }
}

/// `dx (m, k) = dy (m, n) · W (n, k)`: the backward of a linear layer to its input.
///
/// # Panics
/// When a slice is shorter than its shape.
pub fn linear_dx(dy: &[f32], w: &[f32], dx: &mut [f32], dims: (usize, usize, usize)) {
    dx_times(dy, w, dx, None, dims)
}

/// [`linear_dx`], multiplied element-wise by `times (m, k)` when given.
fn dx_times(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    times: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) {
    super::check_len("linear_dx: dy", dy.len(), m * n);
    super::check_len("linear_dx: w", w.len(), n * k);
    super::check_len("linear_dx: dx", dx.len(), m * k);
    if m == 0 || k == 0 {
        return;
    }
    let isa = super::isa();
    let g = super::sgemm::product_geometry(isa, k);
    let threads = team::threads();
    let small = threads == 1 || m * n * k < PARALLEL_MIN_MACS;
    // dx (m, k) = dy (m, n) · W (n, k): W is B with contiguous rows.
    let dxp = SyncPtr(dx.as_mut_ptr());
    let run_with =
        |packed: Option<&PackedB>, (r0, r1): (usize, usize), (c0, c1): (usize, usize)| unsafe {
            // SAFETY: disjoint blocks of dx (ranges of one `Split`).
            let a = MatRef {
                ptr: dy.as_ptr().add(r0 * n),
                rs: n as isize,
                cs: 1,
            };
            let b = match packed {
                Some(p) => BRef::Packed(p, c0),
                None => BRef::Mat(MatRef {
                    ptr: w.as_ptr().add(c0),
                    rs: k as isize,
                    cs: 1,
                }),
            };
            let o = Out {
                times: times.map(|t| t.as_ptr().add(r0 * k + c0)),
                ..Out::plain(dxp.get().add(r0 * k + c0), k as isize)
            };
            gemm(isa, r1 - r0, c1 - c0, n, a, b, o);
        };
    let run = |rows, cols| run_with(None, rows, cols);
    // Many rows: more parts than threads (see `ROW_PARTS_PER_THREAD`), all reading one
    // packing of W.
    let align = |part_rows| tile_rows(isa, (part_rows, k, n));
    if let Some(s) = row_split(m, threads, align).filter(|_| !small && k < m) {
        let wm = MatRef {
            ptr: w.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        shared_packing(isa, wm, (n, k), m / s.count, |packed| {
            team::for_each(s.count, |i| run_with(packed, s.get(i), (0, k)))
        });
        return;
    }
    for_blocks((m, k), small, k >= m, g, run);
}

/// Rows of the input gradient [`linear_dx_blocks`] hands over at a time: whole register tiles
/// on every rung (6, 8 and 12 rows), 72 KiB at 192 inputs, still in L2 when it is used.
const DX_BLOCK_ROWS: usize = 96;

thread_local! {
    /// The calling thread's block of [`linear_dx_blocks`], reused.
    static DX_BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How [`linear_dx_blocks`] splits `m` rows for `threads` threads: one part per thread in
/// whole blocks, or where they are many more parts in whole tiles (see [`row_split`]; the
/// tile unit's, a multiple of the FMA kernels' too).
fn dx_block_parts(m: usize, threads: usize) -> EvenSplit {
    row_split(m, threads, |_| TILE_UNIT_ROWS)
        .unwrap_or_else(|| EvenSplit::new(m, threads, DX_BLOCK_ROWS))
}

/// The parts [`linear_dx_blocks`] hands its blocks to (`part` below it): one per thread, or
/// more where the rows are many (see [`row_split`]).
pub(crate) fn linear_dx_parts(m: usize) -> usize {
    dx_block_parts(m, team::threads()).count
}

/// `dx (m, k) = dy (m, n) · W (n, k)` without writing `dx` anywhere: the rows are split in
/// parts the threads claim, and each part is computed a block of [`DX_BLOCK_ROWS`] rows at a
/// time into a scratch block handed to `then(part, r0, block)` — `block (rows, k)` holding
/// rows `r0..r0 + rows`, `part <` [`linear_dx_parts`]`(m)` (every block of a part goes to the
/// same thread, in order) — while the block is in cache: the LayerNorm backward that
/// consumes a linear layer's input gradient reads it from there instead of from memory. W is
/// packed once for every block.
///
/// # Panics
/// When a slice is shorter than its shape.
pub(crate) fn linear_dx_blocks(
    dy: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    then: impl Fn(usize, usize, &[f32]) + Sync,
) {
    super::check_len("linear_dx: dy", dy.len(), m * n);
    super::check_len("linear_dx: w", w.len(), n * k);
    if m == 0 || k == 0 {
        return;
    }
    let isa = super::isa();
    let wm = MatRef {
        ptr: w.as_ptr(),
        rs: k as isize,
        cs: 1,
    };
    let s = dx_block_parts(m, team::threads());
    let each = |packed_ref: Option<&PackedB>| {
        team::for_each(s.count, |part| {
            let mut block = DX_BLOCK.with(|b| std::mem::take(&mut *b.borrow_mut()));
            if block.len() < DX_BLOCK_ROWS * k {
                block.resize(DX_BLOCK_ROWS * k, 0.0);
            }
            let (p0, p1) = s.get(part);
            // W packed, or in place (the portable rung); `wm` itself is not shared with the team.
            let b = match packed_ref {
                Some(p) => BRef::Packed(p, 0),
                None => BRef::Mat(MatRef {
                    ptr: w.as_ptr(),
                    rs: k as isize,
                    cs: 1,
                }),
            };
            for r0 in (p0..p1).step_by(DX_BLOCK_ROWS) {
                let rows = DX_BLOCK_ROWS.min(p1 - r0);
                let a = MatRef {
                    ptr: dy[r0 * n..].as_ptr(),
                    rs: n as isize,
                    cs: 1,
                };
                // SAFETY: A is rows r0.. of dy, B W (packed or in place), C this thread's block.
                unsafe {
                    gemm(
                        isa,
                        rows,
                        k,
                        n,
                        a,
                        b,
                        Out::plain(block.as_mut_ptr(), k as isize),
                    )
                };
                then(part, r0, &block[..rows * k]);
            }
            DX_BLOCK.with(|b| *b.borrow_mut() = block);
        })
    };
    // W packed once for every block, on the tile unit where a part of the rows, unblocked,
    // would run there.
    // SAFETY: `wm` addresses W (n, k), read as B (n, k) with contiguous rows.
    unsafe { with_packing(isa, wm, (n, k), s.get(0).1, each) };
}

/// `dW (n, k) += dyᵀ (n, m) · x (m, k)`: the backward of a linear layer to its weight.
///
/// # Panics
/// When a slice is shorter than its shape.
pub fn linear_dw(dy: &[f32], x: &[f32], dw: &mut [f32], (m, k, n): (usize, usize, usize)) {
    super::check_len("linear_dw: dy", dy.len(), m * n);
    super::check_len("linear_dw: x", x.len(), m * k);
    super::check_len("linear_dw: dw", dw.len(), n * k);
    linear_dw_db(dy, x, dw, None, (m, k, n));
}

/// [`linear_dw`], and `db (n) += Σ_rows dy` when asked (shapes checked by the callers).
fn linear_dw_db(
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    (m, k, n): (usize, usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let isa = super::isa();
    let g = super::sgemm::product_geometry(isa, k);
    let threads = team::threads();
    let small = threads == 1 || m * n * k < PARALLEL_MIN_MACS;
    // dW (n, k) += dyᵀ (n, m) · x (m, k): a sum over the m rows (images × tokens, thousands in
    // training) into a weight-sized result. Every element of dY and x takes part in only 2k
    // or 2n FLOPs, so packing them is a large share of the work: the threads split the m
    // rows, each packing only its own, the first summing into dW and the others into scratch
    // added to it afterwards. (Split along dW instead, every thread would pack all of x or
    // all of dY.)
    //
    // The bias gradient (Σ_rows dy) comes with each part's product (the tile unit's packing
    // adds it up as it reads dyᵀ; see `gemm_row_sums`): the first part's into db, the others'
    // into scratch after their dW parts. A pass of its own read all of dy again (3 % of the
    // bench-train step, bound by memory).
    if !small && m >= threads * DW_MIN_ROWS_PER_THREAD {
        let s = Split::new(m, threads, 1);
        let mut scratch = DW_SCRATCH.with(|b| std::mem::take(&mut *b.borrow_mut()));
        // The parts after the first: their dW (n·k each), then their db (n each).
        let dw_len = (s.count - 1) * n * k;
        scratch.resize(dw_len + (s.count - 1) * n, 0.0);
        let dwp = SyncPtr(dw.as_mut_ptr());
        let sp = SyncPtr(scratch.as_mut_ptr());
        let mut db = db;
        let dbp = db.as_deref_mut().map(|d| SyncPtr(d.as_mut_ptr()));
        team::for_each(s.count, |i| unsafe {
            // SAFETY: part 0 alone writes dw and db, part i > 0 alone its scratch slot.
            let (p0, p1) = s.get(i);
            let a = MatRef {
                ptr: dy.as_ptr().add(p0 * n),
                rs: 1,
                cs: n as isize,
            };
            let b = MatRef {
                ptr: x.as_ptr().add(p0 * k),
                rs: k as isize,
                cs: 1,
            };
            let part = if i == 0 {
                dwp.get()
            } else {
                sp.get().add((i - 1) * n * k)
            };
            let o = Out {
                accumulate: i == 0,
                ..Out::plain(part, k as isize)
            };
            let sums = match dbp {
                None => None,
                Some(d) if i == 0 => Some(d.get()),
                Some(_) => {
                    let p = sp.get().add(dw_len + (i - 1) * n);
                    std::slice::from_raw_parts_mut(p, n).fill(0.0);
                    Some(p)
                }
            };
            match sums {
                Some(p) => gemm_row_sums(isa, n, k, p1 - p0, a, BRef::Mat(b), o, p),
                None => gemm(isa, n, k, p1 - p0, a, BRef::Mat(b), o),
            }
        });
        let (parts, db_parts) = scratch.split_at(dw_len);
        team::for_chunks_mut(&mut dw[..n * k], 1 << 14, |c, chunk| {
            for part in parts.chunks_exact(n * k) {
                add_assign(chunk, &part[c << 14..(c << 14) + chunk.len()]);
            }
        });
        if let Some(db) = db {
            for part in db_parts.chunks_exact(n) {
                add_assign(&mut db[..n], part);
            }
        }
        DW_SCRATCH.with(|b| *b.borrow_mut() = scratch);
        return;
    }
    // Too few rows to split: split dW along its longer side (each thread packs m floats per
    // row of dyᵀ or column of x it needs: m·(max/2 + min) each, the fewer).
    let dwp = SyncPtr(dw.as_mut_ptr());
    let run_w = |(r0, r1): (usize, usize), (c0, c1): (usize, usize)| unsafe {
        // SAFETY: disjoint blocks of dw (ranges of one `Split`).
        let a = MatRef {
            ptr: dy.as_ptr().add(r0),
            rs: 1,
            cs: n as isize,
        };
        let b = MatRef {
            ptr: x.as_ptr().add(c0),
            rs: k as isize,
            cs: 1,
        };
        let o = Out {
            accumulate: true,
            ..Out::plain(dwp.get().add(r0 * k + c0), k as isize)
        };
        gemm(isa, r1 - r0, c1 - c0, m, a, BRef::Mat(b), o);
    };
    for_blocks((n, k), small, k > n, g, run_w);
    if let Some(db) = db {
        bias_grad(dy, &mut db[..n], m, n);
    }
}

/// Reference twin of [`linear_backward`] in f64.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_ref(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    (m, k, n): (usize, usize, usize),
) {
    if let Some(dx) = dx {
        for i in 0..m {
            for kk in 0..k {
                dx[i * k + kk] = (0..n)
                    .map(|j| dy[i * n + j] as f64 * w[j * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
    }
    for j in 0..n {
        for kk in 0..k {
            let g: f64 = (0..m)
                .map(|i| dy[i * n + j] as f64 * x[i * k + kk] as f64)
                .sum();
            dw[j * k + kk] = (dw[j * k + kk] as f64 + g) as f32;
        }
    }
    if let Some(db) = db {
        for j in 0..n {
            db[j] = (db[j] as f64 + (0..m).map(|i| dy[i * n + j] as f64).sum::<f64>()) as f32;
        }
    }
}

/// Reference twin of [`linear`]: a triple loop accumulating in f64.
pub fn linear_ref(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    (m, k, n): (usize, usize, usize),
    epilogue: Epilogue,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[j] as f64);
            for kk in 0..k {
                acc += x[i * k + kk] as f64 * w[j * k + kk] as f64;
            }
            let o = &mut out[i * n + j];
            *o = match epilogue {
                Epilogue::None => acc as f32,
                Epilogue::Accumulate => (*o as f64 + acc) as f32,
                Epilogue::Gelu(kind) => super::math::gelu_ref(acc as f32, kind),
                Epilogue::Tanh => acc.tanh() as f32,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    /// The cost of a move: the elements packed for the other engine alone, at the speed of
    /// the packings made for the engine moved to (the other's before any).
    #[test]
    fn a_moves_cost_is_what_lacks_its_packing_at_its_speed() {
        let ms = Duration::from_millis;
        let l = PackLedger::new();
        assert_eq!(
            (l.cost(false), l.cost(true)),
            (Duration::ZERO, Duration::ZERO)
        );
        // 1000 elements packed for the FMA kernel in 1 ms: the tiles lack them, at that speed.
        l.made(false, 1000, ms(1), true);
        assert_eq!((l.cost(false), l.cost(true)), (Duration::ZERO, ms(1)));
        // Packed for the tiles too, at 4 µs an element: nothing lacks a packing.
        l.made(true, 1000, ms(4), false);
        assert_eq!(l.cost(true), Duration::ZERO);
        // Another weight for the FMA kernel alone: the tiles' own speed now.
        l.made(false, 500, ms(1), true);
        assert_eq!(l.cost(true), ms(2));
        // Dropped before the tiles' packing: nothing lacks one again.
        l.forget(true, 500);
        assert_eq!(l.cost(true), Duration::ZERO);
        // A count never goes below nothing (it would wrap to a huge cost).
        l.forget(true, 500);
        assert_eq!(l.cost(true), Duration::ZERO);
    }

    #[test]
    fn linear_backward_matches_reference() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (300, 33, 129),
            (40, 100, 60),
            (17, 64, 100),
            // Enough rows for the weight gradient to split its sum among the threads.
            (1000, 24, 40),
            (2000, 16, 8),
            // Parts large enough for the tile unit (where the CPU has one), whose packing then
            // sums db: ragged in every dimension.
            (1100, 200, 130),
            // Parts of more than 512 rows, x whole 32-column panels wide: on the AVX-512 rung's
            // FMA kernel, x is read in place.
            (2000, 64, 24),
            // The same, x's rows longer than DW_X_IN_PLACE_MAX in sgemm (224 floats): packed.
            (1200, 224, 200),
            // Either side of that limit (128 floats, 192), dYᵀ packed (200 rows), parts of more
            // than 512 rows: x in place, then packed.
            (1600, 128, 200),
            (1600, 192, 200),
            // A last partial panel of dYᵀ (30 rows: three of 8 and 6), summed by the packing.
            (1000, 24, 30),
            // Parts of more than 512 rows summed into at most 192: on the AVX-512 rung of
            // two-FMA-unit CPUs, dYᵀ is read in place and db summed block by block; the last
            // row tile partial, 64 columns (6 × 64 tiles) and 128 (8 × 32).
            (1600, 64, 70),
            (2000, 128, 50),
            // The same into 70 rows, x's rows longer than 192 floats: dYᵀ packed.
            (1600, 224, 70),
            // Parts of 800 rows summed into 200 (dYᵀ packed): the sum in blocks of 384 steps
            // and a partial one on the AVX-512 FMA kernel.
            (2400, 40, 200),
            // Rows enough for four parts a thread (see `row_split`): the input gradient's parts
            // share one packing of W (on the tile unit where the CPU has one), ragged.
            (3300, 160, 130),
        ] {
            let dy = rand_vec(m * n, 1);
            let x = rand_vec(m * k, 2);
            let w = rand_vec(n * k, 3);
            let (mut dx, mut dx_r) = (vec![9.0; m * k], vec![9.0; m * k]);
            let (mut dw, mut dw_r) = (rand_vec(n * k, 4), rand_vec(n * k, 4));
            let (mut db, mut db_r) = (rand_vec(n, 5), rand_vec(n, 5));
            pool.install(|| {
                linear_backward(
                    &dy,
                    &x,
                    &w,
                    Some(&mut dx),
                    &mut dw,
                    Some(&mut db),
                    (m, k, n),
                )
            });
            linear_backward_ref(
                &dy,
                &x,
                &w,
                Some(&mut dx_r),
                &mut dw_r,
                Some(&mut db_r),
                (m, k, n),
            );
            let tol = 4e-6 * (m.max(n) as f32).sqrt();
            assert!(max_abs_diff(&dx, &dx_r) < tol, "dx {m}x{k}x{n}");
            assert!(max_abs_diff(&dw, &dw_r) < tol, "dw {m}x{k}x{n}");
            assert!(max_abs_diff(&db, &db_r) < tol, "db {m}x{k}x{n}");
        }
    }

    #[test]
    fn the_input_gradient_in_blocks_is_linear_dx_once_per_row() {
        // Every row handed over once, on the thread share it names, as `linear_dx` computes
        // it: shares of several blocks with a partial last one, a weight packed once per call
        // (reused by the next call, of another shape), one thread and several.
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // The last two: four parts a thread on 2 threads, the last one on 3 too (see
            // `row_split`).
            for &(m, k, n) in &[
                (5, 7, 3),
                (1000, 64, 192),
                (700, 192, 576),
                (333, 40, 1200),
                (2300, 40, 64),
                (3300, 160, 130),
            ] {
                let dy = rand_vec(m * n, 51);
                let w = rand_vec(n * k, 52);
                let mut want = vec![0.0; m * k];
                let got = std::sync::Mutex::new(vec![f32::NAN; m * k]);
                let seen = std::sync::Mutex::new(vec![usize::MAX; m]);
                pool.install(|| {
                    linear_dx(&dy, &w, &mut want, (m, k, n));
                    let parts = linear_dx_parts(m);
                    let many = threads > 1 && m >= threads * ROW_PARTS_PER_THREAD * ROW_PART_MIN;
                    assert_eq!(
                        parts,
                        if many {
                            4 * threads
                        } else {
                            threads.min(m.div_ceil(DX_BLOCK_ROWS))
                        }
                    );
                    linear_dx_blocks(&dy, &w, (m, k, n), |part, r0, block| {
                        assert!(part < parts && block.len().is_multiple_of(k));
                        let rows = block.len() / k;
                        got.lock().unwrap()[r0 * k..(r0 + rows) * k].copy_from_slice(block);
                        let mut seen = seen.lock().unwrap();
                        for s in &mut seen[r0..r0 + rows] {
                            assert_eq!(*s, usize::MAX, "row handed over twice");
                            *s = part;
                        }
                    });
                });
                let case = format!("{m}x{k}x{n}, {threads} threads");
                let seen = seen.into_inner().unwrap();
                assert!(
                    seen.iter().all(|&p| p != usize::MAX),
                    "a row missed, {case}"
                );
                assert!(
                    seen.windows(2).all(|p| p[0] <= p[1]),
                    "shares out of order, {case}"
                );
                let got = got.into_inner().unwrap();
                let tol = 4e-6 * (m.max(n) as f32).sqrt();
                let diff = max_abs_diff(&got, &want);
                assert!(diff < tol, "{case}: {diff}");
            }
        }
    }

    #[test]
    fn the_input_gradient_times_a_factor_is_the_product_then_the_multiply() {
        // Bit for bit `linear_backward` then `mul_assign`, on one thread and split among
        // several: partial tiles, an inner dimension of several blocks (n = 1200, the factor
        // only after the last), and products big enough for the tile unit on AMX hosts (the
        // factor applied to the block after it there).
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for &(m, k, n) in &[
                (5, 7, 3),
                (197, 48, 200),
                (300, 33, 1200),
                (1000, 24, 40),
                (1100, 200, 130),
            ] {
                let dims = (m, k, n);
                let dy = rand_vec(m * n, 41);
                let x = rand_vec(m * k, 42);
                let w = rand_vec(n * k, 43);
                let times = rand_vec(m * k, 44);
                let (mut dx, mut want_dx) = (vec![9.0; m * k], vec![9.0; m * k]);
                let (mut dw, mut want_dw) = (rand_vec(n * k, 45), rand_vec(n * k, 45));
                let (mut db, mut want_db) = (rand_vec(n, 46), rand_vec(n, 46));
                pool.install(|| {
                    let db = Some(&mut db[..]);
                    linear_backward_times(&dy, &x, &w, &mut dx, &times, &mut dw, db, dims);
                    let (dx, db) = (Some(&mut want_dx[..]), Some(&mut want_db[..]));
                    linear_backward(&dy, &x, &w, dx, &mut want_dw, db, dims);
                    super::super::math::mul_assign(&mut want_dx, &times);
                });
                let case = format!("{m}x{k}x{n}, {threads} threads");
                assert!(dx == want_dx, "dx, {case}");
                assert!(dw == want_dw && db == want_db, "dw, db, {case}");
            }
        }
    }

    #[test]
    fn gelu_with_grad_in_the_tiles_is_the_product_then_the_gelu_pass() {
        // Bit for bit what the product into `grad` followed by `gelu_with_grad` gives, on one
        // thread, split by columns (n >= m) and by rows, with partial tiles of rows and
        // columns, several blocks of the inner dimension (k = 1200, so GELU only after the
        // last), and products big enough for the tile unit on AMX hosts (gelu after there).
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for &(m, k, n) in &[(5, 7, 3), (197, 48, 200), (300, 1200, 129), (400, 192, 768)] {
                let x: Vec<f32> = rand_vec(m * k, 31).iter().map(|v| v * 0.3).collect();
                let w = rand_vec(n * k, 32);
                let b = rand_vec(n, 33);
                for (kind, bias) in [(Gelu::Exact, Some(&b[..])), (Gelu::Tanh, None)] {
                    let dims = (m, k, n);
                    let (mut grad, mut values) = (rand_vec(m * n, 34), rand_vec(m * n, 35));
                    pool.install(|| {
                        linear_gelu_with_grad(&x, &w, bias, &mut grad, &mut values, dims, kind)
                    });
                    let (mut want_grad, mut want_values) = (vec![0.0; m * n], vec![0.0; m * n]);
                    pool.install(|| {
                        linear(&x, &w, bias, &mut want_grad, dims, Epilogue::None);
                        super::super::math::gelu_with_grad(&mut want_grad, &mut want_values, kind);
                    });
                    let case = format!("{m}x{k}x{n} {kind:?} {threads} threads");
                    assert!(values == want_values, "values, {case}");
                    assert!(grad == want_grad, "derivatives, {case}");
                    // And against the f64 reference, for values spread over GELU's curve.
                    let mut reference = vec![0.0; m * n];
                    linear_ref(&x, &w, bias, &mut reference, dims, Epilogue::Gelu(kind));
                    assert!(
                        max_abs_diff(&values, &reference) < 1e-4,
                        "reference, {case}"
                    );
                }
            }
        }
    }

    #[test]
    fn linear_matches_reference_on_odd_shapes_and_every_epilogue() {
        // Covers: single-thread path, column split (n >= m), row split (m > n), ragged edges;
        // with the weight packed too, where rows that end in a partial tile take the edge
        // split (197 and 394 rows, and 300 on the tile unit, on 2 and 3 threads; on 2 cut
        // unevenly, each way), and a large weight at few rows the column split with x packed
        // once by the threads together (197 × 500 × 608: 7 tiles of rows, 4/3 or 3/2/2; 19
        // panels in parts that shrink; a partial last step; the next panel fetched while a
        // panel's 7 tiles run).
        const { assert!(500 * 608 >= TILE_COLUMNS_MIN && 500 <= TILE_COLUMNS_MAX_K) };
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for &(m, k, n) in &[
                (1, 1, 1),
                (5, 7, 3),
                (17, 64, 100),
                (197, 48, 40),
                (300, 33, 129),
                (197, 48, 96),
                (300, 200, 192),
                (394, 64, 160),
                (197, 500, 608),
                // Four parts a thread (see `row_split`), their weight packed once for all (on
                // the tile unit where the CPU has one) or packed beforehand.
                (3300, 160, 130),
            ] {
                let x = rand_vec(m * k, 1);
                let w = rand_vec(n * k, 2);
                let b = rand_vec(n, 3);
                let packed = PackedLinear::new(&w, (n, k));
                for epi in Epilogue::ALL {
                    for (bias, p) in [None, Some(&b[..])]
                        .into_iter()
                        .flat_map(|bias| [(bias, None), (bias, packed.as_ref())])
                    {
                        let init = rand_vec(m * n, 4);
                        let mut got = init.clone();
                        let mut want = init.clone();
                        let dims = (m, k, n);
                        // Two threads cut the rows of a product with a partial last tile by
                        // their speeds (see `PairRates`): unevenly, one way or the other.
                        PAIR_RATES.set(if (m + n) % 2 == 0 {
                            [3.0, 1.0]
                        } else {
                            [1.0, 3.0]
                        });
                        pool.install(|| linear_packed(&x, &w, p, bias, &mut got, dims, epi));
                        linear_ref(&x, &w, bias, &mut want, dims, epi);
                        let d = max_abs_diff(&got, &want);
                        // f32 accumulation over k terms of magnitude ≤ 1.
                        assert!(
                            d < 1e-6 * (k as f32).sqrt() * 4.0,
                            "{m}x{k}x{n} {epi:?} bias={} packed={} {threads} threads: {d}",
                            bias.is_some(),
                            p.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn two_threads_cut_the_rows_in_proportion_to_their_speeds() {
        assert_eq!(pair_cut([0.0, 0.0], 16), 8);
        assert_eq!(pair_cut([2.0, 0.0], 16), 8);
        assert_eq!(pair_cut([1.0, 1.0], 16), 8);
        // Within the dead band of a tile.
        assert_eq!(pair_cut([1.03, 1.0], 16), 8);
        assert_eq!(pair_cut([3.0, 1.0], 16), 12);
        assert_eq!(pair_cut([1.0, 3.0], 17), 4);
        // At least a tile each.
        assert_eq!(pair_cut([1.0, 100.0], 16), 1);
        assert_eq!(pair_cut([100.0, 1.0], 16), 15);
        assert_eq!(pair_cut([100.0, 1.0], 2), 1);
        // The averages follow the parts recorded.
        let rates = PairRates::new();
        rates.record(0, 0, 3000, Duration::from_nanos(1000));
        assert_eq!(rates.cut(0, 16), 8, "one rate alone");
        rates.record(0, 1, 1000, Duration::from_nanos(1000));
        assert_eq!(rates.cut(0, 16), 12);
        assert_eq!(rates.cut(1, 16), 8, "the other engine's");
        // A quarter of the way to the latest part's rate: 3 → 2.5 against 1.
        rates.record(0, 0, 1000, Duration::from_nanos(1000));
        assert_eq!(f32::from_bits(rates.0[0][0].load(Relaxed)), 2.5);
        assert_eq!(rates.cut(0, 14), 10);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_partial_last_tile_is_split_by_columns_among_the_threads() {
        // ViT-B/16 at batch 1: 6 whole tiles of rows and 5 rows, on 2 threads.
        const AMX: (usize, usize) = (crate::kernels::amx::MR, crate::kernels::amx::NR);
        let e = edge_split(197, 768, 2, AMX).unwrap();
        assert_eq!(e.full, 192);
        assert_eq!((e.rows.get(0), e.rows.get(1)), ((0, 96), (96, 192)));
        assert_eq!((e.cols.get(0), e.cols.get(1)), ((0, 384), (384, 768)));
        // Whole tiles; too few whole tiles or columns for a part each.
        assert!(edge_split(192, 768, 2, AMX).is_none());
        assert!(edge_split(40, 768, 2, AMX).is_none());
        assert!(edge_split(197, 32, 2, AMX).is_none());
        assert!(edge_split(197, 64, 3, AMX).is_none());
    }

    #[test]
    fn the_fused_residual_and_layernorm_are_the_separate_ones_bit_for_bit() {
        use crate::kernels::layernorm::layernorm;
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // Rows split among the threads (fused), columns split (not), and too small to split.
            for &(m, k, n) in &[(300, 33, 64), (394, 64, 192), (20, 64, 192), (7, 5, 3)] {
                let x = rand_vec(m * k, 11);
                let w = rand_vec(n * k, 12);
                let b = rand_vec(n, 13);
                let (g, beta) = (rand_vec(n, 14), rand_vec(n, 15));
                let packed = PackedLinear::new(&w, (n, k));
                for p in [None, packed.as_ref()] {
                    let init = rand_vec(m * n, 16);
                    let (mut got, mut got_norm) = (init.clone(), vec![0.0; m * n]);
                    let (mut want, mut want_norm) = (init.clone(), vec![0.0; m * n]);
                    pool.install(|| {
                        linear_add_norm(
                            &x,
                            &w,
                            p,
                            Some(&b),
                            &mut got,
                            (&mut got_norm, &g, &beta, 1e-6),
                            (m, k, n),
                        );
                        let epi = Epilogue::Accumulate;
                        linear_packed(&x, &w, p, Some(&b), &mut want, (m, k, n), epi);
                        layernorm(&want, &mut want_norm, &g, &beta, n, 1e-6);
                    });
                    let what = format!("{m}x{k}x{n}, {threads} threads, packed {}", p.is_some());
                    assert_eq!(got, want, "{what}: residual");
                    assert_eq!(got_norm, want_norm, "{what}: norm");
                }
            }
        }
    }
}
