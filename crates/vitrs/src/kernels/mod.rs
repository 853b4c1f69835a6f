//! CPU kernels. Each fast kernel has a plain reference twin (`*_ref`) beside it, and a test
//! holds the two together within a stated tolerance.
//!
//! # The instruction-set ladder
//! One release binary, built for baseline x86-64, picks at run time the highest rung the CPU
//! has — [`Isa::Avx512`] (AVX-512 F + BW + VL + DQ with FMA), [`Isa::Avx2`] (AVX2 + FMA), or
//! [`Isa::Portable`] — and `VITRS_KERNELS=avx2|portable` (or [`set_isa`]) holds it to a lower
//! one. [`isa`] says which runs.
//! - The matrix products ([`sgemm`]) have one register-tiled micro-kernel per rung, written
//!   once over a small vector trait (`simd`): the blocking, packing and edge handling are
//!   shared, so what only an AVX-512 CPU runs is a thin layer of intrinsics.
//! - On CPUs with AMX (Intel Xeon since Sapphire Rapids) the AVX-512 rung runs its larger
//!   products on the tile unit instead, at f32 accuracy (three bf16 pieces per operand, see
//!   [`amx`]); `VITRS_AMX=0` keeps them on the FMA kernel. [`gemm_engine`] says which runs.
//! - Element-wise kernels and reductions are plain loops that LLVM vectorises;
//!   `simd_dispatch!` compiles each three times (baseline, AVX2 + FMA, AVX-512) and picks
//!   the copy of the running rung.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod batchnorm;
pub mod conv;
pub mod gemm;
pub mod layernorm;
pub mod loss;
pub mod math;
pub mod peak;
pub mod sgemm;
pub(crate) mod simd;
pub mod team;

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

/// A rung of the instruction-set ladder, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// No SIMD beyond the x86-64 baseline (or a non-x86 CPU).
    Portable,
    /// AVX2 with FMA (Intel since Haswell, AMD since Zen).
    Avx2,
    /// AVX-512 F, BW, VL and DQ, with FMA (Intel since Skylake-SP, AMD since Zen 4).
    Avx512,
}

impl Isa {
    /// The name `vit bench --json`, `vit info` and `VITRS_KERNELS` use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses [`Isa::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|i| i.name() == s)
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Self {
        match c {
            3 => Isa::Avx512,
            2 => Isa::Avx2,
            _ => Isa::Portable,
        }
    }
}

/// What runs the matrix products: `"amx-bf16x6"` where the AVX-512 rung hands them to the
/// tile unit ([`amx`], at f32 accuracy), `"fma"` for the rung's own FMA micro-kernel,
/// `"matrixmultiply"` on the portable rung. `vit info` and `vit bench` report it.
pub fn gemm_engine() -> &'static str {
    match isa() {
        _ if products_on_tiles() => "amx-bf16x6",
        Isa::Avx512 | Isa::Avx2 => "fma",
        Isa::Portable => "matrixmultiply",
    }
}

/// Where the tile unit may run the products and follows its speed (the default on a CPU with
/// AMX), picks the engine for the next products ([`amx::adapt`]): called at the start of a
/// forward pass and of a training step. Does nothing elsewhere.
pub fn adapt_engine() {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        amx::adapt();
    }
}

/// The calling thread's own engine, held until the guard drops: where the engine follows the
/// tile unit's speed, the products this thread runs go to its core's tile unit or to the FMA
/// kernel, whichever is faster there now ([`amx::follow_here`]). For a task that runs a whole
/// forward pass on one thread; the guard changes nothing where the engine is pinned, the rung
/// is not AVX-512 or there is no tile unit.
pub fn follow_engine_here() -> EngineHere {
    #[cfg(target_arch = "x86_64")]
    return EngineHere((isa() == Isa::Avx512).then(amx::follow_here).flatten());
    #[cfg(not(target_arch = "x86_64"))]
    EngineHere(())
}

/// How many tasks have run on their thread's own engine ([`follow_engine_here`]) so far: `(on
/// the FMA kernel, on the tile unit)`.
pub fn own_engine_tasks() -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    return amx::own_engine_tasks();
    #[cfg(not(target_arch = "x86_64"))]
    (0, 0)
}

/// The guard of [`follow_engine_here`]: the thread's own engine until dropped.
pub struct EngineHere(
    #[cfg(target_arch = "x86_64")]
    #[allow(dead_code)]
    Option<amx::FollowHere>,
    #[cfg(not(target_arch = "x86_64"))] (),
);

/// Whether the engine moves the products between the tile unit and the FMA kernel as their
/// speeds change ([`adapt_engine`]): the default on an AMX CPU, unless `VITRS_AMX=1` or `0`
/// pins one.
pub fn gemm_adaptive() -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa() == Isa::Avx512 && amx::adaptive();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the matrix products run on the AMX tile unit now: the AVX-512 rung with the tiles
/// enabled ([`amx::enabled`]; see [`adapt_engine`]).
pub fn products_on_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa() == Isa::Avx512 && amx::enabled();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The highest rung this CPU has (detected once by std, cached).
pub fn cpu_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Every rung this CPU can run, lowest first: what the path tests iterate over.
pub fn available_isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| i <= cpu_isa())
        .collect()
}

/// The rung in use: 0 not decided yet, else `Isa::code`.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Makes every kernel of this crate run the given rung, or the highest the CPU has if it
/// lacks that one; returns the rung now in use. `VITRS_KERNELS=avx2` or `portable` does the
/// same for a whole process (e.g. `VITRS_KERNELS=portable cargo test -p vitrs` holds the
/// portable paths to every reference test).
pub fn set_isa(want: Isa) -> Isa {
    let got = want.min(cpu_isa());
    MODE.store(got.code(), Relaxed);
    got
}

/// The rung the kernels take: the CPU's highest, lowered by `VITRS_KERNELS` or [`set_isa`].
#[inline]
pub fn isa() -> Isa {
    match MODE.load(Relaxed) {
        0 => {
            let cpu = cpu_isa();
            let env = std::env::var("VITRS_KERNELS").ok();
            let limit = env.as_deref().and_then(Isa::parse).unwrap_or(cpu);
            // A racing set_isa wins over the environment.
            let _ = MODE.compare_exchange(0, limit.min(cpu).code(), Relaxed, Relaxed);
            Isa::from_code(MODE.load(Relaxed))
        }
        c => Isa::from_code(c),
    }
}

/// Holds the kernels to their portable paths (`true`), as on a CPU without AVX2 + FMA, or
/// lets them use the CPU's best again (`false`). Shorthand for [`set_isa`].
pub fn set_portable_only(on: bool) {
    set_isa(if on { Isa::Portable } else { Isa::Avx512 });
}

/// True when the AVX2 + FMA rung or a higher one runs.
#[inline]
pub fn has_avx2_fma() -> bool {
    isa() >= Isa::Avx2
}

/// Defines `fn $name(args)` whose body is compiled for the baseline, for AVX2 + FMA and for
/// AVX-512; the copy of the running rung ([`isa`]) is called. In the body the constant
/// `FMA` says whether fused multiply-adds are instructions there (the SIMD copies), for the
/// polynomials of `math` (`exp_f::<FMA>`).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner<const FMA: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    inner::<true>($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    inner::<true>($($arg),*)
                }
                match $crate::kernels::isa() {
                    // SAFETY: `isa()` never exceeds what the CPU has.
                    $crate::kernels::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::kernels::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::Isa::Portable => {}
                }
            }
            inner::<false>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// A raw pointer that may cross threads. Kernels use it to let parallel tasks write disjoint,
/// non-contiguous regions of one output buffer (each use states why the regions are disjoint).
pub(crate) struct SyncPtr<T = f32>(pub *mut T);
// SAFETY: only used for writes to regions proven disjoint at each use site.
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}

// By hand: a derive would require `T: Copy`, and the pointer is copyable whatever it points to.
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer. A method (not `.0`) so closures capture the whole `Send` wrapper.
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Panics unless a kernel's slice holds at least `need` values. The public kernels write
/// through raw pointers from parallel tasks, so their slice lengths are checked in every
/// build, not only in debug ones.
#[inline]
#[track_caller]
pub(crate) fn check_len(what: &str, len: usize, need: usize) {
    assert!(
        len >= need,
        "{what}: {len} values where the shape needs {need}"
    );
}

/// Largest `|a − b|` over two slices, the comparison every fast-vs-reference test uses. It is
/// NaN-aware: a NaN in either slice (or two infinities) makes it infinite, and so do slices of
/// different lengths, so `diff < tol` fails — where `fold(0.0, f32::max)` would skip the NaN
/// and let a kernel that outputs only NaN pass.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return f32::INFINITY;
        }
        worst = worst.max(d);
    }
    worst
}

/// `‖a − b‖ / ‖a‖` (Euclidean norms, summed in f64): how far a whole parameter vector moved
/// from a reference, e.g. two runs that add the same gradients in another order. NaN-aware
/// like [`max_abs_diff`]: a NaN, an infinity or slices of different lengths give infinity.
pub fn relative_l2_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*x as f64).powi(2);
    }
    let r = (d / n).sqrt() as f32;
    if r.is_finite() {
        r
    } else {
        f32::INFINITY
    }
}

/// `0..len` in `count` ranges of whole `align` units (the last range may end short), their
/// unit counts differing by one at most — unlike [`Split`], whose ranges are all as long as
/// the first but the last (6400 rows in 8 parts of 96-row units: `Split` 7 × 864 + 352,
/// this one 768 or 864 each). For parts that the threads claim as they finish.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EvenSplit {
    len: usize,
    align: usize,
    units: usize,
    pub count: usize,
}

impl EvenSplit {
    pub fn new(len: usize, parts: usize, align: usize) -> Self {
        let align = align.max(1);
        let units = len.div_ceil(align);
        // No ranges for nothing; else at least one, at most one per unit.
        let count = if units == 0 { 0 } else { parts.clamp(1, units) };
        EvenSplit {
            len,
            align,
            units,
            count,
        }
    }

    pub fn get(&self, i: usize) -> (usize, usize) {
        let at = |i: usize| (i * self.units / self.count * self.align).min(self.len);
        (at(i), at(i + 1))
    }
}

/// A strided matrix operand: pointer, row stride, column stride (in elements).
pub(crate) type Strided<P> = (P, isize, isize);

/// `0..len` cut into at most `parts` contiguous ranges of near-equal size, each a multiple of
/// `align` except the last. Computed on demand, so splitting work allocates nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Split {
    len: usize,
    per: usize,
    /// Number of ranges.
    pub count: usize,
}

impl Split {
    pub fn new(len: usize, parts: usize, align: usize) -> Self {
        let align = align.max(1);
        let per = (len.div_ceil(parts.max(1)).div_ceil(align) * align).max(align);
        Split {
            len,
            per,
            count: len.div_ceil(per),
        }
    }

    /// Range `i` as `(start, end)`.
    pub fn get(&self, i: usize) -> (usize, usize) {
        let s = i * self.per;
        (s, (s + self.per).min(self.len))
    }
}

/// `0..len` cut into parts of whole `align`-long units that shrink as they go, for threads
/// that claim them in order as they finish: each part a `1 / (2·threads)` share of the units
/// not yet given out, and at least `min_units` of them (the last may be shorter). The first
/// parts are long (fewer passes over what every part reads); the last, short, even out the
/// finishing times of threads that ran at different speeds. Computed on demand.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuidedSplit {
    len: usize,
    align: usize,
    units: usize,
    threads: usize,
    min_units: usize,
    /// Number of parts.
    pub count: usize,
}

impl GuidedSplit {
    pub fn new(len: usize, threads: usize, align: usize, min_units: usize) -> Self {
        let align = align.max(1);
        let mut g = GuidedSplit {
            len,
            align,
            units: len.div_ceil(align),
            threads: threads.max(1),
            min_units: min_units.max(1),
            count: 0,
        };
        let mut at = 0;
        while at < g.units {
            at += g.part(at);
            g.count += 1;
        }
        g
    }

    /// Units in the part that starts at unit `at` (< `units`).
    fn part(&self, at: usize) -> usize {
        let left = self.units - at;
        left.div_ceil(2 * self.threads)
            .max(self.min_units)
            .min(left)
    }

    /// Part `i` (< `count`) as `(start, end)`.
    pub fn get(&self, i: usize) -> (usize, usize) {
        let mut at = 0;
        for _ in 0..i {
            at += self.part(at);
        }
        let end = at + self.part(at);
        (
            (at * self.align).min(self.len),
            (end * self.align).min(self.len),
        )
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic pseudo-random values in [-1, 1) (xorshift), for kernel tests.
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    pub use super::max_abs_diff;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_diff_fails_on_nan_and_infinity() {
        let good = [1.0, 2.0, 3.0];
        assert_eq!(max_abs_diff(&good, &[1.0, 2.5, 3.0]), 0.5);
        // A kernel that outputs NaN (anywhere, or everywhere) must not pass a tolerance check.
        for bad in [
            [f32::NAN, 2.0, 3.0],
            [f32::NAN; 3],
            [1.0, f32::INFINITY, 3.0],
        ] {
            assert_eq!(max_abs_diff(&bad, &good), f32::INFINITY, "{bad:?}");
            assert_eq!(max_abs_diff(&good, &bad), f32::INFINITY, "{bad:?}");
        }
        assert_eq!(max_abs_diff(&good, &good[..2]), f32::INFINITY);
        // What the old helper did: the NaN is skipped.
        let folded = [f32::NAN; 3]
            .iter()
            .zip(&good)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert_eq!(folded, 0.0);
    }

    #[test]
    fn relative_l2_diff_is_the_norm_ratio_and_fails_on_nan() {
        let a = [3.0, 4.0];
        assert!((relative_l2_diff(&a, &[3.0, 4.5]) - 0.1).abs() < 1e-7);
        assert_eq!(relative_l2_diff(&a, &a), 0.0);
        assert_eq!(relative_l2_diff(&a, &[f32::NAN, 4.0]), f32::INFINITY);
        assert_eq!(relative_l2_diff(&a, &[3.0]), f32::INFINITY);
        assert_eq!(relative_l2_diff(&[0.0], &[1.0]), f32::INFINITY);
    }

    #[test]
    fn even_split_covers_everything_once_in_near_equal_whole_units() {
        for (len, parts, align) in [
            (6400, 8, 32),
            (6400, 8, 96),
            (2300, 12, 12),
            (10, 4, 1),
            (3, 8, 4),
            (0, 2, 1),
            (97, 3, 32),
        ] {
            let r = EvenSplit::new(len, parts, align);
            let units: Vec<usize> = (0..r.count)
                .map(|i| r.get(i))
                .map(|(s, e)| (e - s).div_ceil(align))
                .collect();
            let mut next = 0;
            for (i, (s, e)) in (0..r.count).map(|i| r.get(i)).enumerate() {
                assert_eq!(s, next, "{len}/{parts}/{align}");
                assert!(e > s, "{len}/{parts}/{align}");
                assert!(
                    s % align == 0 && (e == len || e % align == 0),
                    "{len}/{parts}/{align}: part {i}"
                );
                next = e;
            }
            assert_eq!(next, len);
            assert!(r.count <= parts && (len == 0 || r.count >= 1));
            let (lo, hi) = (units.iter().min(), units.iter().max());
            assert!(
                hi.zip(lo).is_none_or(|(h, l)| h - l <= 1),
                "{len}/{parts}/{align}: {units:?}"
            );
        }
        assert_eq!(EvenSplit::new(6400, 8, 32).get(3), (2400, 3200));
    }

    #[test]
    fn split_covers_everything_once() {
        for (len, parts, align) in [(197, 2, 8), (10, 4, 1), (3, 8, 4), (0, 2, 1), (3072, 2, 16)] {
            let r = Split::new(len, parts, align);
            let mut next = 0;
            for (s, e) in (0..r.count).map(|i| r.get(i)) {
                assert_eq!(s, next);
                assert!(e > s);
                next = e;
            }
            assert_eq!(next, len);
            assert!(r.count <= parts.max(1));
        }
    }

    #[test]
    fn guided_split_covers_everything_once_in_shrinking_whole_units() {
        for (len, threads, align, min) in [
            (2304, 2, 32, 2),
            (1152, 2, 32, 2),
            (768, 2, 32, 2),
            (100, 3, 7, 1),
            (5, 2, 32, 2),
            (0, 2, 32, 2),
            (1000, 1, 16, 4),
        ] {
            let g = GuidedSplit::new(len, threads, align, min);
            let mut next = 0;
            let mut last = usize::MAX;
            for (s, e) in (0..g.count).map(|i| g.get(i)) {
                assert_eq!(s, next, "{len}/{threads}/{align}/{min}");
                assert!(
                    e > s && s % align == 0,
                    "{len}/{threads}/{align}/{min}: {s}..{e}"
                );
                // No part longer than the one before, none but the last under `min` units.
                assert!(e - s <= last, "{len}/{threads}/{align}/{min}: {s}..{e}");
                if e < len {
                    assert!(
                        e - s >= min * align,
                        "{len}/{threads}/{align}/{min}: {s}..{e}"
                    );
                }
                last = e - s;
                next = e;
            }
            assert_eq!(next, len);
        }
        // ViT-B/16's qkv at batch 1 on 2 threads, in 32-column panels: 72 panels as
        // 18, 14, 10, 8, 6, 4, 3, 3, 2, 2, 2.
        let g = GuidedSplit::new(2304, 2, 32, 2);
        let panels: Vec<usize> = (0..g.count)
            .map(|i| g.get(i))
            .map(|(s, e)| (e - s) / 32)
            .collect();
        assert_eq!(panels, [18, 14, 10, 8, 6, 4, 3, 3, 2, 2, 2]);
    }
}
