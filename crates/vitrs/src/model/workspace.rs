//! Activation buffers, llm.c style: allocated once per (config, batch size, mode) and reused,
//! so the steady-state forward and training step allocate nothing but their outputs.
//!
//! One [`Activations`] serves both modes of the one forward pass ([`super::forward`]):
//! inferring, every block in turn writes into the same single set of block buffers, and the
//! buffers only the backward reads are left empty; training keeps one set per block.
//! The same list of buffers sizes them and estimates their memory, so the two cannot drift.

use super::block::{BlockActs, Regularization};
use super::embed::EmbedActs;
use super::head::HeadActs;
use super::layers::{NormActs, Sizer};
use super::pool::PoolActs;
use super::ViT;
use crate::config::ViTConfig;

/// Every activation of one forward pass.
#[derive(Debug, Default)]
pub(crate) struct Activations {
    /// What the buffers are sized for: (config, batch size, training).
    key: Option<(ViTConfig, usize, bool)>,
    pub embed: EmbedActs,
    /// The residual stream `(B, N, D)`.
    pub x: Vec<f32>,
    /// One per block when training; one shared by every block when inferring.
    pub blocks: Vec<BlockActs>,
    /// The final LayerNorm over the last block's output `(B, N, D)` (empty without one).
    pub final_norm: NormActs,
    pub pool: PoolActs,
    pub head: HeadActs,
    /// `(B·N, D)`: a masked branch's output before it is added (training only).
    pub branch: Vec<f32>,
    /// The attention kernel's per-thread tiles.
    pub attn_scratch: Vec<f32>,
    /// Tokens per image the last block left in `x` (and the final norm normalised): N, or the
    /// few pooling reads (see `forward::Pass::last_queries`). Set by each forward pass.
    pub tokens: usize,
}

impl Activations {
    /// Calls `f` on every per-image buffer with the length it needs for `batch` images.
    fn visit(&mut self, cfg: &ViTConfig, batch: usize, train: bool, f: &mut Sizer) {
        let rows = batch * cfg.num_tokens();
        let d = cfg.width;
        self.embed.size(cfg, batch, f);
        f(&mut self.x, rows * d);
        self.blocks
            .resize_with(if train { cfg.depth } else { 1 }, BlockActs::default);
        for b in &mut self.blocks {
            b.size(cfg, batch, train, f);
        }
        let final_rows = if cfg.has_final_norm() { rows } else { 0 };
        self.final_norm.size(final_rows, d, train, f);
        self.pool.size(cfg, batch, train, f);
        self.head.size(cfg, batch, train, f);
        f(&mut self.branch, if train { rows * d } else { 0 });
    }

    /// Sizes the buffers for `cfg`, `batch` and the mode, run by the kernels' threads; a no-op
    /// when they already fit.
    pub(crate) fn prepare(&mut self, cfg: &ViTConfig, batch: usize, train: bool) {
        self.prepare_for(cfg, batch, train, crate::kernels::team::threads());
    }

    /// [`Self::prepare`] for a pass run on one thread alone (an image of a batch run image by
    /// image): the attention kernel's tiles for one thread.
    pub(crate) fn prepare_alone(&mut self, cfg: &ViTConfig, batch: usize, train: bool) {
        self.prepare_for(cfg, batch, train, 1);
    }

    fn prepare_for(&mut self, cfg: &ViTConfig, batch: usize, train: bool, threads: usize) {
        if self
            .key
            .as_ref()
            .is_some_and(|(c, b, t)| c == cfg && *b == batch && *t == train)
        {
            return;
        }
        self.visit(cfg, batch, train, &mut |v, len| {
            v.clear();
            v.resize(len, 0.0);
        });
        let dims = crate::kernels::attention::AttnDims {
            batch,
            tokens: cfg.num_tokens(),
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
        };
        // Also the last block's probabilities for its first rows `(B, nh, q, N)` when
        // inferring (training keeps them in the block's own `probs`).
        let first = cfg
            .pooled_prefix()
            .map_or(0, |q| batch * cfg.heads * q * cfg.num_tokens());
        let need = dims.scratch_len(threads).max(first);
        if self.attn_scratch.len() < need {
            self.attn_scratch.resize(need, 0.0);
        }
        self.key = Some((cfg.clone(), batch, train));
    }

    /// Floats the per-image buffers hold for one image, counted without allocating.
    fn floats_per_image(cfg: &ViTConfig, train: bool) -> u64 {
        let mut n = 0u64;
        Activations::default().visit(cfg, 1, train, &mut |_, len| n += len as u64);
        n
    }

    /// The final token states `(B, N, D)`: the final norm's output, or the stream itself.
    pub(crate) fn states<'a>(model: &ViT, final_norm: &'a NormActs, x: &'a [f32]) -> &'a [f32] {
        if model.view.norm.is_some() {
            &final_norm.output
        } else {
            x
        }
    }
}

/// Activation buffers for inference with one model config and batch size. Reusing one across
/// calls means the steady-state forward allocates only its outputs.
#[derive(Debug, Default)]
pub struct Workspace {
    pub(crate) acts: Activations,
    /// One set per image, where a batch runs image by image (see [`super::forward`]).
    pub(crate) images: Vec<Activations>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes a forward pass of `cfg` holds per image of the batch (attention capture and the
    /// attention kernel's per-thread tiles excluded), counted without allocating.
    pub fn bytes_per_image(cfg: &ViTConfig) -> u64 {
        4 * Activations::floats_per_image(cfg, false)
    }
}

/// Everything a training step needs, sized for one config and batch size, plus the gradients.
#[derive(Debug, Default)]
pub struct TrainWorkspace {
    pub(crate) acts: Activations,
    /// ∂loss/∂params, same layout as [`super::Params::flat`]; accumulated by each step.
    pub(crate) grads: Vec<f32>,
    /// Regularisation applied by the next [`ViT::forward_backward`] calls.
    pub reg: Regularization,
    pub(crate) g: GradScratch,
}

/// The backward's gradient buffers.
#[derive(Debug, Default)]
pub(crate) struct GradScratch {
    /// `(B, N, D)`: ∂loss/∂(residual stream), and a second buffer of that shape.
    pub dx: Vec<f32>,
    pub dtmp: Vec<f32>,
    /// `(B, N, 3D)`, `(B, N, D)`, `(B, N, M)`: inside a block.
    pub dqkv: Vec<f32>,
    pub dattn: Vec<f32>,
    pub dh: Vec<f32>,
    /// `(B, D)`, `(B, D)`, `(B, F)`, `(B, K)`: the head's.
    pub dpooled: Vec<f32>,
    pub dpooled_dist: Vec<f32>,
    pub dpre: Vec<f32>,
    pub dlogits: Vec<f32>,
    /// LayerNorm backward's per-thread γ/β sums.
    pub ln_partials: Vec<f32>,
}

impl GradScratch {
    fn visit(&mut self, cfg: &ViTConfig, batch: usize, f: &mut Sizer) {
        let rows = batch * cfg.num_tokens();
        let (d, m) = (cfg.width, cfg.mlp_dim);
        f(&mut self.dx, rows * d);
        f(&mut self.dtmp, rows * d);
        f(&mut self.dqkv, rows * 3 * d);
        f(&mut self.dattn, rows * d);
        f(&mut self.dh, rows * m);
        f(&mut self.dpooled, batch * d);
        f(
            &mut self.dpooled_dist,
            if cfg.distilled { batch * d } else { 0 },
        );
        f(&mut self.dpre, batch * cfg.feature_dim());
        f(&mut self.dlogits, batch * cfg.num_classes);
    }
}

impl TrainWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// The accumulated gradients (parameter layout).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// Sets every gradient to zero (call before each optimizer step's first micro-batch).
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    /// Logits `(B, K)` of the last step.
    pub fn logits(&self) -> &[f32] {
        &self.acts.head.logits
    }

    /// Bytes a training step of `cfg` holds per image of the batch: the activations and
    /// gradient scratch `prepare` allocates (the same list, counted without
    /// allocating, so an impossible batch size can be refused up front). The gradients add
    /// one float per parameter on top.
    pub fn bytes_per_image(cfg: &ViTConfig) -> u64 {
        let mut n = Activations::floats_per_image(cfg, true);
        GradScratch::default().visit(cfg, 1, &mut |_, len| n += len as u64);
        4 * n
    }

    pub(crate) fn prepare(&mut self, model: &ViT, batch: usize) {
        let cfg = model.config();
        if self
            .acts
            .key
            .as_ref()
            .is_some_and(|(c, b, t)| c == cfg && *b == batch && *t)
        {
            return;
        }
        self.acts.prepare(cfg, batch, true);
        self.g.visit(cfg, batch, &mut |v, len| {
            v.clear();
            v.resize(len, 0.0);
        });
        if self.grads.len() != model.params().count() {
            self.grads.clear();
            self.grads.resize(model.params().count(), 0.0);
        }
    }
}
