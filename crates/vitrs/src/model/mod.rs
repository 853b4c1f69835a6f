//! The Vision Transformer.
//!
//! # Shape legend
//! B batch, C channels, H×W image, P patch, gh×gw patch grid (H/P × W/P), N tokens
//! (prefix tokens + gh·gw: the [class] token, and DeiT's distillation and register tokens when
//! present), D width, nh heads, hd head dim (D/nh), M MLP width,
//! K classes, F feature width fed to the classifier (D, or the pre-logits width), L layers.
//!
//! # Data flow (reads top to bottom, as [`ViT::forward`] does)
//! image `(B, C, H, W)` → patches `(B·gh·gw, C·P·P)` → linear projection `(B·gh·gw, D)` →
//! prepend the prefix tokens, add position embeddings `(B, N, D)` → L blocks `(B, N, D)`, each
//! branch optionally scaled by LayerScale → final norm → pool `(B, D)`: class token, mean of
//! the patch tokens, or attention pooling → [fc_norm] → [pre-logits dense + tanh `(B, F)`] →
//! head `(B, K)` (DeiT: the mean of `head` on the class token and `head_dist` on the
//! distillation token).
//!
//! # Where each stage lives
//! One file per stage of the paper, each with its forward and its backward side by side:
//! [`embed`] (patches, prefix tokens, position embedding), [`block`] (attention and MLP
//! branches, pre/post norm, LayerScale, dropout and stochastic depth), [`pool`] (class token,
//! mean, attention pooling) and [`head`] (fc_norm, pre-logits, classifiers). [`forward`] is the
//! one forward pass inference and training share; [`backward`] the training step that runs it
//! and then the stages' backwards in reverse. [`layers`] holds the linear and LayerNorm layers
//! the stages are built from, [`workspace`] the activation buffers, [`params`] the parameter
//! store, [`init`] the initialisation.

mod backward;
mod block;
mod embed;
mod forward;
mod head;
mod init;
mod layers;
mod params;
mod pool;
mod workspace;

pub use block::Regularization;
pub use forward::{Capture, ForwardOutput};
pub use init::Rng;
pub use params::{ParamEntry, Params};
pub use workspace::{TrainWorkspace, Workspace};

use crate::config::ViTConfig;
use crate::error::Result;
use params::{layout, ModelView};

/// A ViT: its config and its parameters.
#[derive(Clone, Debug)]
pub struct ViT {
    config: ViTConfig,
    params: Params,
    view: ModelView,
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

    pub fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }
}
