//! Resampling a position-embedding table to a new patch grid (fine-tuning at a new
//! resolution, or a checkpoint trained at another size): the patch part is treated as a
//! D-channel image of gh×gw and interpolated in 2-D; prefix-token rows (class, distillation,
//! registers, when the table has them) are kept as they are.
//! Bicubic with antialiasing, as timm's `resample_abs_pos_embed`.

use crate::error::{Error, Result};
use crate::resample::Interpolation;
use crate::resample::{resize_planes, Planes};

/// Resamples `pe`.
///
/// # Shapes
/// `pe (1, prefix + old.0·old.1, D)` -> `(1, prefix + new.0·new.1, D)`.
pub fn resample_pos_embed(
    pe: &[f32],
    d: usize,
    prefix: usize,
    old: (usize, usize),
    new: (usize, usize),
) -> Result<Vec<f32>> {
    if pe.len() != (prefix + old.0 * old.1) * d
        || old.0 == 0
        || old.1 == 0
        || new.0 == 0
        || new.1 == 0
    {
        return Err(Error::ShapeMismatch {
            name: "pos_embed".into(),
            expected: vec![1, prefix + old.0 * old.1, d],
            got: vec![pe.len() / d.max(1)],
        });
    }
    // (old.0·old.1, D) -> planes (D, gh, gw)
    let (gh, gw) = old;
    let grid = &pe[prefix * d..];
    let mut planes = vec![0.0; d * gh * gw];
    for p in 0..gh * gw {
        for c in 0..d {
            planes[c * gh * gw + p] = grid[p * d + c];
        }
    }
    let src = Planes {
        c: d,
        h: gh,
        w: gw,
        data: planes,
    };
    let out = resize_planes(&src, new.0, new.1, Interpolation::Bicubic, false);
    // planes (D, gh', gw') -> (gh'·gw', D), after the prefix rows.
    let np = new.0 * new.1;
    let mut res = pe[..prefix * d].to_vec();
    res.resize((prefix + np) * d, 0.0);
    for p in 0..np {
        for c in 0..d {
            res[(prefix + p) * d + c] = out.data[c * np + p];
        }
    }
    Ok(res)
}

/// The grid of a table of `tokens` rows with one prefix token, when it is square.
pub fn square_grid(tokens: usize, prefix: usize) -> Option<(usize, usize)> {
    let n = tokens.checked_sub(prefix)?;
    let s = (n as f64).sqrt().round() as usize;
    (s * s == n && s > 0).then_some((s, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::rand_vec;

    #[test]
    fn same_grid_is_identity() {
        let pe = rand_vec((1 + 12) * 5, 1);
        assert_eq!(resample_pos_embed(&pe, 5, 1, (3, 4), (3, 4)).unwrap(), pe);
    }

    #[test]
    fn constant_table_stays_constant_and_class_row_is_kept() {
        let d = 3;
        let mut pe = vec![0.7; (1 + 4) * d];
        pe[..d].copy_from_slice(&[9.0, 8.0, 7.0]);
        let out = resample_pos_embed(&pe, d, 1, (2, 2), (5, 3)).unwrap();
        assert_eq!(out.len(), (1 + 15) * d);
        assert_eq!(&out[..d], &[9.0, 8.0, 7.0]);
        assert!(out[d..].iter().all(|v| (v - 0.7).abs() < 1e-6));
    }

    #[test]
    fn square_grid_detects_squares() {
        assert_eq!(square_grid(197, 1), Some((14, 14)));
        assert_eq!(square_grid(13, 1), None);
    }
}
