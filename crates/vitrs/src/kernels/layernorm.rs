//! LayerNorm over the last dimension: `y = (x − mean) / sqrt(var + eps) · γ + β`.

use super::math::{sq_dev_sum_lanes, sum_lanes};
use super::{simd_dispatch, team, Split, SyncPtr};

/// Rows per parallel task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// Normalises each row of `x` into `out`.
///
/// # Shapes
/// `x (rows, d)`, `out (rows, d)`, `gamma (d)`, `beta (d)`.
pub fn layernorm(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32) {
    layernorm_impl(x, out, gamma, beta, d, eps, None);
}

/// What [`layernorm_train`] keeps for the backward pass.
///
/// # Shapes
/// `input (rows, d)`, `mean (rows)`, `rstd (rows)`.
pub struct LnSaved<'a> {
    /// A copy of the input (the residual stream it came from changes afterwards).
    pub input: &'a mut [f32],
    pub mean: &'a mut [f32],
    pub rstd: &'a mut [f32],
}

/// [`layernorm`] that also keeps what the backward needs: a copy of the input (made by the
/// same parallel pass, each row while it is in cache), each row's mean and 1/std.
///
/// # Shapes
/// as [`layernorm`], plus [`LnSaved`]'s.
pub fn layernorm_train(
    x: &[f32],
    out: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    d: usize,
    eps: f32,
    saved: LnSaved,
) {
    layernorm_impl(x, out, gamma, beta, d, eps, Some(saved));
}

fn layernorm_impl(
    x: &[f32],
    out: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    d: usize,
    eps: f32,
    saved: Option<LnSaved>,
) {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layernorm: {} values are not rows of {d}",
        x.len()
    );
    super::check_len("layernorm: out", out.len(), x.len());
    super::check_len("layernorm: gamma", gamma.len(), d);
    super::check_len("layernorm: beta", beta.len(), d);
    if let Some(s) = saved.as_ref() {
        super::check_len("layernorm: saved input", s.input.len(), x.len());
        super::check_len("layernorm: mean", s.mean.len(), x.len() / d);
        super::check_len("layernorm: rstd", s.rstd.len(), x.len() / d);
    }
    let saved = saved.map(|s| {
        (
            SyncPtr(s.input.as_mut_ptr()),
            SyncPtr(s.mean.as_mut_ptr()),
            SyncPtr(s.rstd.as_mut_ptr()),
        )
    });
    let chunk = d * ROWS_PER_TASK;
    team::for_chunks_mut(&mut out[..x.len()], chunk, |c, o| {
        let xi = &x[c * chunk..c * chunk + o.len()];
        let mut stats = [(0.0, 0.0); ROWS_PER_TASK];
        layernorm_rows(xi, o, gamma, beta, eps, &mut stats);
        if let Some((ip, mp, rp)) = saved {
            for (r, &(mean, rstd)) in stats.iter().take(o.len() / d).enumerate() {
                let row = c * ROWS_PER_TASK + r;
                // SAFETY: row `row` (of the input copy, mean and rstd, all checked to hold
                // every row above) belongs to this task alone.
                unsafe {
                    let src = xi.as_ptr().add(r * d);
                    std::ptr::copy_nonoverlapping(src, ip.get().add(row * d), d);
                    *mp.get().add(row) = mean;
                    *rp.get().add(row) = rstd;
                }
            }
        }
    });
}

/// [`layernorm`] of `x`'s rows into `out`, on the calling thread: the part of a parallel task
/// that has just written those rows (see `gemm::linear_add_norm`).
///
/// # Shapes
/// `x (rows, d)`, `out (rows, d)`, `gamma (d)`, `beta (d)`.
pub(crate) fn layernorm_here(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    layernorm_rows(x, out, gamma, beta, eps, &mut []);
}

simd_dispatch! {
    /// The rows of `x` (`gamma.len()` wide) normalised into `out`, row `r`'s `(mean, 1/std)`
    /// into `stats[r]` where `stats` has one: one call per task, the passes of every row
    /// inlined into it (a call per pass and row cost a LayerNorm of 192-float rows about half
    /// its time).
    fn layernorm_rows(
        x: &[f32],
        out: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        stats: &mut [(f32, f32)],
    ) {
        let d = gamma.len();
        for (r, (orow, xrow)) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
            let st = layernorm_row(xrow, orow, gamma, beta, eps);
            if let Some(slot) = stats.get_mut(r) {
                *slot = st;
            }
        }
    }
}

#[inline(always)]
fn layernorm_row(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum_lanes(x) / d;
    // Two passes: the variance of centred values does not cancel catastrophically.
    let var = sq_dev_sum_lanes(x, mean) / d;
    let rstd = 1.0 / (var + eps).sqrt();
    let n = x.len();
    let (out, gamma, beta) = (&mut out[..n], &gamma[..n], &beta[..n]);
    for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = (v - mean) * rstd * g + b;
    }
    (mean, rstd)
}

/// Backward of [`layernorm_train`]: `dx += ∂L/∂x`, `dgamma += Σ dy·x̂`, `dbeta += Σ dy`, where
/// `x̂ = (x − mean)·rstd` and
/// `∂L/∂x = rstd · (dy·γ − mean(dy·γ) − x̂ · mean(dy·γ·x̂))`.
///
/// `partials` is scratch for per-thread γ/β sums (grown on first use).
///
/// # Shapes
/// `dy, x, dx (rows, d)`; `mean, rstd (rows)`; `gamma, dgamma, dbeta (d)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    d: usize,
    partials: &mut Vec<f32>,
) {
    assert!(d > 0, "layernorm_backward: width 0");
    let rows = x.len() / d;
    for (what, len, need) in [
        ("dy", dy.len(), rows * d),
        ("dx", dx.len(), rows * d),
        ("mean", mean.len(), rows),
        ("rstd", rstd.len(), rows),
        ("gamma", gamma.len(), d),
        ("dgamma", dgamma.len(), d),
        ("dbeta", dbeta.len(), d),
    ] {
        super::check_len(what, len, need);
    }
    let split = Split::new(rows, team::threads(), ROWS_PER_TASK);
    if partials.len() < split.count * 2 * d {
        partials.resize(split.count * 2 * d, 0.0);
    }
    let dxp = SyncPtr(dx.as_mut_ptr());
    team::for_chunks_mut(&mut partials[..split.count * 2 * d], 2 * d, |g, part| {
        part.fill(0.0);
        let (r0, r1) = split.get(g);
        let rows = r0 * d..r1 * d;
        // SAFETY: rows r0..r1 belong to group g alone.
        let dxr = unsafe { std::slice::from_raw_parts_mut(dxp.get().add(r0 * d), rows.len()) };
        let stats = (&mean[r0..r1], &rstd[r0..r1]);
        layernorm_backward_rows(&dy[rows.clone()], &x[rows], stats, gamma, dxr, part);
    });
    add_partials(&partials[..split.count * 2 * d], dgamma, dbeta);
}

/// [`layernorm_backward`] of a block of rows on the calling thread: `dx += ∂L/∂x` for those
/// rows, their γ and β gradients added into `partial` (`[dγ (d) | dβ (d)]`, a thread's sums,
/// see [`add_partials`]).
///
/// # Shapes
/// `dy, x, dx (rows, d)`; `stats`: `mean, rstd (rows)`; `gamma (d)`; `partial (2·d)`.
pub(crate) fn layernorm_backward_rows(
    dy: &[f32],
    x: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    gamma: &[f32],
    dx: &mut [f32],
    partial: &mut [f32],
) {
    let d = gamma.len();
    let (pg, pb) = partial[..2 * d].split_at_mut(d);
    let rows = dy
        .chunks_exact(d)
        .zip(x.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d));
    for (r, ((dyr, xr), dxr)) in rows.enumerate() {
        layernorm_backward_row(dyr, xr, mean[r], rstd[r], gamma, dxr, pg, pb);
    }
}

/// `dgamma += Σ dγ`, `dbeta += Σ dβ` over the threads' partial sums (`[dγ | dβ]` each, see
/// [`layernorm_backward_rows`]).
pub(crate) fn add_partials(partials: &[f32], dgamma: &mut [f32], dbeta: &mut [f32]) {
    let d = dgamma.len();
    for part in partials.chunks_exact(2 * d) {
        for j in 0..d {
            dgamma[j] += part[j];
            dbeta[j] += part[d + j];
        }
    }
}

simd_dispatch! {
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_row(
        dy: &[f32],
        x: &[f32],
        mean: f32,
        rstd: f32,
        gamma: &[f32],
        dx: &mut [f32],
        pg: &mut [f32],
        pb: &mut [f32],
    ) {
        let n = x.len();
        // Re-sliced to one length so the indexing below carries no bounds checks.
        let (dy, gamma, dx, pg, pb) = (&dy[..n], &gamma[..n], &mut dx[..n], &mut pg[..n], &mut pb[..n]);
        let d = n as f32;
        // m1 = Σ dy·γ and m2 = Σ dy·γ·x̂ in eight lanes (see `math::sum_lanes`). Fixed-size
        // chunks zipped together: indexed by `j0 + l`, LLVM kept this loop scalar (a third
        // of the fashion-mnist step's LayerNorm backward was scalar adds and stores).
        let (mut a1, mut a2) = ([0.0f32; 8], [0.0f32; 8]);
        let n8 = x.len() / 8 * 8;
        let chunks = x[..n8]
            .chunks_exact(8)
            .zip(dy[..n8].chunks_exact(8))
            .zip(gamma[..n8].chunks_exact(8))
            .zip(pg[..n8].chunks_exact_mut(8))
            .zip(pb[..n8].chunks_exact_mut(8));
        for ((((xc, dyc), gc), pgc), pbc) in chunks {
            for l in 0..8 {
                let xh = (xc[l] - mean) * rstd;
                let g = dyc[l] * gc[l];
                a1[l] += g;
                a2[l] += g * xh;
                pgc[l] += dyc[l] * xh;
                pbc[l] += dyc[l];
            }
        }
        let (mut m1, mut m2) = (0.0f32, 0.0f32);
        for j in n8..x.len() {
            let xh = (x[j] - mean) * rstd;
            let g = dy[j] * gamma[j];
            m1 += g;
            m2 += g * xh;
            pg[j] += dy[j] * xh;
            pb[j] += dy[j];
        }
        m1 += a1.iter().sum::<f32>();
        m2 += a2.iter().sum::<f32>();
        let (m1, m2) = (m1 / d, m2 / d);
        for j in 0..x.len() {
            let xh = (x[j] - mean) * rstd;
            dx[j] += rstd * (dy[j] * gamma[j] - m1 - xh * m2);
        }
    }
}

/// Reference twin in f64.
pub fn layernorm_ref(x: &[f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for j in 0..d {
            out.push(((row[j] as f64 - mean) * rstd * gamma[j] as f64 + beta[j] as f64) as f32);
        }
    }
    out
}

/// Reference twin of [`layernorm_backward`] in f64 (recomputing the statistics);
/// returns `(dx, dgamma, dbeta)`.
pub fn layernorm_backward_ref(
    dy: &[f32],
    x: &[f32],
    gamma: &[f32],
    d: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0; x.len()];
    let (mut dg, mut db) = (vec![0.0f64; d], vec![0.0f64; d]);
    for (r, row) in x.chunks_exact(d).enumerate() {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let xh: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let g: Vec<f64> = (0..d)
            .map(|j| dy[r * d + j] as f64 * gamma[j] as f64)
            .collect();
        let m1 = g.iter().sum::<f64>() / d as f64;
        let m2 = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64;
        for j in 0..d {
            dx[r * d + j] = (rstd * (g[j] - m1 - xh[j] * m2)) as f32;
            dg[j] += dy[r * d + j] as f64 * xh[j];
            db[j] += dy[r * d + j] as f64;
        }
    }
    (
        dx,
        dg.iter().map(|&v| v as f32).collect(),
        db.iter().map(|&v| v as f32).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    #[test]
    fn layernorm_matches_reference() {
        for &(rows, d) in &[(1, 1), (3, 7), (197, 192), (40, 768)] {
            // Offset the inputs: a large mean is where one-pass variance would fail.
            let x: Vec<f32> = rand_vec(rows * d, 5)
                .iter()
                .map(|v| v * 3.0 + 10.0)
                .collect();
            let g = rand_vec(d, 6);
            let b = rand_vec(d, 7);
            let mut got = vec![0.0; rows * d];
            layernorm(&x, &mut got, &g, &b, d, 1e-6);
            let want = layernorm_ref(&x, &g, &b, d, 1e-6);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 2e-5, "{rows}x{d}: {diff}");
        }
    }

    #[test]
    fn layernorm_backward_matches_reference() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(rows, d) in &[(1, 1), (3, 7), (197, 64), (50, 192)] {
            let x: Vec<f32> = rand_vec(rows * d, 5)
                .iter()
                .map(|v| v * 3.0 + 1.0)
                .collect();
            let dy = rand_vec(rows * d, 8);
            let g = rand_vec(d, 6);
            let b = rand_vec(d, 7);
            let (mut out, mut mean, mut rstd) =
                (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            let mut kept = vec![0.0; rows * d];
            let saved = LnSaved {
                input: &mut kept,
                mean: &mut mean,
                rstd: &mut rstd,
            };
            pool.install(|| layernorm_train(&x, &mut out, &g, &b, d, 1e-5, saved));
            assert!(max_abs_diff(&out, &layernorm_ref(&x, &g, &b, d, 1e-5)) < 2e-5);
            assert_eq!(kept, x);
            let (mut dx, mut dg, mut db, mut part) =
                (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d], vec![]);
            pool.install(|| {
                layernorm_backward(
                    &dy, &x, &mean, &rstd, &g, &mut dx, &mut dg, &mut db, d, &mut part,
                )
            });
            let (rdx, rdg, rdb) = layernorm_backward_ref(&dy, &x, &g, d, 1e-5);
            assert!(
                max_abs_diff(&dx, &rdx) < 1e-4,
                "dx {rows}x{d}: {}",
                max_abs_diff(&dx, &rdx)
            );
            assert!(max_abs_diff(&dg, &rdg) < 1e-4 * (rows as f32).sqrt());
            assert!(max_abs_diff(&db, &rdb) < 1e-4 * (rows as f32).sqrt());
        }
    }
}
