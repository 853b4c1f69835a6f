//! `vit train`: a run from a TOML config, or `--resume` of one; and [`drive`], which runs any
//! built trainer (also `vit finetune`'s) to its end with Ctrl-C handling and progress.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use vitrs::train::trainer::{Outcome, CURVE, METRICS, MODEL};
use vitrs::train::{RunConfig, Trainer};

use crate::progress::Bar;

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Run configuration (see configs/*.toml).
    #[arg(long, value_name = "FILE", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Run directory: checkpoint, final model.safetensors, metrics.jsonl, curve.png.
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint (or from its start, with its
    /// saved config, when it was stopped before its first checkpoint).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Stop (with a checkpoint and RUN_DIR/model.safetensors) after this many optimizer steps
    /// in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override the dataset (a name or a directory).
    #[arg(long)]
    dataset: Option<String>,
    #[command(flatten)]
    recipe: RecipeOverrides,
}

/// Flags that override a run config's recipe, shared by `vit train` and `vit finetune`.
#[derive(clap::Args)]
pub(crate) struct RecipeOverrides {
    /// Override the number of epochs.
    #[arg(long, conflicts_with = "time_budget")]
    pub(crate) epochs: Option<u64>,
    /// Train for as many epochs as fit in this many minutes of wall time, measured on this
    /// machine before the run starts (replaces the config's epochs).
    #[arg(long, value_name = "MIN")]
    pub(crate) time_budget: Option<f64>,
    /// Override the batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override the peak learning rate.
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Override the seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Use only these classes of the dataset, renumbered from 0 (e.g. `0-4` or `0,2,4`); a new
    /// head gets one output per class.
    #[arg(long, value_name = "LIST")]
    classes: Option<String>,
    /// Train on this many images per class (a seeded choice).
    #[arg(long, value_name = "N")]
    per_class: Option<usize>,
    /// Image folders: stop on a file that is not a readable image instead of skipping it.
    #[arg(long)]
    strict: bool,
}

impl RecipeOverrides {
    /// Writes the given flags into `run` (a lower peak lr pulls `min_lr` down with it); the
    /// caller validates the result.
    pub(crate) fn apply(&self, run: &mut RunConfig) -> Result<()> {
        if let Some(e) = self.epochs {
            run.train.epochs = e;
            run.train.time_budget_min = None;
        }
        if let Some(m) = self.time_budget {
            run.train.time_budget_min = Some(m);
        }
        if let Some(b) = self.batch_size {
            run.train.batch_size = b;
        }
        if let Some(lr) = self.lr {
            run.train.lr = lr;
            run.train.min_lr = run.train.min_lr.min(lr);
        }
        if let Some(s) = self.seed {
            run.train.seed = s;
        }
        if let Some(c) = &self.classes {
            run.data.classes = Some(vitrs::data::parse_classes(c).context("--classes")?);
        }
        if let Some(k) = self.per_class {
            run.data.per_class = Some(k);
        }
        if self.strict {
            run.data.strict = true;
        }
        Ok(())
    }
}

pub(crate) fn run(a: TrainArgs) -> Result<u8> {
    // Under `mpirun`, the ranks: initialised before anything is read, so that a rank that
    // fails to start ends the job at once.
    #[cfg(feature = "mpi")]
    let ranks = crate::mpi::init()?;
    #[allow(unused_mut)]
    let mut trainer = match (&a.resume, &a.config, &a.out) {
        (Some(dir), _, _) => {
            if a.recipe.time_budget.is_some() {
                usage!(
                    "--time-budget fits the epochs when a run starts; a resumed run keeps the \
                     ones it was started with (change them with --epochs N)"
                );
            }
            Trainer::resume(dir, a.recipe.epochs)
                .with_context(|| format!("cannot resume {}", dir.display()))?
        }
        (None, Some(cfg), Some(out)) => {
            let text = std::fs::read_to_string(cfg)
                .with_context(|| format!("cannot read {}", cfg.display()))?;
            let mut run = RunConfig::from_toml(&text, &cfg.display().to_string())?;
            a.recipe.apply(&mut run)?;
            if let Some(d) = a.dataset {
                run.data.dataset = d;
            }
            run.validate()?;
            Trainer::new(run, out)?
        }
        _ => usage!("give --config FILE --out RUN_DIR, or --resume RUN_DIR"),
    };
    #[cfg(feature = "mpi")]
    if let Some(m) = ranks {
        use vitrs::train::dist::Collective;
        let (n, b) = (m.size(), trainer.run.train.batch_size);
        if m.rank() == 0 {
            eprintln!(
                "data parallel over {n} MPI ranks: global batch {b} ({} per rank x {} \
                 accumulation step(s)), gradients averaged over the ranks before each step; \
                 the learning rate is the config's, for the global batch",
                b / n.max(1),
                trainer.run.train.accum_steps
            );
        }
        trainer.set_collective(Box::new(m))?;
    }
    drive(trainer, a.max_steps)
}

/// Runs a built trainer to the end (or a stop): Ctrl-C handling, progress, the final summary.
pub(crate) fn drive(mut trainer: Trainer, max_steps: Option<u64>) -> Result<u8> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is being written ends the process at once.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step; the checkpoint will be saved (Ctrl-C again to abort)"
            );
        });
    }
    let mut bar = Bar::new();
    bar.eval_source = trainer.eval_source.clone();
    trainer.fit_to_budget(&mut bar)?;
    let arch = trainer.model.describe();
    // With several ranks, rank 0 speaks for all.
    if trainer.rank() != 0 {
        let outcome = trainer.run(&mut bar, &stop, max_steps)?;
        return Ok(match outcome {
            Outcome::Stopped { .. } if stop.load(Ordering::SeqCst) => 130,
            _ => 0,
        });
    }
    eprintln!(
        "training {arch} on {} images ({} held for evaluation: {}), {} parameters, {} steps, run dir {}",
        trainer.train_len(),
        trainer.eval_len(),
        trainer.eval_source,
        trainer.model.params().count(),
        trainer.total_steps(),
        trainer.dir().display()
    );
    for note in &trainer.notes {
        eprintln!("note: {note}");
    }
    let (plain, epochs) = (
        trainer.run.augment.plain_last_epochs,
        trainer.run.train.epochs,
    );
    if plain > 0 {
        eprintln!(
            "note: the last {} of {epochs} epoch(s) train on plain images (flip only)",
            plain.min(epochs)
        );
    }
    if trainer.pos.step > 0 {
        eprintln!(
            "resuming at step {} (epoch {}, batch {})",
            trainer.pos.step, trainer.pos.epoch, trainer.pos.batch
        );
    }
    let outcome = trainer.run(&mut bar, &stop, max_steps);
    bar.finish();
    let dir = trainer.dir().to_path_buf();
    match outcome? {
        Outcome::Finished(r) => {
            println!(
                "done: top-1 {:.2}% on the {}, model {}, curve {}, metrics {}",
                100.0 * r.top1,
                trainer.eval_source,
                dir.join(MODEL).display(),
                dir.join(CURVE).display(),
                dir.join(METRICS).display()
            );
            Ok(0)
        }
        Outcome::Stopped { step } => {
            println!(
                "stopped at step {step} (model so far: {}); continue with: vit train --resume {}",
                dir.join(MODEL).display(),
                dir.display()
            );
            Ok(if stop.load(Ordering::SeqCst) { 130 } else { 0 })
        }
    }
}
