//! The training loop: batches from the threaded loader, forward/backward, clipping and the
//! optimiser step on a schedule; progress, a metrics log (JSON lines) and a curve PNG in the
//! run directory; evaluation every epoch; atomic checkpoints that `resume` continues exactly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::config::{RunConfig, TrainSpec};
use super::eval::{evaluate, EvalResult};
use super::optim::{clip_global_norm, Ema, Optimizer};
use super::schedule::Schedule;
use super::state::{self, Position};
use super::transfer;
use crate::checkpoint::safetensors::SaveDtype;
use crate::checkpoint::save_net;
use crate::data::loader::{batches_per_epoch, derive_seed, Batch, Loader, LoaderConfig};
use crate::data::{self, Dataset, Resized, Split, Subset};
use crate::error::{Error, Result};
use crate::kernels::loss::Targets;
use crate::model::{Net, NetWorkspace, Regularization};
use crate::preprocess::{Interpolation, Preprocess, Resize};
use crate::train::dist::{Buckets, Collective, Single};
use crate::viz::confusion::plot_confusion;
use crate::viz::curve::{plot, Panel, Series, BLUE, GREEN, ORANGE};

/// File names inside a run directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The checkpoint before the last one, kept so that a damaged last one is not the end of a run.
pub const PREV_CHECKPOINT: &str = "checkpoint.prev.safetensors";
/// Where a checkpoint that failed its checksum is moved by `resume`.
pub const DAMAGED_CHECKPOINT: &str = "checkpoint.damaged.safetensors";
pub const MODEL: &str = "model.safetensors";
pub const METRICS: &str = "metrics.jsonl";
pub const CURVE: &str = "curve.png";
pub const CONFUSION: &str = "confusion.png";
pub const CONFIG: &str = "config.toml";

/// A progress report, every `log_every` optimizer steps.
#[derive(Clone, Debug)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub epochs: u64,
    /// Mean training loss since the last report.
    pub loss: f64,
    /// Training accuracy since the last report (unmixed batches only; NaN if none).
    pub accuracy: f64,
    pub lr: f32,
    pub images_per_sec: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
}

/// Callbacks the caller (the CLI's progress bar, a test) receives.
pub trait Hooks {
    fn progress(&mut self, _p: &Progress) {}
    fn evaluated(&mut self, _epoch: u64, _r: &EvalResult) {}
    fn note(&mut self, _msg: &str) {}
}

/// Why `run` returned.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// All epochs done; the final evaluation.
    Finished(EvalResult),
    /// Stopped early (`--max-steps` or a stop request); a checkpoint was saved at `step`.
    Stopped { step: u64 },
}

pub struct Trainer {
    /// The model being trained: a ViT, or the ResNet baseline (`[model] arch = "resnet"`).
    pub model: Net,
    pub run: RunConfig,
    pub preprocess: Preprocess,
    pub labels: Vec<String>,
    pub pos: Position,
    /// What the evaluation set is ("test split" or "validation split").
    pub eval_source: String,
    /// What fine-tuning changed in the pre-trained model (empty for a run from scratch).
    /// Notes for the user about how the run was set up (transfer changes, a checkpoint fallback).
    pub notes: Vec<String>,
    opt: Optimizer,
    tw: NetWorkspace,
    train: Arc<dyn Dataset>,
    eval: Arc<dyn Dataset>,
    dir: PathBuf,
    history: Vec<serde_json::Value>,
    /// The step of the checkpoint on disk, when this process wrote it: saving the same step
    /// again (end of epoch right after a periodic save) must not rotate it into the previous.
    saved_step: Option<u64>,
    /// The weights' moving average (`ema_decay`), evaluated and saved as the final model.
    ema: Option<Ema>,
    /// When the data was in memory and the model built: the start of a time budget.
    built: Instant,
    /// Whether `epochs` is settled (fitted to the time budget, or a resumed run's).
    epochs_settled: bool,
    /// The time budget in seconds from `built`, while this process fitted the epochs to it
    /// and has not yet said that the run will overrun it.
    budget_s: Option<f64>,
    /// The processes training together ([`Trainer::set_collective`]); one by default.
    comm: Box<dyn Collective + Send>,
}

impl Trainer {
    /// Starts a run in `dir` (created; an existing checkpoint there is refused: use `resume`).
    /// With a `[finetune]` section the model is the pre-trained checkpoint, adapted.
    pub fn new(run: RunConfig, dir: &Path) -> Result<Self> {
        let source = pretrained(&run)?;
        let (train, eval, eval_source, notes) =
            open_data(&run, source.as_ref().map(|ck| ck.model.input()))?;
        let mut t = Self::build(run, dir, train, eval, eval_source, source)?;
        t.notes.extend(notes);
        Ok(t)
    }

    /// Like [`Trainer::new`] with the datasets given instead of opened from `run.data`
    /// (`vit demo` uses a bundled sample this way).
    pub fn with_data(
        run: RunConfig,
        dir: &Path,
        train: Arc<dyn Dataset>,
        eval: Arc<dyn Dataset>,
        eval_source: String,
    ) -> Result<Self> {
        let source = pretrained(&run)?;
        Self::build(run, dir, train, eval, eval_source, source)
    }

    fn build(
        mut run: RunConfig,
        dir: &Path,
        train: Arc<dyn Dataset>,
        eval: Arc<dyn Dataset>,
        eval_source: String,
        source: Option<crate::checkpoint::Checkpoint<Net>>,
    ) -> Result<Self> {
        if dir.join(CHECKPOINT).exists() || dir.join(PREV_CHECKPOINT).exists() {
            return Err(Error::BadInput(format!(
                "{} already holds a run; continue it with --resume {0} or choose another --out",
                dir.display()
            )));
        }
        if train.is_empty() || eval.is_empty() {
            return Err(Error::BadInput(
                "the training or evaluation set is empty".into(),
            ));
        }
        // Fewer images than a batch: train with the batches there are (as PyTorch's loader
        // would with a short last batch), saying so.
        let mut notes = vec![];
        let (len, t) = (train.len(), &mut run.train);
        if len < t.batch_size * t.accum_steps {
            let (batch, accum) = (t.batch_size, t.accum_steps);
            t.accum_steps = accum.min(len);
            t.batch_size = (len / t.accum_steps).max(1);
            notes.push(format!(
                "{len} training images make no full batch of {batch} x {accum} accumulation \
                 step(s): training with batches of {} x {}",
                t.batch_size, t.accum_steps
            ));
        }
        let classes = train.classes().len();
        let (model, transfer_notes) = match source {
            Some(ck) => {
                // The pre-trained model's normalisation, unless the config sets its own.
                if run.data.mean.is_none() && run.data.std.is_none() {
                    run.data.mean = Some(ck.preprocess.mean.clone());
                    run.data.std = Some(ck.preprocess.std.clone());
                }
                let keep = run.finetune.as_ref().is_some_and(|f| f.keep_head);
                if keep {
                    let k = ck.model.num_classes();
                    if k != classes {
                        return Err(Error::BadInput(format!(
                            "keep_head needs the data to have the model's {k} classes, it has {classes}; \
                             drop --keep-head to train a new head"
                        )));
                    }
                }
                let a = transfer::adapt_net(&ck.model, train.shape(), classes, keep)?;
                check_memory(
                    a.model.params().count(),
                    a.model.train_bytes_per_image(),
                    &run,
                )?;
                (a.model, a.changes)
            }
            None => {
                let cfg = run.model.resolve_net(train.shape(), classes)?;
                let (params, per_image) = cfg.train_footprint()?;
                check_memory(params, per_image, &run)?;
                (cfg.build(run.train.seed)?, vec![])
            }
        };
        check_arch(&run, &model)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let labels = train.classes().to_vec();
        let preprocess = preprocess_for(&run, &model);
        let mut opt = Optimizer::new(run.train.optimizer, model.params());
        opt.set_lr_scales(lr_scales_for(&run, &model));
        let run_ema = run
            .train
            .ema_decay
            .map(|d| Ema::new(d, model.params().flat()));
        std::fs::write(dir.join(CONFIG), run.to_toml()?)
            .map_err(|e| Error::io(dir.join(CONFIG), e))?;
        let _ = std::fs::remove_file(dir.join(METRICS));
        let tw = NetWorkspace::for_net(&model);
        Ok(Trainer {
            model,
            run,
            preprocess,
            labels,
            pos: Position::default(),
            eval_source,
            notes: [transfer_notes, notes].concat(),
            opt,
            tw,
            train,
            eval,
            dir: dir.to_path_buf(),
            history: vec![],
            ema: run_ema,
            saved_step: None,
            built: Instant::now(),
            epochs_settled: false,
            budget_s: None,
            comm: Box::new(Single),
        })
    }

    /// Continues the run in `dir` from its last checkpoint; `epochs` may extend it.
    /// A last checkpoint that is missing or fails to load (checksum, truncation) falls back to
    /// the previous one, with a note saying so; the damaged file is moved aside. A run stopped
    /// before its first checkpoint starts again from step 0 with the config it saved.
    pub fn resume(dir: &Path, epochs: Option<u64>) -> Result<Self> {
        let path = dir.join(CHECKPOINT);
        let prev = dir.join(PREV_CHECKPOINT);
        if !path.is_file() && !prev.is_file() {
            return Self::restart(dir, epochs);
        }
        remove_temp_files(dir);
        let mut notes = vec![];
        let loaded = if path.is_file() {
            state::load(&path)
        } else {
            Err(Error::BadInput(format!("{} is missing", path.display())))
        };
        let state::Loaded {
            ck,
            mut run,
            mut opt,
            ema,
            pos,
        } = match loaded {
            Ok(x) => x,
            Err(e) if prev.is_file() => {
                let x = state::load(&prev).map_err(|e2| {
                    Error::BadInput(format!(
                        "neither checkpoint loads: {e}; and the previous one: {e2}"
                    ))
                })?;
                if path.is_file() {
                    let aside = dir.join(DAMAGED_CHECKPOINT);
                    std::fs::rename(&path, &aside).map_err(|err| Error::io(&path, err))?;
                    notes.push(format!("damaged checkpoint moved to {}", aside.display()));
                }
                notes.insert(
                    0,
                    format!(
                        "the last checkpoint did not load ({e}); resuming from the previous one, \
                         {} (step {})",
                        prev.display(),
                        x.pos.step
                    ),
                );
                x
            }
            Err(e) => return Err(e),
        };
        opt.set_lr_scales(lr_scales_for(&run, &ck.model));
        if let Some(e) = epochs {
            run.train.epochs = e;
        }
        let (train, eval, eval_source, data_notes) = open_data(&run, Some(ck.model.input()))?;
        notes.extend(data_notes);
        // Metrics after the checkpoint belong to steps that will be redone.
        let history = read_history(&dir.join(METRICS), pos.step);
        rewrite_history(&dir.join(METRICS), &history)?;
        Ok(Trainer {
            labels: ck
                .labels
                .clone()
                .unwrap_or_else(|| train.classes().to_vec()),
            tw: NetWorkspace::for_net(&ck.model),
            model: ck.model,
            run,
            preprocess: ck.preprocess,
            pos,
            eval_source,
            notes,
            opt,
            train,
            eval,
            dir: dir.to_path_buf(),
            history,
            ema,
            saved_step: Some(pos.step),
            built: Instant::now(),
            // A resumed run keeps the epochs its checkpoint holds (fitted when it started).
            epochs_settled: true,
            budget_s: None,
            comm: Box::new(Single),
        })
    }

    /// [`Self::resume`] of a run that has no checkpoint yet: the same run from step 0, with
    /// the `config.toml` it wrote when it started.
    fn restart(dir: &Path, epochs: Option<u64>) -> Result<Self> {
        let cfg = dir.join(CONFIG);
        let text = std::fs::read_to_string(&cfg).map_err(|_| {
            Error::BadInput(format!(
                "{}: no checkpoint to resume from, and no {CONFIG} to start the run again with; \
                 start a new run with --config FILE --out {0}",
                dir.display()
            ))
        })?;
        let mut run = RunConfig::from_toml(&text, &cfg.display().to_string())?;
        if let Some(e) = epochs {
            run.train.epochs = e;
            run.train.time_budget_min = None;
        }
        run.validate()?;
        let mut t = Self::new(run, dir)?;
        t.notes.insert(
            0,
            format!(
                "{} has no checkpoint yet (the run stopped before its first one): starting it \
                 again from step 0 with its saved {}",
                dir.display(),
                cfg.display()
            ),
        );
        Ok(t)
    }

    /// Trains together with other processes (data parallel): each rank takes its share of
    /// every global batch (`batch_size` images, split evenly), the gradients are averaged over
    /// the ranks before each optimizer step, and rank 0 alone reports through the hooks and
    /// writes the run directory. Every rank must be built from the same config (or resume the
    /// same checkpoint) and call [`Trainer::run`] with the same `max_steps`.
    pub fn set_collective(&mut self, comm: Box<dyn Collective + Send>) -> Result<()> {
        let (n, t) = (comm.size(), &self.run.train);
        if n > 1 && t.batch_size % n != 0 {
            return Err(Error::InvalidConfig(format!(
                "batch_size {} does not split evenly over {n} ranks; use a multiple of {n}",
                t.batch_size
            )));
        }
        if n > 1 && t.time_budget_min.is_some() && !self.epochs_settled {
            return Err(Error::InvalidConfig(
                "a time budget is fitted by one process; with several ranks give --epochs".into(),
            ));
        }
        self.comm = comm;
        Ok(())
    }

    /// This process's rank (0 when training alone).
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Whether this process writes the run directory and reports: rank 0.
    fn writes(&self) -> bool {
        self.comm.rank() == 0
    }

    pub fn steps_per_epoch(&self) -> u64 {
        let t = &self.run.train;
        (batches_per_epoch(self.train.len(), t.batch_size, true) / t.accum_steps) as u64
    }

    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch() * self.run.train.epochs
    }

    /// The training and evaluation sets, as the run sees them.
    pub fn datasets(&self) -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
        (self.train.clone(), self.eval.clone())
    }

    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    pub fn eval_len(&self) -> usize {
        self.eval.len()
    }

    fn schedule(&self) -> Schedule {
        let t = &self.run.train;
        Schedule {
            base_lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            total_steps: self.total_steps(),
            decay: t.schedule,
        }
    }

    /// The error that stops a diverged run, pointing at the checkpoint left intact.
    fn diverged(&self, what: &str) -> Error {
        Error::BadInput(format!(
            "{what} at step {}; stopping. The last good checkpoint ({}) is intact; \
             lower the learning rate or enable grad_clip and resume",
            self.pos.step,
            self.dir.join(CHECKPOINT).display()
        ))
    }

    /// Writes the checkpoint atomically, keeping the one it replaces as [`PREV_CHECKPOINT`].
    fn save_checkpoint(&mut self) -> Result<()> {
        // Never replace a good checkpoint with a diverged model.
        let params = self.model.params();
        if let Some(e) = params
            .entries()
            .iter()
            .find(|e| !crate::checkpoint::all_finite(&params.flat()[e.range.clone()]))
        {
            return Err(self.diverged(&format!("parameter `{}` became NaN or Inf", e.name)));
        }
        if !self.writes() {
            return Ok(());
        }
        let cur = self.dir.join(CHECKPOINT);
        if cur.is_file() && self.saved_step != Some(self.pos.step) {
            keep_previous(&cur, &self.dir.join(PREV_CHECKPOINT))?;
        }
        state::save(
            &cur,
            &self.model,
            &self.opt,
            self.ema.as_ref(),
            &self.preprocess,
            &self.labels,
            &self.run,
            self.pos,
        )
        .map_err(|e| {
            Error::BadInput(format!(
                "could not save the checkpoint of step {}: {e}. The last saved checkpoint is \
                 intact; free some disk space and continue with --resume {}",
                self.pos.step,
                self.dir.display()
            ))
        })?;
        self.saved_step = Some(self.pos.step);
        Ok(())
    }

    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let path = self.dir.join(METRICS);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(&path, e))?;
        self.history.push(v);
        Ok(())
    }

    /// Draws the training curve from the metrics so far.
    pub fn plot_curve(&self) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let get = |kind: &str, key: &str| -> Vec<(f64, f64)> {
            self.history
                .iter()
                .filter(|v| v["kind"] == kind)
                .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
                .collect()
        };
        let panels = [
            Panel {
                title: "loss".into(),
                series: vec![
                    Series {
                        name: "train".into(),
                        points: get("train", "loss"),
                        color: BLUE,
                    },
                    Series {
                        name: "eval".into(),
                        points: get("eval", "loss"),
                        color: ORANGE,
                    },
                ],
            },
            Panel {
                title: "accuracy".into(),
                series: vec![
                    Series {
                        name: "train".into(),
                        points: get("train", "accuracy"),
                        color: BLUE,
                    },
                    Series {
                        name: format!("eval ({})", self.eval_source),
                        points: get("eval", "top1"),
                        color: GREEN,
                    },
                ],
            },
        ];
        plot(&self.dir.join(CURVE), "optimizer step", &panels)
    }

    /// The model the run evaluates and hands over: the weights' moving average when the run
    /// keeps one, else the model being trained.
    pub fn result_model(&self) -> std::borrow::Cow<'_, Net> {
        let Some(ema) = &self.ema else {
            return std::borrow::Cow::Borrowed(&self.model);
        };
        let mut m = self.model.clone();
        m.params_mut().flat_mut().copy_from_slice(&ema.weights);
        std::borrow::Cow::Owned(m)
    }

    fn evaluate_now(&mut self, hooks: &mut dyn Hooks) -> Result<EvalResult> {
        let r = evaluate(
            &self.result_model(),
            self.eval.clone(),
            self.run.train.batch_size,
            &self.preprocess.mean,
            &self.preprocess.std,
            self.run.data.workers,
        )?;
        hooks.evaluated(self.pos.epoch, &r);
        self.log(json!({"kind": "eval", "step": self.pos.step, "epoch": self.pos.epoch, "top1": r.top1, "top5": r.top5, "loss": r.loss, "n": r.n, "on": self.eval_source}))?;
        self.plot_curve()?;
        if self.writes() {
            plot_confusion(
                &self.dir.join(CONFUSION),
                &r.confusion,
                &self.labels,
                &format!("{} after epoch {}", self.eval_source, self.pos.epoch),
            )?;
        }
        Ok(r)
    }

    /// Trains until the configured epochs are done, `max_steps` optimizer steps have been
    /// taken in total, or `stop` is raised (Ctrl-C); saves a checkpoint whenever it returns.
    pub fn run(
        &mut self,
        hooks: &mut dyn Hooks,
        stop: &AtomicBool,
        max_steps: Option<u64>,
    ) -> Result<Outcome> {
        // Rank 0 reports; the other ranks train silently.
        struct Quiet;
        impl Hooks for Quiet {}
        let mut quiet = Quiet;
        let hooks: &mut dyn Hooks = if self.writes() { hooks } else { &mut quiet };
        let (world, salt) = match self.comm.size() {
            1 => (1, 0),
            n => (n, self.comm.rank() as u64 + 1),
        };
        self.fit_to_budget(hooks)?;
        let t = self.run.train.clone();
        let sched = self.schedule();
        let total = self.total_steps();
        let spe = self.steps_per_epoch();
        if spe == 0 {
            return Err(Error::InvalidConfig(format!(
                "{} training images make no full batch of {} x {} accumulation steps",
                self.train.len(),
                t.batch_size,
                t.accum_steps
            )));
        }
        let start = Instant::now();
        let start_step = self.pos.step;
        let start_epoch = self.pos.epoch;
        let (mut win_loss, mut win_n, mut win_correct, mut win_seen, mut win_imgs) =
            (0.0f64, 0usize, 0usize, 0usize, 0usize);
        let mut win_start = Instant::now();
        let k = self.model.num_classes();
        let mut last_eval = None;
        while self.pos.epoch < t.epochs {
            let mut loader = Loader::new(
                self.train.clone(),
                self.loader_config(self.pos.epoch, self.pos.batch),
            )?;
            let usable = spe as usize * t.accum_steps;
            let (mut micro, mut bad_loss) = (0, false);
            let (mut comm_s, mut comm_steps, epoch_start) = (0.0f64, 0u64, Instant::now());
            self.tw.zero_grads();
            for batch in loader.by_ref() {
                let batch = batch?;
                if batch.index >= usable {
                    break; // leftover micro-batches that make no full optimizer step
                }
                // The last micro-batch of an optimizer step starts summing each bucket of
                // gradients over the ranks while its backward goes on.
                let last_micro = micro + 1 == t.accum_steps;
                let bucket_bytes = (t.bucket_mb as f64 * 1048576.0) as usize;
                let mut buckets =
                    (world > 1 && last_micro).then(|| Buckets::new(&*self.comm, bucket_bytes));
                let loss = micro_step(
                    &mut self.model,
                    &mut self.tw,
                    &t,
                    &batch,
                    (self.pos.step, micro, salt),
                    buckets.as_mut(),
                )?;
                // With several ranks the ranks decide together, at the optimizer step.
                if !loss.is_finite() && world == 1 {
                    return Err(self.diverged(&format!("the loss became {loss}")));
                }
                bad_loss |= !loss.is_finite();
                win_loss += loss as f64;
                win_n += 1;
                win_imgs += batch.labels.len();
                if batch.soft.is_none() {
                    for (row, &y) in self.tw.train_logits().chunks_exact(k).zip(&batch.labels) {
                        let arg = (0..k)
                            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                            .unwrap_or(0);
                        win_correct += (arg == y) as usize;
                        win_seen += 1;
                    }
                }
                micro += 1;
                if micro < t.accum_steps {
                    continue;
                }
                micro = 0;
                // Every rank's gradients averaged: the ranks take the same step. What is timed
                // is the wait left after the backward (the communication not overlapped).
                if world > 1 {
                    let clock = Instant::now();
                    self.comm.finish_means(self.tw.grads_mut());
                    // A ResNet's running statistics, each rank's from its own share of the
                    // batches: averaged, so every rank keeps the same model.
                    if let Some(b) = self.model.buffers_mut() {
                        self.comm.finish_means(b.flat_mut());
                    }
                    comm_s += clock.elapsed().as_secs_f64();
                    comm_steps += 1;
                }
                let lr = sched.lr(self.pos.step);
                optimizer_step(&mut self.model, &mut self.tw, &mut self.opt, &t, lr);
                if let Some(ema) = &mut self.ema {
                    ema.update(self.model.params().flat(), self.pos.step);
                }
                self.pos.step += 1;
                self.pos.batch = batch.index + 1;

                if self.pos.step.is_multiple_of(t.log_every.max(1)) || self.pos.step == total {
                    // The window's numbers over all ranks (every rank logs at the same steps).
                    if world > 1 {
                        let mut w = [
                            win_loss as f32,
                            win_n as f32,
                            win_correct as f32,
                            win_seen as f32,
                            win_imgs as f32,
                        ];
                        self.comm.all_reduce_sum(&mut w);
                        win_loss = w[0] as f64;
                        [win_n, win_correct, win_seen, win_imgs] =
                            [w[1], w[2], w[3], w[4]].map(|v| v.round() as usize);
                    }
                    let dt = win_start.elapsed().as_secs_f64();
                    let elapsed = start.elapsed().as_secs_f64();
                    let done = (self.pos.step - start_step) as f64;
                    let p = Progress {
                        step: self.pos.step,
                        total_steps: total,
                        epoch: self.pos.epoch,
                        epochs: t.epochs,
                        loss: win_loss / win_n.max(1) as f64,
                        accuracy: if win_seen > 0 {
                            win_correct as f64 / win_seen as f64
                        } else {
                            f64::NAN
                        },
                        lr,
                        images_per_sec: win_imgs as f64 / dt.max(1e-9),
                        elapsed_s: elapsed,
                        eta_s: elapsed / done.max(1.0) * (total - self.pos.step) as f64,
                    };
                    hooks.progress(&p);
                    let acc = if p.accuracy.is_finite() {
                        json!(p.accuracy)
                    } else {
                        json!(null)
                    };
                    self.log(json!({"kind": "train", "step": p.step, "epoch": p.epoch, "loss": p.loss, "accuracy": acc,
                                    "lr": p.lr, "images_per_sec": p.images_per_sec, "elapsed_s": p.elapsed_s}))?;
                    (win_loss, win_n, win_correct, win_seen, win_imgs) = (0.0, 0, 0, 0, 0);
                    win_start = Instant::now();
                }
                if t.checkpoint_every > 0 && self.pos.step.is_multiple_of(t.checkpoint_every) {
                    self.save_checkpoint()?;
                }
                let mut stop_now = stop.load(Ordering::SeqCst);
                // The ranks agree on stopping, and on a loss gone bad on any of them.
                if world > 1 {
                    let mut flags = [bad_loss as u8 as f32, stop_now as u8 as f32];
                    self.comm.all_reduce_sum(&mut flags);
                    if flags[0] > 0.0 {
                        return Err(self.diverged("the loss became NaN or Inf on some rank"));
                    }
                    stop_now = flags[1] > 0.0;
                }
                if stop_now || max_steps.is_some_and(|m| self.pos.step >= m) {
                    self.save_checkpoint()?;
                    self.save_model()?;
                    self.plot_curve()?;
                    hooks.note(&format!(
                        "{} at step {}; checkpoint saved to {}, the model so far to {}",
                        if stop_now {
                            "stopped"
                        } else {
                            "reached --max-steps"
                        },
                        self.pos.step,
                        self.dir.join(CHECKPOINT).display(),
                        self.dir.join(MODEL).display()
                    ));
                    return Ok(Outcome::Stopped {
                        step: self.pos.step,
                    });
                }
            }
            let (skipped, why) = loader.skipped();
            drop(loader);
            if comm_steps > 0 {
                let mb = 4.0 * self.tw.grads_mut().len() as f64 / 1e6;
                hooks.note(&format!(
                    "epoch {}: the gradient all-reduce ({mb:.2} MB per step over {world} ranks, \
                     in buckets overlapping the backward) left {:.1} ms per step to wait after \
                     the backward on average, {:.1} % of the epoch's wall time",
                    self.pos.epoch + 1,
                    1e3 * comm_s / comm_steps as f64,
                    100.0 * comm_s / epoch_start.elapsed().as_secs_f64()
                ));
            }
            if skipped > 0 {
                hooks.note(&format!(
                    "epoch {}: left out {skipped} training image(s) that could not be decoded \
                     (set `strict = true` in [data] to stop on them instead); e.g. {}",
                    self.pos.epoch + 1,
                    why.join("; ")
                ));
            }
            self.pos.epoch += 1;
            self.pos.batch = 0;
            last_eval = Some(self.evaluate_now(hooks)?);
            self.save_checkpoint()?;
            self.warn_of_overrun(hooks, start.elapsed().as_secs_f64(), start_epoch);
        }
        // The last epoch's evaluation, or a fresh one when resuming a finished run.
        let r = match last_eval {
            Some(r) => r,
            None => self.evaluate_now(hooks)?,
        };
        self.save_model()?;
        self.plot_curve()?;
        Ok(Outcome::Finished(r))
    }

    /// Writes `RUN_DIR/model.safetensors`: the weights the run evaluates (their moving average
    /// when it keeps one), loadable by every command.
    fn save_model(&self) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        save_net(
            &self.dir.join(MODEL),
            &self.result_model(),
            &self.preprocess,
            Some(&self.labels),
            SaveDtype::F32,
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How the training set is drawn in `epoch`, from batch `start_batch` on.
    fn loader_config(&self, epoch: u64, start_batch: usize) -> LoaderConfig {
        let t = &self.run.train;
        LoaderConfig {
            batch_size: t.batch_size,
            shuffle: true,
            drop_last: true,
            seed: t.seed,
            epoch,
            start_batch,
            workers: self.run.data.workers,
            prefetch: 4,
            augment: self.run.augment.for_epoch(epoch, t.epochs),
            mean: self.preprocess.mean.clone(),
            std: self.preprocess.std.clone(),
            num_classes: self.model.num_classes(),
            shuffle_buffer: self
                .run
                .data
                .shuffle_buffer
                .unwrap_or(crate::data::loader::DEFAULT_SHUFFLE_BUFFER),
            skip_unreadable: !self.run.data.strict,
            rank: self.comm.rank(),
            world: self.comm.size(),
        }
    }

    /// Says once, at an epoch's end, when the epochs this process fitted to the time budget
    /// will not fit in it at the speed of the epochs trained so far (`run_s` seconds since
    /// epoch `start_epoch`). The run keeps its epochs: the schedule is fixed when it starts.
    fn warn_of_overrun(&mut self, hooks: &mut dyn Hooks, run_s: f64, start_epoch: u64) {
        let Some(budget_s) = self.budget_s else {
            return;
        };
        let t = &self.run.train;
        let done = self.pos.epoch.saturating_sub(start_epoch);
        let left = t.epochs.saturating_sub(self.pos.epoch);
        let spent_s = self.built.elapsed().as_secs_f64();
        let Some(end_s) = projected_end(spent_s, run_s, done, left) else {
            return;
        };
        if end_s <= budget_s {
            return;
        }
        self.budget_s = None;
        hooks.note(&format!(
            "slower than measured for the budget: at {:.0} s per epoch so far, the {} epoch(s) \
             end after about {:.0} min, past the {:.0} min asked for; the run keeps them (its \
             schedule was fixed at the start). To end sooner: Ctrl-C (a checkpoint is saved), \
             or start again with --epochs {}",
            run_s / done as f64,
            t.epochs,
            end_s / 60.0,
            budget_s / 60.0,
            epochs_for_budget(budget_s, 0.0, spent_s / self.pos.epoch.max(1) as f64),
        ));
    }

    /// With `time_budget_min` set in `[train]`, sets `epochs` to as many as fit in what is left
    /// of the budget (counted from when the trainer was built) at this machine's speed, and
    /// rewrites the run directory's `config.toml` to say so; otherwise does nothing. A resumed
    /// run keeps the epochs its checkpoint holds.
    ///
    /// The speed is measured before the run on copies of the model and optimizer (so the run
    /// itself is exactly the one `epochs = N` gives): a warm-up optimizer step, then steps on
    /// real, augmented batches for about [`PROBE_SECONDS`]; one evaluation of part of the
    /// evaluation set; one checkpoint save. An epoch costs its steps, one evaluation and its
    /// saves; [`BUDGET_RESERVE`] of the time left is kept back for the host's speed to move.
    /// `run` calls this first; call it before to know the total steps (a progress display).
    pub fn fit_to_budget(&mut self, hooks: &mut dyn Hooks) -> Result<()> {
        let Some(budget_min) = self.run.train.time_budget_min else {
            return Ok(());
        };
        let spe = self.steps_per_epoch();
        if self.epochs_settled || self.pos.step > 0 || spe == 0 {
            return Ok(());
        }
        self.epochs_settled = true;
        let t = self.run.train.clone();
        let mut model = self.model.clone();
        let mut opt = Optimizer::new(t.optimizer, model.params());
        opt.set_lr_scales(lr_scales_for(&self.run, &model));
        let mut tw = NetWorkspace::for_net(&model);
        let lr = self.schedule().lr(0);
        let usable = spe as usize * t.accum_steps;

        // Training steps: the first one (allocations, first touches of memory) is not counted.
        // With the run's whole augmentation, whatever the placeholder `epochs` would make of
        // `plain_last_epochs`: most epochs are augmented.
        let lc = LoaderConfig {
            augment: self.run.augment.clone(),
            ..self.loader_config(0, 0)
        };
        let loader = Loader::new(self.train.clone(), lc)?;
        let (mut micro, mut steps, mut first_s, mut warm) = (0, 0u64, 0.0, false);
        let mut clock = Instant::now();
        for batch in loader {
            let batch = batch?;
            if batch.index >= usable {
                break;
            }
            micro_step(&mut model, &mut tw, &t, &batch, (0, micro, 0), None)?;
            micro += 1;
            if micro < t.accum_steps {
                continue;
            }
            micro = 0;
            optimizer_step(&mut model, &mut tw, &mut opt, &t, lr);
            if !warm {
                warm = true;
                first_s = clock.elapsed().as_secs_f64();
                clock = Instant::now();
                continue;
            }
            steps += 1;
            if clock.elapsed().as_secs_f64() >= PROBE_SECONDS {
                break;
            }
        }
        // An epoch of a single step has only the warm-up step to go by.
        let step_s = match steps {
            0 => first_s,
            n => clock.elapsed().as_secs_f64() / n as f64,
        };

        // Evaluation: part of the set, scaled to all of it.
        let n = self.eval.len().min(PROBE_EVAL_IMAGES.max(t.batch_size));
        let part: Arc<dyn Dataset> = Arc::new(Subset::new(self.eval.clone(), (0..n).collect()));
        let clock = Instant::now();
        evaluate(
            &model,
            part,
            t.batch_size,
            &self.preprocess.mean,
            &self.preprocess.std,
            self.run.data.workers,
        )?;
        let eval_s = clock.elapsed().as_secs_f64() * self.eval.len() as f64 / n as f64;

        // One checkpoint save, to a file removed at once.
        let probe = self.dir.join(".budget-probe.safetensors");
        let clock = Instant::now();
        let saved = state::save(
            &probe,
            &model,
            &opt,
            self.ema.as_ref(),
            &self.preprocess,
            &self.labels,
            &self.run,
            Position::default(),
        );
        let save_s = clock.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&probe);
        saved?;

        let saves_per_epoch = 1 + match t.checkpoint_every {
            0 => 0,
            every => spe / every,
        };
        let epoch_s = step_s * spe as f64 + eval_s + save_s * saves_per_epoch as f64;
        let budget_s = budget_min * 60.0;
        let spent_s = self.built.elapsed().as_secs_f64();
        let epochs = epochs_for_budget(budget_s, spent_s, epoch_s);
        self.run.train.epochs = epochs;
        self.budget_s = Some(budget_s);
        std::fs::write(self.dir.join(CONFIG), self.run.to_toml()?)
            .map_err(|e| Error::io(self.dir.join(CONFIG), e))?;
        let imgs_per_s = (t.batch_size * t.accum_steps) as f64 / step_s.max(1e-9);
        let fits = if epochs as f64 * epoch_s > (budget_s - spent_s).max(0.0) {
            " (one epoch is more than the budget: running one anyway)"
        } else {
            ""
        };
        hooks.note(&format!(
            "time budget {budget_min} min: measured {imgs_per_s:.0} img/s training, {eval_s:.1} s \
             per evaluation, {save_s:.2} s per checkpoint; {epoch_s:.0} s per epoch, so {epochs} \
             epoch(s) of the {:.0} s left{fits}",
            (budget_s - spent_s).max(0.0)
        ));
        Ok(())
    }
}

/// Seconds of training steps that [`Trainer::fit_to_budget`] times.
pub const PROBE_SECONDS: f64 = 4.0;
/// Evaluation images [`Trainer::fit_to_budget`] times (at least one batch).
const PROBE_EVAL_IMAGES: usize = 1000;
/// The share of a time budget kept back for the host's speed to move during the run.
pub const BUDGET_RESERVE: f64 = 0.03;

/// When a run whose clock reads `spent_s` (seconds since its time budget started) ends, if its
/// `left` epochs go at the pace of the `done` ones this process trained in `run_s`; `None`
/// when there is nothing to go by (no epoch done) or nothing left.
pub fn projected_end(spent_s: f64, run_s: f64, done: u64, left: u64) -> Option<f64> {
    if done == 0 || left == 0 {
        return None;
    }
    Some(spent_s + run_s / done as f64 * left as f64)
}

/// Whole epochs of `epoch_s` seconds that fit in what is left of `budget_s` once `spent_s` are
/// gone, [`BUDGET_RESERVE`] kept back; at least one.
pub fn epochs_for_budget(budget_s: f64, spent_s: f64, epoch_s: f64) -> u64 {
    let left = (budget_s - spent_s).max(0.0) * (1.0 - BUDGET_RESERVE);
    let n = left / epoch_s;
    if epoch_s > 0.0 && n.is_finite() {
        (n.floor() as u64).max(1)
    } else {
        1 // an epoch that took no measurable time: nothing to go by
    }
}

/// One micro-batch's forward and backward pass, its gradients added into `tw`; the loss.
/// `step` and `micro` seed the dropout and drop-path masks.
/// One forward and backward on a (micro-)batch, adding to the gradients. `salt` is 0 for a
/// process training alone, and `rank + 1` for one of several, so that each rank draws its
/// own dropout masks.
fn micro_step(
    model: &mut Net,
    tw: &mut NetWorkspace,
    t: &TrainSpec,
    batch: &Batch,
    (step, micro, salt): (u64, usize, u64),
    buckets: Option<&mut Buckets<'_>>,
) -> Result<f32> {
    let targets = match &batch.soft {
        Some(s) => Targets::Soft(s),
        None => Targets::Labels {
            labels: &batch.labels,
            smoothing: t.label_smoothing,
        },
    };
    let reg = Regularization {
        dropout: t.dropout,
        drop_path: t.drop_path,
        seed: match salt {
            0 => derive_seed(&[t.seed, step, micro as u64, 3]),
            r => derive_seed(&[t.seed, step, micro as u64, 3, r]),
        },
    };
    match buckets {
        None => model.forward_backward(&batch.images, targets, reg, tw, &mut |_, _| {}),
        Some(b) => {
            let loss =
                model.forward_backward(&batch.images, targets, reg, tw, &mut |r, g| b.add(r, g))?;
            b.flush(tw.grads());
            Ok(loss)
        }
    }
}

/// The optimizer step on the gradients of `accum_steps` micro-batches (averaged, then clipped
/// to the global norm when asked), which it then clears.
fn optimizer_step(
    model: &mut Net,
    tw: &mut NetWorkspace,
    opt: &mut Optimizer,
    t: &TrainSpec,
    lr: f32,
) {
    if t.accum_steps > 1 {
        let s = 1.0 / t.accum_steps as f32;
        tw.grads_mut().iter_mut().for_each(|g| *g *= s);
    }
    if t.grad_clip > 0.0 {
        clip_global_norm(tw.grads_mut(), t.grad_clip);
    }
    opt.step(model.params_mut().flat_mut(), tw.grads(), lr);
    tw.zero_grads();
}

/// Normalisation and geometry of the run's images, stored with the model so `vit predict`
/// preprocesses new images the same way.
fn preprocess_for(run: &RunConfig, model: &Net) -> Preprocess {
    let (channels, height, width) = model.input();
    Preprocess {
        height,
        width,
        channels,
        resize: Resize::ShorterThenCrop { crop_pct: 1.0 },
        interpolation: Interpolation::Bilinear,
        rescale: 1.0 / 255.0,
        mean: run.data.mean.clone().unwrap_or_else(|| vec![0.5; channels]),
        std: run.data.std.clone().unwrap_or_else(|| vec![0.5; channels]),
    }
}

/// Training set, evaluation set, and what the evaluation set is.
/// Training set, evaluation set, where the evaluation set comes from, notes for the user.
type Sets = (Arc<dyn Dataset>, Arc<dyn Dataset>, String, Vec<String>);

/// Training and evaluation sets: the test split, or a held-out part of the training set.
/// `model` is the `(C, H, W)` input of the model the run starts from, when it has one.
fn open_data(run: &RunConfig, model: Option<(usize, usize, usize)>) -> Result<Sets> {
    // Folder datasets are decoded at this size; IDX/CIFAR have their own (then `resize`).
    let size = match (run.data.resize, model) {
        (Some([h, w]), m) => (m.map_or(3, |c| c.0), h, w),
        (None, Some(c)) => c,
        (None, None) => {
            let s = run.model.image_size.unwrap_or(224);
            (run.model.channels.unwrap_or(3), s, s)
        }
    };
    let prepare = |ds: Arc<dyn Dataset>| -> Result<Arc<dyn Dataset>> {
        let ds = match &run.data.classes {
            Some(cs) => data::select_classes(ds, cs, &run.data.dataset)?,
            None => ds,
        };
        let (_, h, w) = ds.shape();
        Ok(match run.data.resize {
            Some([rh, rw]) if (rh, rw) != (h, w) => Arc::new(Resized::new(ds, (rh, rw))?),
            _ => ds,
        })
    };
    let mut notes = vec![];
    let mut opened = |split: Split, what: &str| -> Result<Arc<dyn Dataset>> {
        let ds = data::open_with(&run.data.dataset, split, size, run.data.strict)?;
        if ds.skipped() > 0 {
            notes.push(format!(
                "{what}: skipped {} file(s) that are not readable images (set `strict = true` in \
                 [data], or pass --strict, to stop on them instead)",
                ds.skipped()
            ));
        }
        prepare(ds)
    };
    let mut train = opened(Split::Train, "training set")?;
    if let Some(k) = run.data.per_class {
        let keep = data::per_class_indices(&*train, k, run.train.seed);
        train = Arc::new(Subset::new(train, keep));
    }
    // A flat image folder has no test split: hold out a stratified tenth unless told otherwise.
    let flat = data::is_flat_image_folder(&run.data.dataset);
    let fraction = run.data.val_fraction.unwrap_or(if flat {
        DEFAULT_FOLDER_VAL_FRACTION
    } else {
        0.0
    });
    if fraction > 0.0 {
        let (tr, va) = data::stratified_split(&*train, fraction, run.train.seed);
        if va.is_empty() {
            return Err(Error::BadInput(format!(
                "{}: no class has two images, so none can be held out for validation; add \
                 images, or set `val_fraction = 0` in [data] to evaluate on the training images",
                run.data.dataset
            )));
        }
        let eval: Arc<dyn Dataset> = Arc::new(Subset::new(train.clone(), va));
        let what = format!(
            "validation split ({:.0} % of the training images, stratified)",
            100.0 * fraction
        );
        return Ok((Arc::new(Subset::new(train, tr)), eval, what, notes));
    }
    if flat {
        notes.push(format!(
            "{} has no train/ val/ or test/ sub-folders and val_fraction is 0: evaluating on the \
             training images themselves, which says nothing about new images",
            run.data.dataset
        ));
        let same = train.clone();
        return Ok((
            train,
            same,
            "training images (nothing held out)".into(),
            notes,
        ));
    }
    let test = opened(Split::Test, "test set")?;
    // An image folder's own evaluation folder is named as what it is.
    let dir = Path::new(&run.data.dataset);
    let shards = dir.is_dir() && data::shards::is_shard_dir(dir);
    let what = match (dir.join("test").is_dir(), dir.join("val").is_dir()) {
        (true, _) if shards => "test shards",
        (false, true) if shards => "val shards",
        (true, _) => "test/ folder",
        (false, true) => "val/ folder",
        _ => "test split",
    };
    Ok((train, test, what.into(), notes))
}

/// The share of a flat image folder held out for validation when the config does not say.
const DEFAULT_FOLDER_VAL_FRACTION: f32 = 0.1;

/// The pre-trained model a fine-tuning run starts from (none for a run from scratch).
fn pretrained(run: &RunConfig) -> Result<Option<crate::checkpoint::Checkpoint<Net>>> {
    run.finetune
        .as_ref()
        .map(|ft| crate::checkpoint::load_net(Path::new(&ft.from)))
        .transpose()
}

/// Learning-rate factors of a fine-tuning run (freezing, layer-wise decay), if any; a ViT's
/// (a ResNet's are refused by [`check_arch`]).
fn lr_scales_for(run: &RunConfig, model: &Net) -> Option<Vec<f32>> {
    let ft = run.finetune.as_ref()?;
    let Net::ViT(m) = model else {
        return None;
    };
    transfer::lr_scales(
        m.params(),
        m.config().depth,
        ft.freeze_blocks,
        ft.layer_decay,
    )
}

/// Refuses the ViT-only settings of a run whose model is a ResNet, naming them.
fn check_arch(run: &RunConfig, model: &Net) -> Result<()> {
    if !matches!(model, Net::ResNet(_)) {
        return Ok(());
    }
    let t = &run.train;
    let ft = run.finetune.as_ref();
    let vit_only = [
        ("[train] dropout", t.dropout > 0.0),
        ("[train] drop_path", t.drop_path > 0.0),
        (
            "[finetune] freeze_blocks",
            ft.is_some_and(|f| f.freeze_blocks > 0),
        ),
        (
            "[finetune] layer_decay",
            ft.is_some_and(|f| f.layer_decay < 1.0),
        ),
    ];
    match vit_only.iter().find(|(_, set)| *set) {
        Some((what, _)) => Err(Error::InvalidConfig(format!(
            "{what} is a ViT setting and this run trains a ResNet (batch norm, no dropout); \
             remove it"
        ))),
        None => Ok(()),
    }
}

fn read_history(path: &Path, upto_step: u64) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s <= upto_step))
        .collect()
}

fn rewrite_history(path: &Path, history: &[serde_json::Value]) -> Result<()> {
    let text: String = history.iter().map(|v| format!("{v}\n")).collect();
    crate::checkpoint::safetensors::write_atomic(path, text.as_bytes())
}

/// Refuses a run whose model and batch cannot fit in this machine's available memory, before
/// allocating any of it, with the estimate and a batch size that would fit.
/// `params` and `per_image` (bytes of activations) describe the model.
fn check_memory(params: usize, per_image: u64, run: &RunConfig) -> Result<()> {
    let Some(avail) = crate::infer::available_memory() else {
        return Ok(());
    };
    // `batch_size` is what one forward/backward holds (accumulation repeats it).
    let micro = run.train.batch_size;
    // Weights, gradients and the optimizer's two moments: 4 buffers of P floats.
    let fixed = 4 * 4 * params as u64;
    let per_image = per_image.max(1);
    let need = fixed.saturating_add(per_image.saturating_mul(micro as u64));
    if need <= avail {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let fits = (avail.saturating_sub(fixed) / per_image).min(micro as u64) as usize;
    let advice = match (fits > 0).then_some(fits) {
        Some(b) => format!(
            "use --batch-size {b} or smaller (with accum_steps = {} in [train] the optimizer \
             still sees {} images per step)",
            micro.div_ceil(b) * run.train.accum_steps.max(1),
            micro * run.train.accum_steps.max(1)
        ),
        None => "even one image does not fit: choose a smaller model".into(),
    };
    Err(Error::BadInput(format!(
        "this run needs about {:.1} GiB ({:.1} GiB of weights, gradients and optimizer state, \
         {:.1} GiB of activations for {micro} images) but {:.1} GiB of memory is available; {advice}",
        gib(need),
        gib(fixed),
        gib(need - fixed),
        gib(avail)
    )))
}

/// Makes `prev` a copy of `cur` without ever leaving neither: a hard link (or, where links are
/// not supported, a copy) to a temporary name, fsynced, then renamed over `prev`.
fn keep_previous(cur: &Path, prev: &Path) -> Result<()> {
    let tmp = crate::checkpoint::safetensors::temp_path(prev);
    let _ = std::fs::remove_file(&tmp);
    let linked = std::fs::hard_link(cur, &tmp).is_ok();
    let res = (|| {
        if !linked {
            std::fs::copy(cur, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
        }
        std::fs::rename(&tmp, prev)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(prev, e)
    })
}

/// Removes the temporary files of saves a killed process never finished (`.NAME.tmpPID-SEQ`,
/// or `.NAME.tmpPID` as earlier versions named them).
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with('.')
            && name.rsplit_once(".tmp").is_some_and(|(stem, pid)| {
                stem.ends_with(".safetensors")
                    && pid.starts_with(|c: char| c.is_ascii_digit())
                    && pid.bytes().all(|b| b.is_ascii_digit() || b == b'-')
            });
        if ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_for_budget_keeps_the_reserve_and_runs_at_least_one() {
        // 100 s left, 3 s kept back: 97 s of 10-second epochs.
        assert_eq!(epochs_for_budget(110.0, 10.0, 10.0), 9);
        assert_eq!(epochs_for_budget(7_200.0, 20.0, 100.0), 69);
        // 2910 s after the reserve: 29 whole epochs of 100 s, not 30.
        assert_eq!(epochs_for_budget(3_000.0, 0.0, 100.0), 29);
        // Nothing left, or an epoch longer than the budget: one epoch anyway.
        assert_eq!(epochs_for_budget(60.0, 90.0, 10.0), 1);
        assert_eq!(epochs_for_budget(60.0, 0.0, 1_000.0), 1);
        assert_eq!(epochs_for_budget(60.0, 0.0, 0.0), 1);
        assert_eq!(epochs_for_budget(60.0, 0.0, f64::NAN), 1);
    }

    #[test]
    fn projected_end_goes_at_the_pace_of_the_epochs_done() {
        // Today's long run: 14 min in after 7 of 68 epochs of ~117 s, 61 left.
        let end = projected_end(840.0, 7.0 * 117.0, 7, 61).unwrap();
        assert!((end - (840.0 + 61.0 * 117.0)).abs() < 1e-6, "{end}");
        // A resumed run's clock and pace count only this process's epochs.
        assert_eq!(projected_end(100.0, 50.0, 2, 3), Some(175.0));
        assert_eq!(projected_end(100.0, 0.0, 0, 3), None);
        assert_eq!(projected_end(100.0, 50.0, 2, 0), None);
    }
}
