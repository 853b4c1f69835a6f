//! LayerNorm over the last dimension: `y = (x − mean) / sqrt(var + eps) · γ + β`.

use rayon::prelude::*;

use super::simd_dispatch;

/// Rows per parallel task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// Normalises each row of `x` into `out`.
///
/// # Shapes
/// `x (rows, d)`, `out (rows, d)`, `gamma (d)`, `beta (d)`.
pub fn layernorm(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32) {
    debug_assert_eq!(x.len(), out.len());
    debug_assert!(d > 0 && x.len() % d == 0 && gamma.len() == d && beta.len() == d);
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xi.chunks_exact(d)) {
                layernorm_row(xrow, orow, gamma, beta, eps);
            }
        });
}

simd_dispatch! {
    fn layernorm_row(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let d = x.len() as f32;
        let mean = x.iter().sum::<f32>() / d;
        // Two passes: the variance of centred values does not cancel catastrophically.
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (v - mean) * rstd * g + b;
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
}
