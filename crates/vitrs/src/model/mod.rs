//! The Vision Transformer.
//!
//! # Shape legend
//! B batch, C channels, H×W image, P patch, gh×gw patch grid (H/P × W/P), N tokens
//! (prefix tokens + gh·gw: the \[class\] token, and DeiT's distillation and register tokens when
//! present), D width, nh heads, hd head dim (D/nh), M MLP width,
//! K classes, F feature width fed to the classifier (D, or the pre-logits width), L layers.
//!
//! # Data flow (reads top to bottom, as [`ViT::forward`] does)
//! image `(B, C, H, W)` → patches `(B·gh·gw, C·P·P)` → linear projection `(B·gh·gw, D)` →
//! prepend the prefix tokens, add position embeddings `(B, N, D)` → L blocks `(B, N, D)`, each
//! branch optionally scaled by LayerScale → final norm → pool `(B, D)`: class token, mean of
//! the patch tokens, or attention pooling → \[fc_norm\] → \[pre-logits dense + tanh `(B, F)`\] →
//! head `(B, K)` (DeiT: the mean of `head` on the class token and `head_dist` on the
//! distillation token).
//!
//! # Where each stage lives
//! One file per stage of the paper, each with its forward and its backward side by side:
//! `embed` (patches, prefix tokens, position embedding), `block` (attention and MLP
//! branches, pre/post norm, LayerScale, dropout and stochastic depth), `pool` (class token,
//! mean, attention pooling) and `head` (fc_norm, pre-logits, classifiers). `forward` is the
//! one forward pass inference and training share; `backward` the training step that runs it
//! and then the stages' backwards in reverse. `layers` holds the linear and LayerNorm layers
//! the stages are built from, `workspace` the activation buffers, `params` the parameter
//! store, `init` the initialisation.

mod backward;
mod block;
mod embed;
mod forward;
mod head;
mod init;
mod layers;
mod net;
mod params;
mod pool;
pub mod resnet;
mod workspace;

pub use block::Regularization;
pub use forward::{Capture, ForwardOutput};
pub use init::Rng;
pub use net::{Net, NetConfig, NetWorkspace};
pub use params::{ParamEntry, Params};
pub use workspace::{TrainWorkspace, Workspace};

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::ViTConfig;
use crate::error::Result;
use crate::kernels::gemm::PackedLinear;
use params::{layout, ModelView};

/// A ViT: its config and its parameters.
#[derive(Clone, Debug)]
pub struct ViT {
    config: ViTConfig,
    params: Params,
    view: ModelView,
    /// The linear layers' weights packed for the GEMM kernel ([`ViT::pack_weights`]), by the
    /// start of the weight in the parameter buffer. Dropped by any change of the parameters.
    packed: Option<Arc<HashMap<usize, PackedLinear>>>,
}

impl ViT {
    /// A model with every parameter zero (to be filled by a checkpoint loader).
    pub fn zeros(config: ViTConfig) -> Result<Self> {
        config.validate()?;
        let (entries, view, len) = layout(&config);
        Ok(ViT {
            config,
            params: Params::zeros(entries, len),
            view,
            packed: None,
        })
    }

    /// A randomly initialised model (timm's scheme, zero head), deterministic in `seed`.
    pub fn random(config: ViTConfig, seed: u64) -> Result<Self> {
        let mut m = ViT::zeros(config)?;
        let layer_scale = m.config.layer_scale;
        init::init_params(&mut m.params, seed, layer_scale);
        Ok(m)
    }

    /// Parameters of a model of `config`, without allocating it.
    pub fn param_count(config: &ViTConfig) -> usize {
        layout(config).2
    }

    /// The named parameter entries of a model of `config`, without allocating it.
    pub fn param_entries(config: &ViTConfig) -> Vec<ParamEntry> {
        layout(config).0
    }

    pub fn config(&self) -> &ViTConfig {
        &self.config
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The parameters, to change: the packed weights ([`Self::pack_weights`]) are dropped.
    pub fn params_mut(&mut self) -> &mut Params {
        self.packed = None;
        &mut self.params
    }

    /// Packs the weight of every linear layer once into the GEMM micro-kernel's panels for
    /// the CPU's instruction set, so that forward passes stop packing them on every call
    /// (10–15 % of a batch-1 ViT-B forward). Worth it when a model runs many forwards — a
    /// benchmark, an evaluation, a server —; it holds the weights a second time (ViT-B: about
    /// 330 MB; 510 MB for the tile unit, and both where the engine moves between the tile unit
    /// and the FMA kernel), and a change of the parameters drops the packing. Does nothing on
    /// the portable rung.
    pub fn pack_weights(&mut self) {
        // For the engine that runs the products now: where it follows the tile unit's speed,
        // a look first (as a forward pass starts with), so that a run whose tile unit is slow
        // packs for the FMA kernel alone (ViT-B/16: 510 MB and 0.2 s of packing for the tiles
        // spared, unless the engine moves to them later).
        crate::kernels::adapt_engine();
        let mut map = HashMap::new();
        let v = &self.view;
        let mut linears = vec![&v.patch_embed];
        for b in &v.blocks {
            linears.extend([&b.qkv, &b.proj, &b.fc1, &b.fc2]);
        }
        if let Some(m) = &v.attn_pool {
            linears.extend([&m.q, &m.kv, &m.proj, &m.fc1, &m.fc2]);
        }
        linears.extend([&v.pre_logits, &v.head, &v.head_dist].into_iter().flatten());
        for l in linears {
            let w = self.params.slice(&l.w);
            if let Some(p) = PackedLinear::new(w, (l.out, l.inp)) {
                map.insert(l.w.start, p);
            }
        }
        self.packed = (!map.is_empty()).then(|| Arc::new(map));
    }

    /// Bytes the packed weights hold (0 when not packed).
    pub fn packed_bytes(&self) -> usize {
        self.packed
            .as_ref()
            .map_or(0, |m| m.values().map(PackedLinear::bytes).sum())
    }
}
