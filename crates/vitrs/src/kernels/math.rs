//! Element-wise maths: a vectorisable `exp`, `erf`, `tanh`, and the GELU and tanh activations
//! applied in place. The fast forms use polynomial approximations (errors stated per function);
//! the `*_ref` twins use f64 and std.

use super::{simd_dispatch, team};
use crate::config::Gelu;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Added to the bits of `y + ROUND_MAGIC` (whose low mantissa bits hold `n = round(y)` above
/// `ROUND_MAGIC`'s own bits, `0x4B40_0000`), the biased exponent of `2^n`, which `<< 23` puts
/// in place: the scalar [`round_pow2`] and the vector rungs' `Simd::pow2_rounded`.
pub(crate) const POW2_BIAS: i32 = 127 - 0x4B40_0000;

/// `a·b + c`: one fused multiply-add when `F` (the SIMD rungs, compiled with FMA: half the
/// instructions and half the latency of the polynomials below), a multiply and an add
/// otherwise (without FMA hardware `mul_add` would be a call into libm).
#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` with relative error below 2e-7 on [-87, 88] (Cephes `expf` polynomial); saturates to
/// about 1e-38 below (the smallest normal) and to 2^127·e^0.4 above. Branch-free so loops over it vectorise.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    exp_f::<false>(x)
}

/// [`exp_fast`], with fused multiply-adds when `F`.
#[inline(always)]
pub(crate) fn exp_f<const F: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    let (n, pow2n) = round_pow2(fma::<F>(x, LOG2E, ROUND_MAGIC));
    let r = fma::<F>(-n, LN2_LO, fma::<F>(-n, LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = fma::<F>(p, r, 1.398_199_9e-3);
    p = fma::<F>(p, r, 8.333_452e-3);
    p = fma::<F>(p, r, 4.166_579_6e-2);
    p = fma::<F>(p, r, 1.666_666_5e-1);
    p = fma::<F>(p, r, 0.5); // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let e = fma::<F>(p, r * r, r) + 1.0;
    e * pow2n
}

/// From `m = y + ROUND_MAGIC` (`y` the argument in base 2, `|y| < 2^22`): `n = round(y)` as
/// a float, and `2^n` (built from its exponent bits; `n` within −126..=127). The low
/// mantissa bits of `m` hold the integer `n`.
#[inline(always)]
fn round_pow2(m: f32) -> (f32, f32) {
    let e = (m.to_bits() as i32).wrapping_add(POW2_BIAS);
    (m - ROUND_MAGIC, f32::from_bits((e << 23) as u32))
}

/// `2^f ≈ P(f)` on `|f| ≤ 1/2`, lowest degree first: degree 5, fitted for relative error
/// (Lawson's re-weighted least squares towards minimax, 7.6e-8 in f64, 2.2e-7 in f32), with
/// `P(0)` exactly 1.
const EXP2_P: [f32; 6] = [
    1.0,
    0.693_146_94,
    0.240_221_22,
    0.055_507_13,
    0.009_675_471,
    0.001_327_626_8,
];

/// `2^t` for `t ≤ 0` (the softmax's scores less their maximum, in base 2), relative error
/// below 2.5e-7; the smallest normal float below −126 (and for −∞). About five fewer
/// operations than [`exp_f`]: the base-2 argument needs no two-part range reduction
/// (`f = t − round(t)` is exact) and no upper clamp. Positive `t` is the caller's error (the
/// result is garbage beyond 127).
#[inline(always)]
fn exp2_nonpos<const F: bool>(t: f32) -> f32 {
    let t = t.max(-126.0);
    let (n, pow2n) = round_pow2(t + ROUND_MAGIC);
    let f = t - n;
    let mut p = EXP2_P[5];
    for c in EXP2_P[..5].iter().rev() {
        p = fma::<F>(p, f, *c);
    }
    p * pow2n
}

/// [`exp2_nonpos`] on a vector of rung `S`: the same operations in the same order, so the same
/// bits in every lane as the scalar form with FMA.
///
/// # Safety
/// The CPU has `S`'s features and the caller is compiled for them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp2_nonpos_simd<S: super::simd::Simd>(t: S::V) -> S::V {
    let t = S::max(t, S::splat(-126.0));
    let m = S::add(t, S::splat(ROUND_MAGIC));
    let f = S::sub(t, S::sub(m, S::splat(ROUND_MAGIC)));
    let mut p = S::splat(EXP2_P[5]);
    for c in EXP2_P[..5].iter().rev() {
        p = S::fma(p, f, S::splat(*c));
    }
    S::mul(p, S::pow2_rounded(m))
}

/// Where the rational `erf` below is clamped: its argument is clamped to `±ERF_CLAMP` and its
/// value to ±1. The fit runs to 3.92 (where `1 − erf` is 3e-8, below half an f32 ulp of 1);
/// past it the fitted ratio rises through 1 (at 3.93), and at 4.05 it is 2.6 ulps above 1 in
/// f64, so any argument beyond comes out exactly ±1 (GELU's far negative tail exactly 0)
/// without a comparison and blend per vector.
const ERF_CLAMP: f32 = 4.05;
/// `erf(x) ≈ x·P(x²)/Q(x²)` on `|x| ≤ 3.92`, lowest degree first: a rational fit of degrees 5
/// and 5 (absolute error 1.8e-8 in f64; `P(0)` is erf's slope at 0, `2/√π`), made by
/// `tools/fit_erf.py`.
const ERF_P: [f32; 6] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    0.19129732,
    0.052865997,
    0.0038037018,
    0.000285698,
    2.0426614e-06,
];
const ERF_Q: [f32; 6] = [
    1.0,
    0.5028655,
    0.11447679,
    0.015045501,
    0.0011716955,
    3.805751e-05,
];

/// The fit with its argument scaled by `s`: `erf(s·x) = x·P_s(x²)/Q_s(x²)`, `P_s[i] = s·P[i]·s²ⁱ`
/// and `Q_s[i] = Q[i]·s²ⁱ`, so that GELU's `erf(x/√2)` needs no multiply for the scaling.
const fn erf_fit_scaled(s: f32) -> ([f32; 6], [f32; 6]) {
    let (mut p, mut q) = (ERF_P, ERF_Q);
    let mut pow = 1.0f32;
    let mut i = 0;
    while i < 6 {
        p[i] *= s * pow;
        q[i] *= pow;
        pow *= s * s;
        i += 1;
    }
    (p, q)
}

/// [`erf_fit_scaled`] for `s = 1/√2`: `erf(x/√2)`, the normal CDF's.
const ERF_HALF: ([f32; 6], [f32; 6]) = erf_fit_scaled(FRAC_1_SQRT_2);

/// `erf(x)`, absolute error below 4e-7 (the f32 rounding of the fit; 1.8e-8 in f64).
#[inline(always)]
pub fn erf_fast(x: f32) -> f32 {
    erf_f::<false>(x)
}

/// [`erf_fast`], with fused multiply-adds when `F`: one division and ten multiply-adds, no
/// `exp` (Abramowitz & Stegun 7.1.26, the form used before, needs both, and cost GELU about
/// twice as much on a Zen 4 EPYC).
#[inline(always)]
fn erf_f<const F: bool>(x: f32) -> f32 {
    erf_fit::<F>(x, ERF_CLAMP, &ERF_P, &ERF_Q)
}

/// `erf(x/√2)`, as [`erf_f`] of `x/√2` without the multiply.
#[inline(always)]
fn erf_half<const F: bool>(x: f32) -> f32 {
    erf_fit::<F>(
        x,
        ERF_CLAMP * std::f32::consts::SQRT_2,
        &ERF_HALF.0,
        &ERF_HALF.1,
    )
}

/// `x·P(x²)/Q(x²)` with `x` clamped to `±clamp` and the value to ±1: two min/max pairs
/// instead of a comparison, a sign and a blend (GELU 25 → 19 instructions a vector). A NaN
/// stays NaN (`clamp` keeps it, and so do the min and max LLVM makes of it).
#[inline(always)]
fn erf_fit<const F: bool>(x: f32, clamp: f32, p: &[f32; 6], q: &[f32; 6]) -> f32 {
    let x = x.clamp(-clamp, clamp);
    let t = x * x;
    let (mut num, mut den) = (p[5], q[5]);
    for i in (0..5).rev() {
        num = fma::<F>(num, t, p[i]);
        den = fma::<F>(den, t, q[i]);
    }
    (x * num / den).clamp(-1.0, 1.0)
}

/// `tanh(x)`, absolute error below 3e-7.
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    tanh_f::<false>(x)
}

/// [`tanh_fast`], with fused multiply-adds when `F`.
#[inline(always)]
fn tanh_f<const F: bool>(x: f32) -> f32 {
    let a = x.abs();
    let e = exp_f::<F>(2.0 * a);
    let y = 1.0 - 2.0 / (e + 1.0);
    y.copysign(x)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// GELU, exact form: the value of [`gelu_exact_and_grad`] (the derivative's work is dropped
/// by the compiler), so the training forward's value is this one, bit for bit.
#[inline(always)]
fn gelu_exact<const F: bool>(x: f32) -> f32 {
    gelu_exact_and_grad::<F>(x).0
}

/// GELU, tanh form: the value of [`gelu_tanh_and_grad`], as for [`gelu_exact`].
#[inline(always)]
fn gelu_tanh<const F: bool>(x: f32) -> f32 {
    gelu_tanh_and_grad::<F>(x).0
}

/// `x[i] ← f(x[i])`, in blocks of 64 floats: four AVX-512 vectors' (eight AVX2) independent
/// chains side by side, so the division's latency overlaps. One vector at a time left the FMA
/// pipes idle: the exact GELU took 0.57 ns per element, 0.37 in blocks, on a Zen 4 EPYC (the
/// tanh forms, whose chains are shorter, ran no faster in blocks: they keep plain loops).
#[inline(always)]
fn map_inplace(x: &mut [f32], f: impl Fn(f32) -> f32) {
    let mut blocks = x.chunks_exact_mut(64);
    for b in &mut blocks {
        for v in b.iter_mut() {
            *v = f(*v);
        }
    }
    for v in blocks.into_remainder() {
        *v = f(*v);
    }
}

simd_dispatch! {
    fn gelu_rung(x: &mut [f32], kind: Gelu) {
        gelu_slice::<FMA>(x, kind);
    }
}

simd_dispatch! {
    /// `x ← tanh(x)` in place.
    pub fn tanh_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = tanh_f::<FMA>(*v);
        }
    }
}

/// `x ← GELU(x)` in place, inlined into the caller (which runs it with fused multiply-adds
/// when `F`, compiled for a SIMD rung): [`gelu_inplace`]'s body, and the GEMM's tile epilogue.
#[inline(always)]
pub(crate) fn gelu_slice<const F: bool>(x: &mut [f32], kind: Gelu) {
    match kind {
        Gelu::Exact => map_inplace(x, gelu_exact::<F>),
        Gelu::Tanh => x.iter_mut().for_each(|v| *v = gelu_tanh::<F>(*v)),
    }
}

/// `x ← GELU(x)` in place, exact (erf) or tanh form. Max abs error vs [`gelu_ref`]: about 3e-7·|x|.
pub fn gelu_inplace(x: &mut [f32], kind: Gelu) {
    gelu_rung(x, kind);
}

/// Lanes of the partial sums in the reductions below: one AVX register of f32.
const LANES: usize = 8;

/// Σ x with eight interleaved partial sums. A single f32 accumulator is a serial chain that
/// LLVM may not reorder, so the loop would stay scalar; eight lanes vectorise.
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b with eight interleaved partial sums (see [`sum_lanes`]).
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ (x − c)² with eight interleaved partial sums (see [`sum_lanes`]).
#[inline(always)]
pub(crate) fn sq_dev_sum_lanes(x: &[f32], c: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - c) * (v - c)).sum();
    for ch in chunks {
        for l in 0..LANES {
            acc[l] += (ch[l] - c) * (ch[l] - c);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// max x (−∞ for an empty slice; NaNs are skipped, as by `f32::max`), eight lanes at a time.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..LANES {
            // A compare-and-select (not `f32::max`, whose NaN rule blocks vectorisation).
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

simd_dispatch! {
    /// Numerically stable softmax of `scale · row` (`scale` > 0: attention's `1/sqrt(hd)`,
    /// folded in here rather than into the scores' product), in place. The exponentials are
    /// one vectorised pass, the sum and the maximum lane-parallel reductions.
    pub fn softmax_inplace(row: &mut [f32], scale: f32) {
        let max = max_lanes(row);
        for v in row.iter_mut() {
            *v = exp_f::<FMA>(scale * (*v - max));
        }
        let inv = 1.0 / sum_lanes(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Floats per chunk of [`softmax_padded_rows`]: one AVX-512 register, two AVX2 ones.
pub const SOFTMAX_CHUNK: usize = 16;

/// The softmax's exponentials of the first `inv.len()` rows of `block`, without the
/// normalisation: rows `padded` floats apart (whole chunks of [`SOFTMAX_CHUNK`] floats), of
/// which `row[..n]` holds the scores and `row[n..]` is padding. Row `i`'s `row[..n]` gets
/// `exp(scale·(row − max))`, its padding `row[n..]` zeros, and `inv[i]` the factor that
/// normalises it, `1 / Σ`. Every pass runs on whole vectors, with no scalar remainder (a
/// 197-token row spent a sixth of its time in the five-element tail of `exp`). The caller
/// applies `inv` to a smaller result (the attention scales its output rows, `hd` floats,
/// instead of the `N` probabilities), or normalises the rows with [`scale_into`].
///
/// On the SIMD rungs the passes are written in the rung's vectors (`padded_rows_simd`):
/// left to LLVM, the maximum's pass came out two lanes wide and each padding fill was a call
/// to `memset`. A block of 6 rows of 197 (the fused attention's) took 513–528 → 349–352 ns on
/// the AVX2 rung and 417–421 → 253–254 ns on the AVX-512 one (an AVX-512 Xeon, interleaved),
/// the whole attention of ViT-Ti/16 at batch 16 +3 % and +6 %. Every rung computes the same
/// operations in the same order (the sums gathered per lane of a chunk, then folded in
/// halves), so the AVX2 and AVX-512 rungs give the same bits as each other and as the generic
/// code with FMA.
///
/// # Panics
/// Unless `padded` is a multiple of the chunk, `0 < n ≤ padded`, `block` holds the rows,
/// and there are at most 16 of them.
pub fn softmax_padded_rows(
    block: &mut [f32],
    padded: usize,
    n: usize,
    scale: f32,
    inv: &mut [f32],
) {
    assert!(padded.is_multiple_of(SOFTMAX_CHUNK) && n > 0 && n <= padded);
    assert!(inv.len() <= 16, "softmax_padded_rows: at most 16 rows");
    let block = &mut block[..inv.len() * padded];
    #[cfg(target_arch = "x86_64")]
    match super::isa() {
        // SAFETY: `isa()` never exceeds what the CPU has; the block holds the rows.
        super::Isa::Avx512 => return unsafe { padded_rows_avx512(block, padded, n, scale, inv) },
        super::Isa::Avx2 => return unsafe { padded_rows_avx2(block, padded, n, scale, inv) },
        super::Isa::Portable => {}
    }
    padded_rows_generic::<false>(block, padded, n, scale, inv)
}

/// `padded_rows_simd` compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; as `padded_rows_simd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn padded_rows_avx2(
    block: &mut [f32],
    padded: usize,
    n: usize,
    scale: f32,
    inv: &mut [f32],
) {
    padded_rows_simd::<super::simd::Avx2>(block, padded, n, scale, inv)
}

/// `padded_rows_simd` compiled for AVX-512.
///
/// # Safety
/// The CPU has the AVX-512 rung's features; as `padded_rows_simd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn padded_rows_avx512(
    block: &mut [f32],
    padded: usize,
    n: usize,
    scale: f32,
    inv: &mut [f32],
) {
    padded_rows_simd::<super::simd::Avx512>(block, padded, n, scale, inv)
}

/// [`softmax_padded_rows`] in lane arrays, left to the compiler: the portable rung (`F` false)
/// and the reference the SIMD rungs match bit for bit (`F` true).
#[inline(always)]
fn padded_rows_generic<const F: bool>(
    block: &mut [f32],
    padded: usize,
    n: usize,
    scale: f32,
    inv: &mut [f32],
) {
    let mut maxes = [0.0f32; 16];
    for (row, max) in block.chunks_exact_mut(padded).zip(&mut maxes) {
        // −∞ never wins the maximum; after the exponentials the padding is zeroed.
        row[n..].fill(f32::NEG_INFINITY);
        *max = max_chunks(row);
    }
    for ((row, max), inv) in block
        .chunks_exact_mut(padded)
        .zip(&maxes)
        .zip(inv.iter_mut())
    {
        *inv = 1.0 / exp_sum_chunks::<F>(row, scale, *max);
        row[n..].fill(0.0);
    }
}

/// [`softmax_padded_rows`] in the vectors of rung `S`: every row's maximum over whole vectors,
/// then every row's exponentials (in base 2, as [`exp2_nonpos`]) with their sums gathered per
/// lane as they are written. The padding is never read (a vector load straight after scalar
/// stores into it waits for them): the vector that holds the row's end, and those past it,
/// take −∞ in the padding's lanes in registers, as the generic code stores there, and store
/// zeros there.
///
/// # Safety
/// The CPU has `S`'s features and the caller is compiled for them; `block` holds
/// `inv.len()` rows of `padded` floats, `padded` a multiple of [`SOFTMAX_CHUNK`] (and so of
/// `S::LANES`), `0 < n ≤ padded`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn padded_rows_simd<S: super::simd::Simd>(
    block: &mut [f32],
    padded: usize,
    n: usize,
    scale: f32,
    inv: &mut [f32],
) {
    const C: usize = SOFTMAX_CHUNK;
    let l = S::LANES;
    debug_assert!(C.is_multiple_of(l) && block.len() >= inv.len() * padded);
    let neg = f32::NEG_INFINITY;
    // e^(scale·d) = 2^(scale·log₂e·d)
    let scale2 = S::splat(scale * LOG2E);
    // The row's vectors at `j`: the scores, −∞ past `n`.
    let scores = |row: *mut f32, j: usize| {
        if j + l <= n {
            S::load(row.add(j))
        } else if j < n {
            S::keep_first(S::load(row.add(j)), n - j, neg)
        } else {
            S::splat(neg)
        }
    };
    // The rows' maxima first, then their exponentials: each pass's rows are independent, so
    // one row's reduction (a chain of dependent maxima, or of sums) overlaps the next row's.
    let mut maxes = [0.0f32; 16];
    for (r, max) in maxes.iter_mut().take(inv.len()).enumerate() {
        let row = block.as_mut_ptr().add(r * padded);
        // Four vectors at a time: four independent chains.
        let mut m = [S::splat(neg); 4];
        let mut j = 0;
        while j + 4 * l <= n {
            for (v, m) in m.iter_mut().enumerate() {
                *m = S::max(S::load(row.add(j + v * l)), *m);
            }
            j += 4 * l;
        }
        while j < n {
            m[0] = S::max(scores(row, j), m[0]);
            j += l;
        }
        *max = S::max_halves(S::max(S::max(m[0], m[1]), S::max(m[2], m[3])));
    }
    for (r, inv) in inv.iter_mut().enumerate() {
        let row = block.as_mut_ptr().add(r * padded);
        let max = S::splat(maxes[r]);
        // The exponentials and their sums: one accumulator per vector of a chunk, so lane `i`
        // of the chunk's sum gathers the same terms in the same order as the generic code's.
        let mut acc = [S::zero(); 2];
        for c0 in (0..padded).step_by(C) {
            for (v, acc) in acc.iter_mut().enumerate().take(C / l) {
                let j = c0 + v * l;
                let e = exp2_nonpos_simd::<S>(S::mul(scale2, S::sub(scores(row, j), max)));
                *acc = S::add(*acc, e);
                let e = if j + l <= n {
                    e
                } else {
                    S::keep_first(e, n.saturating_sub(j), 0.0)
                };
                S::store(row.add(j), e);
            }
        }
        let sum = if C / l == 2 {
            S::sum_halves(S::add(acc[0], acc[1]))
        } else {
            S::sum_halves(acc[0])
        };
        *inv = 1.0 / sum;
    }
}

/// The maximum of a row of whole chunks: a chunk's lanes at a time (compare-and-selects, as
/// in `max_lanes`), the lanes then folded in halves (a tree of shuffles, not a serial chain).
#[inline(always)]
fn max_chunks(row: &[f32]) -> f32 {
    const C: usize = SOFTMAX_CHUNK;
    let mut m = [f32::NEG_INFINITY; C];
    for c in row.chunks_exact(C) {
        for l in 0..C {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mut w = C / 2;
    while w > 0 {
        for l in 0..w {
            m[l] = if m[w + l] > m[l] { m[w + l] } else { m[l] };
        }
        w /= 2;
    }
    m[0]
}

/// `row ← exp(scale·(row − max))` over whole chunks, returning the sum of what it wrote
/// (gathered as it is written; lanes folded in halves), in base 2 ([`exp2_nonpos`]). A −∞
/// padding comes out as the smallest normal float, below an ulp of the sum, whose maximum's
/// term is exactly 1.
#[inline(always)]
fn exp_sum_chunks<const F: bool>(row: &mut [f32], scale: f32, max: f32) -> f32 {
    const C: usize = SOFTMAX_CHUNK;
    // e^(scale·d) = 2^(scale·log₂e·d)
    let scale2 = scale * LOG2E;
    let mut acc = [0.0f32; C];
    for c in row.chunks_exact_mut(C) {
        for l in 0..C {
            let e = exp2_nonpos::<F>(scale2 * (c[l] - max));
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut w = C / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[w + l];
        }
        w /= 2;
    }
    acc[0]
}

/// Elements per task of the whole-buffer pass below (64 KiB of f32: enough work to pay for
/// the task, small enough to balance two threads).
const PAR_CHUNK: usize = 1 << 14;

/// `dy ← dy ⊙ GELU'(x)` over a whole buffer, split across threads, given `grad = GELU'(x)`
/// (kept by [`super::gemm::linear_gelu_with_grad`] or [`gelu_with_grad`]).
pub fn gelu_backward_par(grad: &[f32], dy: &mut [f32]) {
    let n = grad.len().min(dy.len());
    team::for_chunks_mut(&mut dy[..n], PAR_CHUNK, |c, g| {
        mul_assign(g, &grad[c * PAR_CHUNK..c * PAR_CHUNK + g.len()])
    });
}

simd_dispatch! {
    /// `x ← s · x` element-wise.
    pub fn scale_inplace(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

simd_dispatch! {
    /// `dst ← s · src` element-wise (the same products as `*v *= s` in place).
    pub fn scale_into(dst: &mut [f32], src: &[f32], s: f32) {
        for (d, v) in dst.iter_mut().zip(src) {
            *d = *v * s;
        }
    }
}

simd_dispatch! {
    /// `a ← a ⊙ b` element-wise.
    pub fn mul_assign(a: &mut [f32], b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x *= *y;
        }
    }
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `(GELU(x), d GELU(x) / dx)`, exact form: `x·Φ(x)` and `Φ(x) + x·φ(x)`, sharing one `erf`
/// (the `exp` of `φ` is dropped by the compiler where only the value is used).
#[inline(always)]
fn gelu_exact_and_grad<const F: bool>(x: f32) -> (f32, f32) {
    // x·Φ(x) = h + h·erf(x/√2) with h = x/2: one multiply-add for the value.
    let e = erf_half::<F>(x);
    let h = 0.5 * x;
    let phi = fma::<F>(0.5, e, 0.5);
    let gauss = exp_f::<F>(-0.5 * x * x);
    (fma::<F>(h, e, h), fma::<F>(x * FRAC_1_SQRT_2PI, gauss, phi))
}

/// `(GELU(x), d GELU(x) / dx)`, tanh form, sharing one `tanh`.
#[inline(always)]
fn gelu_tanh_and_grad<const F: bool>(x: f32) -> (f32, f32) {
    let t = tanh_f::<F>(SQRT_2_OVER_PI * fma::<F>(0.044_715 * x, x * x, x));
    let grad = 0.5 * (1.0 + t)
        + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
    (0.5 * x * (1.0 + t), grad)
}

simd_dispatch! {
    fn gelu_with_grad_rung(x: &mut [f32], out: &mut [f32], kind: Gelu) {
        gelu_with_grad_slice::<FMA>(x, out, kind);
    }
}

/// [`gelu_with_grad`]'s body, inlined into the caller (with fused multiply-adds when `F`,
/// compiled for a SIMD rung): also the GEMM's tile epilogue in training.
#[inline(always)]
pub(crate) fn gelu_with_grad_slice<const F: bool>(x: &mut [f32], out: &mut [f32], kind: Gelu) {
    match kind {
        Gelu::Exact => {
            for (v, o) in x.iter_mut().zip(out.iter_mut()) {
                (*o, *v) = gelu_exact_and_grad::<F>(*v);
            }
        }
        Gelu::Tanh => {
            for (v, o) in x.iter_mut().zip(out.iter_mut()) {
                (*o, *v) = gelu_tanh_and_grad::<F>(*v);
            }
        }
    }
}

/// `out ← GELU(x)` and `x ← GELU'(x)`: the value and its derivative from one `erf` and `exp`
/// (or one `tanh`), bit for bit what [`gelu_inplace`] and the derivative alone give.
///
/// # Shapes
/// `x`, `out` `(n)`; only the first `min` of the two lengths are touched.
pub fn gelu_with_grad(x: &mut [f32], out: &mut [f32], kind: Gelu) {
    gelu_with_grad_rung(x, out, kind);
}

simd_dispatch! {
    /// `dy ← dy · (1 − y²)` in place, where `y = tanh(x)` is the forward output.
    pub fn tanh_backward_inplace(y: &[f32], dy: &mut [f32]) {
        for (g, &t) in dy.iter_mut().zip(y) {
            *g *= 1.0 - t * t;
        }
    }
}

/// Reference GELU derivative in f64 (central difference of [`gelu_ref`] is too coarse; this
/// is the closed form).
pub fn gelu_grad_ref(x: f32, kind: Gelu) -> f32 {
    let x = x as f64;
    let g = match kind {
        Gelu::Exact => {
            0.5 * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
                + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
        Gelu::Tanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let t = (c * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
    };
    g as f32
}

/// Reference `erf` in f64: its Maclaurin series, which converges everywhere and is accurate
/// to ~1e-12 for |x| ≤ 5; beyond that erf is ±1 to within 2e-12.
pub fn erf_ref(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    let x2 = x * x;
    for n in 1..200 {
        term *= -x2 / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// Reference GELU in f64.
pub fn gelu_ref(x: f32, kind: Gelu) -> f32 {
    let x = x as f64;
    let y = match kind {
        Gelu::Exact => 0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2)),
        Gelu::Tanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
    };
    y as f32
}

/// Reference softmax of one row in f64.
pub fn softmax_ref(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    /// The larger of two errors, NaN-aware like [`max_abs_diff`]: a NaN error (the kernel
    /// returned NaN) is infinite, where `f64::max` would skip it.
    fn worse(worst: f64, err: f64) -> f64 {
        if err.is_nan() {
            f64::INFINITY
        } else {
            worst.max(err)
        }
    }

    /// The largest relative error of `f` against `want` (f64) on `from..=to` in steps of `step`.
    fn worst_relative(
        f: fn(f32) -> f32,
        want: fn(f64) -> f64,
        from: f32,
        to: f32,
        step: f32,
    ) -> f64 {
        let mut worst = 0.0f64;
        let mut x = from;
        while x <= to {
            let r = want(x as f64);
            worst = worse(worst, ((f(x) as f64 - r) / r).abs());
            x += step;
        }
        worst
    }

    #[test]
    fn exp_is_accurate() {
        // Both forms: separate multiplies and adds (portable rung), fused (SIMD rungs).
        for (name, f) in [
            ("mul + add", exp_f::<false> as fn(f32) -> f32),
            ("fused", exp_f::<true>),
        ] {
            let worst = worst_relative(f, f64::exp, -87.0, 88.0, 0.013);
            assert!(worst < 2e-7, "{name}: worst relative error {worst}");
            assert!(f(-1000.0) < 1e-37, "{name}");
            assert!(f(f32::NEG_INFINITY) < 1e-37, "{name}");
        }
    }

    #[test]
    fn exp2_is_accurate() {
        for (name, f) in [
            ("mul + add", exp2_nonpos::<false> as fn(f32) -> f32),
            ("fused", exp2_nonpos::<true>),
        ] {
            let worst = worst_relative(f, f64::exp2, -126.0, 0.0, 0.0037);
            assert!(worst < 2.5e-7, "{name}: worst relative error {worst}");
            assert_eq!(f(0.0), 1.0, "{name}");
            assert_eq!(f(-3.0), 0.125, "{name}");
            assert_eq!(f(-1000.0), f32::MIN_POSITIVE, "{name}");
            assert_eq!(f(f32::NEG_INFINITY), f32::MIN_POSITIVE, "{name}");
        }
    }

    #[test]
    fn erf_and_tanh_are_accurate() {
        let (mut e_erf, mut e_erf_fma, mut e_tanh) = (0.0f64, 0.0f64, 0.0f64);
        for i in -8000..8000 {
            let x = i as f32 * 1e-3;
            let want = erf_ref(x as f64);
            e_erf = worse(e_erf, (erf_fast(x) as f64 - want).abs());
            e_erf_fma = worse(e_erf_fma, (erf_f::<true>(x) as f64 - want).abs());
            e_tanh = worse(e_tanh, (tanh_fast(x) as f64 - (x as f64).tanh()).abs());
        }
        // GELU's erf(x/√2), the fit's coefficients scaled instead of the argument.
        let mut e_half = 0.0f64;
        for i in -11_400..11_400 {
            let x = i as f32 * 1e-3 / FRAC_1_SQRT_2;
            let want = erf_ref(x as f64 * std::f64::consts::FRAC_1_SQRT_2);
            e_half = worse(e_half, (erf_half::<true>(x) as f64 - want).abs());
            e_half = worse(e_half, (erf_half::<false>(x) as f64 - want).abs());
        }
        eprintln!("max abs error: erf {e_erf:e} (fused {e_erf_fma:e}), erf(x/√2) {e_half:e}, tanh {e_tanh:e}");
        assert!(e_erf < 4e-7, "erf {e_erf}");
        assert!(e_erf_fma < 4e-7, "erf, fused {e_erf_fma}");
        assert!(e_half < 4e-7, "erf(x/√2) {e_half}");
        // From 3.9 on, where the clamps take over: exactly ±1, both forms.
        for i in 0..2000 {
            let x = 3.9f32 + i as f32 * 1e-3;
            for f in [erf_f::<true>, erf_f::<false>] {
                assert!(f(x) <= 1.0 && 1.0 - f(x) < 4e-7, "{x}");
            }
            for f in [erf_half::<true>, erf_half::<false>] {
                let xh = x / FRAC_1_SQRT_2;
                assert!(f(xh) <= 1.0 && 1.0 - f(xh) < 4e-7, "{xh}");
            }
        }
        for x in [4.05f32, 4.2, 5.0, 1e3, f32::MAX] {
            for f in [erf_f::<true>, erf_f::<false>] {
                assert_eq!((f(x), f(-x)), (1.0, -1.0), "{x}");
            }
            // x/√2 past the clamp: 4.05·√2 = 5.728 on.
            let xh = (x / FRAC_1_SQRT_2).min(f32::MAX);
            for f in [erf_half::<true>, erf_half::<false>] {
                assert_eq!((f(xh), f(-xh)), (1.0, -1.0), "{xh}");
            }
        }
        assert!(erf_half::<true>(f32::NAN).is_nan());
        assert!(e_tanh < 3e-7, "tanh {e_tanh}");
        // Odd, ±1 beyond the fit's range (and never past it), NaN kept.
        for x in [0.5f32, 2.0, 3.91, 3.93, 10.0, f32::INFINITY] {
            assert_eq!(erf_fast(-x), -erf_fast(x), "{x}");
            assert!(erf_fast(x) <= 1.0, "{x}");
        }
        assert_eq!(erf_fast(10.0), 1.0);
        assert_eq!(erf_fast(f32::NEG_INFINITY), -1.0);
        assert!(erf_fast(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_reference() {
        for kind in [Gelu::Exact, Gelu::Tanh] {
            let mut x: Vec<f32> = rand_vec(4099, 3).iter().map(|v| v * 8.0).collect();
            let want: Vec<f32> = x.iter().map(|&v| gelu_ref(v, kind)).collect();
            gelu_inplace(&mut x, kind);
            let d = max_abs_diff(&x, &want);
            assert!(d < 3e-6, "{kind:?}: {d}");
        }
        // Large |x|: identity and zero, no NaN.
        let mut x = vec![-100.0, 100.0, 0.0];
        gelu_inplace(&mut x, Gelu::Exact);
        assert_eq!(x, vec![0.0, 100.0, 0.0]);
        // Past the clamp of erf's argument (4.05·√2 = 5.73): exactly 0 and x, on this rung
        // and the scalar form.
        let far: Vec<f32> = (0..400).map(|i| 5.73 + i as f32 * 0.37).collect();
        let mut neg: Vec<f32> = far.iter().map(|v| -v).collect();
        let mut pos = far.clone();
        gelu_inplace(&mut neg, Gelu::Exact);
        gelu_inplace(&mut pos, Gelu::Exact);
        assert!(neg.iter().all(|&v| v == 0.0), "{neg:?}");
        assert_eq!(pos, far);
        assert!(far
            .iter()
            .all(|&v| gelu_exact::<false>(-v) == 0.0 && gelu_exact::<false>(v) == v));
    }

    #[test]
    fn gelu_backward_matches_reference_and_finite_differences() {
        for kind in [Gelu::Exact, Gelu::Tanh] {
            let x: Vec<f32> = rand_vec(1001, 21).iter().map(|v| v * 6.0).collect();
            let (mut g, mut y) = (x.clone(), vec![0.0; x.len()]);
            gelu_with_grad(&mut g, &mut y, kind);
            let want: Vec<f32> = x.iter().map(|&v| gelu_grad_ref(v, kind)).collect();
            assert!(max_abs_diff(&g, &want) < 3e-6, "{kind:?}");
            // The value is the plain GELU's, bit for bit.
            let mut plain = x.clone();
            gelu_inplace(&mut plain, kind);
            assert_eq!(y, plain, "{kind:?}");
            // The parallel backward over a buffer of many chunks multiplies by the kept
            // derivative.
            let big: Vec<f32> = rand_vec(100_003, 22).iter().map(|v| v * 6.0).collect();
            let (mut gs, mut ys) = (big.clone(), vec![0.0; big.len()]);
            gelu_with_grad(&mut gs, &mut ys, kind);
            let mut dy = rand_vec(big.len(), 23);
            let want: Vec<f32> = dy.iter().zip(&gs).map(|(d, g)| d * g).collect();
            gelu_backward_par(&gs, &mut dy);
            assert_eq!(dy, want, "{kind:?}");
            // The closed form agrees with a central difference of the reference GELU.
            for &v in &[-2.5f32, -0.3, 0.0, 0.7, 3.1] {
                let h = 1e-3f64;
                let fd = (gelu_ref((v as f64 + h) as f32, kind) as f64
                    - gelu_ref((v as f64 - h) as f32, kind) as f64)
                    / (2.0 * h);
                assert!(
                    (fd - gelu_grad_ref(v, kind) as f64).abs() < 2e-3,
                    "{kind:?} at {v}"
                );
            }
        }
    }

    #[test]
    fn softmax_matches_reference_and_sums_to_one() {
        let mut row: Vec<f32> = rand_vec(197, 9).iter().map(|v| v * 20.0).collect();
        let want = softmax_ref(&row);
        softmax_inplace(&mut row, 1.0);
        assert!(max_abs_diff(&row, &want) < 1e-6);
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
    }

    /// The padded softmax's vector passes on each SIMD rung this CPU has give the bits of the
    /// lane-array code they replace (with FMA): row ends inside a vector, on a vector's edge
    /// and in the first vector, and NaN garbage in the padding (never read).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn padded_softmax_vectors_match_the_lane_arrays_bit_for_bit() {
        type Pass = unsafe fn(&mut [f32], usize, usize, f32, &mut [f32]);
        let mut rungs: Vec<(&str, Pass)> = Vec::new();
        if crate::kernels::cpu_isa() >= crate::kernels::Isa::Avx2 {
            rungs.push(("avx2", padded_rows_avx2));
        }
        if crate::kernels::cpu_isa() >= crate::kernels::Isa::Avx512 {
            rungs.push(("avx512", padded_rows_avx512));
        }
        for (name, pass) in rungs {
            for n in [1usize, 5, 8, 16, 17, 50, 64, 197] {
                let padded = n.next_multiple_of(SOFTMAX_CHUNK);
                for rows in [1, 6, 16] {
                    for (scale, spread) in [(0.125, 10.0), (1.0, 100.0)] {
                        let mut want = vec![f32::NAN; rows * padded];
                        for (r, row) in want.chunks_exact_mut(padded).enumerate() {
                            let v = rand_vec(n, 60 + r as u64);
                            for (d, v) in row.iter_mut().zip(v) {
                                *d = v * spread;
                            }
                        }
                        let mut got = want.clone();
                        let (mut inv_want, mut inv_got) = (vec![0.0; rows], vec![0.0; rows]);
                        padded_rows_generic::<true>(&mut want, padded, n, scale, &mut inv_want);
                        // SAFETY: the CPU has the rung; the block holds the rows.
                        unsafe { pass(&mut got, padded, n, scale, &mut inv_got) };
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        let what = format!("{name}: {rows} rows of {n} (padded {padded})");
                        assert_eq!(bits(&got), bits(&want), "{what}: exponentials");
                        assert_eq!(bits(&inv_got), bits(&inv_want), "{what}: sums");
                    }
                }
            }
        }
    }

    #[test]
    fn erf_reference_is_sane() {
        assert!((erf_ref(1.0) - 0.842_700_792_949_714_9).abs() < 1e-12);
        assert!((erf_ref(-2.5) + 0.999_593_047_982_555).abs() < 1e-12);
    }
}
