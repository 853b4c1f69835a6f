//! Preprocessing bound to a checkpoint: how an image file becomes the model's input tensor.
//!
//! Two recipes cover the checkpoints people have, both reproduced from their sources:
//! - Hugging Face `ViTImageProcessor`: resize straight to the model size (aspect not kept),
//!   rescale by 1/255, normalise with the file's mean and std.
//! - timm's eval transform: resize the shorter side to `size / crop_pct` (keeping the aspect),
//!   centre-crop to the model size, scale to [0, 1], normalise.
//!
//! Resampling follows Pillow's algorithm (which both libraries call): separable, antialiased
//! (the filter widens when shrinking), rounded to 8 bits after each pass.

use std::path::Path;

use image::{DynamicImage, ImageReader, Limits};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::resample::Interpolation;
use crate::resample::{resize_planes, Planes};
use crate::tensor::Tensor;

/// Largest image side we decode, and the decoder's allocation cap: a header claiming
/// 100 000 × 100 000 pixels is refused before any memory is taken, and so is a 573-byte GIF
/// claiming 13 361 × 13 364 (found by `vitrs-fuzz`: it decoded to 714 MB under a 1 GiB cap).
/// 256 MiB still takes a 64-megapixel photo in RGBA.
const MAX_SIDE: u32 = 16_384;
const MAX_DECODE_BYTES: u64 = 256 << 20;
/// Largest intermediate image (pixels) the shorter-side resize may produce.
const MAX_RESIZED_PIXELS: usize = 1 << 26;

/// How the image is brought to the model size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resize {
    /// Straight to H×W (Hugging Face `ViTImageProcessor`).
    Exact,
    /// Shorter side to size / crop_pct, then centre crop to H×W (timm eval transform).
    ShorterThenCrop { crop_pct: f32 },
}

/// The full recipe; stored in native checkpoints next to the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub height: usize,
    pub width: usize,
    /// 1 (grayscale, Pillow's `L` conversion) or 3 (RGB).
    pub channels: usize,
    pub resize: Resize,
    pub interpolation: Interpolation,
    /// Pixel values are multiplied by this first (1/255 everywhere in practice).
    pub rescale: f32,
    /// Per-channel mean and std, applied after rescaling.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Preprocess {
    /// Resize to exactly the model size (bilinear), then scale to [-1, 1] (mean = std = 0.5):
    /// Hugging Face `ViTImageProcessor`'s defaults, and the inputs Google's JAX ViTs were
    /// trained on.
    pub fn resize_to_unit_range(height: usize, width: usize, channels: usize) -> Self {
        Preprocess {
            height,
            width,
            channels,
            resize: Resize::Exact,
            interpolation: Interpolation::Bilinear,
            rescale: 1.0 / 255.0,
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
        }
    }

    /// timm's defaults for a model of this size: bicubic, crop_pct 0.9, ImageNet mean/std
    /// (timm `IMAGENET_DEFAULT_MEAN/STD`; one channel gets their average).
    pub fn timm_default(height: usize, width: usize, channels: usize) -> Self {
        let (mean, std) = if channels == 3 {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        } else {
            (vec![0.449; channels], vec![0.226; channels])
        };
        Preprocess {
            height,
            width,
            channels,
            resize: Resize::ShorterThenCrop { crop_pct: 0.9 },
            interpolation: Interpolation::Bicubic,
            rescale: 1.0 / 255.0,
            mean,
            std,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("preprocessing: {m}")));
        if !(self.channels == 1 || self.channels == 3) {
            return bad(format!(
                "{} input channels; images give 1 or 3",
                self.channels
            ));
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return bad(format!(
                "mean/std have {}/{} values for {} channels",
                self.mean.len(),
                self.std.len(),
                self.channels
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s != 0.0)) {
            return bad("std must be finite and non-zero".into());
        }
        if let Resize::ShorterThenCrop { crop_pct } = self.resize {
            if !(crop_pct > 0.05 && crop_pct <= 4.0) {
                return bad(format!("crop_pct {crop_pct} is outside (0.05, 4]"));
            }
        }
        if self.height == 0 || self.width == 0 {
            return bad("zero image size".into());
        }
        Ok(())
    }

    /// Turns a decoded image into a `(C, H, W)` tensor.
    pub fn apply(&self, img: &DynamicImage) -> Result<Tensor> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::BadInput(
                "the image has no pixels (zero width or height)".into(),
            ));
        }
        let mut planes = to_planes(img, self.channels);
        let (th, tw) = (self.height, self.width);
        match self.resize {
            Resize::Exact => {
                planes = resize_planes(&planes, th, tw, self.interpolation, true);
            }
            Resize::ShorterThenCrop { crop_pct } => {
                let (h, w) = (planes.h, planes.w);
                let (sh, sw) = (
                    (th as f64 / crop_pct as f64).floor() as usize,
                    (tw as f64 / crop_pct as f64).floor() as usize,
                );
                let (nh, nw) = if sh == sw {
                    // torchvision Resize(int): shorter side to `sh`, longer truncated.
                    if h <= w {
                        (sh, (sh as f64 * w as f64 / h as f64) as usize)
                    } else {
                        ((sh as f64 * h as f64 / w as f64) as usize, sh)
                    }
                } else {
                    // timm ResizeKeepRatio: scale by the smaller of the two ratios.
                    let r = (h as f64 / sh as f64).min(w as f64 / sw as f64);
                    (
                        (h as f64 / r).round() as usize,
                        (w as f64 / r).round() as usize,
                    )
                };
                // An extreme aspect ratio would blow the long side up (1 x 16384 -> 224 x 3.7M).
                if nh.saturating_mul(nw) > MAX_RESIZED_PIXELS {
                    return Err(Error::BadInput(format!(
                        "a {w}x{h} image resized to {nw}x{nh} for a {tw}x{th} crop is too large; crop it to a less extreme aspect ratio first"
                    )));
                }
                planes = resize_planes(&planes, nh.max(1), nw.max(1), self.interpolation, true);
                planes = center_crop(&planes, th, tw);
            }
        }
        let Planes { c, h, w, mut data } = planes;
        for ch in 0..c {
            let (m, s) = (self.mean[ch], self.std[ch]);
            for v in &mut data[ch * h * w..(ch + 1) * h * w] {
                *v = (*v * self.rescale - m) / s;
            }
        }
        Tensor::new(vec![c, h, w], data)
    }

    /// Reads an input file as a batch `(B, C, H, W)`: an image (decoded and preprocessed) or a
    /// `.npy` array `(C, H, W)` / `(B, C, H, W)` taken as already preprocessed.
    pub fn load(&self, path: &Path) -> Result<Tensor> {
        let is_npy = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
        if is_npy {
            let t = crate::npy::read_npy(path)?;
            let want = [self.channels, self.height, self.width];
            let shape = t.shape().to_vec();
            let ok = match shape.len() {
                3 => shape[..] == want,
                4 => shape[1..] == want && shape[0] > 0,
                _ => false,
            };
            if !ok {
                return Err(Error::BadInput(format!(
                    "{}: array has shape {shape:?}, the model takes (C, H, W) = {want:?} or (B, C, H, W)",
                    path.display()
                )));
            }
            let b = if shape.len() == 4 { shape[0] } else { 1 };
            return t.reshape(vec![b, want[0], want[1], want[2]]);
        }
        self.batch_of_one(&load_image(path)?)
    }

    /// An image held in memory (an upload) as a batch `(1, C, H, W)`; `what` names it in
    /// errors, which are the ones [`Self::load`] gives for a file.
    pub fn load_bytes(&self, what: &Path, bytes: &[u8]) -> Result<Tensor> {
        self.batch_of_one(&decode_image_bytes(what, bytes)?)
    }

    fn batch_of_one(&self, img: &DynamicImage) -> Result<Tensor> {
        let t = self.apply(img)?;
        let s = t.shape().to_vec();
        t.reshape(vec![1, s[0], s[1], s[2]])
    }
}

/// An image as 8-bit planes `(C, H, W)` at `h × w`: shorter side resized to fit (bilinear,
/// antialiased), then centre-cropped. Used to store training images at the model size.
pub fn image_to_u8(img: &DynamicImage, channels: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::BadInput(
            "the image has no pixels (zero width or height)".into(),
        ));
    }
    let planes = to_planes(img, channels);
    let r = (planes.h as f64 / h as f64).min(planes.w as f64 / w as f64);
    let (nh, nw) = (
        ((planes.h as f64 / r).round() as usize).max(h),
        ((planes.w as f64 / r).round() as usize).max(w),
    );
    if nh.saturating_mul(nw) > MAX_RESIZED_PIXELS {
        return Err(Error::BadInput(format!(
            "a {}x{} image is too elongated to resize to {w}x{h}",
            planes.w, planes.h
        )));
    }
    let resized = resize_planes(&planes, nh, nw, Interpolation::Bilinear, true);
    Ok(center_crop(&resized, h, w)
        .data
        .iter()
        .map(|&v| v as u8)
        .collect())
}

/// Writes 8-bit grayscale pixels `(H, W)` as a PNG.
pub fn save_gray_png(path: &Path, px: &[u8], h: usize, w: usize) -> Result<()> {
    let img = image::GrayImage::from_raw(w as u32, h as u32, px.to_vec()).ok_or_else(|| {
        Error::BadInput(format!("{} pixels do not make a {h}x{w} image", px.len()))
    })?;
    img.save(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Decodes an image file (PNG, JPEG, GIF's first frame, BMP) with size limits.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    decode(reader, path)
}

/// [`load_image`] of an image held in memory (an upload); `what` names it in errors.
pub fn decode_image_bytes(what: &Path, bytes: &[u8]) -> Result<DynamicImage> {
    decode(ImageReader::new(std::io::Cursor::new(bytes)), what)
}

/// Decodes with the format guessed from the content and the size limits that stop a
/// decompression bomb before it allocates.
fn decode<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    path: &Path,
) -> Result<DynamicImage> {
    let err = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader = reader
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(err(NOT_AN_IMAGE.into()));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader.decode().map_err(|e| err(e.to_string()))
}

/// What an input whose bytes name no image format is told.
pub const NOT_AN_IMAGE: &str =
    "not a recognised image format (PNG, JPEG, GIF, BMP) or a .npy array";

/// Converts to planes with values 0..=255: 1 (Pillow `L`: ITU-R 601-2 luma) or 3 (RGB, alpha dropped) planes.
fn to_planes(img: &DynamicImage, channels: usize) -> Planes {
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let px = rgb.as_raw();
    let mut data = vec![0.0f32; channels * h * w];
    if channels == 1 {
        let gray_src = matches!(
            img,
            DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_)
        );
        for i in 0..h * w {
            let (r, g, b) = (px[3 * i] as u32, px[3 * i + 1] as u32, px[3 * i + 2] as u32);
            data[i] = if gray_src {
                r as f32
            } else {
                // Pillow: L = (R*299 + G*587 + B*114) / 1000, rounded.
                ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as f32
            };
        }
    } else {
        for i in 0..h * w {
            for ch in 0..3 {
                data[ch * h * w + i] = px[3 * i + ch] as f32;
            }
        }
    }
    Planes {
        c: channels,
        h,
        w,
        data,
    }
}

/// torchvision `CenterCrop`: offsets `round((size − crop) / 2)` (ties to even, as Python's
/// `round`), zero padding where the image is smaller than the crop.
fn center_crop(src: &Planes, th: usize, tw: usize) -> Planes {
    let off = |size: usize, t: usize| ((size as f64 - t as f64) / 2.0).round_ties_even() as i64;
    let (oy, ox) = (off(src.h, th), off(src.w, tw));
    let mut data = vec![0.0; src.c * th * tw];
    for ch in 0..src.c {
        for y in 0..th {
            let sy = y as i64 + oy;
            if sy < 0 || sy >= src.h as i64 {
                continue;
            }
            for x in 0..tw {
                let sx = x as i64 + ox;
                if sx >= 0 && sx < src.w as i64 {
                    data[(ch * th + y) * tw + x] =
                        src.data[(ch * src.h + sy as usize) * src.w + sx as usize];
                }
            }
        }
    }
    Planes {
        c: src.c,
        h: th,
        w: tw,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planes(h: usize, w: usize) -> Planes {
        let data = (0..h * w).map(|i| ((i * 37) % 256) as f32).collect();
        Planes { c: 1, h, w, data }
    }

    #[test]
    fn degenerate_images_are_errors_not_allocations() {
        let p = Preprocess::timm_default(224, 224, 3);
        let thin = DynamicImage::new_rgb8(1, 16_384);
        assert!(p
            .apply(&thin)
            .unwrap_err()
            .to_string()
            .contains("aspect ratio"));
        let fine = DynamicImage::new_rgb8(300, 200);
        assert_eq!(p.apply(&fine).unwrap().shape(), &[3, 224, 224]);
    }

    #[test]
    fn center_crop_takes_the_middle() {
        let p = planes(6, 8);
        let c = center_crop(&p, 2, 4);
        assert_eq!(c.data[0], p.data[2 * 8 + 2]);
    }
}
