//! Softmax cross-entropy with hard labels (optionally label-smoothed) or soft targets
//! (mixup/cutmix), fused with its gradient.

use crate::error::{Error, Result};

/// What each row of logits should predict.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices `(B)`; the target is `(1 − ε)·onehot + ε/K`.
    Labels { labels: &'a [usize], smoothing: f32 },
    /// A probability row per example `(B, K)`.
    Soft(&'a [f32]),
}

/// Mean cross-entropy over the batch; writes `dlogits = (softmax − target) / B`.
///
/// # Shapes
/// `logits, dlogits (B, K)`.
pub fn cross_entropy(
    logits: &[f32],
    k: usize,
    targets: Targets<'_>,
    dlogits: &mut [f32],
) -> Result<f32> {
    let b = logits.len() / k.max(1);
    match targets {
        Targets::Labels { labels, smoothing } => {
            if labels.len() != b {
                return Err(Error::BadInput(format!(
                    "{} labels for a batch of {b}",
                    labels.len()
                )));
            }
            if let Some(&bad) = labels.iter().find(|&&l| l >= k) {
                return Err(Error::BadInput(format!(
                    "label {bad} is out of range for {k} classes"
                )));
            }
            if !(0.0..1.0).contains(&smoothing) {
                return Err(Error::InvalidConfig(format!(
                    "label smoothing {smoothing} is outside [0, 1)"
                )));
            }
        }
        Targets::Soft(t) => {
            if t.len() != b * k {
                return Err(Error::BadInput(format!(
                    "soft targets of {} values for a ({b}, {k}) batch",
                    t.len()
                )));
            }
        }
    }
    let mut total = 0.0f64;
    let inv_b = 1.0 / b as f32;
    for (i, (row, grad)) in logits
        .chunks_exact(k)
        .zip(dlogits.chunks_exact_mut(k))
        .enumerate()
    {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_z = max as f64 + sum.ln();
        for (c, (g, &v)) in grad.iter_mut().zip(row).enumerate() {
            let t = match targets {
                Targets::Labels { labels, smoothing } => {
                    smoothing / k as f32 + if labels[i] == c { 1.0 - smoothing } else { 0.0 }
                }
                Targets::Soft(ts) => ts[i * k + c],
            };
            let logp = v as f64 - log_z;
            total -= t as f64 * logp;
            *g = (logp.exp() as f32 - t) * inv_b;
        }
    }
    Ok((total / b as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_match_finite_differences() {
        let logits = vec![0.3, -1.2, 2.0, 0.5, 0.1, 0.1, -0.4, 1.7];
        let labels = [2, 3];
        let t = Targets::Labels {
            labels: &labels,
            smoothing: 0.1,
        };
        let mut g = vec![0.0; 8];
        let l0 = cross_entropy(&logits, 4, t, &mut g).unwrap();
        // Known value for the first row without smoothing: -log softmax(2.0).
        let mut g2 = vec![0.0; 4];
        let l1 = cross_entropy(
            &logits[..4],
            4,
            Targets::Labels {
                labels: &[2],
                smoothing: 0.0,
            },
            &mut g2,
        )
        .unwrap();
        let z: f64 = logits[..4].iter().map(|&v| (v as f64).exp()).sum();
        assert!((l1 as f64 - (z.ln() - 2.0)).abs() < 1e-6);
        for i in 0..8 {
            let mut p = logits.clone();
            p[i] += 1e-3;
            let mut m = logits.clone();
            m[i] -= 1e-3;
            let mut scratch = vec![0.0; 8];
            let fd = (cross_entropy(&p, 4, t, &mut scratch).unwrap()
                - cross_entropy(&m, 4, t, &mut scratch).unwrap())
                / 2e-3;
            assert!((fd - g[i]).abs() < 2e-3, "{i}: {fd} vs {}", g[i]);
        }
        assert!(l0 > 0.0);
        // Gradient rows sum to zero (softmax minus a distribution).
        assert!(g[..4].iter().sum::<f32>().abs() < 1e-6);
    }

    #[test]
    fn bad_labels_are_errors() {
        let mut g = vec![0.0; 4];
        assert!(cross_entropy(
            &[0.0; 4],
            2,
            Targets::Labels {
                labels: &[0, 5],
                smoothing: 0.0
            },
            &mut g
        )
        .is_err());
        assert!(cross_entropy(
            &[0.0; 4],
            2,
            Targets::Labels {
                labels: &[0],
                smoothing: 0.0
            },
            &mut g
        )
        .is_err());
    }
}
