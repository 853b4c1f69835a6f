//! A minimal RGB canvas: pixels, lines, rectangles and 8×8 bitmap text.

use std::path::Path;

use crate::error::{Error, Result};

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [200, 200, 200];

pub struct Canvas {
    pub w: usize,
    pub h: usize,
    px: Vec<u8>,
}

impl Canvas {
    pub fn new(w: usize, h: usize, bg: Rgb) -> Self {
        Canvas {
            w,
            h,
            px: bg.iter().copied().cycle().take(w * h * 3).collect(),
        }
    }

    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, c);
            }
        }
    }

    /// A line of width ~2 px (Bresenham, doubled).
    pub fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            self.set(x.round() as i64, y.round() as i64, c);
            self.set(x.round() as i64, y.round() as i64 + 1, c);
        }
    }

    /// Text with its top-left corner at (x, y); `scale` enlarges each font pixel.
    pub fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        self.glyphs(s, scale, c, |gx, gy| (x + gx, y + gy));
    }

    /// Text turned 90° anticlockwise, read from bottom to top (the way axis labels under a
    /// matrix are written), its first character's bottom-left corner at (x, y).
    pub fn text_up(&mut self, x: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        self.glyphs(s, scale, c, |gx, gy| (x + gy, y - gx - scale));
    }

    /// Draws `s` glyph pixel by glyph pixel; `place` maps a pixel's offset along and across the
    /// line of text to the canvas.
    fn glyphs(&mut self, s: &str, scale: i64, c: Rgb, place: impl Fn(i64, i64) -> (i64, i64)) {
        for (i, ch) in s.chars().enumerate() {
            // The public-domain 8×8 font's ASCII table; anything else is drawn as '?'.
            let code = if (ch as u32) < 128 {
                ch as usize
            } else {
                b'?' as usize
            };
            let glyph = font8x8::legacy::BASIC_LEGACY[code];
            for (gy, row) in glyph.iter().enumerate() {
                for gx in 0..8 {
                    if row & (1 << gx) != 0 {
                        let (px, py) = place((i as i64 * 8 + gx) * scale, gy as i64 * scale);
                        self.rect(px, py, px + scale, py + scale, c);
                    }
                }
            }
        }
    }

    /// Width in pixels of `s` at `scale`.
    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 8 * scale
    }

    pub fn save_png(&self, path: &Path) -> Result<()> {
        let img = image::RgbImage::from_raw(self.w as u32, self.h as u32, self.px.clone())
            .ok_or_else(|| Error::BadInput("canvas size does not match its pixels".into()))?;
        let tmp = path.with_extension("png.tmp");
        img.save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(|e| Error::Image {
                path: tmp.clone(),
                reason: e.to_string(),
            })?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// A colour from a value in [0, 1] on a perceptually ordered scale (dark blue → yellow,
/// a short approximation of viridis).
pub fn colormap(t: f64) -> Rgb {
    const STOPS: [(f64, Rgb); 5] = [
        (0.0, [68, 1, 84]),
        (0.25, [59, 82, 139]),
        (0.5, [33, 145, 140]),
        (0.75, [94, 201, 98]),
        (1.0, [253, 231, 37]),
    ];
    let t = t.clamp(0.0, 1.0);
    for w in STOPS.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if t <= b {
            let f = (t - a) / (b - a);
            return [0, 1, 2]
                .map(|i| (ca[i] as f64 + (cb[i] as f64 - ca[i] as f64) * f).round() as u8);
        }
    }
    STOPS[4].1
}
