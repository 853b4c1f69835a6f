//! Training: the run configuration (TOML), optimisers and schedules, evaluation, the loop with
//! checkpoints and resume.

pub mod config;
pub mod dist;
pub mod eval;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod trainer;
pub mod transfer;

pub use config::{ModelSpec, RunConfig};
pub use eval::{evaluate, EvalResult};
pub use trainer::{Hooks, Progress, Trainer};
