//! Attention maps drawn over their images: the map is upsampled (bilinear) from the patch grid
//! to the image, coloured on the canvas colour scale and alpha-blended onto the image, shown
//! beside the original; one row per image, a colour bar at the bottom.

use std::path::Path;

use super::canvas::{colormap, Canvas, Rgb, BLACK, WHITE};
use crate::error::Result;

/// An RGB image, row-major `(h, w, 3)`.
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub w: usize,
    pub h: usize,
    pub px: Vec<u8>,
}

impl RgbImage {
    /// From the model's input pixels `(C, H, W)` as u8 (1 channel → grey, 3 → RGB).
    pub fn from_planes(planes: &[u8], (c, h, w): (usize, usize, usize)) -> Self {
        let mut px = Vec::with_capacity(h * w * 3);
        for i in 0..h * w {
            for ch in 0..3 {
                px.push(planes[(ch % c.max(1)) * h * w + i]);
            }
        }
        RgbImage { w, h, px }
    }

    /// Enlarged by an integer factor (nearest neighbour: small images stay crisp).
    pub fn scaled(&self, s: usize) -> Self {
        let (w, h) = (self.w * s, self.h * s);
        let mut px = vec![0; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let src = ((y / s) * self.w + x / s) * 3;
                px[(y * w + x) * 3..][..3].copy_from_slice(&self.px[src..src + 3]);
            }
        }
        RgbImage { w, h, px }
    }

    /// The image as PNG bytes (for a web page: a server returns overlays inline).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_raw(self.w as u32, self.h as u32, self.px.clone())
            .ok_or_else(|| crate::Error::BadInput("image size does not match its pixels".into()))?
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| crate::Error::Image {
                path: "overlay.png".into(),
                reason: e.to_string(),
            })?;
        Ok(out.into_inner())
    }
}

/// `map (gh, gw)` in [0, 1] resampled to `(h, w)`: bilinear, grid cells centred on their patches.
pub fn upsample(map: &[f32], (gh, gw): (usize, usize), (h, w): (usize, usize)) -> Vec<f32> {
    let coord = |o: usize, out: usize, grid: usize| {
        let g = ((o as f64 + 0.5) * grid as f64 / out as f64 - 0.5).clamp(0.0, (grid - 1) as f64);
        let i0 = g.floor() as usize;
        (i0, (i0 + 1).min(grid - 1), g - i0 as f64)
    };
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let (y0, y1, fy) = coord(y, h, gh);
        for x in 0..w {
            let (x0, x1, fx) = coord(x, w, gw);
            let at = |r: usize, c: usize| map[r * gw + c] as f64;
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bot = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            out.push((top * (1.0 - fy) + bot * fy) as f32);
        }
    }
    out
}

/// `img` with `map` (values in [0, 1], grid `(gh, gw)`) blended on top at `alpha`.
pub fn overlay(img: &RgbImage, map: &[f32], grid: (usize, usize), alpha: f32) -> RgbImage {
    let up = upsample(map, grid, (img.h, img.w));
    let mut px = img.px.clone();
    for (i, &v) in up.iter().enumerate() {
        let c = colormap(v as f64);
        for ch in 0..3 {
            let p = &mut px[i * 3 + ch];
            *p = ((1.0 - alpha) * *p as f32 + alpha * c[ch] as f32).round() as u8;
        }
    }
    RgbImage {
        w: img.w,
        h: img.h,
        px,
    }
}

/// One row of the figure: a label and its panels (each with a caption).
pub struct Row {
    pub label: String,
    pub panels: Vec<(String, RgbImage)>,
}

fn blit(cv: &mut Canvas, x0: i64, y0: i64, img: &RgbImage) {
    for y in 0..img.h {
        for x in 0..img.w {
            let i = (y * img.w + x) * 3;
            let c: Rgb = [img.px[i], img.px[i + 1], img.px[i + 2]];
            cv.set(x0 + x as i64, y0 + y as i64, c);
        }
    }
}

/// Draws `rows` (panels of equal size within a row) with a title, captions and a colour bar
/// ("low → high attention") and writes a PNG.
pub fn plot_rows(path: &Path, title: &str, rows: &[Row]) -> Result<()> {
    let pad = 12i64;
    let caption = 14i64;
    let label_h = 16i64;
    let width = rows
        .iter()
        .map(|r| r.panels.iter().map(|(_, p)| p.w as i64 + pad).sum::<i64>() + pad)
        .max()
        .unwrap_or(200)
        .max(Canvas::text_width(title, 1) + 2 * pad)
        .max(320);
    let row_h = |r: &Row| {
        label_h + caption + r.panels.iter().map(|(_, p)| p.h as i64).max().unwrap_or(0) + pad
    };
    let bar_h = 40i64;
    let height = 30 + rows.iter().map(row_h).sum::<i64>() + bar_h + pad;
    let mut cv = Canvas::new(width as usize, height as usize, WHITE);
    cv.text(pad, 10, title, BLACK, 1);
    let mut y = 30i64;
    for r in rows {
        cv.text(pad, y, &r.label, BLACK, 1);
        let mut x = pad;
        for (cap, img) in &r.panels {
            cv.text(x, y + label_h, cap, BLACK, 1);
            blit(&mut cv, x, y + label_h + caption, img);
            x += img.w as i64 + pad;
        }
        y += row_h(r);
    }
    // Colour bar.
    let (bx, bw) = (pad + 40, (width - 2 * pad - 80).max(40));
    for i in 0..bw {
        let c = colormap(i as f64 / (bw - 1).max(1) as f64);
        cv.rect(bx + i, y, bx + i + 1, y + 12, c);
    }
    cv.text(pad, y + 2, "low", BLACK, 1);
    cv.text(bx + bw + 6, y + 2, "high", BLACK, 1);
    cv.text(
        bx,
        y + 18,
        "attention (each map scaled to its own range)",
        BLACK,
        1,
    );
    cv.save_png(path)
}

/// A scatter of mean attention distance (pixels) per head against layer — the paper's Fig. 7.
/// `dist` is `(L, nh)` row-major.
pub fn plot_distance(
    path: &Path,
    title: &str,
    dist: &[f64],
    (layers, heads): (usize, usize),
    image_px: f64,
) -> Result<()> {
    let (w, h) = (560i64, 400i64);
    let (left, right, top, bottom) = (64i64, 20i64, 40i64, 50i64);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut cv = Canvas::new(w as usize, h as usize, WHITE);
    cv.text(left, 12, title, BLACK, 1);
    let ymax = dist
        .iter()
        .copied()
        .fold(0.0f64, f64::max)
        .max(image_px * 0.05);
    let ymax = (ymax * 1.1).max(1.0);
    let axis: Rgb = [120, 120, 120];
    cv.line(
        (left as f64, (top + ph) as f64),
        ((left + pw) as f64, (top + ph) as f64),
        axis,
    );
    cv.line(
        (left as f64, top as f64),
        (left as f64, (top + ph) as f64),
        axis,
    );
    for t in 0..=4 {
        let v = ymax * t as f64 / 4.0;
        let yy = top + ph - (ph as f64 * t as f64 / 4.0) as i64;
        cv.text(8, yy - 4, &format!("{v:5.1}"), BLACK, 1);
        cv.rect(left - 4, yy, left, yy + 1, axis);
    }
    let xs = |l: usize| left + ((l as f64 + 0.5) / layers as f64 * pw as f64) as i64;
    for l in 0..layers {
        cv.text(xs(l) - 4, top + ph + 8, &format!("{}", l + 1), BLACK, 1);
        for hd in 0..heads {
            let v = dist[l * heads + hd];
            let yy = top + ph - (v / ymax * ph as f64) as i64;
            let c = colormap(hd as f64 / (heads.max(2) - 1) as f64 * 0.9);
            cv.rect(xs(l) - 3, yy - 3, xs(l) + 4, yy + 4, c);
        }
    }
    cv.text(
        left + pw / 2 - 60,
        h - 22,
        "network depth (layer)",
        BLACK,
        1,
    );
    cv.text(8, top - 16, "mean attention distance (px)", BLACK, 1);
    cv.save_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsample_keeps_constant_maps_and_corners() {
        let up = upsample(&[0.3; 6], (2, 3), (8, 12));
        assert!(up.iter().all(|&v| (v - 0.3).abs() < 1e-6));
        let up = upsample(&[0.0, 1.0, 0.0, 1.0], (2, 2), (4, 4));
        // Cell centres at pixel 1 and 3 (of 4): pixel 0 clamps to the first column.
        assert_eq!(up[0], 0.0);
        assert_eq!(up[3], 1.0);
        assert!((up[1] - 0.25).abs() < 1e-6 && (up[2] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn overlay_blends_and_figure_writes() {
        let img = RgbImage::from_planes(&[0u8, 255, 255, 0], (1, 2, 2));
        assert_eq!(&img.px[..6], &[0, 0, 0, 255, 255, 255]);
        let big = img.scaled(3);
        assert_eq!((big.w, big.h), (6, 6));
        let o = overlay(&big, &[1.0], (1, 1), 0.5);
        let top = colormap(1.0);
        assert_eq!(o.px[0], (0.5 * top[0] as f32).round() as u8);
        let dir = std::env::temp_dir().join(format!("vitrs-heatmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rows.png");
        let rows = vec![Row {
            label: "x.png: class 3".into(),
            panels: vec![("image".into(), big.clone()), ("mean".into(), o)],
        }];
        plot_rows(&path, "attention", &rows).unwrap();
        let back = image::open(&path).unwrap();
        assert!(back.width() >= 320);
        plot_distance(
            &dir.join("d.png"),
            "distance",
            &[1.0, 2.0, 3.0, 4.0],
            (2, 2),
            28.0,
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
