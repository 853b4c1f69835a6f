//! Training-time augmentation on 8-bit images `(C, H, W)`, and batch-level mixup/cutmix.
//!
//! Per image, in this order: RandAugment (a faithful subset: 12 of torchvision's 14 ops —
//! no Color, no Sharpness — nearest-neighbour geometry, zero fill), random crop with zero
//! padding or random-resized crop, horizontal flip, random erasing. Every random choice comes
//! from the [`Rng`] the loader derives from (seed, epoch, batch), so a run is reproducible.

use serde::{Deserialize, Serialize};

use crate::model::Rng;

/// RandAugment's two knobs (Cubuk et al. 2020).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandAugment {
    /// Operations applied per image.
    pub ops: usize,
    /// Strength 0–10 (torchvision's 0–30 scale divided by 3).
    pub magnitude: f32,
}

/// What to do to training images. The default does nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Zero-pad by this many pixels and crop back at a random offset (0: off).
    pub crop_padding: usize,
    /// Random-resized crop: smallest area fraction kept, e.g. 0.35 (aspect 3/4–4/3); off if 0.
    pub resized_crop_min_scale: f32,
    /// Mirror left–right with probability 1/2.
    pub hflip: bool,
    pub randaugment: Option<RandAugment>,
    /// Mixup Beta(α, α) parameter (0: off).
    pub mixup: f32,
    /// CutMix Beta(α, α) parameter (0: off). With both on, each batch picks one.
    pub cutmix: f32,
    /// Random erasing (Zhong et al. 2017, timm's `reprob`): with this probability, one
    /// rectangle of 2–33 % of the image (aspect 0.3–3.3) is filled with random pixel values
    /// (0: off).
    pub random_erasing: f32,
    /// The last this-many epochs of a run train on plain images: the horizontal flip stays,
    /// crops, RandAugment, mixup/cutmix and erasing are off, so the model ends on images like
    /// the ones it is tested on (YOLOX's "no-aug" epochs; 0: off). See [`Augment::for_epoch`].
    pub plain_last_epochs: u64,
}

impl Augment {
    /// Whether batches carry soft targets.
    pub fn mixes(&self) -> bool {
        self.mixup > 0.0 || self.cutmix > 0.0
    }

    /// What to apply in `epoch` (counted from 0) of a run of `epochs`: all of this, or only
    /// the flip in the last [`plain_last_epochs`](Augment::plain_last_epochs).
    pub fn for_epoch(&self, epoch: u64, epochs: u64) -> Augment {
        if self.plain_last_epochs > 0 && epoch.saturating_add(self.plain_last_epochs) >= epochs {
            Augment {
                hflip: self.hflip,
                ..Augment::default()
            }
        } else {
            self.clone()
        }
    }

    /// Augments one image in place.
    pub fn apply(
        &self,
        img: &mut [u8],
        (c, h, w): (usize, usize, usize),
        rng: &mut Rng,
        tmp: &mut Vec<u8>,
    ) {
        if let Some(ra) = self.randaugment {
            for _ in 0..ra.ops {
                rand_op(img, (c, h, w), rng, ra.magnitude, tmp);
            }
        }
        if self.resized_crop_min_scale > 0.0 {
            resized_crop(img, (c, h, w), rng, self.resized_crop_min_scale, tmp);
        } else if self.crop_padding > 0 {
            let p = self.crop_padding as i64;
            let (dy, dx) = (
                rng.below(2 * p as usize + 1) as i64 - p,
                rng.below(2 * p as usize + 1) as i64 - p,
            );
            warp(img, (c, h, w), tmp, |x, y| (x + dx as f32, y + dy as f32));
        }
        if self.hflip && rng.below(2) == 1 {
            for row in img.chunks_exact_mut(w) {
                row.reverse();
            }
        }
        if self.random_erasing > 0.0 && rng.uniform() < self.random_erasing as f64 {
            erase(img, (c, h, w), rng);
        }
    }

    /// Checks the values a config can get wrong; `Err` names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.resized_crop_min_scale) {
            return Err("resized_crop_min_scale must be in [0, 1) (0: off)".into());
        }
        if !(self.mixup >= 0.0 && self.cutmix >= 0.0 && (self.mixup + self.cutmix).is_finite()) {
            return Err("mixup and cutmix must be >= 0 (0: off)".into());
        }
        if !(0.0..=1.0).contains(&self.random_erasing) {
            return Err("random_erasing is a probability, in [0, 1]".into());
        }
        if let Some(ra) = self.randaugment {
            if !(0.0..=10.0).contains(&ra.magnitude) {
                return Err("randaugment magnitude must be in [0, 10]".into());
            }
        }
        Ok(())
    }
}

/// Random erasing as timm's `RandomErasing` (mode "pixel", one rectangle): area a fraction
/// 0.02–1/3 of the image, log-uniform aspect 0.3–1/0.3, up to 10 tries to fit; every erased
/// pixel of every channel gets an independent uniform random value. Leaves the image alone if
/// no rectangle fits.
fn erase(img: &mut [u8], (c, h, w): (usize, usize, usize), rng: &mut Rng) {
    let Some((y0, x0, eh, ew)) =
        sample_box((h, w), rng, (0.02, 1.0 / 3.0), (0.3, 1.0 / 0.3), true, true)
    else {
        return;
    };
    for ch in 0..c {
        for y in y0..y0 + eh {
            let row = (ch * h + y) * w;
            for px in &mut img[row + x0..row + x0 + ew] {
                *px = rng.below(256) as u8;
            }
        }
    }
}

/// A rectangle for a crop or an erasure, drawn as torchvision and timm draw theirs: up to 10
/// tries of an area (a fraction of the image, uniform in `area`) and a log-uniform aspect (in
/// `aspect`), which multiplies the height when `aspect_is_height` and the width otherwise. A box
/// fits if it is no larger than the image (`strict`: smaller on both sides). Returns
/// `(y0, x0, height, width)`, or `None` when no try fitted. The draws come in the same order
/// for both callers (area, aspect, then y0 and x0), so a seeded run is reproducible.
fn sample_box(
    (h, w): (usize, usize),
    rng: &mut Rng,
    area: (f64, f64),
    aspect: (f64, f64),
    aspect_is_height: bool,
    strict: bool,
) -> Option<(usize, usize, usize, usize)> {
    let (lo, hi) = (aspect.0.ln(), aspect.1.ln());
    for _ in 0..10 {
        let a = (h * w) as f64 * (area.0 + rng.uniform() * (area.1 - area.0));
        let r = (lo + rng.uniform() * (hi - lo)).exp();
        let (times, over) = (
            (a * r).sqrt().round() as usize,
            (a / r).sqrt().round() as usize,
        );
        let (bh, bw) = if aspect_is_height {
            (times, over)
        } else {
            (over, times)
        };
        let fits = if strict {
            bh < h && bw < w
        } else {
            bh <= h && bw <= w
        };
        if bh >= 1 && bw >= 1 && fits {
            return Some((rng.below(h - bh + 1), rng.below(w - bw + 1), bh, bw));
        }
    }
    None
}

/// Resamples every plane: output pixel (x, y) takes the input at `map(x, y)` (nearest, zero
/// outside).
fn warp(
    img: &mut [u8],
    (c, h, w): (usize, usize, usize),
    tmp: &mut Vec<u8>,
    map: impl Fn(f32, f32) -> (f32, f32),
) {
    tmp.clear();
    tmp.extend_from_slice(img);
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = map(x as f32, y as f32);
            let (sx, sy) = (sx.round(), sy.round());
            let inside = sx >= 0.0 && sy >= 0.0 && (sx as usize) < w && (sy as usize) < h;
            for ch in 0..c {
                img[(ch * h + y) * w + x] = if inside {
                    tmp[(ch * h + sy as usize) * w + sx as usize]
                } else {
                    0
                };
            }
        }
    }
}

fn resized_crop(
    img: &mut [u8],
    (c, h, w): (usize, usize, usize),
    rng: &mut Rng,
    min_scale: f32,
    tmp: &mut Vec<u8>,
) {
    // torchvision RandomResizedCrop: area fraction in [min, 1], log-uniform aspect (width over
    // height) in [3/4, 4/3].
    let min = min_scale as f64;
    let Some((y0, x0, ch, cw)) = sample_box(
        (h, w),
        rng,
        (min, 1.0),
        (3.0 / 4.0, 4.0 / 3.0),
        false,
        false,
    ) else {
        return;
    };
    let (y0, x0) = (y0 as f32, x0 as f32);
    let (sy, sx) = (ch as f32 / h as f32, cw as f32 / w as f32);
    warp(img, (c, h, w), tmp, |x, y| {
        (x0 + (x + 0.5) * sx - 0.5, y0 + (y + 0.5) * sy - 0.5)
    });
}

/// One RandAugment operation at magnitude `m` (0–10), sign chosen at random where it applies.
fn rand_op(
    img: &mut [u8],
    (c, h, w): (usize, usize, usize),
    rng: &mut Rng,
    m: f32,
    tmp: &mut Vec<u8>,
) {
    let f = (m / 10.0).clamp(0.0, 1.0);
    let sign = if rng.below(2) == 0 { -1.0 } else { 1.0 };
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let plane = h * w;
    match rng.below(12) {
        0 => {} // identity
        1 => {
            // autocontrast, per channel
            for p in img.chunks_exact_mut(plane) {
                let (lo, hi) = p
                    .iter()
                    .fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
                if hi > lo {
                    let s = 255.0 / (hi - lo) as f32;
                    p.iter_mut()
                        .for_each(|v| *v = ((*v - lo) as f32 * s).round() as u8);
                }
            }
        }
        2 => {
            // equalize, per channel
            for p in img.chunks_exact_mut(plane) {
                let mut hist = [0usize; 256];
                p.iter().for_each(|&v| hist[v as usize] += 1);
                let mut cdf = [0usize; 256];
                let mut acc = 0;
                for i in 0..256 {
                    acc += hist[i];
                    cdf[i] = acc;
                }
                let min = cdf.iter().copied().find(|&v| v > 0).unwrap_or(0);
                if plane > min {
                    let lut: Vec<u8> = cdf
                        .iter()
                        .map(|&v| ((v.saturating_sub(min)) * 255 / (plane - min)) as u8)
                        .collect();
                    p.iter_mut().for_each(|v| *v = lut[*v as usize]);
                }
            }
        }
        3 => {
            let a = sign * f * 30.0f32.to_radians();
            let (s, co) = a.sin_cos();
            warp(img, (c, h, w), tmp, |x, y| {
                let (dx, dy) = (x - cx, y - cy);
                (co * dx + s * dy + cx, -s * dx + co * dy + cy)
            });
        }
        4 => {
            let t = (256.0 - f * 256.0) as u32;
            img.iter_mut().for_each(|v| {
                if *v as u32 >= t {
                    *v = 255 - *v
                }
            });
        }
        5 => {
            let bits = 8 - (f * 4.0).round() as u32;
            let mask = (0xFFu32 << (8 - bits)) as u8;
            img.iter_mut().for_each(|v| *v &= mask);
        }
        op @ (6 | 7) => {
            // contrast (blend with the plane's mean) / brightness (blend with black)
            let k = 1.0 + sign * 0.9 * f;
            for p in img.chunks_exact_mut(plane) {
                let base = if op == 6 {
                    p.iter().map(|&v| v as f32).sum::<f32>() / plane as f32
                } else {
                    0.0
                };
                p.iter_mut().for_each(|v| {
                    *v = (base + (*v as f32 - base) * k).round().clamp(0.0, 255.0) as u8
                });
            }
        }
        8 => {
            let s = sign * 0.3 * f;
            warp(img, (c, h, w), tmp, |x, y| (x + s * (y - cy), y));
        }
        9 => {
            let s = sign * 0.3 * f;
            warp(img, (c, h, w), tmp, |x, y| (x, y + s * (x - cx)));
        }
        10 => {
            let t = sign * 0.45 * f * w as f32;
            warp(img, (c, h, w), tmp, |x, y| (x - t, y));
        }
        _ => {
            let t = sign * 0.45 * f * h as f32;
            warp(img, (c, h, w), tmp, |x, y| (x, y - t));
        }
    }
}

/// Mixes a batch in place (mixup or cutmix with the batch reversed as partner) and returns
/// the soft targets `(B, K)`.
///
/// # Shapes
/// `images (B, C, H, W)` normalised floats; `labels (B)`.
pub fn mix_batch(
    aug: &Augment,
    images: &mut [f32],
    labels: &[usize],
    k: usize,
    (c, h, w): (usize, usize, usize),
    rng: &mut Rng,
) -> Vec<f32> {
    let b = labels.len();
    let n = c * h * w;
    let use_cutmix = aug.cutmix > 0.0 && (aug.mixup <= 0.0 || rng.below(2) == 1);
    let alpha = if use_cutmix { aug.cutmix } else { aug.mixup } as f64;
    let mut lam = rng.beta(alpha, alpha) as f32;
    let orig = images.to_vec();
    if use_cutmix {
        // A box of area (1 − λ) at a random centre, clipped; λ recomputed from the clipped box.
        let r = (1.0 - lam).sqrt();
        let (bh, bw) = ((h as f32 * r) as usize, (w as f32 * r) as usize);
        let (cy, cx) = (rng.below(h), rng.below(w));
        let (y0, y1) = (cy.saturating_sub(bh / 2), (cy + bh / 2).min(h));
        let (x0, x1) = (cx.saturating_sub(bw / 2), (cx + bw / 2).min(w));
        for i in 0..b {
            let j = b - 1 - i;
            for ch in 0..c {
                for y in y0..y1 {
                    let o = ch * h * w + y * w;
                    images[i * n + o + x0..i * n + o + x1]
                        .copy_from_slice(&orig[j * n + o + x0..j * n + o + x1]);
                }
            }
        }
        lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f32 / (h * w) as f32;
    } else {
        for i in 0..b {
            let j = b - 1 - i;
            for t in 0..n {
                images[i * n + t] = lam * orig[i * n + t] + (1.0 - lam) * orig[j * n + t];
            }
        }
    }
    let mut soft = vec![0.0; b * k];
    for i in 0..b {
        soft[i * k + labels[i]] += lam;
        soft[i * k + labels[b - 1 - i]] += 1.0 - lam;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_identity_and_ops_keep_shape() {
        let (c, h, w) = (1, 8, 8);
        let orig: Vec<u8> = (0..64).map(|i| (i * 4) as u8).collect();
        let mut img = orig.clone();
        let mut tmp = vec![];
        Augment::default().apply(&mut img, (c, h, w), &mut Rng::new(1), &mut tmp);
        assert_eq!(img, orig);
        let a = Augment {
            crop_padding: 2,
            hflip: true,
            randaugment: Some(RandAugment {
                ops: 2,
                magnitude: 9.0,
            }),
            ..Default::default()
        };
        let mut changed = 0;
        for s in 0..50 {
            let mut img = orig.clone();
            a.apply(&mut img, (c, h, w), &mut Rng::new(s), &mut tmp);
            assert_eq!(img.len(), 64);
            changed += (img != orig) as usize;
        }
        assert!(changed > 40);
    }

    #[test]
    fn sample_box_fits_and_orients_its_aspect() {
        let (h, w) = (20, 30);
        for s in 0..300 {
            // A tall box (aspect 2 on the height) must come out taller than wide; the same
            // draw on the width, wider than tall. Both the size of a third of the image.
            let tall = sample_box((h, w), &mut Rng::new(s), (0.3, 0.3), (2.0, 2.0), true, true);
            let (y0, x0, bh, bw) = tall.expect("a third of the image always fits");
            assert!(bh > bw && bh < h && bw < w, "seed {s}: {bh}x{bw}");
            assert!(
                y0 + bh <= h && x0 + bw <= w,
                "seed {s}: box leaves the image"
            );
            let area = (bh * bw) as f64 / (h * w) as f64;
            assert!((area - 0.3).abs() < 0.05, "seed {s}: area {area}");
            let wide = sample_box(
                (h, w),
                &mut Rng::new(s),
                (0.3, 0.3),
                (2.0, 2.0),
                false,
                true,
            );
            let (_, _, wh, ww) = wide.expect("fits");
            assert_eq!((wh, ww), (bw, bh), "seed {s}: the same draw, turned");
        }
        // The whole image fits only when boxes may be as large as the image.
        let full = |strict| {
            sample_box(
                (h, w),
                &mut Rng::new(0),
                (1.0, 1.0),
                (1.5, 1.5),
                false,
                strict,
            )
        };
        assert_eq!(full(false), Some((0, 0, h, w)));
        assert_eq!(full(true), None);
    }

    #[test]
    fn the_last_epochs_keep_only_the_flip() {
        let a = Augment {
            crop_padding: 2,
            hflip: true,
            random_erasing: 0.25,
            mixup: 0.8,
            randaugment: Some(RandAugment {
                ops: 2,
                magnitude: 9.0,
            }),
            plain_last_epochs: 2,
            ..Default::default()
        };
        let flip_only = Augment {
            hflip: true,
            ..Default::default()
        };
        // Epochs 0..5 of 5: 3 and 4 are the last two.
        for e in 0..3 {
            assert_eq!(a.for_epoch(e, 5), a, "epoch {e}");
        }
        for e in 3..5 {
            assert_eq!(a.for_epoch(e, 5), flip_only, "epoch {e}");
        }
        assert!(!a.for_epoch(4, 5).mixes());
        // More plain epochs than the run has: all plain. Off: never.
        assert_eq!(a.for_epoch(0, 1), flip_only);
        let off = Augment {
            plain_last_epochs: 0,
            ..a.clone()
        };
        assert_eq!(off.for_epoch(4, 5), off);
        assert_eq!(a.for_epoch(0, u64::MAX), a);
    }

    #[test]
    fn random_erasing_fills_one_rectangle() {
        let (c, h, w) = (2, 28, 28);
        let a = Augment {
            random_erasing: 1.0,
            ..Default::default()
        };
        let mut tmp = vec![];
        let mut areas = vec![];
        for s in 0..200 {
            // A constant image: a pixel counts as erased where either channel changed (both
            // drawing the old value again has odds 1 in 65 536).
            let mut img = vec![7u8; c * h * w];
            a.apply(&mut img, (c, h, w), &mut Rng::new(s), &mut tmp);
            let plane = h * w;
            let changed: Vec<(usize, usize)> = (0..plane)
                .filter(|&i| img[i] != 7 || img[plane + i] != 7)
                .map(|i| (i / w, i % w))
                .collect();
            assert!(!changed.is_empty(), "seed {s}: nothing erased");
            // The erased pixels fill one rectangle (the same in both channels) ...
            let (y0, y1) = (
                changed.iter().map(|p| p.0).min().unwrap(),
                changed.iter().map(|p| p.0).max().unwrap(),
            );
            let (x0, x1) = (
                changed.iter().map(|p| p.1).min().unwrap(),
                changed.iter().map(|p| p.1).max().unwrap(),
            );
            let box_area = (y1 - y0 + 1) * (x1 - x0 + 1);
            assert!(
                changed.len() + 1 >= box_area,
                "seed {s}: {} erased pixels in a {box_area}-pixel box",
                changed.len()
            );
            areas.push(box_area as f64 / (h * w) as f64);
        }
        // ... of 2–33 % of the image (rounding moves the edges by a pixel).
        assert!(
            areas.iter().all(|&a| (0.01..=0.40).contains(&a)),
            "{areas:?}"
        );
        let mean = areas.iter().sum::<f64>() / areas.len() as f64;
        assert!((0.12..0.22).contains(&mean), "mean erased fraction {mean}");

        // Probability 0.5 erases about half of the images.
        let half = Augment {
            random_erasing: 0.5,
            ..Default::default()
        };
        let erased = (0..400)
            .filter(|&s| {
                let mut img = vec![7u8; c * h * w];
                half.apply(&mut img, (c, h, w), &mut Rng::new(s), &mut tmp);
                img.iter().any(|&p| p != 7)
            })
            .count();
        assert!(
            (160..240).contains(&erased),
            "{erased} of 400 erased at p = 0.5"
        );
        assert!(Augment {
            random_erasing: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Augment {
            mixup: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(a.validate().is_ok());
    }

    #[test]
    fn mixed_targets_are_distributions() {
        let a = Augment {
            mixup: 0.8,
            cutmix: 1.0,
            ..Default::default()
        };
        let mut imgs = vec![0.5; 4 * 3 * 4 * 4];
        for s in 0..20 {
            let soft = mix_batch(&a, &mut imgs, &[0, 1, 2, 1], 3, (3, 4, 4), &mut Rng::new(s));
            for row in soft.chunks(3) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
}
