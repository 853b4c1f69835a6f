//! Batch normalisation over channels-last activations `(M, C)` (M = batch × pixels): each
//! channel normalised by its statistics over the M rows — the batch's in training, the running
//! ones in evaluation — then scaled and shifted, `y = (x − μ) / sqrt(σ² + eps) · γ + β`, with
//! the ReLU and the residual addition a ResNet puts after it fused in. [`batchnorm_train_ref`]
//! and [`batchnorm_backward_ref`] are the plain twins, in f64.

use super::team;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 512;

/// Per-channel sums of `f(row)` contributions over the rows of `(M, C)` matrices, in
/// parallel: each task sums its rows in f32 lanes, the tasks' sums are added in f64.
fn channel_sums(c: usize, rows: usize, per_row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f64> {
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    // (tasks, C): each task's sums, added in task order (the same result on any threads).
    let mut partial = vec![0.0f32; tasks * c];
    team::for_chunks_mut(&mut partial, c.max(1), |t, acc| {
        for r in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows) {
            per_row(r, acc);
        }
    });
    let mut sums = vec![0.0f64; c];
    for part in partial.chunks_exact(c.max(1)) {
        sums.iter_mut().zip(part).for_each(|(s, &a)| *s += a as f64);
    }
    sums
}

/// What follows the normalisation: `y = relu?(bn(x) + residual?)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct After<'a> {
    /// `(M, C)` added before the ReLU (a residual block's shortcut).
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

fn finish(v: f32, res: Option<f32>, relu: bool) -> f32 {
    let v = v + res.unwrap_or(0.0);
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// Training: normalises `x (M, C)` by its own per-channel statistics into `y`, records the
/// mean and 1/std in `mean`, `rstd (C)` for the backward, and moves the running statistics
/// `running_mean`, `running_var` (C) by `momentum` toward the batch's (PyTorch's rule: the
/// running variance takes the unbiased batch variance).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train(
    x: &[f32],
    y: &mut [f32],
    (gamma, beta): (&[f32], &[f32]),
    c: usize,
    eps: f32,
    (mean, rstd): (&mut [f32], &mut [f32]),
    (running_mean, running_var, momentum): (&mut [f32], &mut [f32], f32),
    after: After<'_>,
) {
    let m = x.len() / c.max(1);
    super::check_len("batchnorm: y", y.len(), m * c);
    // Per-channel sums (each row a contiguous run of C channels), then squared deviations
    // from the mean: two passes, f32 within a task of rows, f64 across tasks (M is in the
    // hundreds of thousands for the first stage of a ResNet).
    let s = channel_sums(c, m, |r, acc| {
        acc.iter_mut()
            .zip(&x[r * c..(r + 1) * c])
            .for_each(|(a, &v)| *a += v);
    });
    let mu: Vec<f64> = s.iter().map(|v| v / m.max(1) as f64).collect();
    let mu32: Vec<f32> = mu.iter().map(|&v| v as f32).collect();
    let q = channel_sums(c, m, |r, acc| {
        for ((a, &v), &mu) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mu32) {
            let d = v - mu;
            *a += d * d;
        }
    });
    for ch in 0..c {
        let var = q[ch] / m.max(1) as f64;
        mean[ch] = mu[ch] as f32;
        rstd[ch] = (1.0 / (var + eps as f64).sqrt()) as f32;
        let unbiased = q[ch] / (m.max(2) - 1) as f64;
        running_mean[ch] =
            ((1.0 - momentum as f64) * running_mean[ch] as f64 + momentum as f64 * mu[ch]) as f32;
        running_var[ch] =
            ((1.0 - momentum as f64) * running_var[ch] as f64 + momentum as f64 * unbiased) as f32;
    }
    normalise(x, y, (gamma, beta), c, (mean, rstd), after);
}

/// Evaluation: normalises `x (M, C)` by the running statistics.
pub fn batchnorm_eval(
    x: &[f32],
    y: &mut [f32],
    (gamma, beta): (&[f32], &[f32]),
    c: usize,
    eps: f32,
    (running_mean, running_var): (&[f32], &[f32]),
    after: After<'_>,
) {
    let rstd: Vec<f32> = running_var
        .iter()
        .map(|v| (1.0 / (*v as f64 + eps as f64).sqrt()) as f32)
        .collect();
    normalise(x, y, (gamma, beta), c, (running_mean, &rstd), after);
}

/// `y = after((x − mean) · rstd · γ + β)`, as one scale and shift per channel.
fn normalise(
    x: &[f32],
    y: &mut [f32],
    (gamma, beta): (&[f32], &[f32]),
    c: usize,
    (mean, rstd): (&[f32], &[f32]),
    after: After<'_>,
) {
    let scale: Vec<f32> = (0..c).map(|i| gamma[i] * rstd[i]).collect();
    let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
    if let Some(res) = after.residual {
        super::check_len("batchnorm: residual", res.len(), x.len());
    }
    let n = x.len();
    team::for_chunks_mut(&mut y[..n], c * ROWS_PER_TASK, |t, yc| {
        let at = t * c * ROWS_PER_TASK;
        let xc = &x[at..at + yc.len()];
        match after.residual {
            Some(res) => {
                let rc = &res[at..at + yc.len()];
                for ((yr, xr), rr) in yc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(rc.chunks_exact(c))
                {
                    for i in 0..c {
                        yr[i] = finish(xr[i] * scale[i] + shift[i], Some(rr[i]), after.relu);
                    }
                }
            }
            None => {
                for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    for i in 0..c {
                        yr[i] = finish(xr[i] * scale[i] + shift[i], None, after.relu);
                    }
                }
            }
        }
    });
}

/// The backward of [`batchnorm_train`] (with its ReLU: `y` is its output, whose zeros mask
/// `dy`): `dx` (overwritten) from `dy`, `dgamma` and `dbeta` accumulated. The residual's
/// gradient is `dy` masked the same way, which the caller takes from `dy` after
/// [`relu_mask`] when it fused one.
///
/// `dx = γ·rstd/M · (M·dŷ − Σdŷ − x̂·Σ(dŷ·x̂))`, `x̂ = (x − μ)·rstd`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    gamma: &[f32],
    c: usize,
    (mean, rstd): (&[f32], &[f32]),
    (dgamma, dbeta): (&mut [f32], &mut [f32]),
) {
    let m = x.len() / c.max(1);
    super::check_len("batchnorm_backward: dy", dy.len(), m * c);
    super::check_len("batchnorm_backward: dx", dx.len(), m * c);
    let sd = channel_sums(c, m, |r, acc| {
        acc.iter_mut()
            .zip(&dy[r * c..(r + 1) * c])
            .for_each(|(a, &d)| *a += d);
    });
    let sdx = channel_sums(c, m, |r, acc| {
        let (xr, dr) = (&x[r * c..(r + 1) * c], &dy[r * c..(r + 1) * c]);
        for i in 0..c {
            acc[i] += dr[i] * (xr[i] - mean[i]) * rstd[i];
        }
    });
    let inv_m = 1.0 / m.max(1) as f32;
    let k: Vec<f32> = (0..c).map(|i| gamma[i] * rstd[i]).collect();
    let a: Vec<f32> = (0..c).map(|i| sd[i] as f32 * inv_m).collect();
    let b: Vec<f32> = (0..c).map(|i| sdx[i] as f32 * inv_m).collect();
    team::for_chunks_mut(&mut dx[..m * c], c * ROWS_PER_TASK, |t, oc| {
        let at = t * c * ROWS_PER_TASK;
        let (xc, dc) = (&x[at..at + oc.len()], &dy[at..at + oc.len()]);
        for ((xr, dr), out) in xc
            .chunks_exact(c)
            .zip(dc.chunks_exact(c))
            .zip(oc.chunks_exact_mut(c))
        {
            for i in 0..c {
                let xh = (xr[i] - mean[i]) * rstd[i];
                out[i] = k[i] * (dr[i] - a[i] - xh * b[i]);
            }
        }
    });
    for i in 0..c {
        dgamma[i] += sdx[i] as f32;
        dbeta[i] += sd[i] as f32;
    }
}

/// Zeroes `dy` where the ReLU's output `y` is zero (its gradient there).
pub fn relu_mask(y: &[f32], dy: &mut [f32]) {
    dy.iter_mut()
        .zip(y)
        .for_each(|(d, &v)| *d = if v > 0.0 { *d } else { 0.0 });
}

/// Reference twin of [`batchnorm_train`] without the fused tail: statistics, output and
/// running statistics by the definitions, in f64.
#[allow(clippy::type_complexity)]
pub fn batchnorm_train_ref(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    c: usize,
    eps: f32,
    momentum: f32,
    running: (&[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = x.len() / c;
    let mut y = vec![0.0; x.len()];
    let (mut mean, mut rstd) = (vec![0.0; c], vec![0.0; c]);
    let (mut rm, mut rv) = (running.0.to_vec(), running.1.to_vec());
    for ch in 0..c {
        let vals: Vec<f64> = (0..m).map(|r| x[r * c + ch] as f64).collect();
        let mu = vals.iter().sum::<f64>() / m as f64;
        let var = vals.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / m as f64;
        let r = 1.0 / (var + eps as f64).sqrt();
        for (row, v) in vals.iter().enumerate() {
            y[row * c + ch] = ((v - mu) * r * gamma[ch] as f64 + beta[ch] as f64) as f32;
        }
        mean[ch] = mu as f32;
        rstd[ch] = r as f32;
        let mo = momentum as f64;
        rm[ch] = ((1.0 - mo) * rm[ch] as f64 + mo * mu) as f32;
        rv[ch] = ((1.0 - mo) * rv[ch] as f64 + mo * var * m as f64 / (m - 1) as f64) as f32;
    }
    (y, mean, rstd, rm, rv)
}

/// Reference twin of [`batchnorm_backward`]: the chain rule through the batch statistics
/// written out term by term (∂/∂x̂, ∂/∂σ², ∂/∂μ), in f64.
pub fn batchnorm_backward_ref(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    c: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = x.len() / c;
    let mut dx = vec![0.0; x.len()];
    let (mut dg, mut dbt) = (vec![0.0; c], vec![0.0; c]);
    for ch in 0..c {
        let xs: Vec<f64> = (0..m).map(|r| x[r * c + ch] as f64).collect();
        let ds: Vec<f64> = (0..m).map(|r| dy[r * c + ch] as f64).collect();
        let mu = xs.iter().sum::<f64>() / m as f64;
        let var = xs.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / m as f64;
        let sd = (var + eps as f64).sqrt();
        let g = gamma[ch] as f64;
        let dxhat: Vec<f64> = ds.iter().map(|d| d * g).collect();
        let dvar: f64 = (0..m)
            .map(|i| dxhat[i] * (xs[i] - mu) * -0.5 * sd.powi(-3))
            .sum();
        let dmu: f64 = (0..m).map(|i| -dxhat[i] / sd).sum::<f64>()
            + dvar * (0..m).map(|i| -2.0 * (xs[i] - mu)).sum::<f64>() / m as f64;
        for i in 0..m {
            dx[i * c + ch] =
                (dxhat[i] / sd + dvar * 2.0 * (xs[i] - mu) / m as f64 + dmu / m as f64) as f32;
            dg[ch] += (ds[i] * (xs[i] - mu) / sd) as f32;
            dbt[ch] += ds[i] as f32;
        }
    }
    (dx, dg, dbt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs_diff;
    use crate::model::Rng;

    fn rand(n: usize, rng: &mut Rng, scale: f32, shift: f32) -> Vec<f32> {
        (0..n)
            .map(|_| rng.normal() as f32 * scale + shift)
            .collect()
    }

    #[test]
    fn batch_norm_matches_its_definition_forward_and_backward() {
        let mut rng = Rng::new(9);
        for (m, c) in [(7, 3), (128 * 49, 16), (2, 5)] {
            let x = rand(m * c, &mut rng, 2.0, 0.7);
            let gamma = rand(c, &mut rng, 0.5, 1.0);
            let beta = rand(c, &mut rng, 0.5, 0.0);
            let (rm0, rv0) = (rand(c, &mut rng, 0.1, 0.0), vec![1.5; c]);
            let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
            let (mut mean, mut rstd) = (vec![0.0; c], vec![0.0; c]);
            let mut y = vec![0.0; m * c];
            batchnorm_train(
                &x,
                &mut y,
                (&gamma, &beta),
                c,
                1e-5,
                (&mut mean, &mut rstd),
                (&mut rm, &mut rv, 0.1),
                After::default(),
            );
            let (wy, wmean, wrstd, wrm, wrv) =
                batchnorm_train_ref(&x, &gamma, &beta, c, 1e-5, 0.1, (&rm0, &rv0));
            for (what, a, b, tol) in [
                ("y", &y, &wy, 1e-4),
                ("mean", &mean, &wmean, 1e-5),
                ("rstd", &rstd, &wrstd, 1e-5),
                ("running mean", &rm, &wrm, 1e-6),
                ("running var", &rv, &wrv, 1e-5),
            ] {
                let d = max_abs_diff(a, b);
                assert!(d < tol, "m={m} c={c} {what}: {d}");
            }
            let dy = rand(m * c, &mut rng, 1.0, 0.0);
            let mut dx = vec![9.0; m * c];
            let (mut dg, mut db) = (vec![0.5; c], vec![0.5; c]);
            batchnorm_backward(
                &x,
                &dy,
                &mut dx,
                &gamma,
                c,
                (&mean, &rstd),
                (&mut dg, &mut db),
            );
            let (wdx, wdg, wdb) = batchnorm_backward_ref(&x, &dy, &gamma, c, 1e-5);
            let shift = |v: &[f32]| v.iter().map(|g| g + 0.5).collect::<Vec<_>>();
            let scale = (m as f32).sqrt();
            for (what, a, b, tol) in [
                ("dx", dx.clone(), wdx, 1e-4),
                ("dgamma", dg.clone(), shift(&wdg), 1e-4 * scale),
                ("dbeta", db.clone(), shift(&wdb), 1e-4 * scale),
            ] {
                let d = max_abs_diff(&a, &b);
                assert!(d < tol, "m={m} c={c} {what}: {d}");
            }
        }
    }

    #[test]
    fn the_fused_tail_adds_the_residual_then_clamps() {
        let x = [1.0, -1.0, 3.0, -3.0];
        let res = [0.5, 0.5, -5.0, 5.0];
        let mut y = [0.0; 4];
        // Unit running statistics: the normalisation is the identity.
        batchnorm_eval(
            &x,
            &mut y,
            (&[1.0, 1.0], &[0.0, 0.0]),
            2,
            0.0,
            (&[0.0, 0.0], &[1.0, 1.0]),
            After {
                residual: Some(&res),
                relu: true,
            },
        );
        assert_eq!(y, [1.5, 0.0, 0.0, 2.0]);
        let mut dy = [1.0; 4];
        relu_mask(&y, &mut dy);
        assert_eq!(dy, [1.0, 0.0, 0.0, 1.0]);
    }
}
