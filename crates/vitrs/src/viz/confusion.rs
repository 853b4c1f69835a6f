//! A confusion matrix as a PNG: rows are true classes, columns predictions, each cell
//! coloured by the fraction of its row, with counts written in.

use std::path::Path;

use super::canvas::{colormap, Canvas, BLACK, WHITE};
use crate::error::Result;

/// `confusion[true · K + predicted]`, `labels` by class index. The true class runs down the
/// left (its axis named "true class"), the prediction along the bottom ("predicted class"),
/// column labels turned to read upwards under their columns.
pub fn plot_confusion(
    path: &Path,
    confusion: &[u64],
    labels: &[String],
    title: &str,
) -> Result<()> {
    let k = labels.len();
    let cell = if k <= 10 {
        48i64
    } else if k <= 30 {
        24
    } else {
        10
    };
    // Labels longer than 20 characters are cut (with `~`) so the margins stay sane.
    let short: Vec<String> = labels
        .iter()
        .map(|l| match l.chars().count() {
            n if n > 20 => l.chars().take(19).chain(['~']).collect(),
            _ => l.clone(),
        })
        .collect();
    let name_w = short
        .iter()
        .map(|l| Canvas::text_width(l, 1))
        .max()
        .unwrap_or(0);
    // Left to right: the axis title (turned), the row labels, the matrix.
    let (axis, top) = (24i64, 50i64);
    let left = axis + name_w + 12;
    let bottom = top + cell * k as i64;
    let (w, h) = (
        (left + cell * k as i64 + 20).max(Canvas::text_width(title, 2) + 20),
        bottom + 8 + name_w + 30,
    );
    let mut cv = Canvas::new(w as usize, h as usize, WHITE);
    cv.text(10, 12, title, BLACK, 2);
    let y_title = "true class";
    let mid_y = (top + bottom) / 2 + Canvas::text_width(y_title, 1) / 2;
    cv.text_up(6, mid_y, y_title, BLACK, 1);
    for t in 0..k {
        let total: u64 = confusion[t * k..(t + 1) * k].iter().sum::<u64>().max(1);
        let row_y = top + t as i64 * cell + cell / 2 - 4;
        cv.text(axis, row_y, &short[t], BLACK, 1);
        for p in 0..k {
            let n = confusion[t * k + p];
            let frac = n as f64 / total as f64;
            let (x, y) = (left + p as i64 * cell, top + t as i64 * cell);
            cv.rect(x, y, x + cell - 1, y + cell - 1, colormap(frac));
            if cell >= 24 && n > 0 {
                let s = n.to_string();
                let color = if frac > 0.6 { BLACK } else { WHITE };
                cv.text(
                    x + cell / 2 - Canvas::text_width(&s, 1) / 2,
                    y + cell / 2 - 4,
                    &s,
                    color,
                    1,
                );
            }
        }
        // The column's label under it, reading upwards and ending just below the matrix.
        let x = left + t as i64 * cell + cell / 2 - 4;
        cv.text_up(
            x,
            bottom + 6 + Canvas::text_width(&short[t], 1),
            &short[t],
            BLACK,
            1,
        );
    }
    let x_title = "predicted class";
    cv.text(
        left + cell * k as i64 / 2 - Canvas::text_width(x_title, 1) / 2,
        bottom + 8 + name_w + 12,
        x_title,
        BLACK,
        1,
    );
    cv.save_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_named_and_labels_fit() {
        let labels: Vec<String> = ["T-shirt/top", "Trouser", "a label far longer than twenty"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = std::env::temp_dir().join(format!("vitrs-confusion-{}.png", std::process::id()));
        plot_confusion(&p, &[5, 1, 0, 2, 7, 1, 0, 0, 9], &labels, "test").unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        std::fs::remove_file(&p).ok();
        // The longest label is cut to 20 characters: 160 px of row labels, and the same height
        // of turned column labels under the 3 × 48 px matrix, then the x-axis title.
        let (left, bottom) = (24 + 160 + 12, 50 + 3 * 48);
        assert_eq!(img.height() as i64, bottom + 8 + 160 + 30);
        assert_eq!(img.width() as i64, left + 3 * 48 + 20);
        // Ink left of the row labels (the turned "true class") and under the column labels
        // (the "predicted class" title).
        let ink = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1).any(|x| (y0..y1).any(|y| img.get_pixel(x, y).0 == [0, 0, 0]))
        };
        assert!(ink(0, 20, 50, bottom as u32), "no y-axis title");
        let ty = (bottom + 8 + 160) as u32;
        assert!(
            ink(left as u32, img.width(), ty, ty + 20),
            "no x-axis title"
        );
    }
}
