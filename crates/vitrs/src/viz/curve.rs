//! Training curves: panels of line series against a shared x axis, saved as PNG.

use std::path::Path;

use super::canvas::{Canvas, Rgb, BLACK, GREY, WHITE};
use crate::error::Result;

/// One line: name, points (x, y), colour.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: Rgb,
}

/// One panel: a y-axis title and its lines.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

pub const BLUE: Rgb = [31, 119, 180];
pub const ORANGE: Rgb = [255, 127, 14];
pub const GREEN: Rgb = [44, 160, 44];

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.3}", v)
    }
}

/// Draws panels side by side, `x_label` under each, and writes the PNG atomically.
pub fn plot(path: &Path, x_label: &str, panels: &[Panel]) -> Result<()> {
    let (pw, ph) = (520i64, 360i64);
    let mut cv = Canvas::new(
        (pw * panels.len().max(1) as i64) as usize,
        ph as usize,
        WHITE,
    );
    for (pi, panel) in panels.iter().enumerate() {
        let ox = pi as i64 * pw;
        let (l, r, t, b) = (ox + 70, ox + pw - 20, 44i64, ph - 50);
        cv.text(ox + 70, 12, &panel.title, BLACK, 2);
        let pts: Vec<(f64, f64)> = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        if pts.is_empty() {
            cv.text(l + 10, (t + b) / 2, "no data yet", BLACK, 1);
            continue;
        }
        let (mut x0, mut x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, c), p| (a.min(p.0), c.max(p.0)));
        let (mut y0, mut y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, c), p| (a.min(p.1), c.max(p.1)));
        if x1 <= x0 {
            (x0, x1) = (x0 - 0.5, x0 + 0.5);
        }
        if y1 <= y0 {
            (y0, y1) = (y0 - 0.5, y0 + 0.5);
        }
        let pad = (y1 - y0) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
        let sx = |x: f64| l as f64 + (x - x0) / (x1 - x0) * (r - l) as f64;
        let sy = |y: f64| b as f64 - (y - y0) / (y1 - y0) * (b - t) as f64;
        // Grid and ticks: 5 on each axis.
        for i in 0..=4 {
            let f = i as f64 / 4.0;
            let (gx, gy) = (
                l + ((r - l) as f64 * f) as i64,
                b - ((b - t) as f64 * f) as i64,
            );
            cv.rect(gx, t, gx + 1, b, GREY);
            cv.rect(l, gy, r, gy + 1, GREY);
            let xl = fmt(x0 + (x1 - x0) * f);
            cv.text(gx - Canvas::text_width(&xl, 1) / 2, b + 6, &xl, BLACK, 1);
            let yl = fmt(y0 + (y1 - y0) * f);
            cv.text(l - 6 - Canvas::text_width(&yl, 1), gy - 4, &yl, BLACK, 1);
        }
        cv.rect(l, b, r, b + 1, BLACK);
        cv.rect(l, t, l + 1, b, BLACK);
        cv.text(
            (l + r) / 2 - Canvas::text_width(x_label, 1) / 2,
            b + 22,
            x_label,
            BLACK,
            1,
        );
        for (si, s) in panel.series.iter().enumerate() {
            let mut prev: Option<(f64, f64)> = None;
            for &(x, y) in s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
            {
                let p = (sx(x), sy(y));
                if let Some(q) = prev {
                    cv.line(q, p, s.color);
                } else {
                    cv.rect(
                        p.0 as i64 - 1,
                        p.1 as i64 - 1,
                        p.0 as i64 + 2,
                        p.1 as i64 + 2,
                        s.color,
                    );
                }
                prev = Some(p);
            }
            // Legend in the header band above the plot, right-aligned, so it never hides a line.
            let ly = 6 + si as i64 * 12;
            let lx = r - 10 - Canvas::text_width(&s.name, 1);
            cv.rect(lx - 16, ly + 2, lx - 4, ly + 6, s.color);
            cv.text(lx, ly, &s.name, BLACK, 1);
        }
    }
    cv.save_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_of_the_right_size() {
        let p = std::env::temp_dir().join(format!("vitrs-curve-{}.png", std::process::id()));
        let s = Series {
            name: "loss".into(),
            points: (0..50)
                .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                .collect(),
            color: BLUE,
        };
        plot(
            &p,
            "step",
            &[
                Panel {
                    title: "train loss".into(),
                    series: vec![s],
                },
                Panel {
                    title: "empty".into(),
                    series: vec![],
                },
            ],
        )
        .unwrap();
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (1040, 360));
        std::fs::remove_file(p).ok();
    }
}
