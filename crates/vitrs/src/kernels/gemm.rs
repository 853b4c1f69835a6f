//! Matrix products `Y = X·Wᵀ + b` with a fused epilogue, the heart of the engine.
//!
//! The inner kernel is the `matrixmultiply` crate's single-threaded SGEMM (AVX2/FMA picked at
//! run time; measured on the ViT shapes in `docs/perf.md`). Threads split the output into
//! blocks along its larger dimension, so each block packs only its own panel of the weight,
//! and each block's epilogue (bias, residual, GELU, tanh) runs while its tile is still in cache.
//!
//! Weights are kept in PyTorch's `(out, in)` layout; the packing into cache-sized panels
//! happens inside the SGEMM. A pre-packed layout can replace this module without changing
//! its interface.

use rayon::prelude::*;

use super::math::{gelu_inplace, tanh_inplace};
use super::{Split, SyncPtr};
use crate::config::Gelu;

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

/// Below this many multiply-adds a product runs on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

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
    (m, k, n): (usize, usize, usize),
    epilogue: Epilogue,
) {
    super::check_len("linear: x", x.len(), m * k);
    super::check_len("linear: w", w.len(), n * k);
    super::check_len("linear: out", out.len(), m * n);
    if let Some(b) = bias {
        super::check_len("linear: bias", b.len(), n);
    }
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let outp = SyncPtr(out.as_mut_ptr());
    let run = |rows: (usize, usize), cols: (usize, usize)| {
        // SAFETY: the ranges of a `Split` are disjoint, so each task writes its own
        // sub-matrix of `out`; `x` and `w` are only read.
        unsafe { block(x, w, bias, outp, (m, k, n), rows, cols, epilogue) }
    };
    if threads == 1 || m * n * k < PARALLEL_MIN_MACS {
        run((0, m), (0, n));
    } else if n >= m {
        // Few rows (small batch): split the columns; each thread packs only its slice of W.
        let s = Split::new(n, threads, 16);
        (0..s.count)
            .into_par_iter()
            .for_each(|i| run((0, m), s.get(i)));
    } else {
        let s = Split::new(m, threads, 8);
        (0..s.count)
            .into_par_iter()
            .for_each(|i| run(s.get(i), (0, n)));
    }
}

/// Computes the block `out[r0..r1, c0..c1]`.
///
/// # Safety
/// `out` must point to an `(m, n)` buffer, and no other thread may touch this block.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: SyncPtr,
    (_m, k, n): (usize, usize, usize),
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    epilogue: Epilogue,
) {
    let (bm, bn) = (r1 - r0, c1 - c0);
    let c = out.get().add(r0 * n + c0);
    let row = |r: usize| std::slice::from_raw_parts_mut(c.add(r * n), bn);
    // Start from the bias (or add it to the residual), then let SGEMM accumulate (beta = 1).
    let beta = match (bias, epilogue) {
        (Some(b), Epilogue::Accumulate) => {
            for r in 0..bm {
                add_assign(row(r), &b[c0..c1]);
            }
            1.0
        }
        (None, Epilogue::Accumulate) => 1.0,
        (Some(b), _) => {
            for r in 0..bm {
                row(r).copy_from_slice(&b[c0..c1]);
            }
            1.0
        }
        (None, _) => 0.0,
    };
    // B = Wᵀ restricted to columns c0..c1: B[kk][j] = W[c0 + j][kk].
    super::sgemm(
        (bm, k, bn),
        1.0,
        (x.as_ptr().add(r0 * k), k as isize, 1),
        (w.as_ptr().add(c0 * k), 1, k as isize),
        beta,
        (c, n as isize, 1),
    );
    match epilogue {
        Epilogue::None | Epilogue::Accumulate => {}
        Epilogue::Gelu(kind) => (0..bm).for_each(|r| gelu_inplace(row(r), kind)),
        Epilogue::Tanh => (0..bm).for_each(|r| tanh_inplace(row(r))),
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
    (m, k, n): (usize, usize, usize),
) {
    super::check_len("linear_backward: dy", dy.len(), m * n);
    super::check_len("linear_backward: x", x.len(), m * k);
    super::check_len("linear_backward: w", w.len(), n * k);
    super::check_len("linear_backward: dw", dw.len(), n * k);
    if let Some(dx) = dx.as_deref() {
        super::check_len("linear_backward: dx", dx.len(), m * k);
    }
    if let Some(db) = db.as_deref() {
        super::check_len("linear_backward: db", db.len(), n);
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let small = threads == 1 || m * n * k < PARALLEL_MIN_MACS;
    if let Some(dx) = dx {
        // dx (m, k) = dy (m, n) · W (n, k): the forward product with W read untransposed.
        let dxp = SyncPtr(dx.as_mut_ptr());
        let run = |(r0, r1): (usize, usize), (c0, c1): (usize, usize)| unsafe {
            // SAFETY: disjoint blocks of dx (ranges of one `Split`).
            super::sgemm(
                (r1 - r0, n, c1 - c0),
                1.0,
                (dy.as_ptr().add(r0 * n), n as isize, 1),
                (w.as_ptr().add(c0), k as isize, 1),
                0.0,
                (dxp.get().add(r0 * k + c0), k as isize, 1),
            );
        };
        if small {
            run((0, m), (0, k));
        } else if k >= m {
            let s = Split::new(k, threads, 16);
            (0..s.count)
                .into_par_iter()
                .for_each(|i| run((0, m), s.get(i)));
        } else {
            let s = Split::new(m, threads, 8);
            (0..s.count)
                .into_par_iter()
                .for_each(|i| run(s.get(i), (0, k)));
        }
    }
    // dW (n, k) += dyᵀ (n, m) · x (m, k), split over the rows of dW (the output features).
    let dwp = SyncPtr(dw.as_mut_ptr());
    let run_w = |(r0, r1): (usize, usize)| unsafe {
        // SAFETY: disjoint row ranges of dw.
        super::sgemm(
            (r1 - r0, m, k),
            1.0,
            (dy.as_ptr().add(r0), 1, n as isize),
            (x.as_ptr(), k as isize, 1),
            1.0,
            (dwp.get().add(r0 * k), k as isize, 1),
        );
    };
    if small {
        run_w((0, n));
    } else {
        let s = Split::new(n, threads, 8);
        (0..s.count).into_par_iter().for_each(|i| run_w(s.get(i)));
    }
    if let Some(db) = db {
        for row in dy.chunks_exact(n).take(m) {
            add_assign(&mut db[..n], row);
        }
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
    fn linear_matches_reference_on_odd_shapes_and_every_epilogue() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // Covers: single-thread path, column split (n >= m), row split (m > n), ragged edges.
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (17, 64, 100),
            (197, 48, 40),
            (300, 33, 129),
        ] {
            let x = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let b = rand_vec(n, 3);
            for epi in [
                Epilogue::None,
                Epilogue::Gelu(Gelu::Exact),
                Epilogue::Gelu(Gelu::Tanh),
                Epilogue::Tanh,
                Epilogue::Accumulate,
            ] {
                for bias in [Some(&b[..]), None] {
                    let init = rand_vec(m * n, 4);
                    let mut got = init.clone();
                    let mut want = init.clone();
                    pool.install(|| linear(&x, &w, bias, &mut got, (m, k, n), epi));
                    linear_ref(&x, &w, bias, &mut want, (m, k, n), epi);
                    let d = max_abs_diff(&got, &want);
                    // f32 accumulation over k terms of magnitude ≤ 1.
                    assert!(
                        d < 1e-6 * (k as f32).sqrt() * 4.0,
                        "{m}x{k}x{n} {epi:?} bias={}: {d}",
                        bias.is_some()
                    );
                }
            }
        }
    }
}
