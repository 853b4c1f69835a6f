//! The vector layer of the instruction-set ladder: the few operations a micro-kernel (and the
//! attention's softmax) needs, implemented once per rung. Everything above it (blocking,
//! packing, edges, threading, the exponential's polynomial) is generic code shared by the
//! rungs, so the part only an AVX-512 CPU runs is this file's `Avx512` impl — short
//! intrinsics, each the 512-bit twin of an `Avx2` one.
//!
//! Every method is `unsafe`: the caller must run on a CPU with the rung's features, inside a
//! function compiled for them (`#[target_feature]`), with every pointer valid for the lanes it
//! touches.

/// One SIMD register's worth of f32 and the operations on it.
pub(crate) trait Simd: Copy {
    /// f32 lanes per register.
    const LANES: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    /// Every lane `*p`.
    unsafe fn broadcast(p: *const f32) -> Self::V;
    /// `LANES` floats from `p` (no alignment needed).
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`, one rounding.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Every lane `x`.
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// Lane by lane `a > b ? a : b`: `b` where either is NaN, so a NaN in `a` is skipped.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the lanes, folded in halves: the upper half added to the lower, and again,
    /// down to one lane (the order of the generic code's lane arrays, so the same bits).
    unsafe fn sum_halves(a: Self::V) -> f32;
    /// The largest lane, folded in halves as [`Simd::sum_halves`].
    unsafe fn max_halves(a: Self::V) -> f32;
    /// `2^n` from `m = y + 1.5·2^23` (`n = round(y)`, within −126..=127, in `m`'s low mantissa
    /// bits): per lane the bits `(bits(m) + POW2_BIAS) << 23` (`math::POW2_BIAS`).
    unsafe fn pow2_rounded(m: Self::V) -> Self::V;
    /// `x`'s first `valid` lanes (`valid ≤ LANES`), and `fill` in the others: a row's last,
    /// partial vector without storing into its padding (a vector load straight after scalar
    /// stores to the same bytes waits for them to retire).
    unsafe fn keep_first(x: Self::V, valid: usize, fill: f32) -> Self::V;
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::math::POW2_BIAS;
    use super::Simd;
    use std::arch::x86_64::*;

    /// Four lanes folded in halves with `op`: lanes `l` and `l + 2`, then lanes 0 and 1.
    #[inline(always)]
    unsafe fn fold4(x: __m128, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
        let x = op(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(op(x, _mm_movehdup_ps(x)))
    }

    /// 8 × f32 in a ymm register (AVX2 + FMA).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn broadcast(p: *const f32) -> __m256 {
            _mm256_broadcast_ss(&*p)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum_halves(a: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(a);
            fold4(_mm_add_ps(lo, _mm256_extractf128_ps::<1>(a)), |x, y| {
                _mm_add_ps(x, y)
            })
        }
        #[inline(always)]
        unsafe fn max_halves(a: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(a);
            fold4(_mm_max_ps(lo, _mm256_extractf128_ps::<1>(a)), |x, y| {
                _mm_max_ps(x, y)
            })
        }
        #[inline(always)]
        unsafe fn pow2_rounded(m: __m256) -> __m256 {
            let e = _mm256_add_epi32(_mm256_castps_si256(m), _mm256_set1_epi32(POW2_BIAS));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
        }
        #[inline(always)]
        unsafe fn keep_first(x: __m256, valid: usize, fill: f32) -> __m256 {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lane);
            _mm256_blendv_ps(_mm256_set1_ps(fill), x, _mm256_castsi256_ps(keep))
        }
    }

    /// 16 × f32 in a zmm register (AVX-512 F).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn broadcast(p: *const f32) -> __m512 {
            _mm512_set1_ps(*p)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum_halves(a: __m512) -> f32 {
            let (lo, hi) = (_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a));
            Avx2::sum_halves(_mm256_add_ps(lo, hi))
        }
        #[inline(always)]
        unsafe fn max_halves(a: __m512) -> f32 {
            let (lo, hi) = (_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a));
            Avx2::max_halves(_mm256_max_ps(lo, hi))
        }
        #[inline(always)]
        unsafe fn pow2_rounded(m: __m512) -> __m512 {
            let e = _mm512_add_epi32(_mm512_castps_si512(m), _mm512_set1_epi32(POW2_BIAS));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
        }
        #[inline(always)]
        unsafe fn keep_first(x: __m512, valid: usize, fill: f32) -> __m512 {
            let keep = ((1u32 << valid) - 1) as __mmask16;
            _mm512_mask_blend_ps(keep, _mm512_set1_ps(fill), x)
        }
    }
}
