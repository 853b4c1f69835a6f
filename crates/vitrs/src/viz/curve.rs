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

/// Axis ticks at round numbers, as plotting libraries place them: about `target` ticks, `step`
/// 1, 2, 2.5 or 5 times a power of ten, and the axis widened to the multiples of `step` around
/// `[lo, hi]`. Returns `(first, last, step)`; the ticks are `first, first + step, … last`.
pub(crate) fn nice_ticks(lo: f64, hi: f64, target: usize) -> (f64, f64, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / target.max(2) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    // Snap to the step's multiples; the small slack keeps an exact multiple where it is.
    let first = (lo / step + 1e-9).floor() * step;
    let last = (hi / step - 1e-9).ceil() * step;
    (first, last.max(first + step), step)
}

/// A tick label with as many decimals as the step needs (0.5 -> 1, 0.25 -> 2, 2000 -> 0).
fn tick_label(v: f64, step: f64) -> String {
    let mut decimals = 0usize;
    while decimals < 6 {
        let scaled = step * 10f64.powi(decimals as i32);
        if (scaled.round() - scaled).abs() < 1e-6 {
            break;
        }
        decimals += 1;
    }
    // -0.0 prints as 0.
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    format!("{v:.decimals$}")
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
        // Axes from round number to round number, a grid line and label at each tick.
        let (x0, x1, xstep) = nice_ticks(x0, x1, 5);
        let (y0, y1, ystep) = nice_ticks(y0, y1, 5);
        let sx = |x: f64| l as f64 + (x - x0) / (x1 - x0) * (r - l) as f64;
        let sy = |y: f64| b as f64 - (y - y0) / (y1 - y0) * (b - t) as f64;
        let ticks = |first: f64, last: f64, step: f64| {
            let n = ((last - first) / step).round() as i64;
            (0..=n).map(move |i| first + i as f64 * step)
        };
        for x in ticks(x0, x1, xstep) {
            let gx = sx(x).round() as i64;
            cv.rect(gx, t, gx + 1, b, GREY);
            let xl = tick_label(x, xstep);
            cv.text(gx - Canvas::text_width(&xl, 1) / 2, b + 6, &xl, BLACK, 1);
        }
        for y in ticks(y0, y1, ystep) {
            let gy = sy(y).round() as i64;
            cv.rect(l, gy, r, gy + 1, GREY);
            let yl = tick_label(y, ystep);
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
    fn ticks_sit_at_round_numbers() {
        let close = |got: (f64, f64, f64), want: (f64, f64, f64)| {
            let d = [got.0 - want.0, got.1 - want.1, got.2 - want.2];
            assert!(
                d.iter().all(|d| d.abs() < 1e-9 * want.1.abs().max(1.0)),
                "{got:?} vs {want:?}"
            );
        };
        // What training curves span: a loss, an accuracy, a step count, a learning rate.
        close(nice_ticks(0.045, 0.589, 5), (0.0, 0.6, 0.2));
        close(nice_ticks(0.0, 1.0, 5), (0.0, 1.0, 0.2));
        close(nice_ticks(0.0, 7329.0, 5), (0.0, 8000.0, 2000.0));
        close(nice_ticks(100.0, 9360.0, 4), (0.0, 10_000.0, 2500.0));
        close(nice_ticks(1.7e-5, 2.9e-3, 5), (0.0, 3e-3, 1e-3));
        // Every tick is an integer multiple of a step of 1, 2, 2.5 or 5 times a power of ten.
        for (lo, hi) in [(0.123, 0.987), (3.0, 3.5), (-2.2, 7.9), (17.0, 731.0)] {
            let (first, last, step) = nice_ticks(lo, hi, 5);
            assert!(first <= lo && last >= hi, "{lo}..{hi}: {first}..{last}");
            let m = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 2.5, 5.0].iter().any(|k| (m - k).abs() < 1e-9),
                "step {step}"
            );
            assert!(((first / step).round() - first / step).abs() < 1e-9);
        }
        assert_eq!(tick_label(0.6000000001, 0.2), "0.6");
        assert_eq!(tick_label(2500.0, 2500.0), "2500");
        assert_eq!(tick_label(-1e-17, 0.25), "0.00");
    }

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
