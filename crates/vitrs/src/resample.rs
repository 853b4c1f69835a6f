//! Separable, antialiased resampling after Pillow's `Resample.c`, shared by image
//! preprocessing and position-embedding interpolation. PyTorch's
//! `interpolate(..., antialias=True)` (what timm uses to resample position embeddings) follows
//! the same algorithm, so one implementation matches both.

use serde::{Deserialize, Serialize};

/// Resampling filter (Pillow's definitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
}

impl Interpolation {
    /// Parses timm's names and Pillow's integer codes (HF's `resample`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nearest" | "0" => Some(Self::Nearest),
            "bilinear" | "linear" | "2" => Some(Self::Bilinear),
            "bicubic" | "cubic" | "3" => Some(Self::Bicubic),
            _ => None,
        }
    }
}

/// Planar data `(C, H, W)`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Planes {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

fn filter(kind: Interpolation, x: f64) -> f64 {
    let x = x.abs();
    match kind {
        Interpolation::Nearest => 0.0,
        Interpolation::Bilinear => (1.0 - x).max(0.0),
        Interpolation::Bicubic => {
            // Pillow's bicubic, a = -0.5.
            let a = -0.5;
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * a
            } else {
                0.0
            }
        }
    }
}

/// Pillow's `precompute_coeffs`: for each output index, the first input index and weights.
fn coeffs(in_size: usize, out_size: usize, kind: Interpolation) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    if kind == Interpolation::Nearest {
        return (0..out_size)
            .map(|i| {
                (
                    ((i as f64 + 0.5) * scale).floor().min(in_size as f64 - 1.0) as usize,
                    vec![1.0],
                )
            })
            .collect();
    }
    let support = match kind {
        Interpolation::Bicubic => 2.0,
        _ => 1.0,
    };
    let fscale = scale.max(1.0);
    let support = support * fscale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter(kind, (x as f64 - center + 0.5) / fscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// Pillow's fixed-point precision for 8-bit images: `32 - 8 - 2` fraction bits.
const PRECISION_BITS: u32 = 22;

/// One output value from `weights` applied to inputs `at(0), at(1), ...`. With `round8`, the
/// exact integer arithmetic of Pillow on 8-bit images (coefficients rounded to 22 fraction bits,
/// sum rounded and clipped to 0..=255); otherwise real arithmetic.
#[inline]
fn weigh(weights: &[f64], at: impl Fn(usize) -> f32, round8: bool) -> f32 {
    if round8 {
        let one = (1i64 << PRECISION_BITS) as f64;
        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
        for (k, &w) in weights.iter().enumerate() {
            // Pillow's normalize_coeffs_8bpc rounds half away from zero.
            let kk = if w < 0.0 {
                (w * one - 0.5) as i64
            } else {
                (w * one + 0.5) as i64
            };
            acc += at(k) as i64 * kk;
        }
        (acc >> PRECISION_BITS).clamp(0, 255) as f32
    } else {
        weights
            .iter()
            .enumerate()
            .map(|(k, &w)| w as f32 * at(k))
            .sum()
    }
}

/// Resizes every plane to `out_h × out_w`: horizontal pass, then vertical, each skipped when
/// that side is unchanged. With `round8` the planes hold 8-bit levels and each pass rounds as
/// Pillow does on `uint8` images; without, values stay real (PyTorch
/// `interpolate(..., antialias=True)` on floats).
pub(crate) fn resize_planes(
    src: &Planes,
    out_h: usize,
    out_w: usize,
    kind: Interpolation,
    round8: bool,
) -> Planes {
    let mut cur = src.clone();
    if out_w != cur.w {
        let cs = coeffs(cur.w, out_w, kind);
        let mut data = vec![0.0; cur.c * cur.h * out_w];
        for (row, orow) in cur
            .data
            .chunks_exact(cur.w)
            .zip(data.chunks_exact_mut(out_w))
        {
            for (o, (start, w)) in orow.iter_mut().zip(&cs) {
                *o = weigh(w, |k| row[start + k], round8);
            }
        }
        cur = Planes {
            c: cur.c,
            h: cur.h,
            w: out_w,
            data,
        };
    }
    if out_h != cur.h {
        let cs = coeffs(cur.h, out_h, kind);
        let w = cur.w;
        let mut data = vec![0.0; cur.c * out_h * w];
        for ch in 0..cur.c {
            let plane = &cur.data[ch * cur.h * w..(ch + 1) * cur.h * w];
            for (y, (start, ws)) in cs.iter().enumerate() {
                let orow = &mut data[(ch * out_h + y) * w..(ch * out_h + y + 1) * w];
                for (x, o) in orow.iter_mut().enumerate() {
                    *o = weigh(ws, |k| plane[(start + k) * w + x], round8);
                }
            }
        }
        cur = Planes {
            c: cur.c,
            h: out_h,
            w,
            data,
        };
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planes(h: usize, w: usize) -> Planes {
        let data = (0..h * w).map(|i| ((i * 37) % 256) as f32).collect();
        Planes { c: 1, h, w, data }
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let p = planes(7, 9);
        for k in [
            Interpolation::Bilinear,
            Interpolation::Bicubic,
            Interpolation::Nearest,
        ] {
            assert_eq!(resize_planes(&p, 7, 9, k, true).data, p.data);
        }
    }

    #[test]
    fn weights_sum_to_one_and_constant_images_stay_constant() {
        for (i, o) in [(10, 3), (3, 10), (224, 256), (71, 32)] {
            for k in [Interpolation::Bilinear, Interpolation::Bicubic] {
                for (_, w) in coeffs(i, o, k) {
                    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                }
            }
        }
        let p = Planes {
            c: 1,
            h: 13,
            w: 17,
            data: vec![200.0; 13 * 17],
        };
        let r = resize_planes(&p, 5, 29, Interpolation::Bicubic, true);
        assert!(r.data.iter().all(|&v| v == 200.0));
    }
}
