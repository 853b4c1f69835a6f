//! SGEMM for the small products inside attention (per image and head: `N × hd` by `hd × N`
//! and `N × N` by `N × hd`, with `hd` often 16–64), where a general SGEMM spends as much time
//! packing its operands as multiplying them.
//!
//! No packing: a 6 × 16 register tile of `C` (twelve AVX accumulators) is built by
//! broadcasting elements of `A` straight from memory, at any strides, and loading rows of `B`,
//! which must have unit column stride. Column tails use masked loads and stores, so nothing
//! outside the operands is read or written. Without AVX2 + FMA it falls back to the general
//! SGEMM, which is also the reference the tests hold it to.

use super::Strided;

/// Rows of `C` per register tile.
const MR: usize = 6;
/// Columns of `C` per register tile (two AVX registers).
const NR: usize = 16;

/// `C (m, n) = alpha · A (m, k) · B (k, n)`, or `C += alpha · A · B` when `accumulate`.
/// `B` and `C` have unit column stride (`b = (ptr, row stride)`); `A` any strides.
///
/// # Safety
/// As [`super::sgemm`]: each pointer addresses a matrix of the given shape and strides, `c`
/// aliases neither `a` nor `b`, and no other thread writes the same elements of `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_sgemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: Strided<*const f32>,
    b: (*const f32, isize),
    accumulate: bool,
    c: (*mut f32, isize),
) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        return avx2::gemm((m, k, n), alpha, a, b, accumulate, c);
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    super::sgemm((m, k, n), alpha, a, (b.0, b.1, 1), beta, (c.0, c.1, 1));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Lane mask for the first `cols` (0..=8) lanes.
    #[inline(always)]
    unsafe fn mask(cols: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(cols.min(8) as i32), idx)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(
        (m, k, n): (usize, usize, usize),
        alpha: f32,
        a: super::Strided<*const f32>,
        b: (*const f32, isize),
        accumulate: bool,
        c: (*mut f32, isize),
    ) {
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(NR);
            let (m0, m1) = (mask(cols), mask(cols.saturating_sub(8)));
            let bj = b.0.add(j);
            let cj = c.0.add(j);
            let mut i = 0;
            while i < m {
                let ai = a.0.offset(i as isize * a.1);
                let ci = cj.offset(i as isize * c.1);
                let tile = Tile {
                    k,
                    a: (ai, a.1, a.2),
                    b: (bj, b.1),
                    c: (ci, c.1),
                    masks: (m0, m1),
                    full: cols == NR,
                    alpha,
                    accumulate,
                };
                match (m - i).min(MR) {
                    6 => tile.run::<6>(),
                    5 => tile.run::<5>(),
                    4 => tile.run::<4>(),
                    3 => tile.run::<3>(),
                    2 => tile.run::<2>(),
                    _ => tile.run::<1>(),
                }
                i += MR;
            }
            j += NR;
        }
    }

    /// One `R × 16` tile of `C` (fewer columns when `full` is false: the masks say which).
    struct Tile {
        k: usize,
        a: super::Strided<*const f32>,
        b: (*const f32, isize),
        c: (*mut f32, isize),
        masks: (__m256i, __m256i),
        full: bool,
        alpha: f32,
        accumulate: bool,
    }

    impl Tile {
        #[inline(always)]
        unsafe fn run<const R: usize>(&self) {
            let (m0, m1) = self.masks;
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let (a, ars, acs) = self.a;
            let (b, ldb) = self.b;
            for p in 0..self.k {
                let bp = b.offset(p as isize * ldb);
                let (b0, b1) = if self.full {
                    (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)))
                } else {
                    (
                        _mm256_maskload_ps(bp, m0),
                        _mm256_maskload_ps(bp.add(8), m1),
                    )
                };
                let ap = a.offset(p as isize * acs);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.offset(r as isize * ars));
                    acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
                    acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
                }
            }
            let (c, ldc) = self.c;
            let alpha = _mm256_set1_ps(self.alpha);
            for (r, acc_r) in acc.iter().enumerate() {
                let cr = c.offset(r as isize * ldc);
                let mut v0 = _mm256_mul_ps(alpha, acc_r[0]);
                let mut v1 = _mm256_mul_ps(alpha, acc_r[1]);
                if self.full {
                    if self.accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr.add(8)));
                    }
                    _mm256_storeu_ps(cr, v0);
                    _mm256_storeu_ps(cr.add(8), v1);
                } else {
                    if self.accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_maskload_ps(cr, m0));
                        v1 = _mm256_add_ps(v1, _mm256_maskload_ps(cr.add(8), m1));
                    }
                    _mm256_maskstore_ps(cr, m0, v0);
                    _mm256_maskstore_ps(cr.add(8), m1, v1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    /// Every tile shape and tail, every operand layout used by attention, against the general
    /// SGEMM; elements of `C` outside the product must be left untouched.
    #[test]
    fn attention_sgemm_matches_general_sgemm() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 16, 16),
            (50, 16, 50),
            (7, 3, 17),
            (13, 64, 33),
            (197, 64, 197),
            (5, 9, 8),
            (12, 0, 20),
        ] {
            for &a_trans in &[false, true] {
                for &accumulate in &[false, true] {
                    let pad = 3;
                    let a = rand_vec(m * k + 1, 1);
                    let ldb = n + pad;
                    let b = rand_vec(k * ldb + 1, 2);
                    let ldc = n + pad;
                    let c0 = rand_vec(m * ldc + 1, 3);
                    let (ars, acs) = if a_trans {
                        (1, m.max(1) as isize)
                    } else {
                        (k.max(1) as isize, 1)
                    };
                    let mut want = c0.clone();
                    let mut got = c0.clone();
                    let beta = if accumulate { 1.0 } else { 0.0 };
                    unsafe {
                        super::super::sgemm(
                            (m, k, n),
                            0.7,
                            (a.as_ptr(), ars, acs),
                            (b.as_ptr(), ldb as isize, 1),
                            beta,
                            (want.as_mut_ptr(), ldc as isize, 1),
                        );
                        attention_sgemm(
                            (m, k, n),
                            0.7,
                            (a.as_ptr(), ars, acs),
                            (b.as_ptr(), ldb as isize),
                            accumulate,
                            (got.as_mut_ptr(), ldc as isize),
                        );
                    }
                    let d = max_abs_diff(&got, &want);
                    assert!(
                        d < 1e-5,
                        "{m}x{k}x{n} a_trans {a_trans} acc {accumulate}: {d}"
                    );
                    // Padding columns and the guard element keep their values exactly.
                    for r in 0..m {
                        for col in n..ldc {
                            assert_eq!(got[r * ldc + col], c0[r * ldc + col]);
                        }
                    }
                    assert_eq!(got[m * ldc], c0[m * ldc]);
                }
            }
        }
    }
}
