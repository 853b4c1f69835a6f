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
use crate::model::resnet::{ResNet, ResNetConfig};
use crate::model::{Net, NetWorkspace, Regularization, ViT};
use crate::tensor::Tensor;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::RunConfig;

/// A model to time and the optimiser its training step uses.
pub struct Workload {
    pub model: Net,
    pub optimizer: OptimizerKind,
}

impl Workload {
    /// `spec` is a run config (`.toml`: its `[model]` at its dataset's image shape, and its
    /// optimiser), a checkpoint path, or a preset name (`B/16`, `S/16@384`,
    /// `vit_tiny_patch16_224`, or a ResNet's `resnet20@28x1`); presets and checkpoints get random weights or their own, and
    /// AdamW with PyTorch's defaults.
    pub fn from_spec(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(p).map_err(|e| crate::Error::io(p, e))?;
            let run = RunConfig::from_toml(&text, spec)?;
            // Without the data at hand, take the shape of a dataset known by name.
            let (shape, classes) =
                crate::data::known_shape(&run.data.dataset).unwrap_or(((3, 224, 224), 1000));
            return Ok(Workload {
                model: run.model.resolve_net(shape, classes)?.build(0)?,
                optimizer: run.train.optimizer,
            });
        }
        let model = if p.exists() {
            crate::checkpoint::load_net(p)?.model
        } else if let Some(cfg) = ResNetConfig::preset(spec) {
            Net::ResNet(ResNet::new(cfg?, 0)?)
        } else {
            Net::ViT(ViT::random(ViTConfig::preset(spec)?, 0)?)
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
    /// The fastest repetition: on a shared host, whose neighbours slow some repetitions by a
    /// quarter, a steadier figure than the median for comparing two builds of a kernel.
    pub best_batch_seconds: f64,
    pub iters: usize,
    pub train: bool,
    /// The kernels' rung of the instruction-set ladder ([`crate::kernels::isa`]).
    pub kernels: &'static str,
    /// What ran the matrix products ([`crate::kernels::gemm_engine`]; `"amx-bf16x6+fma"`
    /// where [`crate::kernels::adapt_engine`] used both between repetitions, or the threads
    /// of a pass image by image both, each on its own ([`crate::kernels::follow_engine_here`])).
    pub gemm: &'static str,
}

/// Which product of a linear layer `y = x·Wᵀ` (`x (m, k)`, `W (n, k)`) [`gemm`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmOp {
    /// `y (m, n) = x·Wᵀ + b`, the forward.
    Fwd,
    /// `dx (m, k) = dy (m, n) · W`, the backward to the input.
    Dx,
    /// `dW (n, k) += dyᵀ · x`, the backward to the weight.
    Dw,
}

impl GemmOp {
    /// `fwd`, `dx` or `dw`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fwd" => Some(GemmOp::Fwd),
            "dx" => Some(GemmOp::Dx),
            "dw" => Some(GemmOp::Dw),
            _ => None,
        }
    }
}

/// What [`gemm`] measured: one product of a linear layer as the engine runs it.
#[derive(Clone, Debug, Serialize)]
pub struct GemmReport {
    pub op: GemmOp,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// The weight was packed once beforehand (as [`ViT::pack_weights`] does).
    pub packed: bool,
    pub gflops_per_sec: f64,
    pub median_seconds: f64,
    /// The fastest repetition (see [`BenchReport::best_batch_seconds`]).
    pub best_seconds: f64,
    pub iters: usize,
    pub threads: usize,
    pub kernels: &'static str,
    /// What ran the product ([`crate::kernels::gemm_engine`]).
    pub gemm: &'static str,
}

/// Times one product of the linear layer `x (m, k)`, `W (n, k)` — the forward (with bias),
/// or the backward to the input or to the weight — as the engine runs it on the current
/// thread pool, `iters` times after `warmup` untimed runs; the median and the best.
/// 2·m·k·n FLOPs each.
pub fn gemm(
    op: GemmOp,
    (m, k, n): (usize, usize, usize),
    packed: bool,
    iters: usize,
    warmup: usize,
) -> GemmReport {
    use crate::kernels::gemm::{linear_dw, linear_dx, linear_packed, Epilogue, PackedLinear};
    let fill = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let (x, w, b, dy) = (fill(m * k, 1), fill(n * k, 2), fill(n, 3), fill(m * n, 4));
    let mut out = vec![0.0; m * n.max(k)];
    let mut dw = vec![0.0; n * k];
    let pw = (packed && op == GemmOp::Fwd)
        .then(|| PackedLinear::new(&w, (n, k)))
        .flatten();
    let mut once = || {
        // As a forward pass does (see `kernels::adapt_engine`), before the clock starts.
        crate::kernels::adapt_engine();
        let t = Instant::now();
        match op {
            GemmOp::Fwd => {
                let o = &mut out[..m * n];
                linear_packed(&x, &w, pw.as_ref(), Some(&b), o, (m, k, n), Epilogue::None)
            }
            GemmOp::Dx => linear_dx(&dy, &w, &mut out[..m * k], (m, k, n)),
            GemmOp::Dw => linear_dw(&dy, &x, &mut dw, (m, k, n)),
        }
        t.elapsed().as_secs_f64()
    };
    for _ in 0..warmup {
        once();
    }
    let mut on_tiles = 0;
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = once();
            on_tiles += usize::from(crate::kernels::products_on_tiles());
            t
        })
        .collect();
    let (median, best) = median_and_best(&mut times);
    GemmReport {
        op,
        m,
        k,
        n,
        packed: pw.is_some(),
        gflops_per_sec: 2.0 * (m * k * n) as f64 / median / 1e9,
        median_seconds: median,
        best_seconds: best,
        iters: times.len(),
        threads: rayon::current_num_threads(),
        kernels: crate::kernels::isa().name(),
        gemm: engines(on_tiles, times.len(), (0, 0)),
    }
}

/// What ran the products of `of` timed repetitions, `on_tiles` of them on the tile unit by
/// the process's engine, and `own` tasks `(on the FMA kernel, on the tiles)` each on its
/// thread's own ([`crate::kernels::own_engine_tasks`]: a pass image by image, where those
/// decide): [`crate::kernels::gemm_engine`], or both engines where they ran the products of
/// some repetitions or tasks each.
fn engines(on_tiles: usize, of: usize, own: (u64, u64)) -> &'static str {
    let (fma, tiles) = if own == (0, 0) {
        (on_tiles < of, on_tiles > 0)
    } else {
        (own.0 > 0, own.1 > 0)
    };
    match crate::kernels::gemm_engine() {
        "amx-bf16x6" | "fma" if fma && tiles => "amx-bf16x6+fma",
        "amx-bf16x6" | "fma" if tiles => "amx-bf16x6",
        "amx-bf16x6" | "fma" => "fma",
        e => e,
    }
}

/// The median and the fastest of timed repetitions (seconds; at least one), sorting them.
fn median_and_best(times: &mut [f64]) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
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
    let batch = batch.max(1);
    let (c, h, wd) = w.model.input();
    let fwd_flops = w.model.flops_per_image();
    let shape = vec![batch, c, h, wd];
    let numel: usize = shape.iter().product();
    let x = Tensor::new(
        shape,
        (0..numel)
            .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
            .collect(),
    )?;
    let k = w.model.num_classes().max(1);
    let labels: Vec<usize> = (0..batch).map(|i| i % k).collect();
    let targets = || Targets::Labels {
        labels: &labels,
        smoothing: 0.0,
    };
    if let (Net::ViT(m), false) = (&mut w.model, train) {
        // Repeated forwards of unchanging weights: pack them once, as a server would.
        m.pack_weights();
    }
    let mut opt = Optimizer::new(w.optimizer, w.model.params());
    let mut ws = NetWorkspace::for_net(&w.model);
    let model = &mut w.model;
    let mut once = |net: &mut Net| -> Result<()> {
        if train {
            ws.zero_grads();
            let reg = Regularization::default();
            net.forward_backward(&x, targets(), reg, &mut ws, &mut |_, _| {})?;
            opt.step(net.params_mut().flat_mut(), ws.grads(), 1e-4);
        } else {
            net.logits(&x, &mut ws)?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        once(model)?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    let mut on_tiles = 0;
    let own_before = crate::kernels::own_engine_tasks();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        once(model)?;
        times.push(t.elapsed().as_secs_f64());
        on_tiles += usize::from(crate::kernels::products_on_tiles());
    }
    let own_after = crate::kernels::own_engine_tasks();
    let own = (own_after.0 - own_before.0, own_after.1 - own_before.1);
    let (median, best) = median_and_best(&mut times);
    let ips = batch as f64 / median;
    Ok(BenchReport {
        images_per_sec: ips,
        // A training step is the forward and a backward of twice its work.
        gflops_per_sec: ips * fwd_flops * if train { 3.0 } else { 1.0 } / 1e9,
        batch_size: batch,
        threads: rayon::current_num_threads(),
        median_batch_seconds: median,
        best_batch_seconds: best,
        iters: times.len(),
        train,
        kernels: crate::kernels::isa().name(),
        gemm: engines(on_tiles, times.len(), own),
    })
}

/// What [`loader`] measured: how fast the data loader decodes, augments and normalises
/// batches, with no model behind it.
#[derive(Clone, Debug, Serialize)]
pub struct LoaderReport {
    pub dataset: String,
    /// `(C, H, W)` of the batches.
    pub shape: [usize; 3],
    pub batch_size: usize,
    pub workers: usize,
    pub batches: usize,
    pub images_per_sec: f64,
    /// `images_per_sec / workers`: what one core decodes.
    pub images_per_sec_per_worker: f64,
    /// Images left out because they could not be decoded.
    pub skipped: usize,
}

/// Times the loader alone on `spec` (a dataset `vit train` reads: a name, a directory, shards;
/// image folders and photo shards decoded to `size` `(C, H, W)`), with `augment`,
/// on `workers` threads: `batches` batches of `batch_size` after one untimed batch.
pub fn loader(
    spec: &str,
    size: (usize, usize, usize),
    augment: crate::data::augment::Augment,
    batch_size: usize,
    workers: usize,
    batches: usize,
) -> Result<LoaderReport> {
    use crate::data::loader::{Loader, LoaderConfig};
    // Datasets with a size of their own (IDX, CIFAR, shards packed from them) keep it, as in
    // training; image folders and shards of photos are decoded to `size`.
    let data = crate::data::open_with(spec, crate::data::Split::Train, size, false)?;
    let (c, h, w) = data.shape();
    let cfg = LoaderConfig {
        workers: workers.max(1),
        augment,
        shuffle: true,
        drop_last: true,
        prefetch: 2 * workers.max(1),
        ..LoaderConfig::in_order(batch_size.max(1), &vec![0.5; c], &vec![0.5; c], 1)
    };
    let mut l = Loader::new(data, cfg)?;
    // One untimed batch: threads started, files opened.
    l.next().transpose()?;
    let start = Instant::now();
    let (mut n, mut images) = (0, 0);
    for b in l.by_ref().take(batches.max(1)) {
        images += b?.labels.len();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let ips = images as f64 / secs;
    Ok(LoaderReport {
        dataset: spec.to_string(),
        shape: [c, h, w],
        batch_size,
        workers: workers.max(1),
        batches: n,
        images_per_sec: ips,
        images_per_sec_per_worker: ips / workers.max(1) as f64,
        skipped: l.skipped().0,
    })
}

#[cfg(test)]
mod tests {
    use super::engines;

    #[test]
    fn the_engine_reported_is_what_ran_the_products() {
        if crate::kernels::gemm_engine() == "matrixmultiply" {
            assert_eq!(engines(0, 5, (0, 0)), "matrixmultiply");
            return;
        }
        // The process's engine, repetition by repetition.
        assert_eq!(engines(0, 5, (0, 0)), "fma");
        assert_eq!(engines(5, 5, (0, 0)), "amx-bf16x6");
        assert_eq!(engines(2, 5, (0, 0)), "amx-bf16x6+fma");
        // Image by image, the threads' own engines decide, whatever the process's was.
        assert_eq!(engines(5, 5, (3, 0)), "fma");
        assert_eq!(engines(0, 5, (0, 4)), "amx-bf16x6");
        assert_eq!(engines(0, 5, (3, 1)), "amx-bf16x6+fma");
    }
}
