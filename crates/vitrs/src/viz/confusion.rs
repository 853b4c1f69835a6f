//! A confusion matrix as a PNG: rows are true classes, columns predictions, each cell
//! coloured by the fraction of its row, with counts written in.

use std::path::Path;

use super::canvas::{colormap, Canvas, BLACK, WHITE};
use crate::error::Result;

/// `confusion[true · K + predicted]`, `labels` by class index.
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
    let name_w = labels
        .iter()
        .map(|l| Canvas::text_width(l, 1))
        .max()
        .unwrap_or(0)
        .min(160)
        + 12;
    let (left, top) = (name_w + 20, 50i64);
    let (w, h) = (
        left + cell * k as i64 + 20,
        top + cell * k as i64 + name_w + 20,
    );
    let mut cv = Canvas::new(w as usize, h as usize, WHITE);
    cv.text(10, 12, title, BLACK, 2);
    for t in 0..k {
        let total: u64 = confusion[t * k..(t + 1) * k].iter().sum::<u64>().max(1);
        cv.text(
            10,
            top + t as i64 * cell + cell / 2 - 4,
            &labels[t].chars().take(20).collect::<String>(),
            BLACK,
            1,
        );
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
        // Column labels, written downwards character by character under the matrix.
        let x = left + t as i64 * cell + cell / 2 - 4;
        for (i, ch) in labels[t]
            .chars()
            .take(((name_w - 12) / 8) as usize)
            .enumerate()
        {
            cv.text(
                x,
                top + cell * k as i64 + 6 + i as i64 * 9,
                &ch.to_string(),
                BLACK,
                1,
            );
        }
    }
    cv.save_png(path)
}
