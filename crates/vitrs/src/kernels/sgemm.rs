//! The engine's SGEMM, `C = A·B (+ C) (+ bias)`, one thread's share of a product.
//!
//! GotoBLAS/BLIS structure, written once and instantiated per rung of the instruction-set
//! ladder ([`super::Isa`]):
//! - the inner dimension is cut into blocks of `KC` (384 where the L2 allows: fewer passes
//!   over `C`, the `B` micro-panel streamed from L2), the rows of `A` into blocks of `MC` (a
//!   packed `A` block fits in half of L2), both from the CPU's L2 size read at run time;
//! - `A` is packed per block into `MR`-row micro-panels (`[k][MR]`, zero-padded), so the
//!   micro-kernel reads it sequentially whatever its strides (a transposed `dY` in the weight
//!   gradient, say); a short row-major `A` (a batch-1 forward) is read in place, and so is a
//!   tall one where all of `B` stays in L2 (one row tile across every panel, see `b_resident`);
//! - `B` is read as `NR`-column micro-panels (`[k][NR]`): pre-packed once ([`PackedB`]: the
//!   weights of a model, packed once per model) or packed per block of the inner dimension
//!   (a copy of contiguous rows, or 8 × 8 transposes), so a micro-panel is one contiguous,
//!   aligned run that the prefetcher streams (read in place, a panel's rows straddle cache
//!   lines);
//! - the micro-kernel keeps an `MR × NR` tile of `C` in registers (AVX2: 6 × 16, twelve ymm
//!   accumulators; AVX-512: 8 × 32, sixteen zmm — the 12 × 32
//!   tile of twenty-four spilled a third of its loop to the stack on a Zen 4 EPYC and ran at a
//!   quarter of the peak, below the AVX2 rung; 8 × 32 does not spill and runs 2×; on those
//!   CPUs products at least 256 columns wide in 64-column panels take 6 × 64, see
//!   [`panel_width`]), broadcasting one element of `A` and
//!   loading `NR` of `B` per step of the inner dimension, unrolled four steps at a time, and
//!   adds bias and the old `C` when it writes the tile.
//!
//! The portable rung calls the `matrixmultiply` crate (which is also the reference the tests
//! and the criterion bench hold this one to).

use std::cell::RefCell;

use super::simd::Simd;
use super::Isa;
use crate::config::Gelu;

/// A read-only matrix operand: pointer, row stride, column stride (elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// An `A` operand read through two offset tables, `A(i, p) = base[rows[i] + cols[p]]`: a
/// convolution's lowered input without the lowering (row `i` an output pixel's window origin
/// in a zero-padded input, column `p` a tap's and channel's offset from it). Read in place,
/// like row-major activations; only the SIMD rungs take it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gather {
    pub base: *const f32,
    /// `(m)` row offsets.
    pub rows: *const isize,
    /// `(k)` column offsets.
    pub cols: *const isize,
}

/// The `A` operand.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ARef {
    Mat(MatRef),
    Gather(Gather),
}

/// Where the product goes: `C (m, n)` with unit column stride and row stride `rs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out {
    pub ptr: *mut f32,
    pub rs: isize,
    /// `C += A·B` instead of `C = A·B`.
    pub accumulate: bool,
    /// Added to every row: `(n)` values, for the columns of this product.
    pub bias: Option<*const f32>,
    /// GELU applied to the finished elements: by the FMA kernels to each register tile as it
    /// is written (still in L1), by the other engines to the block afterwards.
    pub gelu: Option<Gelu>,
    /// With `gelu`, when training: GELU's values go here (C's row stride, the same rows and
    /// columns) and C keeps its derivative at the pre-activation, the backward's factor, as
    /// [`super::math::gelu_with_grad`] leaves them — one evaluation while the tile is in L1
    /// instead of a pass that reads the pre-activations back from memory.
    pub gelu_values: Option<*mut f32>,
    /// The finished elements multiplied by these (C's row stride, the same rows and columns),
    /// after any GELU: a backward's element-wise factor (GELU's derivative, in the MLP's
    /// input gradient), by the FMA kernels on each register tile once written (in L1), by the
    /// other engines on the block afterwards — instead of a pass that reads the product back
    /// from memory.
    pub times: Option<*const f32>,
}

impl Out {
    /// `C (m, n)` at `ptr`, rows `rs` apart: `C = A·B`, no epilogue.
    pub(crate) fn plain(ptr: *mut f32, rs: isize) -> Self {
        Out {
            ptr,
            rs,
            accumulate: false,
            bias: None,
            gelu: None,
            gelu_values: None,
            times: None,
        }
    }

    /// The same product's C and epilogue `by` elements further on in C's layout: its GELU
    /// values and factors, which share that layout, move with it (a tile's or an edge's place).
    ///
    /// # Safety
    /// The moved pointers must stay within their matrices.
    unsafe fn moved(self, by: isize) -> Self {
        Out {
            ptr: self.ptr.offset(by),
            gelu_values: self.gelu_values.map(|v| v.offset(by)),
            times: self.times.map(|t| t.offset(by)),
            ..self
        }
    }

    /// The same C without the epilogues applied after the product (GELU, the factor), for an
    /// engine that applies them to the block afterwards ([`after`]).
    fn without_after(self) -> Self {
        Out {
            gelu: None,
            gelu_values: None,
            times: None,
            ..self
        }
    }
}

/// Where a product also adds the sums of A's rows (`Σ_p A(i, p)` into element `i`), if
/// anywhere: only for a transposed A (`rs == 1, cs != 1`), which every engine but the portable
/// one packs, adding the sums as it goes (see [`gemm_row_sums`]).
type Sums = Option<*mut f32>;

/// The `B` operand.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BRef<'a> {
    Mat(MatRef),
    /// Columns `c0..` of a pre-packed matrix (`c0` a multiple of its panel width).
    Packed(&'a PackedB, usize),
}

/// A few more rows of a product (fewer than a tile's), computed for some of its columns
/// only, in the same pass over B as the product's other rows: the partial last tile of rows
/// of a product whose threads share its whole tiles' rows, and these rows by columns (a
/// partial tile costs more than half a whole one, so leaving one in each thread's part of the
/// rows cost time; computing them in a pass of their own read B twice). Taken by the tile
/// unit ([`super::amx::gemm`]) and the FMA kernels ([`gemm_edge`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Edge {
    /// The rows of A, `(rows, k)`.
    pub a: MatRef,
    pub rows: usize,
    /// Their row 0 of C, column 0 of the product (row stride as the product's).
    pub c: *mut f32,
    /// The columns computed, `(c0, c1)`, of the product (whose block spans all its columns):
    /// `c0` a multiple of the panel width.
    pub cols: (usize, usize),
}

/// Register-tile and cache-block sizes of one rung.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Rows and columns of the register tile.
    pub mr: usize,
    pub nr: usize,
    /// Inner-dimension block (A and B micro-panels in L1) and row block (packed A in L2).
    pub kc: usize,
    pub mc: usize,
    /// Bytes of one core's L2.
    pub l2: usize,
    /// A row-major A with more rows than this is packed; one with fewer is read in place.
    pub pack_a_rows: usize,
    /// Whether a B that fits in L2 is kept there for the whole product (see `b_resident`).
    pub resident_b: bool,
}

/// Bytes of one core's L2, from sysfs (Linux), else 512 KiB.
fn l2_size() -> usize {
    (0..8)
        .find_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let get = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
            let (lv, ty) = (get("level")?, get("type")?);
            if lv.trim() != "2" || ty.trim() == "Instruction" {
                return None;
            }
            let s = get("size")?;
            let s = s.trim();
            let (num, mult) = match s.strip_suffix('K') {
                Some(n) => (n, 1024),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (s, 1),
                },
            };
            num.parse::<usize>().ok().map(|v| v * mult)
        })
        .filter(|&v| v >= 128 << 10)
        .unwrap_or(512 << 10)
}

/// The blocking of `isa` on this CPU (its L2 size read once).
pub fn geometry(isa: Isa) -> Geometry {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let l2 = *L2.get_or_init(l2_size);
    let wide = isa == Isa::Avx512 && two_512_bit_fmas();
    let (mr, nr) = match isa {
        Isa::Avx512 if wide => (MR512_WIDE, NR512),
        Isa::Avx512 => (MR512, NR512),
        _ => (MR256, NR256),
    };
    let pack_a_rows = if wide { 0 } else { PACK_A_ROWS };
    // 384 steps of the inner dimension, the B micro-panel kept within a quarter of L2. L1-sized
    // blocks (three quarters of L1 for both micro-panels: 144 on AVX-512, 272 on AVX2 with a
    // 32 KiB L1) ran 5–15 % slower on a Zen 4 EPYC, on both rungs, at batch 1 and 16 (C is
    // read and written once per block: more passes over it cost more than streaming B's
    // micro-panel from L2, which the hardware prefetcher keeps ahead of the tile); 384 was
    // the best of 144–768 there.
    //
    // An AVX-512 tile is twice as many FLOPs per step on CPUs with two 512-bit FMA units (Intel
    // Xeon), so each pass over C costs more of the time: there, with a 2 MiB L2, 768 steps ran
    // the ViT-B/16 products 3–8 % faster than 384 (1024 and 1536 no better; 2 threads,
    // interleaved). Hence 384 steps per MiB of L2, between 384 and 768, on AVX-512; AVX2 kept
    // 384 on that Xeon too (768: −2 to +5 %, no clear gain).
    let target = match isa {
        Isa::Avx512 => (KC_TARGET * l2 / (1 << 20)).clamp(KC_TARGET, 2 * KC_TARGET),
        _ => KC_TARGET,
    };
    let kc = (target.min(l2 / (4 * 4 * nr)) / 16 * 16).max(64);
    // Half of L2 for the packed A block, in whole micro-panels.
    let mc = ((l2 / 2) / (4 * kc) / mr * mr).clamp(mr, 4096 / mr * mr);
    Geometry {
        mr,
        nr,
        kc,
        mc,
        l2,
        pack_a_rows,
        // Not measured on the two-FMA-unit CPUs, whose 12-row tile spills with A read in
        // place (see `MR512`) and whose larger L2 already gives 768-step blocks.
        resident_b: !wide,
    }
}

/// Whether all of `B (k, n)` in `nr`-wide panels stays in L2 for the whole product, as one
/// block of the inner dimension (up to twice [`Geometry::kc`]) in at most three quarters of
/// it: then each row tile of A runs across every panel before the next, reading its rows into
/// L1 once and where they are, however tall A is (no packed copy of A), and C is written in
/// one pass. ViT-Ti/16's products at batch 16 on a Zen 4 EPYC (one thread, A/B interleaved):
/// the 768-deep MLP output `3152x768x192` +7–9 % on both rungs (+3.5 % of it from the single
/// pass alone), `3152x192x192` +1–3 %, the 192-deep `x576`/`x768` within ±1 %; the whole
/// ViT-Ti/16 batch-16 forward +0.4–4.7 % (2 threads).
fn b_resident(g: &Geometry, k: usize, n: usize, nr: usize) -> bool {
    g.resident_b && k <= 2 * g.kc && 4 * k * n.div_ceil(nr) * nr <= g.l2 / 4 * 3
}

/// Steps of the inner dimension per block of a product `B (k, n)` in `nr`-wide panels: all
/// of them where B stays in L2 ([`b_resident`]), else [`Geometry::kc`].
fn inner_block(g: &Geometry, k: usize, n: usize, nr: usize) -> usize {
    if b_resident(g, k, n, nr) {
        k
    } else {
        g.kc
    }
}

/// The blocking of a product with `n` columns on rung `isa`: [`geometry`], except on AVX-512
/// CPUs with one 512-bit FMA per cycle (AMD Zen 4), where a product at least 256 wide in whole
/// 64-column panels takes the 6 × 64 tile (24 accumulators, 10 loads per 24 FMAs against 8 ×
/// 32's 10 per 16, and half as many tiles to set up and store). Against 8 × 32 there (Zen 4
/// EPYC, 2 threads, 6 interleaved rounds): the ViT-B/16 batch-1 products +2 to +7 %, ViT-B/16
/// batch 1 +5 % and S/16 +2.5 % whole; on the narrow products of the fashion-mnist training
/// step (64–192 columns) it lost 8 %, so they keep 8 × 32.
pub fn product_geometry(isa: Isa, n: usize) -> Geometry {
    let g = geometry(isa);
    match isa {
        Isa::Avx512 if !two_512_bit_fmas() && n >= 256 && n.is_multiple_of(2 * NR512) => Geometry {
            mr: MR512_NARROW,
            nr: 2 * NR512,
            ..g
        },
        _ => g,
    }
}

/// Columns per panel of `B` (packed or read in place) in a product with `n` columns (see
/// [`product_geometry`]).
pub fn panel_width(isa: Isa, n: usize) -> usize {
    product_geometry(isa, n).nr
}

/// Steps of the inner dimension per block, where the L2 allows (see [`geometry`]).
const KC_TARGET: usize = 384;

const MR256: usize = 6;
const NV256: usize = 2;
const NR256: usize = 16;
// AVX-512 tiles. 8 rows (16 accumulators) where a 512-bit FMA issues once per cycle (Zen 4
// runs it as two 256-bit halves): 16 chains cover its latency, and with 12 rows read in place
// (12 pointers) LLVM spilled accumulators and pointers in the inner loop (a third of the
// samples on stack traffic, 60 GFLOP/s of a 222 GFLOP/s single-thread peak on a Zen 4 EPYC;
// 8 × 48 spilled the same way), while 12 rows over a packed A measured no better there. On
// CPUs with two 512-bit FMA units (Intel Xeon) A is always packed (read through one pointer)
// and the tile has 12 rows (24 accumulators): the ViT-B/16 products 2.5–7 % faster than 8
// rows on an AVX-512 Xeon (one shape −1 %). A gathered A (a convolution's) is read through one
// pointer per row, so that product keeps 8 rows everywhere.
const MR512: usize = 8;
/// Rows of the AVX-512 6 × 64 tile (two panels' width), for narrow products reading A in
/// place (see `gemm_avx512`).
const MR512_NARROW: usize = 6;
const MR512_WIDE: usize = 12;
/// Rows of the tile that runs an edge (see [`Edge`]) of at most this many rows beside 12-row
/// tiles: a partial tile costs a whole one, and the 197 rows of a batch-1 forward (16 tiles
/// and 5 rows) gave each of 2 threads 8.5 tiles' time where 8.2 are needed. 6 × 32 runs the
/// 5 rows in half the time (12 accumulators, 8 loads per 12 FMAs). Alternating within one
/// process on an AVX-512 Xeon (2 threads, new/old speed, median): ViT-B/16 at batch 1
/// +2.5 %, S/16 +2.3 %, Ti/16 +2.0 %.
const EDGE_MR: usize = 6;
const NV512: usize = 2;
const NR512: usize = 32;

/// Whether this CPU issues two 512-bit FMAs per cycle: Intel's AVX-512 cores (Skylake-SP and
/// later Xeons) do, AMD's Zen 4 and 5 client and EPYC parts split a 512-bit FMA in two 256-bit
/// halves (Zen 5's full-width units are not told apart here: they get the narrower tile).
fn two_512_bit_fmas() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
            #[allow(unused_unsafe)]
            let r = unsafe { std::arch::x86_64::__cpuid(0) };
            // The vendor string, "GenuineIntel", is in EBX, EDX, ECX.
            let mut v = [0u8; 12];
            v[..4].copy_from_slice(&r.ebx.to_le_bytes());
            v[4..8].copy_from_slice(&r.edx.to_le_bytes());
            v[8..].copy_from_slice(&r.ecx.to_le_bytes());
            &v == b"GenuineIntel"
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A matrix `B (k, n)` packed once into the micro-panels the running rung's kernel reads: for
/// each block of `KC` steps of the inner dimension, `ceil(n / NR)` panels of `[KC][NR]`. A
/// model's weights, packed for inference.
pub struct PackedB {
    isa: Isa,
    nr: usize,
    /// The blocks of the inner dimension it is laid out in: `[k / kc][panels][kc][nr]`.
    kc: usize,
    k: usize,
    n: usize,
    data: Aligned,
    /// The tile unit's packing instead of `data`, where the AMX path was on.
    #[cfg(target_arch = "x86_64")]
    amx: Option<super::amx::PackedB>,
    #[cfg(not(target_arch = "x86_64"))]
    amx: Option<std::convert::Infallible>,
}

/// A zeroed buffer whose first element is 64-byte aligned, so a micro-panel's vector loads
/// (or the tile unit's rows, [`super::amx`]) never straddle cache lines (an allocator's large
/// blocks start 16 bytes past one).
#[derive(Default)]
pub(crate) struct Aligned<T = f32> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    /// Makes room for `len` elements (keeping none of the old contents).
    pub(crate) fn ensure(&mut self, len: usize) {
        if self.len >= len {
            return;
        }
        let pad = 64 / std::mem::size_of::<T>() - 1;
        self.buf = vec![T::default(); len + pad];
        self.off = self.buf.as_ptr().align_offset(64).min(pad);
        self.len = len;
        crate::alloc::advise_huge_pages(&self.buf);
    }

    pub(crate) fn slice(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }

    pub(crate) fn slice_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedB({}x{}, {}, NR {})",
            self.k,
            self.n,
            self.isa.name(),
            self.nr
        )
    }
}

impl PackedB {
    /// Packs `B (k, n)` for rung `isa`; `None` on the portable rung (which packs per call
    /// inside `matrixmultiply`).
    ///
    /// # Safety
    /// `b` must address a `(k, n)` matrix with its strides.
    pub(crate) unsafe fn new(isa: Isa, b: MatRef, k: usize, n: usize) -> Option<Self> {
        let amx = isa == Isa::Avx512 && amx_enabled();
        Self::pack(isa, amx, b, k, n, Aligned::default())
    }

    /// [`Self::new`] into the buffers of `old`: a product that packs its B once per call for
    /// its parts (the backward's input gradient, a block of rows at a time; a training
    /// forward's row parts), without allocating and zeroing fresh buffers each time. For the
    /// tile unit only where a product of `rows` rows would run there ([`amx_worth`]), as it
    /// would have unpacked.
    ///
    /// # Safety
    /// As [`Self::new`].
    pub(crate) unsafe fn repack(
        old: Option<Self>,
        isa: Isa,
        b: MatRef,
        (k, n): (usize, usize),
        rows: usize,
    ) -> Option<Self> {
        let amx = on_tiles_for(isa, rows, n, k);
        let (data, tiles) = match old {
            Some(p) => (p.data, p.amx),
            None => (Aligned::default(), None),
        };
        #[cfg(target_arch = "x86_64")]
        if amx {
            let tiles = tiles.map_or_else(Aligned::default, super::amx::PackedB::into_data);
            return Some(Self::on_tiles_in(isa, b, k, n, tiles));
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = tiles;
        Self::pack(isa, false, b, k, n, data)
    }

    /// A packing for the tile unit, into `tiles` (grown as needed).
    ///
    /// # Safety
    /// As [`Self::new`], with the tile unit on.
    #[cfg(target_arch = "x86_64")]
    unsafe fn on_tiles_in(isa: Isa, b: MatRef, k: usize, n: usize, tiles: Aligned<u16>) -> Self {
        PackedB {
            isa,
            nr: super::amx::NR,
            kc: geometry(isa).kc,
            k,
            n,
            data: Aligned::default(),
            amx: Some(super::amx::PackedB::new_in(b, k, n, tiles)),
        }
    }

    /// [`Self::new`] for the tile unit's kernel (`amx`) or the rung's FMA kernel, into `data`
    /// (grown as needed).
    unsafe fn pack(
        isa: Isa,
        amx: bool,
        b: MatRef,
        k: usize,
        n: usize,
        mut data: Aligned,
    ) -> Option<Self> {
        if isa == Isa::Portable {
            return None;
        }
        let g = geometry(isa);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = amx;
        #[cfg(target_arch = "x86_64")]
        if amx {
            return Some(Self::on_tiles_in(isa, b, k, n, Aligned::default()));
        }
        let nr = panel_width(isa, n);
        let kc = inner_block(&g, k, n, nr);
        let panels = n.div_ceil(nr);
        // Block by block of the inner dimension, as the kernel reads it: within a block the
        // panels follow each other, so the hardware prefetcher streams from one to the next.
        data.ensure(panels * k * nr);
        /// The blocks, copied with the rung's vectors (`pack_b` is inlined here).
        #[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
        unsafe fn blocks(b: MatRef, (k, n, nr, kc): (usize, usize, usize, usize), out: &mut [f32]) {
            let panels = n.div_ceil(nr);
            for pc in (0..k).step_by(kc) {
                let kcb = kc.min(k - pc);
                let part = MatRef {
                    ptr: b.ptr.offset(pc as isize * b.rs),
                    ..b
                };
                pack_b(
                    part,
                    kcb,
                    n,
                    nr,
                    &mut out[pc * panels * nr..(pc + kcb) * panels * nr],
                );
            }
        }
        // SAFETY: a SIMD rung (checked above) has AVX2 and FMA.
        blocks(b, (k, n, nr, kc), data.slice_mut());
        Some(PackedB {
            isa,
            nr,
            kc,
            k,
            n,
            data,
            amx: None,
        })
    }

    /// Where the block of the inner dimension starting at step `pc` (`kc` steps long) has the
    /// panel of column `c0` (a multiple of the panel width): in block `pc`, every panel's `kc`
    /// rows, panel after panel.
    ///
    /// # Safety
    /// `pc` starts a block of this packing, `kc` is its length and `c0 < n`.
    unsafe fn panel_at(&self, pc: usize, kc: usize, c0: usize) -> *const f32 {
        let block = pc * self.n.div_ceil(self.nr) * self.nr;
        self.data
            .slice()
            .as_ptr()
            .add(block + (c0 / self.nr) * kc * self.nr)
    }

    /// Whether rung `isa`'s kernel reads this packing (a test may have switched rungs, or
    /// the AMX path on or off).
    pub(crate) fn usable(&self, isa: Isa) -> bool {
        isa == self.isa && self.amx.is_some() == (isa == Isa::Avx512 && amx_enabled())
    }

    /// Whether this packing is for the tile unit ([`super::amx`]).
    pub(crate) fn on_tiles(&self) -> bool {
        self.amx.is_some()
    }

    /// Panel width: column splits of a product over it must be multiples of it.
    pub fn panel(&self) -> usize {
        self.nr
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = &self.amx {
            return p.bytes();
        }
        self.data.len * 4
    }

    /// `(k, n)` of the matrix packed.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// Packs `B (k, n)` into `ceil(n / nr)` panels `[k][nr]` in `out`; the columns of the last
/// panel past `n` are left as they were (the tiles computed from them are never stored).
///
/// Inlined into the blocked product, so that a whole panel's row of a row-major B is copied
/// with the rung's vectors. As a `memmove` call per row (16–64 floats) the copies were 4.5 %
/// of the bench-train step's samples on a Zen 4 EPYC (0.7 % after); the weight-gradient
/// products (B = x) on its AVX2 rung 0 to +12 % (one −4 %; one thread, best of 30, two rounds
/// of eight products), level on its AVX-512 rung.
#[inline(always)]
unsafe fn pack_b(b: MatRef, k: usize, n: usize, nr: usize, out: &mut [f32]) {
    /// Copies `count` runs of `W` floats, `from` apart from `src`, into `dst`, `to` apart.
    #[inline(always)]
    unsafe fn rows<const W: usize>(
        src: *const f32,
        from: usize,
        count: usize,
        dst: *mut f32,
        to: usize,
    ) {
        for i in 0..count {
            std::ptr::copy_nonoverlapping(src.add(i * from), dst.add(i * to), W);
        }
    }
    if b.cs == 1 {
        // Rows of B are contiguous (x in a weight gradient, W in an input gradient): row by
        // row, each split among the panels, so the reads are one sequential stream and each
        // panel's writes another. Panel by panel, each step read one line `rs` floats past the
        // last, waiting on memory: 11 % of the blocked product's samples in bench-train's
        // step on the AVX2 rung of an AVX-512 Xeon; row by row, one thread, the weight
        // gradients `dw:6400x768x192` +12 %, `dw:6400x192x192` +4 % (level on the AVX-512
        // rung). Whole panels with a copy of constant length, the rung's panel width.
        let whole = n / nr;
        let cols = n - whole * nr;
        let panel_len = k * nr;
        let dst = out.as_mut_ptr();
        for p in 0..k {
            let src = b.ptr.offset(p as isize * b.rs);
            let d = dst.add(p * nr);
            match nr {
                16 => rows::<16>(src, 16, whole, d, panel_len),
                32 => rows::<32>(src, 32, whole, d, panel_len),
                64 => rows::<64>(src, 64, whole, d, panel_len),
                _ => {
                    for jp in 0..whole {
                        std::ptr::copy_nonoverlapping(src.add(jp * nr), d.add(jp * panel_len), nr);
                    }
                }
            }
            if cols > 0 {
                let at = whole * nr;
                std::ptr::copy_nonoverlapping(src.add(at), d.add(whole * panel_len), cols);
            }
        }
        return;
    }
    for (jp, panel) in out.chunks_exact_mut(k * nr).enumerate() {
        let j0 = jp * nr;
        let cols = nr.min(n - j0);
        // Columns of B contiguous along the inner dimension (B = Wᵀ: rows of W): 8 × 8 blocks
        // transposed in registers where the CPU has AVX2, the rest element by element.
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if b.rs == 1 && std::is_x86_feature_detected!("avx2") {
            done =
                transpose::pack_columns(b.ptr.offset(j0 as isize * b.cs), b.cs, k, cols, nr, panel);
        }
        for jj in 0..cols {
            let src = b.ptr.offset((j0 + jj) as isize * b.cs);
            let from = if jj < cols / 8 * 8 { done } else { 0 };
            for p in from..k {
                panel[p * nr + jj] = *src.offset(p as isize * b.rs);
            }
        }
    }
}

/// 8 × 8 transposes for the packing of contiguous rows into micro-panels.
#[cfg(target_arch = "x86_64")]
mod transpose {
    use std::arch::x86_64::*;

    /// Transposes the 8 × 8 block `r` (row `i` in `r[i]`).
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// Rows `0..rows` of a matrix (row `i` at `src + i·ld`, contiguous), columns `0..k`, into
    /// `out[p·stride + i]` for every full group of 8 rows and every full group of 8 columns.
    /// Returns how many columns (a multiple of 8) it wrote; the caller writes the rest.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_columns(
        src: *const f32,
        ld: isize,
        k: usize,
        rows: usize,
        stride: usize,
        out: &mut [f32],
    ) -> usize {
        let k8 = k / 8 * 8;
        assert!(out.len() >= k.saturating_sub(1) * stride + rows);
        for g in 0..rows / 8 {
            let base = src.offset((g * 8) as isize * ld);
            for p0 in (0..k8).step_by(8) {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(base.offset(i as isize * ld).add(p0)));
                for (t, v) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add((p0 + t) * stride + g * 8), v);
                }
            }
        }
        k8
    }

    /// A transposed block of `A` — `mc` rows, `kc` columns, column `p` the `mc` contiguous
    /// floats at `src + p·ld` (a row of `dY` in a weight gradient) — into its `⌈mc/MR⌉`
    /// micro-panels `out[pi·MR·kc + p·MR + i]`, the last one's rows past `mc` zeros. Column
    /// by column (`p` outer): each step reads `mc` contiguous floats, a stream the hardware
    /// prefetcher follows. Panel by panel, each step read `MR` floats of one line, a new 4 KiB
    /// page every step when `ld ≥ 1024`: its loads, waiting on memory, were a fifth of the
    /// samples of `dw:6400x192x768` on the AVX2 rung of an AVX-512 Xeon (one thread); column
    /// by column, four columns a pass over the panels, that product and `dw:6400x192x576` run
    /// +8–14 % (level on the AVX-512 rung's 12-row tile).
    ///
    /// Stores are 8 lanes wide: a group's lanes past `MR` spill into the slots of the panel's
    /// next column, written at the next step; the last column's are masked. Loads past a
    /// panel's `MR` floats read the next column (`p + 1 < kc`) or are masked.
    ///
    /// With `sums` (`mc` floats), also `sums[i] += Σ_p A(i, p)`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_transposed<const MR: usize>(
        src: *const f32,
        ld: isize,
        mc: usize,
        kc: usize,
        out: *mut f32,
        sums: Option<*mut f32>,
    ) {
        let groups = MR.div_ceil(8);
        debug_assert!(groups <= 2 && ld >= mc as isize);
        let tail = MR - (groups - 1) * 8;
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let lanes = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx);
        let tail_mask = lanes(tail);
        let full = mc / MR;
        // Real rows of the last panel when it is partial (0: none), and its groups' lanes.
        let part = mc - full * MR;
        let part_masks = [lanes(part.min(8)), lanes(part.saturating_sub(8).min(8))];
        // Full panels, `U` columns at a time (never the last, whose stores are masked): each
        // panel's `U·MR` floats written in one run.
        const U: usize = 4;
        let mut p = 0;
        while p + U < kc {
            let row = src.offset(p as isize * ld);
            for pi in 0..full {
                let s = row.add(pi * MR);
                let d = out.add(pi * MR * kc + p * MR);
                for u in 0..U {
                    let (s, d) = (s.offset(u as isize * ld), d.add(u * MR));
                    for g in 0..groups {
                        _mm256_storeu_ps(d.add(g * 8), _mm256_loadu_ps(s.add(g * 8)));
                    }
                }
            }
            p += U;
        }
        let unrolled = p;
        for p in 0..kc {
            let row = src.offset(p as isize * ld);
            let last = p + 1 == kc;
            // The full panels of the columns the unrolled loop did not copy.
            let full_left = if p < unrolled { 0 } else { full };
            for pi in 0..full_left {
                let s = row.add(pi * MR);
                let d = out.add(pi * MR * kc + p * MR);
                for g in 0..groups - 1 {
                    _mm256_storeu_ps(d.add(g * 8), _mm256_loadu_ps(s.add(g * 8)));
                }
                let g = (groups - 1) * 8;
                if last {
                    let v = _mm256_maskload_ps(s.add(g), tail_mask);
                    _mm256_maskstore_ps(d.add(g), tail_mask, v);
                } else {
                    _mm256_storeu_ps(d.add(g), _mm256_loadu_ps(s.add(g)));
                }
            }
            if part > 0 {
                let s = row.add(full * MR);
                let d = out.add(full * MR * kc + p * MR);
                for (g, &mask) in part_masks.iter().enumerate().take(groups) {
                    let v = _mm256_maskload_ps(s.add(g * 8), mask);
                    if last && g + 1 == groups {
                        _mm256_maskstore_ps(d.add(g * 8), tail_mask, v);
                    } else {
                        _mm256_storeu_ps(d.add(g * 8), v);
                    }
                }
            }
            if let Some(sp) = sums {
                let mut i = 0;
                while i + 8 <= mc {
                    let at = sp.add(i);
                    _mm256_storeu_ps(
                        at,
                        _mm256_add_ps(_mm256_loadu_ps(at), _mm256_loadu_ps(row.add(i))),
                    );
                    i += 8;
                }
                for i in i..mc {
                    *sp.add(i) += *row.add(i);
                }
            }
        }
    }

    /// `MR` rows of A (`rows ≤ MR` of them real, row `i` at `src + i·ld`) into the
    /// micro-panel `out[p·MR + i]` for the full groups of 8 columns; rows past `rows` get
    /// zeros. Each group of 8 rows is an 8 × 8 transpose. A last group of 4 rows (the 12-row
    /// AVX-512 tile) is a 4 × 8 one: 8 shuffles instead of 24 over four rows of zeros, the
    /// upper halves stored straight from the register. Any other last group is an 8 × 8 over
    /// rows of zeros, whose stores write 8 − MR mod 8 floats past their column (the next
    /// column's stores overwrite them; past the last one, the caller leaves room). Returns
    /// how many columns it wrote.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_rows<const MR: usize>(
        src: *const f32,
        ld: isize,
        k: usize,
        rows: usize,
        out: *mut f32,
    ) -> usize {
        let k8 = k / 8 * 8;
        let (full, tail) = (MR / 8, MR % 8);
        // Groups done by 8 × 8 transposes (at most 2: MR ≤ 16).
        let groups = if tail == 0 || tail == 4 {
            full
        } else {
            full + 1
        };
        let load = |row: usize, p0: usize| {
            if row < rows {
                _mm256_loadu_ps(src.offset(row as isize * ld).add(p0))
            } else {
                _mm256_setzero_ps()
            }
        };
        for p0 in (0..k8).step_by(8) {
            // Every group's transposed block first, then the stores in increasing address
            // order, so that a short last group's spill is overwritten by the next column.
            let mut cols = [[_mm256_setzero_ps(); 8]; 2];
            for (g, col) in cols.iter_mut().enumerate().take(groups) {
                *col = transpose8(std::array::from_fn(|i| load(g * 8 + i, p0)));
            }
            for t in 0..8 {
                for (g, col) in cols.iter().enumerate().take(groups) {
                    _mm256_storeu_ps(out.add((p0 + t) * MR + g * 8), col[t]);
                }
            }
            if tail == 4 {
                // Rows 8·full .. 8·full + 4: u[t] holds column t in its lower half and column
                // t + 4 in its upper half, four floats each.
                let r: [__m256; 4] = std::array::from_fn(|i| load(full * 8 + i, p0));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let u = [
                    _mm256_shuffle_ps::<0x44>(t0, t2),
                    _mm256_shuffle_ps::<0xEE>(t0, t2),
                    _mm256_shuffle_ps::<0x44>(t1, t3),
                    _mm256_shuffle_ps::<0xEE>(t1, t3),
                ];
                for (t, v) in u.into_iter().enumerate() {
                    let lo = out.add((p0 + t) * MR + full * 8);
                    let hi = out.add((p0 + t + 4) * MR + full * 8);
                    _mm_storeu_ps(lo, _mm256_castps256_ps128(v));
                    _mm_storeu_ps(hi, _mm256_extractf128_ps::<1>(v));
                }
            }
        }
        k8
    }
}

thread_local! {
    /// Per-thread packing buffers (A block, B block), grown on demand and reused.
    static BUFFERS: RefCell<(Aligned, Aligned)> = RefCell::new(Default::default());
}

/// `C (m, n) = A (m, k) · B (k, n)` (+ bias, + C), on the calling thread, with rung `isa`'s
/// kernel (the caller reads [`super::isa`] once per product, so a packing it checked stays
/// the one that runs).
///
/// # Safety
/// Every pointer must address a matrix of the given shape and strides; `C` must not overlap
/// `A`, `B` or the bias, and no other thread may write it meanwhile. `isa` must not exceed
/// the CPU's, and a packed `B` must be [`PackedB::usable`] by it.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(isa: Isa, m: usize, n: usize, k: usize, a: MatRef, b: BRef, c: Out) {
    gemm_a(isa, m, n, k, ARef::Mat(a), b, c, None)
}

/// [`gemm`] with `A` gathered through offset tables (see [`Gather`]).
///
/// # Panics
/// On the portable rung, whose `matrixmultiply` takes strided matrices only: callers lower
/// the input there instead.
pub(crate) unsafe fn gemm_gather(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: Gather,
    b: BRef,
    c: Out,
) {
    assert!(isa != Isa::Portable, "gathered A on the portable rung");
    gemm_a(isa, m, n, k, ARef::Gather(a), b, c, None)
}

/// The dispatch of [`gemm`], [`gemm_gather`] and [`gemm_row_sums`]: `sums` only with a
/// transposed A (see [`Sums`]), whose packing adds them up on every engine but the portable
/// one, which sums in a pass of its own.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_a(isa: Isa, m: usize, n: usize, k: usize, a: ARef, b: BRef, c: Out, sums: Sums) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // No products (and sums of nothing).
        bias_into(m, n, c);
        after(m, n, c);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            use super::amx;
            if let ARef::Mat(am) = a {
                let on_tiles = match b {
                    BRef::Packed(pb, c0) => pb.amx.as_ref().map(|pa| amx::B::Packed(pa, c0)),
                    BRef::Mat(bm) if amx_worth(m, n, k) && amx::enabled() => Some(amx::B::Mat(bm)),
                    BRef::Mat(_) => None,
                };
                if let Some(bt) = on_tiles {
                    return gemm_amx(m, n, k, am, bt, c, sums);
                }
            }
            debug_assert!(!matches!(b, BRef::Packed(pb, _) if pb.amx.is_some()));
            gemm_avx512(m, n, k, a, b, c, sums, None)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => gemm_avx2(m, n, k, a, b, c, sums, None),
        _ => {
            gemm_portable(m, n, k, a, b, c);
            after(m, n, c);
            if let (Some(s), ARef::Mat(am)) = (sums, a) {
                row_sums_into(am, m, k, s);
            }
        }
    }
}

/// A product on the tile unit ([`super::amx::gemm`]), `c.gelu` applied to the block after
/// it: the tile unit has no GELU epilogue.
///
/// # Safety
/// As [`super::amx::gemm`].
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_amx(m: usize, n: usize, k: usize, a: MatRef, b: super::amx::B, c: Out, sums: Sums) {
    super::amx::gemm(
        m,
        n,
        k,
        super::amx::A::Mat(a),
        b,
        c.without_after(),
        sums,
        None,
    );
    after(m, n, c);
}

/// `C (m, n) = A · B` with `B` columns `c0..c0 + n` of a weight packed for the tile unit: A
/// packed here ([`super::amx::A::Mat`]) or beforehand by the threads together
/// ([`super::amx::A::Pieces`]), and with `edge` its rows for its columns in the same pass over
/// the weight ([`Edge`]); `c.gelu` over all of it after.
///
/// # Safety
/// As [`super::amx::gemm`]; `b` was packed on the tile unit's rung ([`PackedB::on_tiles`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_tiles_packed(
    m: usize,
    n: usize,
    k: usize,
    a: super::amx::A,
    b: &PackedB,
    c0: usize,
    c: Out,
    edge: Option<Edge>,
) {
    let Some(pb) = b.amx.as_ref() else {
        unreachable!("gemm_tiles_packed: a weight not packed for the tile unit");
    };
    let bt = super::amx::B::Packed(pb, c0);
    super::amx::gemm(m, n, k, a, bt, c.without_after(), None, edge);
    after(m, n, c);
    if let Some(e) = edge {
        let (e0, e1) = e.cols;
        // The edge's rows lie in the same matrix as the block (C's layout).
        after(e.rows, e1 - e0, c.moved(e.c.add(e0).offset_from(c.ptr)));
    }
}

/// [`gemm`] on an FMA rung (AVX2, or AVX-512 without the tile unit) with all of a packed B,
/// plus `edge`: its rows for its columns of the product, in the same pass over B as A's rows
/// (see [`Edge`]). `C (m, n)` is the block of A's rows over all of B's `n` columns.
///
/// # Safety
/// As [`gemm`]; `isa` is [`Isa::Avx2`] or [`Isa::Avx512`], `b` packed for its FMA kernel
/// ([`PackedB::usable`], not [`PackedB::on_tiles`]); `m, n, k > 0`; the edge's first column
/// a multiple of [`PackedB::panel`], its `c` addressing its rows and columns of C (the same
/// row stride), which no other thread touches.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_edge(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: &PackedB,
    c: Out,
    edge: Edge,
) {
    debug_assert!(m > 0 && n > 0 && k > 0 && b.amx.is_none() && b.shape() == (k, n));
    debug_assert!(edge.cols.0.is_multiple_of(b.nr));
    let b = BRef::Packed(b, 0);
    match isa {
        Isa::Avx512 => gemm_avx512(m, n, k, ARef::Mat(a), b, c, None, Some(edge)),
        Isa::Avx2 => gemm_avx2(m, n, k, ARef::Mat(a), b, c, None, Some(edge)),
        Isa::Portable => unreachable!("gemm_edge: no FMA kernel on the portable rung"),
    }
}

/// `c.gelu`, then `c.times`, over the finished block `C (m, n)`, for the engines without them
/// in their tiles.
///
/// # Safety
/// `c` addresses an `(m, n)` block no other thread touches, and its factor `(m, n)` floats.
unsafe fn after(m: usize, n: usize, c: Out) {
    gelu_after(m, n, c);
    if let Some(t) = c.times {
        for r in 0..m {
            let at = r as isize * c.rs;
            let row = std::slice::from_raw_parts_mut(c.ptr.offset(at), n);
            super::math::mul_assign(row, std::slice::from_raw_parts(t.offset(at), n));
        }
    }
}

/// `c.gelu` over the finished block `C (m, n)` (see [`after`]).
///
/// # Safety
/// As [`after`].
unsafe fn gelu_after(m: usize, n: usize, c: Out) {
    if let Some(kind) = c.gelu {
        for r in 0..m {
            let at = r as isize * c.rs;
            let row = std::slice::from_raw_parts_mut(c.ptr.offset(at), n);
            match c.gelu_values {
                None => super::math::gelu_inplace(row, kind),
                Some(v) => {
                    let values = std::slice::from_raw_parts_mut(v.offset(at), n);
                    super::math::gelu_with_grad(row, values, kind);
                }
            }
        }
    }
}

/// [`gemm`] that also adds the sums of A's rows, `sums[i] += Σ_p A(i, p)` (`sums (m)`): a
/// linear layer's bias gradient beside its weight gradient (`A = dYᵀ`), added up while the
/// packing reads A (the tile unit's or the FMA kernel's, for a transposed A), in a pass of its
/// own otherwise (the portable rung, a row-major A).
///
/// # Safety
/// As [`gemm`]; `sums` addresses `m` floats no other thread touches.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_row_sums(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: BRef,
    c: Out,
    sums: *mut f32,
) {
    if a.rs == 1 && a.cs != 1 {
        gemm_a(isa, m, n, k, ARef::Mat(a), b, c, Some(sums));
    } else {
        gemm(isa, m, n, k, a, b, c);
        row_sums_into(a, m, k, sums);
    }
}

/// `sums[i] += Σ_p A(i, p)` over the `m` rows and `k` columns of `A`.
///
/// # Safety
/// `a` addresses an `(m, k)` matrix with its strides, `sums` `m` floats.
pub(crate) unsafe fn row_sums_into(a: MatRef, m: usize, k: usize, sums: *mut f32) {
    if m == 0 || k == 0 {
        return;
    }
    let out = std::slice::from_raw_parts_mut(sums, m);
    if a.rs == 1 && a.cs >= m as isize {
        // Rows adjacent (`dYᵀ`): A's columns are contiguous runs of `m`, `cs` apart, added in
        // one vectorised pass (a call per column cost more than the adds at m = 64).
        let cs = a.cs as usize;
        let span = std::slice::from_raw_parts(a.ptr, (k - 1) * cs + m);
        super::gemm::sum_rows_into(out, span, cs, 0);
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            let row = a.ptr.offset(i as isize * a.rs);
            *o += (0..k).map(|p| *row.offset(p as isize * a.cs)).sum::<f32>();
        }
    }
}

/// `C (m, n) = bias (+ C)`: the epilogue alone, for a product with no inner dimension, or
/// applied before an engine that cannot add a bias itself.
///
/// # Safety
/// As [`gemm`] for `C` and the bias.
pub(crate) unsafe fn bias_into(m: usize, n: usize, c: Out) {
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.ptr.offset(i as isize * c.rs), n);
        if !c.accumulate {
            row.fill(0.0);
        }
        if let Some(bias) = c.bias {
            row.iter_mut()
                .zip(std::slice::from_raw_parts(bias, n))
                .for_each(|(o, b)| *o += b);
        }
    }
}

/// Whether the AVX-512 rung's products run on the tile unit ([`super::amx`]).
fn amx_enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::amx::enabled();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a product of `(m, n, k)` on rung `isa` runs on the tile unit (with B unpacked, or
/// packed by [`PackedB::repack`] for it).
pub(crate) fn on_tiles_for(isa: Isa, m: usize, n: usize, k: usize) -> bool {
    isa == Isa::Avx512 && amx_enabled() && amx_worth(m, n, k)
}

/// Whether a product is large enough for the tile unit's 32 × 32 × 32 steps to pay (both
/// operands are split into pieces per product unless B is a packed weight).
///
/// Measured on an AVX-512 Xeon with AMX: the attention's per-head products (197 × 64 × 197 at
/// ViT-B/16, 50 × 64 × 50 in `configs/bench-train.toml`) ran no faster there, and the
/// `configs/fashion-mnist.toml` training step (products with 64 columns or a 64-long inner
/// dimension) ran 3–5 % faster with those left on the FMA kernel. Nor did a weight gradient
/// of 64 rows (its B, x, is split per product and each piece serves only 2 × 64 FLOPs):
/// `dw:6400x128x64` 270 GFLOP/s on the tiles, 285–305 on the FMA kernel; from 128 rows the
/// tiles win (`dw:6400x128x128` 356–362 against 295–327).
fn amx_worth(m: usize, n: usize, k: usize) -> bool {
    m >= 128 && n >= 128 && k >= 128 && m * n * k >= 1 << 22
}

/// Whether a narrow product with A read in place takes the 6 × 64 tile (see `gemm_avx512`):
/// many rows, whole 64-column panels, and a B it packs itself (a packed weight has 32-column
/// panels).
fn wide_b(m: usize, n: usize, b: BRef) -> bool {
    m >= 256 && n.is_multiple_of(2 * NR512) && matches!(b, BRef::Mat(_))
}

/// Whether a transposed A (`dYᵀ` in a linear layer's weight gradient: each step of the inner
/// dimension is a row of `dY`, `m` contiguous floats) is read where it is instead of packed:
/// on the 12-row AVX-512 geometry (two-FMA-unit CPUs), for a long sum (`k ≥ 512`) into at
/// most 192 rows. Its packing was a fifth of the fashion-mnist weight gradients' time (one
/// dependent load and store per step, the rows `m` floats apart), more than the tiles lose to
/// reading a line of `dY` per step from L2. An AVX-512 Xeon, 2 threads, against the build that
/// packed it (11 interleaved rounds): `dw:6400x64x192` +13 %, `dw:6400x64x128` +14 %,
/// `dw:6400x128x64` +2.5 % (+11 to +22 % in the trial's rounds); `dw:6400x768x192` +24 % on
/// the FMA kernel (`VITRS_AMX=0`). With 576 and 768 rows (a step's floats several pages
/// apart) it lost 8–14 %, hence the limit. Nor in a product wider than 192 columns (x's rows,
/// `n`): on a model-207 Xeon on 2026-12-06, with x packed, packing dYᵀ too ran that
/// `dw:6400x768x192` (bench-train's MLP output) +4.6 % (the median of five alternations
/// within one process, 1.00–1.19) and `dw:3152x768x192` +0.7 to +11 %; at 192 columns it was
/// level, at 64 it lost 20 %. Not measured on AMD's AVX-512 or on the AVX2 rung, which keep
/// packing.
fn transposed_in_place(g: &Geometry, (m, n, k): (usize, usize, usize), a: ARef) -> bool {
    matches!(a, ARef::Mat(am) if am.rs == 1 && am.cs != 1)
        && g.mr == MR512_WIDE
        && k >= 512
        && m <= 192
        && n <= 192
}

/// The longest rows (floats apart) of `x` that a linear layer's weight gradient on the
/// AVX-512 rung of two-FMA-unit CPUs reads in place as its B (see `blocked`); longer ones are
/// packed. A panel's steps are x's rows: 3 KiB apart (768 floats), a block of 384 of them
/// fell into a sixteenth of L1's sets and, at 12 KiB (ViT-B/16's MLP output: 3072 inputs),
/// into 32 of L2's 2048, more lines than their ways hold, so every step went to L3. Packed
/// instead (alternating within one process, an AVX-512 Xeon, 2 threads, FMA kernel):
/// `dw:3152x3072x768` 2.6–2.9× as fast, `dw:3152x1536x384` +35 %, `dw:3152x768x3072` +16 %,
/// `dw:3152x768x768` +20 %, `dw:3152x384x1152` and `x1536` +14–15 %. 192-float rows
/// (`configs/bench-train.toml`'s qkv and fc1 weight gradients) are packed too: the in-place
/// read won there by 1–7 % when it came in and measured level a session later, but lost in
/// every run on a model-207 Xeon on 2026-12-06 (alternating within one process, FMA kernel,
/// four runs: `dw:6400x192x576` +7–13 % packed, `dw:6400x192x768` +8–14 %, the unchanged
/// products beside them level; the whole bench-train step's total time 0.999–1.039, median
/// 1.017, in ten runs). 128-float rows and shorter keep the in-place read.
const DW_X_IN_PLACE_MAX: usize = 128;

/// Whether `m` rows waste at least 5 % fewer padded rows in 8-row tiles than in 12-row
/// ones (64 rows: 64 against 72): the wide tile's edge was a sixth of a 64-row weight
/// gradient's work.
fn pads_less_in_eights(m: usize) -> bool {
    m.div_ceil(MR512) * MR512 * 20 < m.div_ceil(MR512_WIDE) * MR512_WIDE * 19
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: ARef,
    b: BRef,
    c: Out,
    sums: Sums,
    edge: Option<Edge>,
) {
    let g = geometry(Isa::Avx2);
    blocked::<super::simd::Avx2, MR256, NV256>(m, n, k, a, b, c, g, sums, edge);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx512(
    m: usize,
    n: usize,
    k: usize,
    a: ARef,
    b: BRef,
    c: Out,
    sums: Sums,
    edge: Option<Edge>,
) {
    use super::simd::Avx512;
    let g = geometry(Isa::Avx512);
    match a {
        // A row-major A times a narrow B (at most 192 columns) in one block of the inner
        // dimension (fashion-mnist's products, 64–192 wide): each element of A takes part in
        // only 2n FLOPs, and copying it into panels cost as much as a sixth of the product.
        // Its rows are read in place, by a tile with few enough rows for their pointers to
        // stay in registers (see `MR512`): 6 × 64 (24 accumulators, 10 loads per 24 FMAs)
        // where B is whole 64-column panels, 8 × 32 otherwise. Against the packed 12 × 32
        // tile (2 threads, an AVX-512 Xeon): 8 × 32 +12-17 % on the 64-column products; 6 ×
        // 64 a further +3-10 % on 64-192 columns; the fashion-mnist training step +5 % and
        // +4-10 %. Not for the attention's few hundred rows (ViT-B/16 batch 1 -1.5 % with it).
        ARef::Mat(am)
            if g.mr == MR512_WIDE
                && am.cs == 1
                && k <= g.kc
                && (n <= 4 * NR512 || (n <= 6 * NR512 && wide_b(m, n, b))) =>
        {
            let g = Geometry {
                pack_a_rows: usize::MAX,
                ..g
            };
            if wide_b(m, n, b) {
                blocked::<Avx512, MR512_NARROW, { 2 * NV512 }>(m, n, k, a, b, c, g, sums, edge)
            } else {
                blocked::<Avx512, MR512, NV512>(m, n, k, a, b, c, g, sums, edge)
            }
        }
        // A weight gradient into at most 192 rows with A read in place (see
        // `transposed_in_place`) and 64 columns: the 6 × 64 tile, B's panel x's whole rows
        // (read in place, one sequential stream) — +7–11 % over 12 × 32 on `dw:6400x64x192`
        // and `dw:6400x64x128`. With 128 columns (two panels, x's rows halved) 8 × 32 over a
        // packed B was as fast as 6 × 64 over a packed B and 1–4 % faster than over x in
        // place; 12 × 32 17 % slower.
        ARef::Mat(_)
            if n == 2 * NR512
                && matches!(b, BRef::Mat(_))
                && transposed_in_place(&g, (m, n, k), a) =>
        {
            blocked::<Avx512, MR512_NARROW, { 2 * NV512 }>(m, n, k, a, b, c, g, sums, edge)
        }
        ARef::Mat(_) if g.mr == MR512_WIDE && !pads_less_in_eights(m) => {
            blocked::<Avx512, MR512_WIDE, NV512>(m, n, k, a, b, c, g, sums, edge)
        }
        // One 512-bit FMA per cycle (AMD): the 6 × 64 tile where B has (or is given) 64-column
        // panels (see `panel_width`).
        ARef::Mat(_)
            if match b {
                BRef::Packed(pb, _) => pb.nr == 2 * NR512,
                BRef::Mat(_) => panel_width(Isa::Avx512, n) == 2 * NR512,
            } =>
        {
            blocked::<Avx512, MR512_NARROW, { 2 * NV512 }>(m, n, k, a, b, c, g, sums, edge)
        }
        _ => blocked::<Avx512, MR512, NV512>(m, n, k, a, b, c, g, sums, edge),
    }
}

/// The portable rung: `matrixmultiply`'s SGEMM, the bias and accumulation done around it.
unsafe fn gemm_portable(m: usize, n: usize, k: usize, a: ARef, b: BRef, c: Out) {
    let ARef::Mat(a) = a else {
        unreachable!("a gathered A on the portable rung (see gemm_gather)")
    };
    let BRef::Mat(b) = b else {
        // Packings are made for (and only used on) a SIMD rung; see `PackedB::usable`.
        unreachable!("a packed B on the portable rung")
    };
    let mut beta = if c.accumulate { 1.0 } else { 0.0 };
    if c.bias.is_some() {
        bias_into(m, n, c);
        beta = 1.0;
    }
    matrixmultiply::sgemm(
        m, k, n, 1.0, a.ptr, a.rs, a.cs, b.ptr, b.rs, b.cs, beta, c.ptr, c.rs, 1,
    );
}

/// The blocked product for one rung: `S` its vector type, an `MR × NV·LANES` register tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn blocked<S: Simd, const MR: usize, const NV: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: ARef,
    b: BRef,
    c: Out,
    g: Geometry,
    sums: Sums,
    edge: Option<Edge>,
) {
    let nr = NV * S::LANES;
    // A transposed A read in place, step by step (see `transposed_in_place`).
    let strided_a = transposed_in_place(&g, (m, n, k), a);
    let kc_max = match (a, b) {
        // A packed B was blocked when it was packed, by the same rule.
        (_, BRef::Packed(pb, _)) => pb.kc,
        // A transposed A packed (a weight gradient's dYᵀ into more rows than
        // `transposed_in_place` takes): blocks of `KC_TARGET` steps, also where a larger L2
        // gives the forwards more (768 on AVX-512 Xeons with 2 MiB). There, alternating within
        // one process on the AVX-512 FMA kernel: bench-train's `dw:6400x192x576` and
        // `dw:6400x192x768` +4 %, ViT-B/16's `dw:3152x768x768` +4 %, `dw:3152x768x2304` +4 %,
        // `dw:3152x768x3072` +3 %, `dw:3152x3072x768` +12 % (192 and 256 steps alike; the
        // forwards and input gradients at 384 moved −3 to +3.5 %, so they keep 768).
        // Elsewhere the block is 384 already.
        (ARef::Mat(am), BRef::Mat(_)) if am.rs == 1 && am.cs != 1 && !strided_a => {
            inner_block(&g, k, n, nr).min(KC_TARGET)
        }
        (_, BRef::Mat(_)) => inner_block(&g, k, n, nr),
    };
    // All of B in L2, one block: A's row tiles read in place, each across every panel.
    let resident = kc_max >= k && b_resident(&g, k, n, nr);
    // Whole tiles of this instantiation (`g.mr` may be another tile's height); a longer block
    // of the inner dimension than `g.kc`, fewer rows in a packed block of A.
    let mut mc_max = (g.mc * g.kc.min(kc_max) / kc_max / MR * MR).max(MR);
    // A long inner dimension and a small C (the weight gradient: thousands of rows summed
    // into a weight-sized C) passes over C once per block of the inner dimension: keep all of
    // C in L2 beside the packed A block, with smaller A blocks.
    let c_bytes = 4 * m * n;
    if k > kc_max && c_bytes <= g.l2 / 2 {
        let room = g.l2 * 4 / 5 - c_bytes;
        mc_max = mc_max.min((room / (4 * kc_max) / MR * MR).max(MR));
    }
    // The buffers are taken out of the thread-local and put back at the end: the work must
    // not run inside a closure, which would not be compiled with this rung's features.
    let (mut abuf, mut bbuf) = BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
    {
        debug_assert!(edge.is_none_or(|e| sums.is_none() && e.cols.0 % nr == 0 && e.cols.1 <= n));
        // The edge's rows, packed once per block of the inner dimension, after A's block.
        let edge_at = mc_max.min(m.div_ceil(MR) * MR) * kc_max.min(k) + PACK_SLACK;
        let edge_rows = edge.map_or(0, |e| e.rows.div_ceil(MR) * MR);
        abuf.ensure(edge_at + edge_rows * kc_max.min(k) + PACK_SLACK);
        let (abuf_main, edge_buf) = abuf.slice_mut().split_at_mut(edge_at);
        let panels = n.div_ceil(nr);
        // A row-major B read where it is: a convolution's weight gradient (gathered A)
        // multiplies `dy`, row-major and a few whole panels wide: its rows are read in place,
        // no copy. So does a linear layer's weight gradient (A = dyᵀ, a sum over thousands of
        // rows) on the AVX-512 rung of two-FMA-unit CPUs, with dYᵀ packed: x's rows, read by
        // dW's few row tiles from L2, cost less than copying them first (the fashion-mnist dW
        // products +3-13 % on an AVX-512 Xeon, when their dYᵀ was packed; on the AVX2 rung, 16
        // columns a panel, -4 to +2 %; not measured on AMD's AVX-512, which keeps packing),
        // where x's rows are short (see `DW_X_IN_PLACE_MAX`). With dYᵀ read in place too, x is
        // packed (+3-5 %: with rows 256 or 768 bytes apart, the two strided streams fell into a
        // quarter of L1's 64 sets), unless its rows are one panel, contiguous.
        let b_in_place = match b {
            BRef::Mat(bm) => {
                bm.cs == 1
                    && n.is_multiple_of(nr)
                    && match a {
                        ARef::Gather(_) => true,
                        ARef::Mat(_) if strided_a => n == nr,
                        ARef::Mat(am) => {
                            g.mr == MR512_WIDE
                                && am.rs == 1
                                && am.cs != 1
                                && k >= 512
                                && bm.rs <= DW_X_IN_PLACE_MAX as isize
                        }
                    }
            }
            BRef::Packed(..) => false,
        };
        // A weight gradient's x (row-major B, packed) in more than one block of the inner
        // dimension, all of dW's rows in one block of A: the tiles of each block copy the next
        // block's rows of x into their panels as they run (see `Ahead`).
        let copy_ahead = matches!(b, BRef::Mat(bm) if bm.cs == 1)
            && !b_in_place
            && matches!(a, ARef::Mat(am) if am.rs == 1 && am.cs != 1)
            && n.is_multiple_of(nr)
            && g.mr == MR512_WIDE
            && edge.is_none()
            && k > kc_max
            && m <= mc_max;
        // Two blocks of panels, the block the tiles read and the next one they copy, taking
        // the two halves in turn: `copy_half(pc)` holds the block starting at step `pc`.
        let bcopy = if copy_ahead {
            bbuf.ensure(2 * panels * kc_max * nr);
            bbuf.slice_mut().as_mut_ptr()
        } else {
            std::ptr::null_mut()
        };
        let copy_half = |pc: usize| bcopy.wrapping_add((pc / kc_max % 2) * panels * kc_max * nr);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            // Where panel `jp` of B's rows pc..pc+kc is, and its row stride.
            let (bbase, ldb, pstride): (*const f32, isize, isize) = match b {
                BRef::Packed(pb, c0) => {
                    debug_assert!(pb.nr == nr);
                    (pb.panel_at(pc, kc, c0), nr as isize, (kc * nr) as isize)
                }
                // Read in place (see `b_in_place`).
                BRef::Mat(bm) if b_in_place => {
                    (bm.ptr.offset(pc as isize * bm.rs), bm.rs, nr as isize)
                }
                BRef::Mat(bm) => {
                    let need = panels * kc * nr;
                    let dst = if copy_ahead {
                        copy_half(pc)
                    } else {
                        bbuf.ensure(need);
                        bbuf.slice_mut().as_mut_ptr()
                    };
                    // After the first block, copied into place by the tiles of the block
                    // before (see `Ahead`).
                    if !(copy_ahead && pc > 0) {
                        let part = MatRef {
                            ptr: bm.ptr.offset(pc as isize * bm.rs),
                            ..bm
                        };
                        pack_b(part, kc, n, nr, std::slice::from_raw_parts_mut(dst, need));
                    }
                    (dst as *const f32, nr as isize, (kc * nr) as isize)
                }
            };
            // The edge's tiles on panel `jp`, where its columns reach: `MR` of its rows at a
            // time, packed (a few rows, read by half of B's panels).
            if let Some(e) = edge {
                pack_a_tiles::<MR>(e.a, 0, e.rows, pc, kc, edge_buf, None);
            }
            // The tile of C `at` elements past its start (C's layout), over panel `jp` from
            // column `j0`, with this block's share of the epilogue: the bias on the first block
            // of the inner dimension, C reloaded after it, GELU and the factor on the last.
            let tile_at = |at: isize,
                           (jp, j0): (usize, usize),
                           (rows, cols): (usize, usize),
                           next_c: (*mut f32, usize),
                           next_b: (*const f32, usize)| {
                let o = c.moved(at);
                let last = pc + kc == k;
                Tile {
                    k: kc,
                    a: (),
                    b: bbase.offset(jp as isize * pstride),
                    ldb,
                    c: o.ptr,
                    ldc: c.rs,
                    next_c,
                    next_b,
                    rows,
                    cols,
                    load_c: c.accumulate || pc > 0,
                    bias: if pc == 0 {
                        c.bias.map(|p| p.add(j0))
                    } else {
                        None
                    },
                    gelu: if last { c.gelu } else { None },
                    gelu_values: o.gelu_values,
                    times: if last { o.times } else { None },
                    ahead: Ahead::NONE,
                }
            };
            let edge_panel = edge_buf.as_ptr();
            let run_edge = |jp: usize| {
                let Some(e) = edge else { return };
                let j0 = jp * nr;
                if j0 < e.cols.0 || j0 >= e.cols.1 {
                    return;
                }
                for r in (0..e.rows).step_by(MR) {
                    // The edge lies in C's matrix.
                    let at =
                        e.c.offset(r as isize * c.rs + j0 as isize)
                            .offset_from(c.ptr);
                    let size = (MR.min(e.rows - r), nr.min(e.cols.1 - j0));
                    let tile = tile_at(at, (jp, j0), size, (c.ptr, 0), (bbase, 0));
                    run_packed::<S, MR, NV>(&tile, edge_panel.add(r * kc));
                }
            };
            // A packed B's first panel of the next block (of this product's columns), and
            // its steps.
            let next_block = match b {
                BRef::Packed(pb, c0) if pc + kc < k => {
                    let (p1, kc1) = (pc + kc, kc_max.min(k - pc - kc));
                    Some((pb.panel_at(p1, kc1, c0), kc1))
                }
                _ => None,
            };
            // The next block's rows of B, where this block's tiles copy them: from `(src, ld)`
            // into `dst`, `kc_next` rows, `per` rows a row tile on each panel.
            let next_copy = match b {
                BRef::Mat(bm) if copy_ahead && pc + kc < k => {
                    let kc_next = kc_max.min(k - pc - kc);
                    let src = bm.ptr.offset((pc + kc) as isize * bm.rs);
                    let dst = copy_half(pc + kc);
                    Some((src, bm.rs, dst, kc_next, kc_next.div_ceil(m.div_ceil(MR))))
                }
                _ => None,
            };
            for ic in (0..m).step_by(mc_max) {
                let mc = mc_max.min(m - ic);
                // Gathered A, and row-major A (activations) of at most `g.pack_a_rows` rows
                // (a batch-1 forward) or over a resident B, are read where they are; any
                // other layout, and taller row-major A, is packed: one sequential stream per
                // tile instead of MR rows `k` apart, packed once per block and read by every
                // panel of B.
                let apack = &mut abuf_main[..mc.div_ceil(MR) * MR * kc + PACK_SLACK];
                let packed_a = match a {
                    // Read step by step where it is; its rows' sums (the bias gradient) in a
                    // pass over the block before the tiles, which also brings it into L2
                    // in order.
                    ARef::Mat(am) if strided_a => {
                        if let Some(s) = sums {
                            let block = MatRef {
                                ptr: am.ptr.offset(ic as isize + pc as isize * am.cs),
                                ..am
                            };
                            row_sums_into(block, mc, kc, s.add(ic));
                        }
                        false
                    }
                    ARef::Mat(am) if am.cs != 1 || (m > g.pack_a_rows && !resident) => {
                        pack_a_tiles::<MR>(am, ic, mc, pc, kc, apack, sums.map(|p| p.add(ic)));
                        true
                    }
                    _ => false,
                };
                // While the tiles of one B micro-panel run, they ask L2 for the next panel, a
                // share each (the whole panel over this panel's tiles): its first tile would
                // otherwise wait on L3 for every line, the hardware prefetcher restarting at
                // each 4 KiB page (+2–4 % on the ViT-B/16 products on an AVX-512 Xeon).
                let tiles = mc.div_ceil(MR);
                // Cache lines (16 floats) per panel.
                let lines = (kc * nr).div_ceil(16);
                // With all of B's panels in L1 (at most 64 KiB), or all of B resident in L2,
                // each row tile runs across every panel before the next: A's rows (read in
                // place from memory, or packed) come into L1 once instead of once per panel.
                // Otherwise panel by panel, each read from L2 by every row tile.
                let rows_outer = panels * kc * nr * 4 <= 64 << 10 || resident;
                // A packed weight kept in L2 is read from memory by the first row tiles (once
                // per forward: a model's weights do not stay in the cache between forwards).
                // Run across every panel, the first tile alone waited on memory for all of B
                // (a panel's 384 steps take a fraction of a microsecond, its 24 KiB far
                // longer); so the first `warm` row tiles go panel by panel, asking for the
                // next panel meanwhile, and the rest row by row over B in L2. AVX2 rung of an
                // AVX-512 Xeon, 2 threads: ViT-S/16 at batch 1 +5.5–7.7 % (qkv 888 → 810 µs a
                // block, fc1 1302 → 1213, the projection 333 → 297: ViT-S/16's 88 MB of
                // weights stream from memory, where a model of its width with up to four
                // blocks, whose weights stay in L3, ran them as fast as alone), ViT-Ti/16 at
                // batch 16 +4.5 %, batch 1 +1.7 %; 8 to 64 warm tiles alike, all of batch 1's
                // 33 (64) +1.5 % over 32. The AVX-512 rung of two-FMA-unit CPUs (no resident
                // B) and the tile unit are unaffected.
                let warm = if rows_outer && matches!(b, BRef::Packed(..)) {
                    tiles.min(WARM_TILES)
                } else {
                    0
                };
                // Tile `t`'s (row tile, panel).
                // Tile `t`'s (row tile, panel) from tile `t − 1`'s, (0, 0) first: the warm row
                // tiles panel by panel, then the others each across every panel (or all of
                // them panel by panel). Compared, not divided: the divisions per tile took
                // 0.45 % of ViT-B/16's batch-1 samples on the AVX2 rung.
                let next_tile = |(it, jp): (usize, usize)| {
                    if it < warm {
                        if it + 1 < warm {
                            (it + 1, jp)
                        } else if jp + 1 < panels {
                            (0, jp + 1)
                        } else {
                            (warm, 0)
                        }
                    } else if rows_outer {
                        if jp + 1 < panels {
                            (it, jp + 1)
                        } else {
                            (it + 1, 0)
                        }
                    } else if it + 1 < tiles {
                        (it + 1, jp)
                    } else {
                        (0, jp + 1)
                    }
                };
                // Row tiles that run a panel together, and share the next one's lines: each
                // tile's share of a panel of this block, and of the next block's first.
                let sharing = if warm > 0 { warm } else { tiles };
                let per_tile = lines.div_ceil(sharing);
                let next_lines = next_block.map(|(_, kc_next)| kc_next * nr / 16);
                let per_tile_next = next_lines.map_or(0, |l| l.div_ceil(sharing));
                // Whether every row tile runs panel by panel: then the edge's tiles run on a
                // panel after its last row tile, still in L1; otherwise after all of them.
                let last_block = ic + mc >= m;
                let by_panel = !rows_outer || warm == tiles;
                let mut here = (0, 0);
                for t in 0..tiles * panels {
                    let (it, jp) = here;
                    here = next_tile(here);
                    let ir = it * MR;
                    let j0 = jp * nr;
                    let cols = nr.min(n - j0);
                    let bp = bbase.offset(jp as isize * pstride);
                    // Panel by panel, this tile's share of the next panel, asked into L2
                    // during its steps: the next one of this block, or after the last, a
                    // packed B's first in the next block (a tenth of ViT-B/16's panels at
                    // batch 1 start a block).
                    let share = |nb: *const f32, lines: usize, per_tile: usize| {
                        let from = (it * per_tile).min(lines);
                        (nb.add(from * 16), (from + per_tile).min(lines) - from)
                    };
                    let next_b = if rows_outer && it >= warm {
                        // Row by row, each row tile across every panel: its share of the next
                        // row tile's rows of A, where they are read in place and lie one after
                        // the other (a whole row per block: `dY` in an input gradient), asked
                        // into L2 — the hardware's stream had the first tile on each row wait
                        // for them. AVX2 rung, 2 threads, products alone: `dx:6400x64x192`
                        // +8 %, `dx:6400x64x128` +3.4 %, `dx:6400x192x576` +1.5 %; the
                        // forwards and `dx:6400x768x192` (48 panels a row tile) level.
                        match a {
                            ARef::Mat(am)
                                if !packed_a
                                    && am.cs == 1
                                    && am.rs == kc as isize
                                    && it + 1 < tiles =>
                            {
                                let first = ic + ir + MR;
                                let rows = MR.min(mc - (ir + MR));
                                // Whole lines: the pointers stay within A.
                                let lines = rows * kc / 16;
                                let per = lines.div_ceil(panels);
                                let from = (jp * per).min(lines);
                                let start = am.ptr.offset(first as isize * am.rs);
                                (start.add(from * 16), (from + per).min(lines) - from)
                            }
                            _ => (bp, 0),
                        }
                    } else if ldb != nr as isize {
                        (bp, 0)
                    } else if jp + 1 < panels {
                        share(bbase.offset((jp + 1) as isize * pstride), lines, per_tile)
                    } else {
                        match (next_block, next_lines) {
                            (Some((nb, _)), Some(l)) if ic + mc >= m => share(nb, l, per_tile_next),
                            _ => (bp, 0),
                        }
                    };
                    {
                        let rows = MR.min(mc - ir);
                        let at = (ic + ir) as isize * c.rs + j0 as isize;
                        let cptr = c.ptr.offset(at);
                        // The next tile's C: its lines are asked for during this tile's steps.
                        let next_c = if t + 1 < tiles * panels {
                            let (nt, np) = here;
                            let r = nt * MR;
                            let ptr = c.ptr.offset((ic + r) as isize * c.rs + (np * nr) as isize);
                            (ptr, MR.min(mc - r))
                        } else {
                            (cptr, 0)
                        };
                        let mut tile = tile_at(at, (jp, j0), (rows, cols), next_c, next_b);
                        if let Some((src, ld, dst, kc_next, per)) = next_copy {
                            let r0 = (it * per).min(kc_next);
                            let r1 = (r0 + per).min(kc_next);
                            tile.ahead = Ahead {
                                src: src.offset(r0 as isize * ld).add(j0),
                                ld,
                                dst: dst.add(jp * kc_next * nr + r0 * nr),
                                rows: r1 - r0,
                                every: (kc / 4 / per.max(1)).max(1),
                            };
                        }
                        // Rows past the edge read the last real one (never stored).
                        let row = |i: usize| ic + ir + i.min(rows - 1);
                        match a {
                            ARef::Gather(g) => {
                                let rows_a: [*const f32; MR] =
                                    std::array::from_fn(|i| g.base.offset(*g.rows.add(row(i))));
                                let access = GatherA(rows_a, g.cols.add(pc));
                                run_tile::<S, _, MR, NV>(&tile.with_a(access));
                            }
                            // A transposed A: a whole tile reads its `MR` contiguous floats per
                            // step in place; the edge tile is packed (reading past the last
                            // row could run off the end of the matrix).
                            ARef::Mat(am) if strided_a && rows == MR => {
                                let at = (ic + ir) as isize + pc as isize * am.cs;
                                let access = StridedA(am.ptr.offset(at), am.cs);
                                run_tile::<S, _, MR, NV>(&tile.with_a(access));
                            }
                            ARef::Mat(am) if strided_a => {
                                pack_a::<MR>(am, ic + ir, rows, pc, kc, apack, None);
                                let panel = PackedA::<MR>(apack.as_ptr());
                                run_tile::<S, _, MR, NV>(&tile.with_a(panel));
                            }
                            ARef::Mat(am) if !packed_a => {
                                let rows_a: [*const f32; MR] = std::array::from_fn(|i| {
                                    am.ptr.offset(row(i) as isize * am.rs + pc as isize)
                                });
                                run_tile::<S, _, MR, NV>(&tile.with_a(RowsA(rows_a)));
                            }
                            ARef::Mat(_) => {
                                run_packed::<S, MR, NV>(&tile, apack.as_ptr().add(ir * kc));
                            }
                        }
                    }
                    if last_block && by_panel && it + 1 == tiles {
                        run_edge(jp);
                    }
                }
                if last_block && !by_panel {
                    (0..panels).for_each(run_edge);
                }
            }
        }
    }
    BUFFERS.with(|b| *b.borrow_mut() = (abuf, bbuf));
}

/// Whether a tile of `rows` rows (an edge, or the last row tile) beside `MR`-row tiles runs
/// on the [`EDGE_MR`]-row tile: beside 12-row tiles, at most 6 rows.
#[inline(always)]
fn half_edge<const MR: usize>(rows: usize) -> bool {
    MR == MR512_WIDE && rows > 0 && rows <= EDGE_MR
}

/// [`pack_a`], except that a last partial tile the [`EDGE_MR`]-row tile runs
/// ([`half_edge`]) is packed in its layout, `[kc][EDGE_MR]`; [`run_packed`] reads them.
#[inline(always)]
unsafe fn pack_a_tiles<const MR: usize>(
    a: MatRef,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    out: &mut [f32],
    sums: Sums,
) {
    let full = if half_edge::<MR>(mc % MR) {
        mc / MR * MR
    } else {
        mc
    };
    if full > 0 {
        pack_a::<MR>(a, i0, full, p0, kc, out, sums);
    }
    if full < mc {
        let rest = &mut out[full * kc..];
        let sums = sums.map(|p| p.add(full));
        pack_a::<EDGE_MR>(a, i0 + full, mc - full, p0, kc, rest, sums);
    }
}

/// Runs `tile` over A's micro-panel at `panel`, packed by [`pack_a_tiles`]: on the
/// [`EDGE_MR`]-row tile where its rows take it, the `MR`-row one otherwise.
#[inline(always)]
unsafe fn run_packed<S: Simd, const MR: usize, const NV: usize>(
    tile: &Tile<()>,
    panel: *const f32,
) {
    if half_edge::<MR>(tile.rows) {
        run_tile::<S, _, EDGE_MR, NV>(&tile.with_a(PackedA::<EDGE_MR>(panel)));
    } else {
        run_tile::<S, _, MR, NV>(&tile.with_a(PackedA::<MR>(panel)));
    }
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of `A` into `MR`-row micro-panels
/// `[kc][MR]`, the last one zero-padded. `out` has [`PACK_SLACK`] floats of room past the
/// last panel.
///
/// With `sums` (a transposed A only, `rs == 1`), also `sums[i] += Σ_p A(i0 + i, p0 + p)` for
/// the block's `mc` rows, added up from what the packing loads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_a<const MR: usize>(
    a: MatRef,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    out: &mut [f32],
    sums: Sums,
) {
    debug_assert!(sums.is_none() || a.rs == 1);
    #[cfg(target_arch = "x86_64")]
    if MR <= 16 && a.rs == 1 && a.cs != 1 && std::is_x86_feature_detected!("avx2") {
        // Transposed A (dYᵀ in the weight gradient): the whole block, column by column.
        let base = a.ptr.offset(i0 as isize + p0 as isize * a.cs);
        transpose::pack_transposed::<MR>(base, a.cs, mc, kc, out.as_mut_ptr(), sums);
        return;
    }
    let panels = mc.div_ceil(MR);
    for pi in 0..panels {
        let r0 = i0 + pi * MR;
        let rows = MR.min(i0 + mc - r0);
        let base = a.ptr.offset(r0 as isize * a.rs + p0 as isize * a.cs);
        let panel = out.as_mut_ptr().add(pi * MR * kc);
        let panel_sums = sums.map(|p| p.add(pi * MR));
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if MR <= 16 && a.cs == 1 && std::is_x86_feature_detected!("avx2") {
            // Row-major A (activations): 8 × 8 transposes.
            done = transpose::pack_rows::<MR>(base, a.rs, kc, rows, panel);
        }
        for p in done..kc {
            let col = base.offset(p as isize * a.cs);
            for i in 0..MR {
                let v = if i < rows {
                    *col.offset(i as isize * a.rs)
                } else {
                    0.0
                };
                *panel.add(p * MR + i) = v;
                if let (Some(sp), true) = (panel_sums, i < rows) {
                    *sp.add(i) += v;
                }
            }
        }
    }
}

/// Products with more rows than this pack a row-major A (where [`Geometry::pack_a_rows`] is
/// not 0). Reading it in place won at batch 1 (197 rows) on a Zen 4 EPYC; at batch 16 (3152
/// rows) there, packing made the ViT-B/16 GEMMs +5–12 % on three of its four shapes (−4 % on
/// the fourth) and the whole forward +0.6–3.5 % in three interleaved A/Bs (S/16 +0.1–4.8 %).
/// On an AVX-512 Xeon the in-place read lost 12 % at batch 1 (LLVM reloaded the row pointers
/// from the stack in the inner loop), and its tile has 12 rows: there A is always packed.
const PACK_A_ROWS: usize = 256;

/// Row tiles that read a packed weight kept in L2 panel by panel first (see `blocked`): all of
/// a batch-1 product's 33.
const WARM_TILES: usize = 64;

/// Room the packing of A may write past its last micro-panel.
const PACK_SLACK: usize = 16;

/// How a micro-kernel reads `A(i, p)`, row `i` of its tile at step `p` of the inner dimension.
trait AccessA: Copy {
    unsafe fn at(&self, i: usize, p: usize) -> *const f32;
}

/// A packed micro-panel `[k][MR]`.
#[derive(Clone, Copy)]
struct PackedA<const MR: usize>(*const f32);

impl<const MR: usize> AccessA for PackedA<MR> {
    #[inline(always)]
    unsafe fn at(&self, i: usize, p: usize) -> *const f32 {
        self.0.add(p * MR + i)
    }
}

/// A transposed A read where it is (`rs == 1`): row `i` at `base + i`, step `p` at
/// `base + p·cs + i`.
#[derive(Clone, Copy)]
struct StridedA(*const f32, isize);

impl AccessA for StridedA {
    #[inline(always)]
    unsafe fn at(&self, i: usize, p: usize) -> *const f32 {
        self.0.offset(p as isize * self.1 + i as isize)
    }
}

/// `MR` contiguous rows of A read where they are (row-major activations): row `i` at
/// `rows[i]`, step `p` at `rows[i] + p`.
#[derive(Clone, Copy)]
struct RowsA<const MR: usize>([*const f32; MR]);

impl<const MR: usize> AccessA for RowsA<MR> {
    #[inline(always)]
    unsafe fn at(&self, i: usize, p: usize) -> *const f32 {
        self.0[i].add(p)
    }
}

/// `MR` rows of a gathered A (see [`Gather`]): row `i`'s origin at `rows[i]`, step `p` at
/// `rows[i] + cols[p]`.
#[derive(Clone, Copy)]
struct GatherA<const MR: usize>([*const f32; MR], *const isize);

impl<const MR: usize> AccessA for GatherA<MR> {
    #[inline(always)]
    unsafe fn at(&self, i: usize, p: usize) -> *const f32 {
        self.0[i].offset(*self.1.add(p))
    }
}

/// Runs one tile in a function of its own, compiled for the rung's vector width: LLVM then
/// allocates the tile's registers for that loop alone. Inlined into the blocked product
/// (with its three ways of reading A), the AVX-512 tile's accumulators spilled to the stack in
/// some builds and not others (a third of the loop on stack traffic, half the speed), as
/// unrelated code elsewhere in the crate changed.
#[inline(always)]
unsafe fn run_tile<S: Simd, A: AccessA, const MR: usize, const NV: usize>(t: &Tile<A>) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        #[inline(never)]
        unsafe fn wide<S: Simd, A: AccessA, const MR: usize, const NV: usize>(t: &Tile<A>) {
            t.run_b::<S, MR, NV>()
        }
        #[target_feature(enable = "avx2,fma")]
        #[inline(never)]
        unsafe fn narrow<S: Simd, A: AccessA, const MR: usize, const NV: usize>(t: &Tile<A>) {
            t.run_b::<S, MR, NV>()
        }
        // Only the AVX-512 vector type has 16 lanes; the AVX2 one (8) never runs with the
        // AVX-512 features enabled.
        if S::LANES == 16 {
            wide::<S, A, MR, NV>(t)
        } else {
            narrow::<S, A, MR, NV>(t)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    t.run_b::<S, MR, NV>()
}

/// One `MR × NR` tile of `C` (`rows × cols` of it valid).
struct Tile<A> {
    k: usize,
    /// A's `MR` rows, steps `0..k`.
    a: A,
    /// B micro-panel: row `p` at `b + p·ldb`, `NR` floats (zero-padded past `cols`).
    b: *const f32,
    ldb: isize,
    c: *mut f32,
    ldc: isize,
    /// The next tile's C and its rows (0: none), prefetched during this one.
    next_c: (*mut f32, usize),
    /// Cache lines (16 floats apart) asked into L2 during this tile, and how many: its share
    /// of the next B panel, or of the next row tile's rows of A.
    next_b: (*const f32, usize),
    rows: usize,
    cols: usize,
    /// Add the tile to what C holds.
    load_c: bool,
    /// Add this `(cols)` vector to every row.
    bias: Option<*const f32>,
    /// Apply GELU to the tile once written (its last block of the inner dimension).
    gelu: Option<Gelu>,
    /// With `gelu`: the tile's place in [`Out::gelu_values`] (C's row stride).
    gelu_values: Option<*mut f32>,
    /// Multiply the tile once written by these (its place in [`Out::times`]; its last block
    /// of the inner dimension).
    times: Option<*const f32>,
    /// Its share of the next block of a row-major B to copy into panels during its steps.
    ahead: Ahead,
}

/// Rows of one panel of the next block of a row-major B (a weight gradient's x) that a tile
/// copies into their packed place while it runs, one row (`NR` floats) every `every` groups
/// of four steps, each asked into L2 [`AHEAD_ROWS`] rows before it is copied.
///
/// Packing x a block at a time before the block's tiles was a pass of its own, bound by L3
/// (10.9 % of `dw:6400x768x192`'s samples on the AVX-512 FMA kernel of a Xeon, whose dW has
/// 192 rows and x rows of 768 floats). Spread over the tiles, its loads and stores issue
/// beside the FMAs, and the loads hit L2. Against the whole-block copy, alternating within
/// one process (AVX-512 Xeon, 2 threads, FMA kernel): `dw:6400x768x192` +4.4 to +5.7 % in
/// three runs, `dw:6400x128x64` +4.6 %, the other weight gradients level, the training steps
/// level. On the AVX2 rung the products were level to +4 %, but the training steps lost
/// 1.4–1.8 % (with nothing changed, the same harness read −0.3 to −0.7 %); there the block
/// keeps its copy of its own. Not measured on AMD's AVX-512.
#[derive(Clone, Copy)]
struct Ahead {
    src: *const f32,
    /// B's row stride.
    ld: isize,
    dst: *mut f32,
    rows: usize,
    every: usize,
}

impl Ahead {
    const NONE: Ahead = Ahead {
        src: std::ptr::null(),
        ld: 0,
        dst: std::ptr::null_mut(),
        rows: 0,
        every: 1,
    };
}

/// Rows ahead of its copy that a row of [`Ahead`] is asked into L2.
const AHEAD_ROWS: usize = 4;

/// Asks L2 for a tile's row of B, `NV` vectors of `S` from `row` (a line every 16 floats).
/// The lines are only asked for, never read. (`wrapping_add` here instead of `add` cost the
/// copy-ahead weight gradient 4 %: `dw:6400x768x192` on the AVX-512 FMA kernel, six pairs of
/// processes.)
#[inline(always)]
unsafe fn prefetch_row_l2<S: Simd, const NV: usize>(row: *const f32) {
    for j in (0..NV * S::LANES).step_by(16) {
        prefetch_l2(row.add(j));
    }
}

impl<A> Tile<A> {
    /// The same tile reading A through `a`.
    #[inline(always)]
    fn with_a<B>(&self, a: B) -> Tile<B> {
        Tile {
            k: self.k,
            a,
            b: self.b,
            ldb: self.ldb,
            c: self.c,
            ldc: self.ldc,
            next_c: self.next_c,
            next_b: self.next_b,
            rows: self.rows,
            cols: self.cols,
            load_c: self.load_c,
            bias: self.bias,
            gelu: self.gelu,
            gelu_values: self.gelu_values,
            times: self.times,
            ahead: self.ahead,
        }
    }
}

impl<A: AccessA> Tile<A> {
    /// [`Self::run`] with B's row stride a constant where B is a packed panel (`NR` floats a
    /// row): its loads then take immediate offsets, one address computation per step fewer.
    /// And the copy of [`Self::ahead`] in a loop of its own, so that every other tile's loop
    /// stays as it was.
    #[inline(always)]
    unsafe fn run_b<S: Simd, const MR: usize, const NV: usize>(&self) {
        if self.ldb == (NV * S::LANES) as isize {
            if self.ahead.rows > 0 {
                self.run::<S, MR, NV, true, true>()
            } else {
                self.run::<S, MR, NV, true, false>()
            }
        } else {
            debug_assert!(
                self.ahead.rows == 0,
                "a copy ahead into panels B is not read from"
            );
            self.run::<S, MR, NV, false, false>()
        }
    }

    #[inline(always)]
    unsafe fn run<
        S: Simd,
        const MR: usize,
        const NV: usize,
        const PANEL: bool,
        const AHEAD: bool,
    >(
        &self,
    ) {
        let mut acc = [[S::zero(); NV]; MR];
        let mut b = self.b;
        let ldb = if PANEL {
            (NV * S::LANES) as isize
        } else {
            self.ldb
        };
        let mut p = 0;
        // No closures here: they would not be compiled with the rung's target features.
        macro_rules! step {
            () => {{
                let mut bv = [S::zero(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = S::load(b.add(v * S::LANES));
                }
                #[allow(clippy::needless_range_loop)]
                for i in 0..MR {
                    let av = S::broadcast(self.a.at(i, p));
                    for v in 0..NV {
                        acc[i][v] = S::fma(av, bv[v], acc[i][v]);
                    }
                }
                b = b.offset(ldb);
                p += 1;
            }};
        }
        // One row of the next tile's C asked for every four steps, every line of it (all rows
        // at once, the 6 × 64 tile's 24–30 lines would overrun the L1's fill buffers; the
        // first and last float of a row alone left half of a 64-float row to the stores: the
        // S/16 batch-1 products ran 1–15 % slower on a Zen 4 EPYC).
        // And one line of the next B panel every four steps: asked all at once, before the
        // tile, they waited on memory together (2.5 % of ViT-B/16's batch-1 samples on a Zen 4
        // EPYC).
        let (next, next_rows) = self.next_c;
        let (mut nb, mut nb_lines) = self.next_b;
        let mut q = 0;
        let mut ahead = if AHEAD { self.ahead } else { Ahead::NONE };
        let mut tick = ahead.every;
        macro_rules! copy_row {
            () => {{
                // Past B's last row at the end of a block: never read, only asked for.
                prefetch_row_l2::<S, NV>(ahead.src.wrapping_offset(AHEAD_ROWS as isize * ahead.ld));
                for v in 0..NV {
                    S::store(
                        ahead.dst.add(v * S::LANES),
                        S::load(ahead.src.add(v * S::LANES)),
                    );
                }
                ahead.src = ahead.src.wrapping_offset(ahead.ld);
                ahead.dst = ahead.dst.add(NV * S::LANES);
                ahead.rows -= 1;
            }};
        }
        for r in 0..if AHEAD { AHEAD_ROWS.min(ahead.rows) } else { 0 } {
            prefetch_row_l2::<S, NV>(ahead.src.offset(r as isize * ahead.ld));
        }
        while p + 4 <= self.k {
            if AHEAD && ahead.rows > 0 {
                tick -= 1;
                if tick == 0 {
                    tick = ahead.every;
                    copy_row!();
                }
            }
            if q < next_rows {
                let cr = next.offset(q as isize * self.ldc);
                // A 64-float row spans four lines, five where it is not aligned.
                for j in (0..NV * S::LANES).step_by(16) {
                    prefetch(cr.add(j));
                }
                prefetch(cr.add(NV * S::LANES - 1));
                q += 1;
            }
            if nb_lines > 0 {
                prefetch_l2(nb);
                nb = nb.add(16);
                nb_lines -= 1;
            }
            step!();
            step!();
            step!();
            step!();
        }
        while p < self.k {
            step!();
        }
        while AHEAD && ahead.rows > 0 {
            copy_row!();
        }
        while nb_lines > 0 {
            prefetch_l2(nb);
            nb = nb.add(16);
            nb_lines -= 1;
        }
        // The accumulators must only ever be indexed with constants, or LLVM keeps a copy of
        // them in memory and stores to it on every step: whole tiles are written by loops of
        // constant length without exits or branches (one loop per epilogue, so that LLVM
        // unrolls each whole; with the bias and C tests inside one loop, the 12 × 32 tile
        // over a packed A was left rolled, and stored its 24 accumulators to the stack on
        // every step: a third of the AVX-512 FMA peak on a Xeon), edge tiles through a buffer.
        if self.rows == MR && self.cols == NV * S::LANES {
            macro_rules! put {
                ($bias:expr, $load_c:expr) => {{
                    #[allow(clippy::needless_range_loop)]
                    for i in 0..MR {
                        let cr = self.c.offset(i as isize * self.ldc);
                        for v in 0..NV {
                            let at = v * S::LANES;
                            let mut y = acc[i][v];
                            if let Some(bias) = $bias {
                                y = S::add(y, S::load(bias.add(at)));
                            }
                            if $load_c {
                                y = S::add(y, S::load(cr.add(at)));
                            }
                            S::store(cr.add(at), y);
                        }
                    }
                }};
            }
            match (self.bias, self.load_c) {
                (Some(bias), true) => put!(Some(bias), true),
                (Some(bias), false) => put!(Some(bias), false),
                (None, true) => put!(None::<*const f32>, true),
                (None, false) => put!(None::<*const f32>, false),
            }
            // GELU on the tile just written, in L1, over whole rows of a length known here:
            // the rows' vectors unrolled side by side, their chains overlapping.
            if let Some(kind) = self.gelu {
                self.gelu_rows(MR, NV * S::LANES, kind);
            }
            if let Some(t) = self.times {
                #[allow(clippy::needless_range_loop)]
                for i in 0..MR {
                    let cr = self.c.offset(i as isize * self.ldc);
                    let tr = t.offset(i as isize * self.ldc);
                    for v in 0..NV {
                        let at = v * S::LANES;
                        S::store(cr.add(at), S::mul(S::load(cr.add(at)), S::load(tr.add(at))));
                    }
                }
            }
        } else {
            let nr = NV * S::LANES;
            let mut buf = [0.0f32; EDGE_BUF];
            #[allow(clippy::needless_range_loop)]
            for i in 0..MR {
                for v in 0..NV {
                    S::store(buf.as_mut_ptr().add(i * nr + v * S::LANES), acc[i][v]);
                }
            }
            for i in 0..self.rows {
                let cr = self.c.offset(i as isize * self.ldc);
                for j in 0..self.cols {
                    let mut y = buf[i * nr + j];
                    if let Some(bias) = self.bias {
                        y += *bias.add(j);
                    }
                    if self.load_c {
                        y += *cr.add(j);
                    }
                    *cr.add(j) = y;
                }
            }
            // GELU on the tile just written, in L1 (applied to the block afterwards, the
            // hidden layer made a round trip through L3 at batch 16).
            if let Some(kind) = self.gelu {
                self.gelu_rows(self.rows, self.cols, kind);
            }
            if let Some(t) = self.times {
                for i in 0..self.rows {
                    let cr = self.c.offset(i as isize * self.ldc);
                    let tr = t.offset(i as isize * self.ldc);
                    for j in 0..self.cols {
                        *cr.add(j) *= *tr.add(j);
                    }
                }
            }
        }
    }

    /// GELU over the tile's first `rows × cols` elements of C, just written: in place, or with
    /// [`Self::gelu_values`] the values there and the derivative in C.
    #[inline(always)]
    unsafe fn gelu_rows(&self, rows: usize, cols: usize, kind: Gelu) {
        for i in 0..rows {
            let at = i as isize * self.ldc;
            let row = std::slice::from_raw_parts_mut(self.c.offset(at), cols);
            match self.gelu_values {
                None => super::math::gelu_slice::<true>(row, kind),
                Some(v) => {
                    let values = std::slice::from_raw_parts_mut(v.offset(at), cols);
                    super::math::gelu_with_grad_slice::<true>(row, values, kind);
                }
            }
        }
    }
}

/// The register tile [`row_tile`] runs on rung `isa`: `(rows, columns, lanes)`; `None` on the
/// portable rung. Narrower products run a tile of as many whole vectors as their columns need.
///
/// AVX-512: 6 × 64 (24 accumulators), the narrow products' tile of `gemm_avx512`. Against 8 ×
/// 32 in the fused attention (Zen 4 EPYC, ViT-Ti/16 batch 16, interleaved): `q·kᵀ`'s 64-step
/// tiles do half as much again per call, and `P·v` reads each row of `v` once per 6 query
/// rows instead of twice (two 32-column halves) per 8.
pub(crate) fn row_tile_shape(isa: Isa) -> Option<(usize, usize, usize)> {
    match isa {
        Isa::Avx512 => Some((MR512_NARROW, 2 * NR512, 16)),
        Isa::Avx2 => Some((MR256, NR256, 8)),
        Isa::Portable => None,
    }
}

/// How [`row_tile`] reads its tile of `A (rows, k)`, in place.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TileA<'a> {
    /// Row `i` at `a[i]`, its `k` steps contiguous; `a.len()` is the tile's rows.
    Rows(&'a [*const f32]),
    /// A transposed (the columns of a row-major matrix): `A(i, p)` at `ptr + p·ld + i`, for
    /// `rows` rows. Every step reads the full tile's height ([`row_tile_shape`]'s rows), so
    /// `ptr + p·ld` must address that many floats even when `rows` is fewer.
    Transposed {
        ptr: *const f32,
        ld: isize,
        rows: usize,
    },
}

impl TileA<'_> {
    fn rows(&self) -> usize {
        match *self {
            TileA::Rows(a) => a.len(),
            TileA::Transposed { rows, .. } => rows,
        }
    }
}

/// One register tile `C (rows, cols) = A (rows, k) · B (k, cols)` on rung `isa`, for kernels
/// that drive the tiles themselves (the fused attention and its backward,
/// [`super::attention`]): A read in place as [`TileA`] says, B row `p` at `b + p·ldb`, C row
/// `i` at `c + i·ldc`. The tile's rows are at most [`row_tile_shape`]'s; `cols` at most its
/// columns.
///
/// # Safety
/// The rung must be the CPU's or below, and not portable. A's reads (see [`TileA`]) address
/// `k` steps; B's rows address `cols` rounded up to whole vectors of the rung; `C` addresses
/// its `rows × cols` elements, aliasing neither operand.
#[inline(always)]
pub(crate) unsafe fn row_tile(
    isa: Isa,
    k: usize,
    a: TileA,
    b: *const f32,
    ldb: isize,
    (c, ldc): (*mut f32, isize),
    cols: usize,
) {
    #[inline(always)]
    unsafe fn run<S: Simd, const MR: usize, const NV: usize>(
        k: usize,
        a: TileA,
        b: *const f32,
        ldb: isize,
        (c, ldc): (*mut f32, isize),
        cols: usize,
    ) {
        let rows = a.rows();
        debug_assert!((1..=MR).contains(&rows) && (1..=NV * S::LANES).contains(&cols));
        let tile = Tile {
            k,
            a: (),
            b,
            ldb,
            c,
            ldc,
            next_c: (c, 0),
            next_b: (b, 0),
            rows,
            cols,
            load_c: false,
            bias: None,
            gelu: None,
            gelu_values: None,
            times: None,
            ahead: Ahead::NONE,
        };
        #[inline(always)]
        unsafe fn go<S: Simd, A: AccessA, const MR: usize, const NV: usize>(
            t: &Tile<A>,
            cols: usize,
        ) {
            // As many whole vectors as the columns need (B is read no further).
            match cols.div_ceil(S::LANES) {
                1 => run_tile::<S, _, MR, 1>(t),
                2 if NV >= 2 => run_tile::<S, _, MR, 2>(t),
                3 if NV >= 3 => run_tile::<S, _, MR, 3>(t),
                _ => run_tile::<S, _, MR, NV>(t),
            }
        }
        match a {
            TileA::Rows(a) => {
                // Rows past the edge read the last real one (never stored).
                let rows_a: [*const f32; MR] = std::array::from_fn(|i| a[i.min(rows - 1)]);
                go::<S, _, MR, NV>(&tile.with_a(RowsA(rows_a)), cols)
            }
            TileA::Transposed { ptr, ld, .. } => {
                go::<S, _, MR, NV>(&tile.with_a(StridedA(ptr, ld)), cols)
            }
        }
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let t = (c, ldc);
            run::<super::simd::Avx512, MR512_NARROW, { 2 * NV512 }>(k, a, b, ldb, t, cols)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => run::<super::simd::Avx2, MR256, NV256>(k, a, b, ldb, (c, ldc), cols),
        _ => unreachable!("row_tile on the portable rung"),
    }
}

/// Packs `B (k, n)` into `ceil(n / nr)` panels `[k][nr]` (the layout [`row_tile`] reads with
/// `ldb = nr`), panel after panel in `out`; the padding columns of the last panel are left as
/// they were.
///
/// # Safety
/// `b` addresses a `(k, n)` matrix with its strides; `out` holds the panels.
pub(crate) unsafe fn pack_panels(b: MatRef, k: usize, n: usize, nr: usize, out: &mut [f32]) {
    pack_b(b, k, n, nr, &mut out[..n.div_ceil(nr) * k * nr]);
}

/// Brings the cache line of `p` into L2 (a hint: never faults).
#[inline(always)]
pub(crate) unsafe fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Brings the cache line of `p` into L1 (a hint: never faults).
#[inline(always)]
unsafe fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Floats of the largest register tile (AVX-512's 12 × 32), for writing edge tiles.
const EDGE_BUF: usize = MR512_WIDE * NR512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::available_isas;
    use crate::kernels::testutil::*;

    /// `C = A·B (+ bias) (+ C)` in f64, on strided operands.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        (ars, acs): (usize, usize),
        b: &[f32],
        (brs, bcs): (usize, usize),
        bias: Option<&[f32]>,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s: f64 = (0..k)
                    .map(|p| a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64)
                    .sum();
                if let Some(bias) = bias {
                    s += bias[j] as f64;
                }
                if accumulate {
                    s += c[i * ldc + j] as f64;
                }
                c[i * ldc + j] = s as f32;
            }
        }
    }

    /// A product routine under test: `gemm` of one rung, or a test instantiation.
    type Product<'a> = &'a dyn Fn(usize, usize, usize, MatRef, BRef, Out);

    /// Gives a closure the higher-ranked signature `Product` needs.
    fn product<F: Fn(usize, usize, usize, MatRef, BRef, Out)>(f: F) -> F {
        f
    }

    /// `product` against f64 on every operand layout the engine uses, shapes with ragged
    /// edges in all three dimensions and across the cache blocks of `g`; elements of C
    /// outside the product keep their values. `packing` packs B for its `BRef::Packed` case.
    fn check_products(name: &str, g: Geometry, product: Product, packing: Option<(Isa, bool)>) {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 37, 33),
            (g.mr + 1, g.kc + 3, g.nr * 2 + 5),
            (g.mc + 7, 2 * g.kc + 1, 3 * g.nr),
            (50, 64, 192),
            // Narrow products, A read in place on the AVX-512 rung of two-FMA-unit CPUs: the
            // 6 × 64 tile (many rows, 64-column multiples), the 8 × 32 one (few columns).
            (301, 70, 128),
            (300, 64, 192),
            (40, 64, 96),
            // 64-column panels on AVX-512 CPUs with one 512-bit FMA per cycle (the 6 × 64
            // tile, B packed or not; see `panel_width`).
            (13, 37, 256),
            (g.mc + 5, g.kc + 9, 320),
            // B resident in L2 (see `b_resident`): a tall A read in place over one block of
            // the inner dimension longer than `kc`, ragged columns.
            (300, 2 * g.kc - 5, 2 * g.nr + 7),
            // A transposed A read in place (see `transposed_in_place`): a long sum into few
            // rows, the last row tile partial; 64 columns (the 6 × 64 tile over x's rows in
            // place), 96 and 128 (12 and 8 × 32 over a packed B), across blocks.
            (70, 600, 64),
            (190, 1000, 96),
            (50, g.kc + 300, 128),
            // A transposed A packed (more than 192 columns) over a row-major B in several
            // blocks, the last one short: on two-FMA-unit AVX-512 CPUs each block's tiles copy
            // the next block of B into panels (see `Ahead`), nine row tiles sharing a block's
            // rows unevenly, the last tile partial.
            (100, 2 * g.kc + 50, 224),
        ] {
            let a = rand_vec(m * k, 1);
            let bt = rand_vec(n * k, 2); // B stored transposed, (n, k): a weight
            let bn = rand_vec(k * n, 3); // B row-major (k, n): activations
            let bias = rand_vec(n, 4);
            let ldc = n + 3;
            let c0 = rand_vec(m * ldc, 5);
            // (A layout, B matrix + strides): x·Wᵀ, dY·W, and a transposed A (dYᵀ·X).
            type Case<'a> = (&'a [f32], (usize, usize), &'a [f32], (usize, usize));
            let cases: [Case; 3] = [
                (&a, (k, 1), &bt, (1, k)),
                (&a, (k, 1), &bn, (n, 1)),
                (&a, (1, m), &bn, (n, 1)),
            ];
            for (ci, &(av, (ars, acs), bv, (brs, bcs))) in cases.iter().enumerate() {
                // The GELU epilogue too: in the FMA kernels' tiles, after the other engines.
                for (accumulate, with_bias, gelu) in [
                    (false, true, None),
                    (true, false, None),
                    (true, true, None),
                    (false, true, Some(Gelu::Exact)),
                    (true, false, Some(Gelu::Tanh)),
                ] {
                    let bias = with_bias.then_some(&bias[..]);
                    let mut want = c0.clone();
                    reference(
                        m,
                        n,
                        k,
                        av,
                        (ars, acs),
                        bv,
                        (brs, bcs),
                        bias,
                        &mut want,
                        ldc,
                        accumulate,
                    );
                    if let Some(kind) = gelu {
                        for row in want.chunks_exact_mut(ldc) {
                            for v in &mut row[..n] {
                                *v = super::super::math::gelu_ref(*v, kind);
                            }
                        }
                    }
                    let amat = MatRef {
                        ptr: av.as_ptr(),
                        rs: ars as isize,
                        cs: acs as isize,
                    };
                    let bmat = MatRef {
                        ptr: bv.as_ptr(),
                        rs: brs as isize,
                        cs: bcs as isize,
                    };
                    let packed = packing.and_then(|(isa, amx)| unsafe {
                        PackedB::pack(isa, amx, bmat, k, n, Aligned::default())
                    });
                    let bs: Vec<BRef> = match &packed {
                        Some(p) => vec![BRef::Mat(bmat), BRef::Packed(p, 0)],
                        None => vec![BRef::Mat(bmat)],
                    };
                    for bref in bs {
                        let mut got = c0.clone();
                        let out = Out {
                            accumulate,
                            bias: bias.map(|b| b.as_ptr()),
                            gelu,
                            ..Out::plain(got.as_mut_ptr(), ldc as isize)
                        };
                        product(m, n, k, amat, bref, out);
                        let d = max_abs_diff(&got, &want);
                        assert!(
                            d < 2e-6 * (k as f32).sqrt() * 4.0,
                            "{name} {m}x{k}x{n} case {ci} {bref:?} acc {accumulate} bias {with_bias} gelu {gelu:?}: {d}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_rung_matches_the_reference_on_every_layout() {
        for isa in available_isas() {
            let p = product(|m, n, k, a, b, c| unsafe { gemm(isa, m, n, k, a, b, c) });
            let amx = isa == Isa::Avx512 && amx_enabled();
            check_products(isa.name(), geometry(isa), &p, Some((isa, amx)));
        }
    }

    /// The AVX-512 FMA kernel itself, wherever the products would otherwise go to the tile
    /// unit (the test above then runs the AMX path on most shapes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_fma_kernel_matches_the_reference_on_every_layout() {
        if !available_isas().contains(&Isa::Avx512) {
            return;
        }
        let p = product(|m, n, k, a, b, c| unsafe {
            gemm_avx512(m, n, k, ARef::Mat(a), b, c, None, None)
        });
        let g = geometry(Isa::Avx512);
        check_products("avx512 fma", g, &p, Some((Isa::Avx512, false)));
    }

    /// A block of rows with an edge (a few more rows, some of the columns; see [`Edge`]) on
    /// each FMA rung the CPU has, against f64: one and several blocks of the inner dimension
    /// and of the rows, the edge's tiles run panel by panel and after all the row tiles,
    /// ragged columns, edges of 1 to `MR − 1` rows and of more than one tile (the narrower
    /// tiles of AVX-512; beside 12-row tiles, up to [`EDGE_MR`] rows on the smaller edge
    /// tile, 11 on a whole one), with every epilogue. The edge's other columns and every element
    /// outside the product keep their values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn an_edge_is_computed_with_its_block() {
        use super::super::math::gelu_with_grad;
        for isa in available_isas().into_iter().filter(|&i| i != Isa::Portable) {
            let g = geometry(isa);
            let (mr, nr, kc) = (g.mr, g.nr, g.kc);
            // (block rows, k, n, edge rows, edge columns)
            for &(m, k, n, er, (e0, e1)) in &[
                // ViT-B/16's batch-1 projection on a thread: two blocks of the inner dimension.
                (96, 768, 768, 5, (384, 768)),
                // DeiT's 198 tokens: an edge of 6 rows, the most the smaller edge tile takes.
                (96, 768, 768, 6, (0, 384)),
                (16 * mr, 2 * kc + 5, 3 * nr + 5, 1, (nr, 3 * nr + 5)),
                (g.mc + 7, kc + 9, 5 * nr, mr - 1, (0, 2 * nr)),
                // A small B: each row tile across every panel, the first 64 panel by panel.
                (500, 64, 2 * nr, 3, (nr, 2 * nr)),
                (40, 64, 256, 11, (64, 256)),
                (40, 64, 96, 11, (32, 96)),
            ] {
                let rows = m + er;
                let a = rand_vec(rows * k, 1);
                let bt = rand_vec(n * k, 2); // B transposed, (n, k): a weight
                let bias = rand_vec(n, 4);
                let factor = rand_vec(rows * n, 6);
                let ldc = n + 3;
                let c0 = rand_vec(rows * ldc, 5);
                let amat = MatRef {
                    ptr: a.as_ptr(),
                    rs: k as isize,
                    cs: 1,
                };
                let bmat = MatRef {
                    ptr: bt.as_ptr(),
                    rs: 1,
                    cs: k as isize,
                };
                let packed = unsafe { PackedB::pack(isa, false, bmat, k, n, Aligned::default()) };
                let packed = packed.expect("an FMA rung packs B");
                if !e0.is_multiple_of(packed.panel()) {
                    // The 6 × 64 tile's panels on one-FMA-unit AVX-512 CPUs.
                    continue;
                }
                // (accumulate, bias, GELU with its values, the factor)
                for (accumulate, with_bias, gelu, times) in [
                    (false, true, None, false),
                    (true, false, None, false),
                    (true, true, None, true),
                    (false, true, Some(Gelu::Exact), false),
                    (false, false, Some(Gelu::Tanh), true),
                ] {
                    let bias = with_bias.then_some(&bias[..]);
                    let mut want = c0.clone();
                    let mut want_values = vec![0.0; rows * ldc];
                    reference(
                        rows,
                        n,
                        k,
                        &a,
                        (k, 1),
                        &bt,
                        (1, k),
                        bias,
                        &mut want,
                        ldc,
                        accumulate,
                    );
                    for i in 0..rows {
                        let row = &mut want[i * ldc..i * ldc + n];
                        if let Some(kind) = gelu {
                            gelu_with_grad(row, &mut want_values[i * ldc..i * ldc + n], kind);
                        }
                        if times {
                            for (v, f) in row.iter_mut().zip(&factor[i * n..]) {
                                *v *= f;
                            }
                        }
                        // Outside the edge's columns its rows keep what they held.
                        if i >= m {
                            for j in (0..e0).chain(e1..n) {
                                want[i * ldc + j] = c0[i * ldc + j];
                                want_values[i * ldc + j] = 0.0;
                            }
                        }
                    }
                    // The factor in C's layout.
                    let mut factor_c = vec![0.0; rows * ldc];
                    for i in 0..rows {
                        factor_c[i * ldc..i * ldc + n].copy_from_slice(&factor[i * n..(i + 1) * n]);
                    }
                    let mut got = c0.clone();
                    let mut values = vec![0.0; rows * ldc];
                    let out = Out {
                        accumulate,
                        bias: bias.map(|b| b.as_ptr()),
                        gelu,
                        gelu_values: gelu.map(|_| values.as_mut_ptr()),
                        times: times.then_some(factor_c.as_ptr()),
                        ..Out::plain(got.as_mut_ptr(), ldc as isize)
                    };
                    let edge = Edge {
                        a: MatRef {
                            ptr: a[m * k..].as_ptr(),
                            ..amat
                        },
                        rows: er,
                        c: got[m * ldc..].as_mut_ptr(),
                        cols: (e0, e1),
                    };
                    unsafe { gemm_edge(isa, m, n, k, amat, &packed, out, edge) };
                    let case = format!(
                        "{isa:?} {m}+{er}x{k}x{n} cols {e0}..{e1} acc {accumulate} \
                         bias {with_bias} gelu {gelu:?} times {times}"
                    );
                    let d = max_abs_diff(&got, &want);
                    assert!(d < 2e-6 * (k as f32).sqrt() * 8.0, "{case}: {d}");
                    if gelu.is_some() {
                        let d = max_abs_diff(&values, &want_values);
                        assert!(d < 2e-6 * (k as f32).sqrt() * 8.0, "{case}, values: {d}");
                    }
                }
            }
            eprintln!("an edge with its block: {isa:?} ran");
        }
    }

    /// The tile unit's product on every layout, ragged shapes across its blocks, B packed
    /// once and per call; printed so a log shows whether this CPU ran it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_amx_path_matches_the_reference_on_every_layout() {
        use super::super::amx;
        if !amx::supported() {
            println!("AMX: not on this CPU (or not granted by the OS); skipped");
            return;
        }
        println!("AMX: running the bf16x6 tile product");
        let p = product(|m, n, k, a, b, c| unsafe {
            let b = match b {
                BRef::Mat(bm) => amx::B::Mat(bm),
                BRef::Packed(pb, c0) => amx::B::Packed(pb.amx.as_ref().expect("AMX packing"), c0),
            };
            gemm_amx(m, n, k, a, b, c, None)
        });
        // Blocks: 256 rows of A, 8 steps of 32 along k; shapes cross both and end ragged.
        let g = Geometry {
            mr: amx::MR,
            nr: amx::NR,
            kc: 256,
            mc: 256,
            ..geometry(Isa::Avx512)
        };
        check_products("amx", g, &p, Some((Isa::Avx512, true)));
    }

    /// The AVX-512 rung's tiles — 12 and 8 rows, two vectors per row — instantiated with AVX2
    /// vectors, so the shared code it runs (its 12-row packing in two groups of 8, the
    /// accumulator array, the edge tiles, the packed B) is tested on any AVX2 CPU. What an
    /// AVX2 machine cannot run of that rung is only `simd::Avx512`'s intrinsics.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_tile_shape_is_right_on_avx2_vectors() {
        use super::super::simd::Avx2;
        if !available_isas().contains(&Isa::Avx2) {
            return;
        }
        let base = geometry(Isa::Avx2);
        let at = |mr: usize, pack_a_rows: usize| Geometry {
            mr,
            mc: (base.mc / mr).max(1) * mr,
            pack_a_rows,
            ..base
        };
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<const MR: usize>(
            m: usize,
            n: usize,
            k: usize,
            a: MatRef,
            b: BRef,
            c: Out,
            g: Geometry,
        ) {
            blocked::<Avx2, MR, NV512>(m, n, k, ARef::Mat(a), b, c, g, None, None);
        }
        // Both tile heights, with A read in place up to 256 rows and with A always packed.
        // B packed for AVX2 has the panel width (16) and blocking these instantiations read.
        for pack_a_rows in [PACK_A_ROWS, 0] {
            let g = at(MR512_WIDE, pack_a_rows);
            let p = product(|m, n, k, a, b, c| unsafe { wide::<MR512_WIDE>(m, n, k, a, b, c, g) });
            let name = format!("12 x (2 x 8) on AVX2, A packed above {pack_a_rows} rows");
            check_products(&name, g, &p, Some((Isa::Avx2, false)));
            let g = at(MR512, pack_a_rows);
            let p = product(|m, n, k, a, b, c| unsafe { wide::<MR512>(m, n, k, a, b, c, g) });
            let name = format!("8 x (2 x 8) on AVX2, A packed above {pack_a_rows} rows");
            check_products(&name, g, &p, Some((Isa::Avx2, false)));
        }
    }

    /// The tile unit's products carry f32's error, not bf16's: on a ViT-B-sized product its
    /// largest and mean errors against f64 are within 2× those of the FMA kernel (bf16
    /// inputs alone would be ~1000× worse).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_amx_path_is_as_accurate_as_the_fma_kernel() {
        use super::super::amx;
        if !amx::supported() {
            println!("AMX: not on this CPU; skipped");
            return;
        }
        let (m, k, n) = (197, 768, 256);
        let a = rand_vec(m * k, 11);
        let w = rand_vec(n * k, 12);
        let amat = MatRef {
            ptr: a.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        let bmat = MatRef {
            ptr: w.as_ptr(),
            rs: 1,
            cs: k as isize,
        };
        let exact: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum()
            })
            .collect();
        let errors = |run: &dyn Fn(Out)| {
            let mut c = vec![0.0f32; m * n];
            run(Out::plain(c.as_mut_ptr(), n as isize));
            let d: Vec<f64> = c
                .iter()
                .zip(&exact)
                .map(|(&g, &x)| (g as f64 - x).abs())
                .collect();
            let max = d.iter().cloned().fold(0.0, f64::max);
            (max, d.iter().sum::<f64>() / d.len() as f64)
        };
        let fma = errors(&|o| unsafe {
            gemm_avx512(m, n, k, ARef::Mat(amat), BRef::Mat(bmat), o, None, None)
        });
        let (at, bt) = (amx::A::Mat(amat), amx::B::Mat(bmat));
        let tiles = errors(&|o| unsafe { amx::gemm(m, n, k, at, bt, o, None, None) });
        println!(
            "max / mean error against f64: FMA {:.2e} / {:.2e}, AMX bf16x6 {:.2e} / {:.2e}",
            fma.0, fma.1, tiles.0, tiles.1
        );
        assert!(
            tiles.0 <= 2.0 * fma.0 && tiles.1 <= 2.0 * fma.1,
            "{tiles:?} vs {fma:?}"
        );
    }

    #[test]
    fn a_buffer_advised_into_huge_pages_is_zeroed_aligned_and_whole() {
        // Large enough for whole 2 MiB pages inside it, whatever the allocator's offset.
        let len = 3 * crate::alloc::HUGE_MIN / 4;
        let mut a = Aligned::<f32>::default();
        a.ensure(len);
        assert_eq!(a.slice().as_ptr() as usize % 64, 0);
        assert!(a.slice().iter().all(|&x| x == 0.0));
        for (i, x) in a.slice_mut().iter_mut().enumerate() {
            *x = i as f32;
        }
        assert!(a.slice().iter().enumerate().all(|(i, &x)| x == i as f32));
        assert_eq!(a.slice().len(), len);
    }

    #[test]
    fn the_blocking_fits_the_caches() {
        for isa in [Isa::Avx2, Isa::Avx512] {
            let g = geometry(isa);
            assert!(g.kc >= 64 && g.kc.is_multiple_of(16), "{g:?}");
            assert!(g.mc >= g.mr && g.mc.is_multiple_of(g.mr), "{g:?}");
        }
    }
}
