//! The forward pass, with activations allocated once per batch size and reused.

use super::backward::{average_into, pool_forward, token_rows, MapActs};
use super::params::{LinearView, NormView};
use super::ViT;
use crate::config::{NormPlacement, ViTConfig};
use crate::error::{Error, Result};
use crate::kernels::attention::{attention, AttnDims};
use crate::kernels::gemm::{linear, Epilogue};
use crate::kernels::layernorm::layernorm;
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

/// Activation buffers for one model config and batch size. Reusing one across calls means the
/// steady-state forward allocates only its outputs.
#[derive(Debug, Default)]
pub struct Workspace {
    key: Option<(ViTConfig, usize)>,
    /// Flattened patches `(B·gh·gw, C·P·P)`.
    patches: Vec<f32>,
    /// Patch tokens after projection `(B·gh·gw, D)`.
    tokens: Vec<f32>,
    /// Residual stream `(B, N, D)`.
    x: Vec<f32>,
    /// Normalised stream `(B, N, D)`.
    xn: Vec<f32>,
    /// Fused q/k/v `(B, N, 3D)`.
    qkv: Vec<f32>,
    /// Attention output, heads side by side `(B, N, D)`.
    attn: Vec<f32>,
    /// MLP hidden `(B, N, M)`.
    hidden: Vec<f32>,
    /// Attention scratch tiles.
    scratch: Vec<f32>,
    /// Pooled `(B, D)`.
    pooled: Vec<f32>,
    /// fc_norm output `(B, D)`.
    pooled_norm: Vec<f32>,
    /// Pre-logits `(B, F)`.
    pre: Vec<f32>,
    /// A residual branch before its LayerScale gain `(B, N, D)` (empty without LayerScale).
    branch: Vec<f32>,
    /// Attention pooling's activations (empty without it).
    map: MapActs,
    /// The distillation token's final state `(B, D)` (DeiT only).
    pooled_dist: Vec<f32>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes a forward pass of `cfg` holds per image of the batch (the buffers
    /// [`Self::prepare`] sizes, attention capture excluded), counted without allocating.
    pub fn bytes_per_image(cfg: &ViTConfig) -> u64 {
        let (n, d, m) = (
            cfg.num_tokens() as u64,
            cfg.width as u64,
            cfg.mlp_dim as u64,
        );
        let np = cfg.num_patches() as u64;
        let pd = (cfg.channels * cfg.patch_size * cfg.patch_size) as u64;
        let floats = np * (pd + d) + n * (6 * d + m) + 4 * d + cfg.feature_dim() as u64;
        4 * floats
    }

    /// Sizes the buffers for `cfg` and `batch`; a no-op when they already fit.
    fn prepare(&mut self, cfg: &ViTConfig, batch: usize) {
        if self
            .key
            .as_ref()
            .is_some_and(|(c, b)| c == cfg && *b == batch)
        {
            return;
        }
        let (n, d, m) = (cfg.num_tokens(), cfg.width, cfg.mlp_dim);
        let np = cfg.num_patches();
        let pd = cfg.channels * cfg.patch_size * cfg.patch_size;
        let sized = |v: &mut Vec<f32>, len: usize| {
            v.clear();
            v.resize(len, 0.0);
        };
        sized(&mut self.patches, batch * np * pd);
        sized(&mut self.tokens, batch * np * d);
        sized(&mut self.x, batch * n * d);
        sized(&mut self.xn, batch * n * d);
        sized(&mut self.qkv, batch * n * 3 * d);
        sized(&mut self.attn, batch * n * d);
        sized(&mut self.hidden, batch * n * m);
        sized(&mut self.pooled, batch * d);
        sized(&mut self.pooled_norm, batch * d);
        sized(&mut self.pre, batch * cfg.feature_dim());
        let ls = cfg.layer_scale.is_some();
        sized(&mut self.branch, if ls { batch * n * d } else { 0 });
        self.map.size(cfg, batch, false);
        sized(
            &mut self.pooled_dist,
            if cfg.distilled { batch * d } else { 0 },
        );
        let dims = attn_dims(cfg, batch);
        sized(
            &mut self.scratch,
            dims.scratch_len(rayon::current_num_threads()),
        );
        self.key = Some((cfg.clone(), batch));
    }
}

fn attn_dims(cfg: &ViTConfig, batch: usize) -> AttnDims {
    AttnDims {
        batch,
        tokens: cfg.num_tokens(),
        heads: cfg.heads,
        head_dim: cfg.head_dim(),
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
        ws.prepare(cfg, batch);
        let mut attentions = capture.attentions.then(|| {
            let n = cfg.num_tokens();
            Tensor::zeros(vec![cfg.depth, batch, cfg.heads, n, n])
        });
        self.forward_features(images.data(), batch, ws, attentions.as_mut());
        self.pool(batch, ws);
        let logits = self.forward_head(batch, ws)?;
        let pre_logits = capture.pre_logits.then(|| {
            let f = cfg.feature_dim();
            Tensor::new(vec![batch, f], self.features_out(ws, batch))
        });
        Ok(ForwardOutput {
            logits,
            attentions,
            pre_logits: pre_logits.transpose()?,
        })
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

    /// Embedding and encoder: leaves the final token states `(B, N, D)` in `ws.xn` (pre-norm
    /// with a final norm) or `ws.x`, recording attention maps into `attentions` if given.
    fn forward_features(
        &self,
        images: &[f32],
        batch: usize,
        ws: &mut Workspace,
        mut attentions: Option<&mut Tensor>,
    ) {
        let cfg = &self.config;
        let v = &self.view;
        let (n, m) = (cfg.num_tokens(), cfg.mlp_dim);
        let rows = batch * n;

        // Patch embedding: (B, C, H, W) -> (B·gh·gw, C·P·P) -> (B·gh·gw, D).
        patchify(images, &mut ws.patches, cfg, batch);
        self.linear(
            &v.patch_embed,
            &ws.patches,
            &mut ws.tokens,
            batch * cfg.num_patches(),
            Epilogue::None,
        );

        self.embed_tokens(&ws.tokens, &mut ws.x, batch);

        let dims = attn_dims(cfg, batch);
        let plane = batch * cfg.heads * n * n;
        for (l, blk) in v.blocks.iter().enumerate() {
            let probs = attentions
                .as_deref_mut()
                .map(|t| &mut t.data_mut()[l * plane..(l + 1) * plane]);
            match cfg.norm {
                NormPlacement::Pre => {
                    // x = x + proj(attn(LN1(x)))
                    self.norm(&blk.norm1, &ws.x, &mut ws.xn);
                    self.linear(&blk.qkv, &ws.xn, &mut ws.qkv, rows, Epilogue::None);
                    attention(&ws.qkv, &mut ws.attn, probs, &mut ws.scratch, dims);
                    let ls1 = blk.ls1.as_ref().map(|g| (g, &mut ws.branch));
                    self.add_branch(&blk.proj, &ws.attn, &mut ws.x, &mut [], None, ls1, rows);
                    // x = x + fc2(GELU(fc1(LN2(x))))
                    self.norm(&blk.norm2, &ws.x, &mut ws.xn);
                    self.linear(
                        &blk.fc1,
                        &ws.xn,
                        &mut ws.hidden,
                        rows,
                        Epilogue::Gelu(cfg.gelu),
                    );
                    let ls2 = blk.ls2.as_ref().map(|g| (g, &mut ws.branch));
                    let h = &ws.hidden[..rows * m];
                    self.add_branch(&blk.fc2, h, &mut ws.x, &mut [], None, ls2, rows);
                }
                NormPlacement::Post => {
                    // x = LN1(x + proj(attn(x)))
                    self.linear(&blk.qkv, &ws.x, &mut ws.qkv, rows, Epilogue::None);
                    attention(&ws.qkv, &mut ws.attn, probs, &mut ws.scratch, dims);
                    let ls1 = blk.ls1.as_ref().map(|g| (g, &mut ws.branch));
                    self.add_branch(&blk.proj, &ws.attn, &mut ws.x, &mut [], None, ls1, rows);
                    self.norm(&blk.norm1, &ws.x, &mut ws.xn);
                    std::mem::swap(&mut ws.x, &mut ws.xn);
                    // x = LN2(x + fc2(GELU(fc1(x))))
                    self.linear(
                        &blk.fc1,
                        &ws.x,
                        &mut ws.hidden,
                        rows,
                        Epilogue::Gelu(cfg.gelu),
                    );
                    let ls2 = blk.ls2.as_ref().map(|g| (g, &mut ws.branch));
                    let h = &ws.hidden[..rows * m];
                    self.add_branch(&blk.fc2, h, &mut ws.x, &mut [], None, ls2, rows);
                    self.norm(&blk.norm2, &ws.x, &mut ws.xn);
                    std::mem::swap(&mut ws.x, &mut ws.xn);
                }
            }
        }
        if let Some(norm) = &v.norm {
            self.norm(norm, &ws.x, &mut ws.xn);
        } else {
            ws.xn.copy_from_slice(&ws.x);
        }
    }

    /// Pooling (and fc_norm): final token states `(B, N, D)` in `ws.xn` -> `(B, D)` (and the
    /// distillation token's `(B, D)` for DeiT).
    fn pool(&self, batch: usize, ws: &mut Workspace) {
        let cfg = &self.config;
        let (n, d) = (cfg.num_tokens(), cfg.width);
        match &self.view.attn_pool {
            Some(mv) => {
                self.map_forward(mv, &ws.xn, batch, &mut ws.map);
                ws.pooled.copy_from_slice(&ws.map.out);
            }
            None => pool_forward(cfg, &ws.xn, &mut ws.pooled, batch),
        }
        if cfg.distilled {
            token_rows(&ws.xn, &mut ws.pooled_dist, batch, n, d, 1);
        }
        if let Some(fc_norm) = &self.view.fc_norm {
            self.norm(fc_norm, &ws.pooled, &mut ws.pooled_norm);
            std::mem::swap(&mut ws.pooled, &mut ws.pooled_norm);
        }
    }

    /// The vector fed to the classifier `(B, F)`: pre-logits if the head has them, else pooled.
    fn features<'a>(&self, ws: &'a Workspace) -> &'a [f32] {
        if self.view.pre_logits.is_some() {
            &ws.pre
        } else {
            &ws.pooled
        }
    }

    /// The model's features `(B, F)` as returned to users: [`Self::features`], or for DeiT the
    /// mean of the class and distillation tokens (timm's `pre_logits`).
    fn features_out(&self, ws: &Workspace, batch: usize) -> Vec<f32> {
        let f = self.config.feature_dim();
        let mut out = self.features(ws)[..batch * f].to_vec();
        if self.config.distilled {
            average_into(&mut out, &ws.pooled_dist[..batch * f]);
        }
        out
    }

    /// Head: pooled `(B, D)` -> [tanh(dense) `(B, F)`] -> logits `(B, K)`.
    fn forward_head(&self, batch: usize, ws: &mut Workspace) -> Result<Tensor> {
        if let Some(pre) = &self.view.pre_logits {
            self.linear(pre, &ws.pooled, &mut ws.pre, batch, Epilogue::Tanh);
        }
        let feats = self.features(ws);
        match &self.view.head {
            Some(head) => {
                let mut out = vec![0.0; batch * head.out];
                self.linear(head, feats, &mut out, batch, Epilogue::None);
                if let Some(hd) = &self.view.head_dist {
                    // DeiT: the mean of the class-token and distillation-token heads.
                    let mut dist = vec![0.0; batch * hd.out];
                    self.linear(hd, &ws.pooled_dist, &mut dist, batch, Epilogue::None);
                    average_into(&mut out, &dist);
                }
                Tensor::new(vec![batch, head.out], out)
            }
            None => {
                let f = self.config.feature_dim();
                Tensor::new(vec![batch, f], self.features_out(ws, batch))
            }
        }
    }

    pub(super) fn linear(
        &self,
        l: &LinearView,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        epi: Epilogue,
    ) {
        let w = self.params.slice(&l.w);
        let b = l.b.as_ref().map(|r| self.params.slice(r));
        linear(x, w, b, out, (rows, l.inp, l.out), epi);
    }

    fn norm(&self, nv: &NormView, x: &[f32], out: &mut [f32]) {
        let d = self.config.width;
        layernorm(
            x,
            out,
            self.params.slice(&nv.w),
            self.params.slice(&nv.b),
            d,
            self.config.layer_norm_eps,
        );
    }
}

/// Cuts images into flattened patches in the conv weight's (c, py, px) order.
///
/// # Shapes
/// `images (B, C, H, W)` -> `patches (B, gh, gw, C, P, P)` = `(B·gh·gw, C·P·P)`.
pub(super) fn patchify(images: &[f32], patches: &mut [f32], cfg: &ViTConfig, batch: usize) {
    let (c, h, w, p) = (
        cfg.channels,
        cfg.image_height,
        cfg.image_width,
        cfg.patch_size,
    );
    let (gh, gw) = cfg.grid();
    let mut o = 0;
    for b in 0..batch {
        for gy in 0..gh {
            for gx in 0..gw {
                for ch in 0..c {
                    for py in 0..p {
                        let src = ((b * c + ch) * h + gy * p + py) * w + gx * p;
                        patches[o..o + p].copy_from_slice(&images[src..src + p]);
                        o += p;
                    }
                }
            }
        }
    }
}
