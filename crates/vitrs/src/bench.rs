//! The workload `vit bench` times: a model — a preset, a checkpoint or a run config's — run on
//! fixed pseudo-random inputs, for inference or for a whole training step (forward, backward,
//! optimiser update), reported as images per second and GFLOP/s. Median of the timed
//! repetitions, after untimed warm-up ones.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::config::ViTConfig;
use crate::error::Result;
use crate::kernels::loss::Targets;
use crate::model::{Capture, TrainWorkspace, ViT, Workspace};
use crate::tensor::Tensor;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::RunConfig;

/// A model to time and the optimiser its training step uses.
pub struct Workload {
    pub model: ViT,
    pub optimizer: OptimizerKind,
}

impl Workload {
    /// `spec` is a run config (`.toml`: its `[model]` at its dataset's image shape, and its
    /// optimiser), a checkpoint path, or a preset name (`B/16`, `S/16@384`,
    /// `vit_tiny_patch16_224`); presets and checkpoints get random weights or their own, and
    /// AdamW with PyTorch's defaults.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(p).map_err(|e| crate::Error::io(p, e))?;
            let run = RunConfig::from_toml(&text, spec)?;
            // Without the data at hand, take the shape of a dataset known by name.
            let (shape, classes) =
                crate::data::known_shape(&run.data.dataset).unwrap_or(((3, 224, 224), 1000));
            let cfg = run.model.resolve(shape, classes)?;
            return Ok(Workload {
                model: ViT::random(cfg, 0)?,
                optimizer: run.train.optimizer,
            });
        }
        let model = if p.exists() {
            crate::checkpoint::load(p)?.model
        } else {
            ViT::random(ViTConfig::preset(spec)?, 0)?
        };
        Ok(Workload {
            model,
            optimizer: OptimizerKind::default(),
        })
    }
}

/// What [`run`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub images_per_sec: f64,
    pub gflops_per_sec: f64,
    pub batch_size: usize,
    pub threads: usize,
    pub median_batch_seconds: f64,
    pub iters: usize,
    pub train: bool,
    /// The kernels' rung of the instruction-set ladder ([`crate::kernels::isa`]).
    pub kernels: &'static str,
}

/// FLOPs of one image through `cfg`: a forward, or a training step, which costs about three
/// forwards (the forward, and the backward's products to inputs and to weights).
pub fn flops_per_image(cfg: &ViTConfig, train: bool) -> f64 {
    cfg.flops_per_image() * if train { 3.0 } else { 1.0 }
}

/// Times `iters` repetitions (after `warmup` untimed ones) of inference, or with `train` of a
/// whole training step, on a batch of `batch` fixed pseudo-random images.
pub fn run(
    w: &mut Workload,
    train: bool,
    batch: usize,
    iters: usize,
    warmup: usize,
) -> Result<BenchReport> {
    let cfg = w.model.config().clone();
    let batch = batch.max(1);
    let shape = vec![batch, cfg.channels, cfg.image_height, cfg.image_width];
    let numel: usize = shape.iter().product();
    let x = Tensor::new(
        shape,
        (0..numel)
            .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
            .collect(),
    )?;
    let k = cfg.num_classes.max(1);
    let labels: Vec<usize> = (0..batch).map(|i| i % k).collect();
    if !train {
        // Repeated forwards of unchanging weights: pack them once, as a server would.
        w.model.pack_weights();
    }
    let mut ws = Workspace::new();
    let mut tw = TrainWorkspace::new();
    let mut opt = Optimizer::new(w.optimizer, w.model.params());
    let model = &mut w.model;
    let mut once = |vit: &mut ViT| -> Result<()> {
        if train {
            tw.zero_grads();
            let targets = Targets::Labels {
                labels: &labels,
                smoothing: 0.0,
            };
            vit.forward_backward(&x, targets, &mut tw)?;
            opt.step(vit.params_mut().flat_mut(), tw.grads(), 1e-4);
        } else {
            vit.forward(&x, Capture::default(), &mut ws)?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        once(model)?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        once(model)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let ips = batch as f64 / median;
    Ok(BenchReport {
        images_per_sec: ips,
        gflops_per_sec: ips * flops_per_image(&cfg, train) / 1e9,
        batch_size: batch,
        threads: rayon::current_num_threads(),
        median_batch_seconds: median,
        iters: times.len(),
        train,
        kernels: crate::kernels::isa().name(),
    })
}
