//! Training checkpoints: a native model file (loadable by every `vit` command) that also holds
//! the optimiser moments as `optimizer.m.<name>` / `optimizer.v.<name>` tensors, the weights'
//! moving average as `ema.<name>` when the run keeps one (loaded in place of the trained
//! weights by the other commands, as model.safetensors is that average) and, in its metadata,
//! the run config and the position in the run. Written atomically.

use std::path::Path;

use super::config::RunConfig;
use super::optim::{Ema, Optimizer};
use crate::checkpoint::safetensors::{self, SafeTensors, SaveDtype};
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::model::Net;
use crate::preprocess::Preprocess;

/// Where a run stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub batch: usize,
}

const META_RUN: &str = "vitrs.run_config";
const META_POS: &str = "vitrs.position";
const META_OPT_T: &str = "vitrs.optimizer_t";

/// Saves model, optimiser, the weights' moving average (as `ema.<name>`, when the run keeps
/// one) and position to `path` (temp file, fsync, rename).
#[allow(clippy::too_many_arguments)]
pub fn save(
    path: &Path,
    model: &Net,
    opt: &Optimizer,
    ema: Option<&Ema>,
    pre: &Preprocess,
    labels: &[String],
    run: &RunConfig,
    pos: Position,
) -> Result<()> {
    let mut meta = checkpoint::net_metadata(model, pre, Some(labels))?;
    meta.insert(META_RUN.into(), run.to_toml()?);
    meta.insert(
        META_POS.into(),
        serde_json::to_string(&pos).map_err(|e| Error::serialize("the run position", e))?,
    );
    meta.insert(META_OPT_T.into(), opt.t.to_string());
    let p = model.params();
    let mut names: Vec<(String, &[usize], &[f32])> = vec![];
    for e in p.entries() {
        names.push((e.name.clone(), &e.shape, &p.flat()[e.range.clone()]));
        names.push((
            format!("optimizer.m.{}", e.name),
            &e.shape,
            &opt.m[e.range.clone()],
        ));
        if !opt.v.is_empty() {
            names.push((
                format!("optimizer.v.{}", e.name),
                &e.shape,
                &opt.v[e.range.clone()],
            ));
        }
        if let Some(avg) = ema {
            names.push((
                format!("{}{}", checkpoint::EMA_PREFIX, e.name),
                &e.shape,
                &avg.weights[e.range.clone()],
            ));
        }
    }
    // A ResNet's running statistics: state of the model, not trained by the optimizer.
    if let Some(b) = model.buffers() {
        for e in b.entries() {
            names.push((e.name.clone(), &e.shape, &b.flat()[e.range.clone()]));
        }
    }
    let tensors: Vec<(&str, &[usize], &[f32])> =
        names.iter().map(|(n, s, d)| (n.as_str(), *s, *d)).collect();
    safetensors::write(path, &tensors, &meta, SaveDtype::F32)
}

/// What a training checkpoint holds.
pub struct Loaded {
    /// The model, with its preprocessing and labels.
    pub ck: Checkpoint<Net>,
    pub run: RunConfig,
    pub opt: Optimizer,
    /// The weights' moving average, when the run keeps one (`ema_decay`).
    pub ema: Option<Ema>,
    pub pos: Position,
}

/// Loads a training checkpoint.
pub fn load(path: &Path) -> Result<Loaded> {
    let mut ck = checkpoint::load_net(path)?;
    let st = SafeTensors::read(path)?;
    let meta = st.metadata();
    let bad = |r: String| Error::malformed(path, "training checkpoint", r);
    let run = RunConfig::from_toml(meta.get(META_RUN).ok_or_else(|| bad(format!("metadata lacks `{META_RUN}` (is this a model file rather than a run's checkpoint?)")))?, &path.display().to_string())?;
    let pos: Position = serde_json::from_str(
        meta.get(META_POS)
            .ok_or_else(|| bad(format!("metadata lacks `{META_POS}`")))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    let mut opt = Optimizer::new(run.train.optimizer, ck.model.params());
    opt.t = meta
        .get(META_OPT_T)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("bad optimizer step".into()))?;
    let has_v = !opt.v.is_empty();
    let mut ema = run.train.ema_decay.map(|decay| Ema {
        decay,
        weights: vec![0.0f32; ck.model.params().count()],
    });
    let entries = ck.model.params().entries().to_vec();
    // `checkpoint::load` gives the weights' average when the run keeps one (what every other
    // command should see); resuming needs the trained weights, stored under their own names.
    let mut bufs: Vec<(&str, &mut [f32])> = vec![("optimizer.m.", &mut opt.m)];
    if has_v {
        bufs.push(("optimizer.v.", &mut opt.v));
    }
    if let Some(avg) = ema.as_mut() {
        bufs.push((checkpoint::EMA_PREFIX, &mut avg.weights));
        bufs.push(("", ck.model.params_mut().flat_mut()));
    }
    for (prefix, buf) in bufs {
        checkpoint::read_prefixed(&st, prefix, &entries, buf)?;
    }
    Ok(Loaded {
        ck,
        run,
        opt,
        ema,
        pos,
    })
}
