//! Training progress on stderr: on a terminal, one bar that redraws in place and is cut to the
//! terminal's width (indicatif); otherwise (a log file, CI) one full line per report.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vitrs::train::{EvalResult, Hooks, Progress};

/// The [`Hooks`] every training command reports through.
pub(crate) struct Bar {
    /// The live bar, on a terminal only.
    live: Option<ProgressBar>,
    /// What the evaluations run on ("test split", "validation split (...)", ...).
    pub(crate) eval_source: String,
}

fn hms(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One report as text, most useful first (a narrow terminal cuts the end off): where the run
/// is, how it is doing, when it ends, then the details.
pub(crate) fn status(p: &Progress) -> String {
    let acc = if p.accuracy.is_finite() {
        format!("{:.1}%", 100.0 * p.accuracy)
    } else {
        "-".into()
    };
    format!(
        "epoch {}/{} loss {:.4} acc {acc} ETA {} {:.0} img/s | step {}/{} lr {:.2e} elapsed {}",
        p.epoch + 1,
        p.epochs,
        p.loss,
        hms(p.eta_s),
        p.images_per_sec,
        p.step,
        p.total_steps,
        p.lr,
        hms(p.elapsed_s)
    )
}

impl Bar {
    pub(crate) fn new() -> Self {
        let live = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            // `wide_msg` takes the width the bar leaves and cuts the message to it.
            if let Ok(style) = ProgressStyle::with_template("[{bar:20}] {wide_msg}") {
                bar.set_style(style.progress_chars("#>."));
            }
            bar
        });
        Bar {
            live,
            eval_source: "evaluation set".into(),
        }
    }

    /// Prints a line above the bar (or just a line).
    fn line(&self, msg: &str) {
        match &self.live {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Leaves the bar's last state on screen.
    pub(crate) fn finish(&self) {
        if let Some(b) = &self.live {
            b.abandon();
        }
    }
}

impl Hooks for Bar {
    fn progress(&mut self, p: &Progress) {
        let msg = status(p);
        match &self.live {
            Some(b) => {
                b.set_length(p.total_steps.max(1));
                b.set_position(p.step);
                b.set_message(msg);
            }
            None => {
                let filled = (20 * p.step / p.total_steps.max(1)).min(20) as usize;
                eprintln!("[{}{}] {msg}", "#".repeat(filled), ".".repeat(20 - filled));
            }
        }
    }

    fn evaluated(&mut self, epoch: u64, r: &EvalResult) {
        self.line(&format!(
            "epoch {epoch}: top-1 {:.2}% top-5 {:.2}% loss {:.4} on the {} ({} images)",
            100.0 * r.top1,
            100.0 * r.top5,
            r.loss,
            self.eval_source,
            r.n
        ));
    }

    fn note(&mut self, msg: &str) {
        self.line(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_leads_with_what_a_narrow_terminal_must_show() {
        let p = Progress {
            step: 1234,
            total_steps: 9360,
            epoch: 2,
            epochs: 20,
            loss: 0.41234,
            accuracy: 0.853,
            lr: 2.5e-3,
            images_per_sec: 797.2,
            elapsed_s: 190.0,
            eta_s: 1234.0,
        };
        let s = status(&p);
        // What an 80-column terminal keeps once the 22-column bar is drawn.
        let kept: String = s.chars().take(80 - 23).collect();
        for part in ["epoch 3/20", "loss 0.4123", "acc 85.3%", "ETA 0:20:34"] {
            assert!(
                kept.contains(part),
                "`{part}` not in the first columns: {kept}"
            );
        }
        assert!(
            s.contains("step 1234/9360") && s.contains("797 img/s"),
            "{s}"
        );
    }
}
