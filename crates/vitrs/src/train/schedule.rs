//! Learning-rate schedules as pure functions of the step: linear warm-up from 0, then cosine
//! or linear decay to `min_lr`, or constant.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// The schedule of a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub base_lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let frac = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
            Decay::Linear => 1.0 - t,
            Decay::Constant => 1.0,
        } as f32;
        self.min_lr + (self.base_lr - self.min_lr) * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            base_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(500) - 0.1).abs() < 1e-6);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr(60) - 0.55).abs() < 1e-6);
        let c = Schedule {
            decay: Decay::Constant,
            ..s
        };
        assert_eq!(c.lr(100), 1.0);
    }
}
