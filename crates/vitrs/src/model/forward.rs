//! The forward pass — one for inference and training. [`ViT::forward_pass`] reads top to
//! bottom as the paper's model: embedding → blocks → final norm → pool → head; the [`Pass`]
//! says whether it keeps what the backward needs (training) or overwrites as it goes and
//! fuses where it can (inference). [`ViT::forward`] is the public inference entry point.

use super::block::{BlockPass, Regularization};
use super::workspace::{Activations, Workspace};
use super::ViT;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// What a forward pass should return besides the logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Per-layer attention probabilities `(L, B, nh, N, N)`.
    pub attentions: bool,
    /// The vector fed to the classifier `(B, F)`.
    pub pre_logits: bool,
}

/// Result of [`ViT::forward`].
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// `(B, K)`; when the model has no classifier (K = 0) the features `(B, F)`.
    pub logits: Tensor,
    /// `(L, B, nh, N, N)`, when captured.
    pub attentions: Option<Tensor>,
    /// `(B, F)`, when captured.
    pub pre_logits: Option<Tensor>,
}

/// How [`ViT::forward_pass`] runs.
pub(crate) enum Pass<'a> {
    /// Inference: each block overwrites the last one's activations, the MLP's GELU is fused
    /// into its product, and the attention maps `(L, B, nh, N, N)` are written into
    /// `attentions` when given.
    Infer { attentions: Option<&'a mut [f32]> },
    /// Training: every block keeps what the backward reads, and `reg` draws the dropout and
    /// stochastic-depth masks.
    Train { reg: Regularization },
}

impl Pass<'_> {
    /// Block `l`'s part of the pass: what it keeps, the masks it draws, where its attention
    /// maps `(B, nh, N, N)` go (one plane of `(L, B, nh, N, N)`).
    fn block(&mut self, l: usize, plane: usize) -> BlockPass<'_> {
        match self {
            Pass::Train { reg } => BlockPass {
                keep: true,
                reg: reg.active().then_some(*reg),
                capture: None,
            },
            Pass::Infer { attentions } => BlockPass {
                keep: false,
                reg: None,
                capture: attentions
                    .as_deref_mut()
                    .map(|t| &mut t[l * plane..(l + 1) * plane]),
            },
        }
    }
}

impl ViT {
    /// Runs the model on a batch of preprocessed images.
    ///
    /// # Shapes
    /// `images (B, C, H, W)` → logits `(B, K)` (or features `(B, F)` when K = 0), attentions
    /// `(L, B, nh, N, N)`, pre-logits `(B, F)`.
    pub fn forward(
        &self,
        images: &Tensor,
        capture: Capture,
        ws: &mut Workspace,
    ) -> Result<ForwardOutput> {
        let cfg = &self.config;
        let batch = self.batch_size_of(images, "input images (B, C, H, W)")?;
        ws.acts.prepare(cfg, batch, false);
        let mut attentions = capture.attentions.then(|| {
            let n = cfg.num_tokens();
            Tensor::zeros(vec![cfg.depth, batch, cfg.heads, n, n])
        });
        let pass = Pass::Infer {
            attentions: attentions.as_mut().map(|t| t.data_mut()),
        };
        self.forward_pass(images.data(), batch, &mut ws.acts, pass);
        let a = &ws.acts;
        let features = || self.features(batch, &a.pool, &a.head);
        let f = cfg.feature_dim();
        let logits = match cfg.num_classes {
            0 => Tensor::new(vec![batch, f], features())?,
            k => Tensor::new(vec![batch, k], a.head.logits[..batch * k].to_vec())?,
        };
        let pre_logits = capture
            .pre_logits
            .then(|| Tensor::new(vec![batch, f], features()))
            .transpose()?;
        Ok(ForwardOutput {
            logits,
            attentions,
            pre_logits,
        })
    }

    /// The forward pass: leaves the logits `(B, K)` in `acts.head.logits` (and every
    /// activation the backward needs in `acts`, when training).
    ///
    /// # Shapes
    /// `images (B, C, H, W)` → tokens `x (B, N, D)` → L blocks `(B, N, D)` → final norm →
    /// pooled `(B, D)` → logits `(B, K)`.
    pub(crate) fn forward_pass(
        &self,
        images: &[f32],
        batch: usize,
        acts: &mut Activations,
        mut pass: Pass<'_>,
    ) {
        let keep = matches!(pass, Pass::Train { .. });
        let cfg = &self.config;
        let plane = batch * cfg.heads * cfg.num_tokens() * cfg.num_tokens();
        let Activations {
            embed,
            x,
            blocks,
            final_norm,
            pool,
            head,
            branch,
            attn_scratch,
            ..
        } = acts;
        self.embed(images, batch, embed, x);
        for l in 0..cfg.depth {
            // Training keeps every block's activations; inference reuses one set.
            let block_acts = &mut blocks[if keep { l } else { 0 }];
            let bp = pass.block(l, plane);
            self.block_forward(l, x, block_acts, branch, attn_scratch, batch, bp);
        }
        if let Some(nv) = &self.view.norm {
            self.norm(nv, x, final_norm, keep);
        }
        let states = Activations::states(self, final_norm, x);
        self.pool(states, batch, pool, keep);
        self.head(batch, pool, head, keep);
    }

    /// The batch size of `images`, checked to be `(B ≥ 1, C, H, W)` of this model; `what`
    /// names the tensor in the error.
    pub(super) fn batch_size_of(&self, images: &Tensor, what: &str) -> Result<usize> {
        let cfg = &self.config;
        let want = [cfg.channels, cfg.image_height, cfg.image_width];
        let shape = images.shape();
        if shape.len() != 4 || shape[1..] != want || shape[0] == 0 {
            return Err(Error::ShapeMismatch {
                name: what.into(),
                expected: vec![
                    shape.first().copied().unwrap_or(1).max(1),
                    want[0],
                    want[1],
                    want[2],
                ],
                got: shape.to_vec(),
            });
        }
        Ok(shape[0])
    }

    /// Convenience forward with a fresh workspace and no capture.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self
            .forward(images, Capture::default(), &mut Workspace::new())?
            .logits)
    }
}
