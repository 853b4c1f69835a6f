//! Training forward (keeping what the backward needs) and the hand-written backward pass,
//! llm.c style: every activation buffer is allocated once per (config, batch size) in a
//! [`TrainWorkspace`], and gradients live in one flat buffer with the parameters' layout.

use std::ops::Range;

use super::params::{BlockView, LinearView, MapView, NormView};
use super::ViT;
use crate::config::{NormPlacement, Pool, ViTConfig};
use crate::error::{Error, Result};
use crate::kernels::attention::{attention, attention_backward, AttnDims};
use crate::kernels::gemm::{add_assign, linear_backward, Epilogue};
use crate::kernels::layernorm::{layernorm_backward, layernorm_train};
use crate::kernels::loss::{cross_entropy, Targets};
use crate::kernels::math::{gelu_backward_par, gelu_into_par, tanh_backward_inplace};
use crate::tensor::Tensor;

/// Saved activations of one LayerNorm: input, output, per-row mean and 1/std.
#[derive(Debug, Default)]
struct NormActs {
    input: Vec<f32>,
    output: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl NormActs {
    fn size(&mut self, rows: usize, d: usize) {
        for (v, n) in [
            (&mut self.input, rows * d),
            (&mut self.output, rows * d),
            (&mut self.mean, rows),
            (&mut self.rstd, rows),
        ] {
            v.clear();
            v.resize(n, 0.0);
        }
    }
}

/// Saved activations of one block. Shapes as in the forward: `(B, N, D)` unless noted.
#[derive(Debug, Default)]
struct BlockActs {
    /// Block input (post-norm only: pre-norm's backward reads the LayerNorm's saved input).
    x_in: Vec<f32>,
    /// First LayerNorm (pre-norm: of the block input; post-norm: of `x + attn`).
    ln1: NormActs,
    /// `(B, N, 3D)`.
    qkv: Vec<f32>,
    /// `(B, nh, N, N)`.
    probs: Vec<f32>,
    /// Attention output, heads side by side.
    attn: Vec<f32>,
    /// Second LayerNorm (pre-norm: of the mid-block residual; post-norm: of `x + mlp`).
    ln2: NormActs,
    /// fc1 output before / after GELU `(B, N, M)`.
    h_pre: Vec<f32>,
    h_act: Vec<f32>,
    /// Dropout × stochastic-depth multipliers of the attention and MLP branch outputs
    /// `(B, N, D)`; empty when regularisation is off.
    mask_attn: Vec<f32>,
    mask_mlp: Vec<f32>,
    /// With LayerScale, the attention and MLP branch outputs before their gains `(B, N, D)`.
    ls_attn: Vec<f32>,
    ls_mlp: Vec<f32>,
}

/// Activations of attention pooling ([`MapView`]), for the forward and its backward.
#[derive(Debug, Default)]
pub(crate) struct MapActs {
    /// The projected query `(D)`, the same for every image.
    q: Vec<f32>,
    /// Keys then values of every token `(B, N, 2D)`.
    kv: Vec<f32>,
    /// Pooling attention `(B, nh, N)`.
    pub(crate) probs: Vec<f32>,
    /// Attention output, heads side by side `(B, D)`.
    attn: Vec<f32>,
    /// After `proj` `(B, D)`: the residual stream of the pooling MLP.
    z: Vec<f32>,
    ln: NormActs,
    /// MLP hidden before / after GELU `(B, M)`.
    h_pre: Vec<f32>,
    h_act: Vec<f32>,
    /// The pooled vectors `(B, D)`.
    pub(crate) out: Vec<f32>,
    // Gradient scratch.
    dq: Vec<f32>,
    dkv: Vec<f32>,
    dattn: Vec<f32>,
    dz: Vec<f32>,
    dh: Vec<f32>,
    dy: Vec<f32>,
}

impl MapActs {
    pub(crate) fn size(&mut self, cfg: &ViTConfig, batch: usize, train: bool) {
        let (n, d, m) = (cfg.num_tokens(), cfg.width, cfg.mlp_dim);
        let on = cfg.pool == Pool::Map;
        let sized = |v: &mut Vec<f32>, len: usize| {
            v.clear();
            v.resize(if on { len } else { 0 }, 0.0);
        };
        sized(&mut self.q, d);
        sized(&mut self.kv, batch * n * 2 * d);
        sized(&mut self.probs, batch * cfg.heads * n);
        sized(&mut self.attn, batch * d);
        sized(&mut self.z, batch * d);
        self.ln.size(if on { batch } else { 0 }, d);
        sized(&mut self.h_pre, batch * m);
        sized(&mut self.h_act, batch * m);
        sized(&mut self.out, batch * d);
        let g = |x: usize| if train { x } else { 0 };
        sized(&mut self.dq, g(d));
        sized(&mut self.dkv, g(batch * n * 2 * d));
        sized(&mut self.dattn, g(batch * d));
        sized(&mut self.dz, g(batch * d));
        sized(&mut self.dh, g(batch * m));
        sized(&mut self.dy, g(batch * d));
    }
}

/// Training-time regularisation of the residual branches (timm's `proj_drop`/`drop` and
/// `drop_path`): dropout on each element of a branch's output, and stochastic depth, which
/// drops a whole branch for a whole example with a rate rising linearly from 0 at the first
/// block to `drop_path` at the last. Both rescale what they keep, so inference needs nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Regularization {
    pub dropout: f32,
    pub drop_path: f32,
    /// Seeds the masks: the same seed gives the same masks.
    pub seed: u64,
}

impl Regularization {
    fn active(&self) -> bool {
        self.dropout > 0.0 || self.drop_path > 0.0
    }
}

/// Fills `mask (B, N, D)` with the branch multipliers of block `layer` of `depth`.
fn fill_mask(
    mask: &mut [f32],
    reg: &Regularization,
    layer: usize,
    depth: usize,
    which: u64,
    (b, n, d): (usize, usize, usize),
) {
    let mut rng = super::Rng::new(crate::data::loader::derive_seed(&[
        reg.seed,
        layer as u64,
        which,
    ]));
    let dp = if depth > 1 {
        reg.drop_path * layer as f32 / (depth - 1) as f32
    } else {
        reg.drop_path
    };
    let keep_elem = 1.0 / (1.0 - reg.dropout);
    for bi in 0..b {
        let sample = if dp > 0.0 && (rng.uniform() as f32) < dp {
            0.0
        } else {
            1.0 / (1.0 - dp)
        };
        for m in &mut mask[bi * n * d..(bi + 1) * n * d] {
            let e = if reg.dropout > 0.0 && (rng.uniform() as f32) < reg.dropout {
                0.0
            } else {
                keep_elem
            };
            *m = sample * e;
        }
    }
}

/// Everything a training step needs, sized for one config and batch size, plus the gradients.
#[derive(Debug, Default)]
pub struct TrainWorkspace {
    key: Option<(ViTConfig, usize)>,
    /// `(B·gh·gw, C·P·P)`.
    patches: Vec<f32>,
    /// `(B·gh·gw, D)`: patch projections, then their gradient.
    tokens: Vec<f32>,
    /// Residual stream `(B, N, D)`.
    x: Vec<f32>,
    blocks: Vec<BlockActs>,
    final_norm: NormActs,
    fc_norm: NormActs,
    map: MapActs,
    /// `(B, D)` pooled (after fc_norm when present).
    pooled: Vec<f32>,
    /// `(B, D)` the distillation token's final state (DeiT).
    pooled_dist: Vec<f32>,
    /// `(B, F)` pre-logits (tanh output).
    pre: Vec<f32>,
    /// `(B, K)`.
    logits: Vec<f32>,
    // Gradient scratch.
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dqkv: Vec<f32>,
    dattn: Vec<f32>,
    dh: Vec<f32>,
    dpooled: Vec<f32>,
    dpooled_dist: Vec<f32>,
    dpre: Vec<f32>,
    dlogits: Vec<f32>,
    attn_scratch: Vec<f32>,
    ln_partials: Vec<f32>,
    /// A branch output `(B, N, D)` before its mask, or a masked gradient.
    branch: Vec<f32>,
    /// Regularisation applied by the next [`ViT::forward_backward`] calls.
    pub reg: Regularization,
    /// ∂loss/∂params, same layout as [`super::Params::flat`]; accumulated by each step.
    grads: Vec<f32>,
}

/// The workspace buffers a block's backward borrows, lent to the branch helpers of
/// [`ViT::backward`] together.
struct BranchBufs<'a> {
    /// A branch's masked or scaled output gradient `(B·N, D)`.
    branch: &'a mut [f32],
    /// `(B·N, MLP)`: ∂loss/∂(fc1 output), then ∂/∂(GELU input).
    dh: &'a mut [f32],
    /// `(B·N, D)`: ∂loss/∂(attention output, heads concatenated).
    dattn: &'a mut [f32],
    /// `(B·N, 3·D)`: ∂loss/∂(q, k, v).
    dqkv: &'a mut [f32],
    attn_scratch: &'a mut Vec<f32>,
    grads: &'a mut [f32],
    /// Whether stochastic depth or dropout masks apply.
    masked: bool,
    /// `B·N`.
    rows: usize,
    dims: AttnDims,
}

/// Which residual branch of a block.
#[derive(Clone, Copy)]
enum Branch {
    Attn,
    Mlp,
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
        &self.logits
    }

    /// Bytes a training step of `cfg` holds per image of the batch: the activations and
    /// gradient scratch [`Self::prepare`] allocates (the same terms, counted without
    /// allocating, so an impossible batch size can be refused up front). The gradients add
    /// one float per parameter on top.
    pub fn bytes_per_image(cfg: &ViTConfig) -> u64 {
        let batch = 1usize;
        let (n, d, m) = (
            cfg.num_tokens() as u64,
            cfg.width as u64,
            cfg.mlp_dim as u64,
        );
        let b = batch as u64;
        let rows = b * n;
        let np = b * cfg.num_patches() as u64;
        let pd = (cfg.channels * cfg.patch_size * cfg.patch_size) as u64;
        let post = (cfg.norm == NormPlacement::Post) as u64;
        let ls = cfg.layer_scale.is_some() as u64;
        let per_block = post * rows * d        // x_in
            + 2 * (2 * rows * d + 2 * rows)    // ln1, ln2
            + 3 * rows * d                     // qkv
            + b * cfg.heads as u64 * n * n     // probs
            + rows * d                         // attn
            + 2 * rows * m                     // h_pre, h_act
            + 2 * rows * d                     // masks
            + 2 * ls * rows * d; // LayerScale branch outputs
        let global = np * pd + np * d          // patches, tokens
            + 2 * rows * d                     // x, branch
            + 2 * rows * d + 2 * rows          // final norm
            + 2 * rows * d                     // dx, dtmp
            + 3 * rows * d + rows * d + rows * m; // dqkv, dattn, dh
        4 * (cfg.depth as u64 * per_block + global)
    }

    fn prepare(&mut self, model: &ViT, batch: usize) {
        let cfg = model.config();
        if self
            .key
            .as_ref()
            .is_some_and(|(c, b)| c == cfg && *b == batch)
        {
            return;
        }
        let (n, d, m, k) = (cfg.num_tokens(), cfg.width, cfg.mlp_dim, cfg.num_classes);
        let (rows, np) = (batch * n, batch * cfg.num_patches());
        let pd = cfg.channels * cfg.patch_size * cfg.patch_size;
        let sized = |v: &mut Vec<f32>, len: usize| {
            v.clear();
            v.resize(len, 0.0);
        };
        sized(&mut self.patches, np * pd);
        sized(&mut self.tokens, np * d);
        sized(&mut self.x, rows * d);
        self.blocks.resize_with(cfg.depth, BlockActs::default);
        for b in &mut self.blocks {
            let post = cfg.norm == NormPlacement::Post;
            sized(&mut b.x_in, if post { rows * d } else { 0 });
            b.ln1.size(rows, d);
            sized(&mut b.qkv, rows * 3 * d);
            sized(&mut b.probs, batch * cfg.heads * n * n);
            sized(&mut b.attn, rows * d);
            b.ln2.size(rows, d);
            sized(&mut b.h_pre, rows * m);
            sized(&mut b.h_act, rows * m);
            sized(&mut b.mask_attn, rows * d);
            sized(&mut b.mask_mlp, rows * d);
            let ls = if cfg.layer_scale.is_some() {
                rows * d
            } else {
                0
            };
            sized(&mut b.ls_attn, ls);
            sized(&mut b.ls_mlp, ls);
        }
        self.map.size(cfg, batch, true);
        let dist = if cfg.distilled { batch * d } else { 0 };
        sized(&mut self.pooled_dist, dist);
        sized(&mut self.dpooled_dist, dist);
        sized(&mut self.branch, rows * d);
        self.final_norm.size(rows, d);
        self.fc_norm.size(batch, d);
        sized(&mut self.pooled, batch * d);
        sized(&mut self.pre, batch * cfg.feature_dim());
        sized(&mut self.logits, batch * k);
        sized(&mut self.dx, rows * d);
        sized(&mut self.dtmp, rows * d);
        sized(&mut self.dqkv, rows * 3 * d);
        sized(&mut self.dattn, rows * d);
        sized(&mut self.dh, rows * m);
        sized(&mut self.dpooled, batch * d);
        sized(&mut self.dpre, batch * cfg.feature_dim());
        sized(&mut self.dlogits, batch * k);
        if self.grads.len() != model.params().count() {
            sized(&mut self.grads, model.params().count());
        }
        self.key = Some((cfg.clone(), batch));
    }
}

/// Two disjoint mutable ranges of one buffer (`a` must end before `b` starts).
fn two_mut<'a>(
    buf: &'a mut [f32],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'a mut [f32], &'a mut [f32]) {
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a.clone()], &mut hi[..b.len()])
}

impl ViT {
    /// One training step's maths: forward keeping activations, softmax cross-entropy against
    /// `targets`, and backward **accumulating** ∂loss/∂params into `tw.grads()` (zero them
    /// yourself between optimizer steps). Returns the mean loss over the batch.
    ///
    /// # Shapes
    /// `images (B, C, H, W)`; targets of B examples over K classes.
    pub fn forward_backward(
        &self,
        images: &Tensor,
        targets: Targets<'_>,
        tw: &mut TrainWorkspace,
    ) -> Result<f32> {
        let cfg = &self.config;
        if cfg.num_classes == 0 {
            return Err(Error::InvalidConfig(
                "training needs a classifier: the model has num_classes = 0".into(),
            ));
        }
        let batch = self.batch_size_of(images, "training images (B, C, H, W)")?;
        tw.prepare(self, batch);
        self.train_forward(images.data(), batch, tw);
        let k = cfg.num_classes;
        let loss = cross_entropy(&tw.logits, k, targets, &mut tw.dlogits)?;
        self.backward(batch, tw);
        Ok(loss)
    }

    fn train_forward(&self, images: &[f32], batch: usize, tw: &mut TrainWorkspace) {
        let cfg = &self.config;
        let v = &self.view;
        let (n, d) = (cfg.num_tokens(), cfg.width);
        let rows = batch * n;
        super::forward::patchify(images, &mut tw.patches, cfg, batch);
        self.linear(
            &v.patch_embed,
            &tw.patches,
            &mut tw.tokens,
            batch * cfg.num_patches(),
            Epilogue::None,
        );
        self.embed_tokens(&tw.tokens, &mut tw.x, batch);
        let dims = self.attn_dims(batch);
        let gelu = cfg.gelu;
        let reg = tw.reg;
        let depth = cfg.depth;
        for (l, (blk, acts)) in v.blocks.iter().zip(tw.blocks.iter_mut()).enumerate() {
            if cfg.norm == NormPlacement::Post {
                acts.x_in.copy_from_slice(&tw.x);
            }
            if reg.active() {
                fill_mask(&mut acts.mask_attn, &reg, l, depth, 0, (batch, n, d));
                fill_mask(&mut acts.mask_mlp, &reg, l, depth, 1, (batch, n, d));
            }
            let x = &mut tw.x;
            let branch = &mut tw.branch;
            match cfg.norm {
                NormPlacement::Pre => {
                    self.norm_train(&blk.norm1, x, &mut acts.ln1);
                    self.linear(
                        &blk.qkv,
                        &acts.ln1.output,
                        &mut acts.qkv,
                        rows,
                        Epilogue::None,
                    );
                    attention(
                        &acts.qkv,
                        &mut acts.attn,
                        Some(&mut acts.probs),
                        &mut tw.attn_scratch,
                        dims,
                    );
                    self.add_branch(
                        &blk.proj,
                        &acts.attn,
                        x,
                        branch,
                        reg.active().then_some(&acts.mask_attn),
                        blk.ls1.as_ref().map(|g| (g, &mut acts.ls_attn)),
                        rows,
                    );
                    self.norm_train(&blk.norm2, x, &mut acts.ln2);
                    self.linear(
                        &blk.fc1,
                        &acts.ln2.output,
                        &mut acts.h_pre,
                        rows,
                        Epilogue::None,
                    );
                    gelu_into_par(&acts.h_pre, &mut acts.h_act, gelu);
                    self.add_branch(
                        &blk.fc2,
                        &acts.h_act,
                        x,
                        branch,
                        reg.active().then_some(&acts.mask_mlp),
                        blk.ls2.as_ref().map(|g| (g, &mut acts.ls_mlp)),
                        rows,
                    );
                }
                NormPlacement::Post => {
                    self.linear(&blk.qkv, x, &mut acts.qkv, rows, Epilogue::None);
                    attention(
                        &acts.qkv,
                        &mut acts.attn,
                        Some(&mut acts.probs),
                        &mut tw.attn_scratch,
                        dims,
                    );
                    self.add_branch(
                        &blk.proj,
                        &acts.attn,
                        x,
                        branch,
                        reg.active().then_some(&acts.mask_attn),
                        blk.ls1.as_ref().map(|g| (g, &mut acts.ls_attn)),
                        rows,
                    );
                    self.norm_train(&blk.norm1, x, &mut acts.ln1);
                    x.copy_from_slice(&acts.ln1.output);
                    self.linear(&blk.fc1, x, &mut acts.h_pre, rows, Epilogue::None);
                    gelu_into_par(&acts.h_pre, &mut acts.h_act, gelu);
                    self.add_branch(
                        &blk.fc2,
                        &acts.h_act,
                        x,
                        branch,
                        reg.active().then_some(&acts.mask_mlp),
                        blk.ls2.as_ref().map(|g| (g, &mut acts.ls_mlp)),
                        rows,
                    );
                    self.norm_train(&blk.norm2, x, &mut acts.ln2);
                    x.copy_from_slice(&acts.ln2.output);
                }
            }
        }
        // Final token states: the final norm's output, or the stream itself.
        let states: &[f32] = match &v.norm {
            Some(norm) => {
                self.norm_train(norm, &tw.x, &mut tw.final_norm);
                &tw.final_norm.output
            }
            None => &tw.x,
        };
        match &v.attn_pool {
            Some(mv) => {
                self.map_forward(mv, states, batch, &mut tw.map);
                tw.pooled.copy_from_slice(&tw.map.out);
            }
            None => pool_forward(cfg, states, &mut tw.pooled, batch),
        }
        if cfg.distilled {
            token_rows(states, &mut tw.pooled_dist, batch, n, d, 1);
        }
        if let Some(fc) = &v.fc_norm {
            self.norm_train(fc, &tw.pooled, &mut tw.fc_norm);
            tw.pooled.copy_from_slice(&tw.fc_norm.output);
        }
        if let Some(pre) = &v.pre_logits {
            self.linear(pre, &tw.pooled, &mut tw.pre, batch, Epilogue::Tanh);
        }
        let feats = if v.pre_logits.is_some() {
            &tw.pre
        } else {
            &tw.pooled
        };
        if let Some(head) = &v.head {
            self.linear(head, feats, &mut tw.logits, batch, Epilogue::None);
        }
        if let Some(hd) = &v.head_dist {
            // DeiT: logits = (head(class token) + head_dist(distillation token)) / 2.
            self.linear(hd, &tw.pooled_dist, &mut tw.dlogits, batch, Epilogue::None);
            average_into(&mut tw.logits, &tw.dlogits);
        }
    }

    fn backward(&self, batch: usize, tw: &mut TrainWorkspace) {
        let cfg = &self.config;
        let v = &self.view;
        let (n, d) = (cfg.num_tokens(), cfg.width);
        let rows = batch * n;
        let TrainWorkspace {
            patches,
            tokens,
            blocks,
            x,
            final_norm,
            fc_norm,
            map,
            pooled,
            pooled_dist,
            pre,
            dx,
            dtmp,
            dqkv,
            dattn,
            dh,
            dpooled,
            dpooled_dist,
            dpre,
            dlogits,
            attn_scratch,
            ln_partials,
            branch,
            grads,
            reg,
            ..
        } = tw;
        let masked = reg.active();

        // Head: dlogits (B, K) -> d features (B, F) -> d pooled (B, D).
        let has_pre = v.pre_logits.is_some();
        if let Some(hd) = &v.head_dist {
            // Each of DeiT's two heads gets half the gradient of their mean.
            dlogits.iter_mut().for_each(|g| *g *= 0.5);
            self.linear_grad(hd, dlogits, pooled_dist, Some(dpooled_dist), grads, batch);
        }
        if let Some(head) = &v.head {
            let feats: &[f32] = if has_pre { pre } else { pooled };
            let dfeats: &mut [f32] = if has_pre { dpre } else { dpooled };
            self.linear_grad(head, dlogits, feats, Some(dfeats), grads, batch);
        }
        if let Some(pl) = &v.pre_logits {
            tanh_backward_inplace(pre, dpre);
            self.linear_grad(pl, dpre, pooled, Some(dpooled), grads, batch);
        }
        if let Some(fc) = &v.fc_norm {
            dtmp[..batch * d].fill(0.0);
            self.norm_grad(
                fc,
                dpooled,
                fc_norm,
                &mut dtmp[..batch * d],
                grads,
                ln_partials,
            );
            dpooled.copy_from_slice(&dtmp[..batch * d]);
        }
        // Pooling: (B, D) -> (B, N, D).
        dx.fill(0.0);
        let npre = cfg.num_prefix_tokens();
        for (b, g) in dpooled.chunks_exact(d).enumerate() {
            match cfg.pool {
                Pool::Cls => dx[b * n * d..b * n * d + d].copy_from_slice(g),
                Pool::Mean => {
                    let inv = 1.0 / (n - npre) as f32;
                    for t in npre..n {
                        let row = &mut dx[(b * n + t) * d..(b * n + t + 1) * d];
                        row.iter_mut().zip(g).for_each(|(r, v)| *r = v * inv);
                    }
                }
                Pool::Map => {}
            }
        }
        if let Some(mv) = &v.attn_pool {
            let states: &[f32] = if v.norm.is_some() {
                &final_norm.output
            } else {
                x
            };
            self.map_backward(mv, states, batch, map, dpooled, dx, grads, ln_partials);
        }
        if cfg.distilled {
            for (b, g) in dpooled_dist.chunks_exact(d).enumerate() {
                dx[(b * n + 1) * d..(b * n + 2) * d].copy_from_slice(g);
            }
        }
        if let Some(norm) = &v.norm {
            dtmp.fill(0.0);
            self.norm_grad(norm, dx, final_norm, dtmp, grads, ln_partials);
            std::mem::swap(dx, dtmp);
        }

        // Blocks, last to first; dx holds ∂loss/∂(block output) on entry, ∂/∂(block input) after.
        let dims = self.attn_dims(batch);
        let mut bufs = BranchBufs {
            branch,
            dh,
            dattn,
            dqkv,
            attn_scratch,
            grads,
            masked,
            rows,
            dims,
        };
        for (blk, acts) in v.blocks.iter().zip(blocks.iter()).rev() {
            // The MLP half first (its norm is norm2/ln2), then the attention half (norm1/ln1).
            let halves = [
                (Branch::Mlp, &blk.norm2, &acts.ln2),
                (Branch::Attn, &blk.norm1, &acts.ln1),
            ];
            for (which, norm, ln) in halves {
                match cfg.norm {
                    NormPlacement::Pre => {
                        // x_out = x + Branch(LN(x))
                        self.block_branch_grad(blk, acts, which, &ln.output, dx, dtmp, &mut bufs);
                        self.norm_grad(norm, dtmp, ln, dx, bufs.grads, ln_partials);
                    }
                    NormPlacement::Post => {
                        // x_out = LN(s), s = x + Branch(x); the MLP's x is the middle state
                        // (LN1's output), attention's the block's input.
                        dtmp.fill(0.0);
                        self.norm_grad(norm, dx, ln, dtmp, bufs.grads, ln_partials);
                        std::mem::swap(dx, dtmp);
                        let input = match which {
                            Branch::Mlp => &acts.ln1.output,
                            Branch::Attn => &acts.x_in,
                        };
                        self.block_branch_grad(blk, acts, which, input, dx, dtmp, &mut bufs);
                        add_assign(dx, dtmp);
                    }
                }
            }
        }
        let grads = bufs.grads;

        // Embedding (see `embed_tokens`): prefix tokens, position rows, patch projections.
        for (t, r) in self.prefix_rows().into_iter().enumerate() {
            for b in 0..batch {
                add_assign(
                    &mut grads[r.clone()],
                    &dx[(b * n + t) * d..(b * n + t + 1) * d],
                );
            }
        }
        {
            // Position row i sits on token i, or on patch i with `no_embed_class`.
            let first = n - cfg.pos_tokens();
            let dpos = &mut grads[v.pos_embed.clone()];
            for b in 0..batch {
                add_assign(dpos, &dx[(b * n + first) * d..(b + 1) * n * d]);
            }
        }
        let np = n - npre;
        for b in 0..batch {
            let src = &dx[(b * n + npre) * d..(b + 1) * n * d];
            tokens[b * np * d..(b + 1) * np * d].copy_from_slice(src);
        }
        self.linear_grad(
            &v.patch_embed,
            tokens,
            patches,
            None,
            grads,
            batch * cfg.num_patches(),
        );
    }

    /// One residual branch of a block, backwards — the MLP `γ2 ⊙ mask ⊙ fc2(GELU(fc1(input)))`
    /// or the attention `γ1 ⊙ mask ⊙ proj(attn(qkv(input)))`: from `dx = ∂loss/∂(residual sum)`
    /// `(B·N, D)` to `∂loss/∂input` `(B·N, D)`, written to `dinput`; the branch's parameter
    /// gradients are added to `bufs.grads`. `input` is what the branch's first product saw:
    /// the norm's output (pre-norm), or for post-norm the block's middle state (kept as LN1's
    /// output) for the MLP and the block's input for attention.
    #[allow(clippy::too_many_arguments)]
    fn block_branch_grad(
        &self,
        blk: &BlockView,
        acts: &BlockActs,
        which: Branch,
        input: &[f32],
        dx: &[f32],
        dinput: &mut [f32],
        bufs: &mut BranchBufs,
    ) {
        let (mask, scale) = match which {
            Branch::Mlp => (&acts.mask_mlp, blk.ls2.as_ref().map(|g| (g, &acts.ls_mlp))),
            Branch::Attn => (
                &acts.mask_attn,
                blk.ls1.as_ref().map(|g| (g, &acts.ls_attn)),
            ),
        };
        let dy = self.branch_grad(
            dx,
            bufs.masked.then_some(mask),
            scale,
            bufs.branch,
            bufs.grads,
        );
        let rows = bufs.rows;
        match which {
            Branch::Mlp => {
                self.linear_grad(&blk.fc2, dy, &acts.h_act, Some(bufs.dh), bufs.grads, rows);
                gelu_backward_par(&acts.h_pre, bufs.dh, self.config.gelu);
                self.linear_grad(&blk.fc1, bufs.dh, input, Some(dinput), bufs.grads, rows);
            }
            Branch::Attn => {
                self.linear_grad(
                    &blk.proj,
                    dy,
                    &acts.attn,
                    Some(bufs.dattn),
                    bufs.grads,
                    rows,
                );
                attention_backward(
                    &acts.qkv,
                    &acts.probs,
                    bufs.dattn,
                    bufs.dqkv,
                    bufs.attn_scratch,
                    bufs.dims,
                );
                self.linear_grad(&blk.qkv, bufs.dqkv, input, Some(dinput), bufs.grads, rows);
            }
        }
    }

    /// `x += γ ⊙ mask ⊙ linear(input)`, or the fused in-place residual add when there is
    /// neither mask nor LayerScale. With LayerScale `(γ, saved)`, the branch output before
    /// its gain is kept in `saved` for the backward; otherwise `branch` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_branch(
        &self,
        l: &LinearView,
        input: &[f32],
        x: &mut [f32],
        branch: &mut [f32],
        mask: Option<&Vec<f32>>,
        scale: Option<(&Range<usize>, &mut Vec<f32>)>,
        rows: usize,
    ) {
        if mask.is_none() && scale.is_none() {
            return self.linear(l, input, x, rows, Epilogue::Accumulate);
        }
        let (out, gamma) = match scale {
            Some((g, saved)) => (&mut saved[..], Some(self.params.slice(g))),
            None => (branch, None),
        };
        self.linear(l, input, out, rows, Epilogue::None);
        let d = self.config.width;
        // One loop per case, so the per-element work has no branches (the training hot path).
        for (r, (xr, or)) in x.chunks_exact_mut(d).zip(out.chunks_exact(d)).enumerate() {
            let xo = xr.iter_mut().zip(or);
            match (gamma, mask.map(|m| &m[r * d..(r + 1) * d])) {
                (Some(g), Some(m)) => xo
                    .zip(g.iter().zip(m))
                    .for_each(|((x, o), (g, m))| *x += g * m * o),
                (Some(g), None) => xo.zip(g).for_each(|((x, o), g)| *x += g * o),
                (None, Some(m)) => xo.zip(m).for_each(|((x, o), m)| *x += m * o),
                (None, None) => xo.for_each(|(x, o)| *x += o),
            }
        }
    }

    /// The gradient reaching a branch `γ ⊙ mask ⊙ y` from `dx`: `dx ⊙ mask ⊙ γ` (written into
    /// `buf`), or `dx` itself; with LayerScale, `dγ += Σ_rows dx ⊙ mask ⊙ y` (`y` saved).
    fn branch_grad<'a>(
        &self,
        dx: &'a [f32],
        mask: Option<&Vec<f32>>,
        scale: Option<(&Range<usize>, &Vec<f32>)>,
        buf: &'a mut [f32],
        grads: &mut [f32],
    ) -> &'a [f32] {
        if mask.is_none() && scale.is_none() {
            return dx;
        }
        let d = self.config.width;
        for (r, (o, g)) in buf.chunks_exact_mut(d).zip(dx.chunks_exact(d)).enumerate() {
            match mask {
                Some(m) => o
                    .iter_mut()
                    .zip(g)
                    .zip(&m[r * d..(r + 1) * d])
                    .for_each(|((o, g), m)| *o = g * m),
                None => o.copy_from_slice(g),
            }
        }
        if let Some((gr, saved)) = scale {
            let gamma = self.params.slice(gr);
            let dgamma = &mut grads[gr.clone()];
            for (o, y) in buf.chunks_exact_mut(d).zip(saved.chunks_exact(d)) {
                for c in 0..d {
                    dgamma[c] += o[c] * y[c];
                    o[c] *= gamma[c];
                }
            }
        }
        buf
    }

    /// Attention pooling (timm `AttentionPoolLatent`, big_vision `MAPHead`): one learned query
    /// attends over the final token states `(B, N, D)`; then `z + fc2(GELU(fc1(LN(z))))`.
    /// Leaves the pooled `(B, D)` in `acts.out`.
    pub(crate) fn map_forward(
        &self,
        mv: &MapView,
        states: &[f32],
        batch: usize,
        acts: &mut MapActs,
    ) {
        let cfg = &self.config;
        let (n, d, nh, hd) = (cfg.num_tokens(), cfg.width, cfg.heads, cfg.head_dim());
        // q = latent·Wqᵀ + b: (1, D), shared by the batch.
        self.linear(
            &mv.q,
            self.params.slice(&mv.latent),
            &mut acts.q,
            1,
            Epilogue::None,
        );
        // kv (B·N, 2D): keys in the first D columns, values in the next D (timm's reshape
        // (B, N, 2, nh, hd)).
        self.linear(&mv.kv, states, &mut acts.kv, batch * n, Epilogue::None);
        let scale = 1.0 / (hd as f32).sqrt();
        for b in 0..batch {
            let kv = &acts.kv[b * n * 2 * d..(b + 1) * n * 2 * d];
            for h in 0..nh {
                let q = &acts.q[h * hd..(h + 1) * hd];
                let p = &mut acts.probs[(b * nh + h) * n..(b * nh + h + 1) * n];
                for (j, pj) in p.iter_mut().enumerate() {
                    let k = &kv[j * 2 * d + h * hd..j * 2 * d + (h + 1) * hd];
                    *pj = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
                }
                softmax_inplace(p);
                let o = &mut acts.attn[b * d + h * hd..b * d + (h + 1) * hd];
                o.fill(0.0);
                for (j, pj) in p.iter().enumerate() {
                    let v = &kv[j * 2 * d + d + h * hd..j * 2 * d + d + (h + 1) * hd];
                    o.iter_mut().zip(v).for_each(|(o, v)| *o += pj * v);
                }
            }
        }
        self.linear(&mv.proj, &acts.attn, &mut acts.z, batch, Epilogue::None);
        self.norm_train(&mv.norm, &acts.z, &mut acts.ln);
        self.linear(
            &mv.fc1,
            &acts.ln.output,
            &mut acts.h_pre,
            batch,
            Epilogue::None,
        );
        gelu_into_par(&acts.h_pre, &mut acts.h_act, cfg.gelu);
        acts.out.copy_from_slice(&acts.z);
        self.linear(
            &mv.fc2,
            &acts.h_act,
            &mut acts.out,
            batch,
            Epilogue::Accumulate,
        );
    }

    /// Backward of [`Self::map_forward`]: `dout (B, D)` -> `dstates (B, N, D)` (overwritten),
    /// parameter gradients accumulated.
    #[allow(clippy::too_many_arguments)]
    fn map_backward(
        &self,
        mv: &MapView,
        states: &[f32],
        batch: usize,
        acts: &mut MapActs,
        dout: &[f32],
        dstates: &mut [f32],
        grads: &mut [f32],
        partials: &mut Vec<f32>,
    ) {
        let cfg = &self.config;
        let (n, d, nh, hd) = (cfg.num_tokens(), cfg.width, cfg.heads, cfg.head_dim());
        let MapActs {
            q,
            kv,
            probs,
            attn,
            ln,
            h_pre,
            h_act,
            dq,
            dkv,
            dattn,
            dz,
            dh,
            dy,
            ..
        } = acts;
        // out = z + fc2(GELU(fc1(LN(z)))).
        dz.copy_from_slice(&dout[..batch * d]);
        self.linear_grad(&mv.fc2, dout, h_act, Some(dh), grads, batch);
        gelu_backward_par(h_pre, dh, cfg.gelu);
        self.linear_grad(&mv.fc1, dh, &ln.output, Some(dy), grads, batch);
        self.norm_grad(&mv.norm, dy, ln, dz, grads, partials);
        self.linear_grad(&mv.proj, dz, attn, Some(dattn), grads, batch);
        // o = Σ_j p_j v_j, p = softmax(scale · q·k_j).
        let scale = 1.0 / (hd as f32).sqrt();
        dq.fill(0.0);
        for b in 0..batch {
            let kv = &kv[b * n * 2 * d..(b + 1) * n * 2 * d];
            let dkv = &mut dkv[b * n * 2 * d..(b + 1) * n * 2 * d];
            for h in 0..nh {
                let p = &probs[(b * nh + h) * n..(b * nh + h + 1) * n];
                let dout_h = &dattn[b * d + h * hd..b * d + (h + 1) * hd];
                let qh = &q[h * hd..(h + 1) * hd];
                // dp_j = do·v_j, then the softmax backward: ds_j = p_j (dp_j − Σ p·dp).
                let dp: Vec<f32> = (0..n)
                    .map(|j| {
                        let v = &kv[j * 2 * d + d + h * hd..j * 2 * d + d + (h + 1) * hd];
                        dout_h.iter().zip(v).map(|(a, b)| a * b).sum()
                    })
                    .collect();
                let s: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..n {
                    let ds = p[j] * (dp[j] - s) * scale;
                    let k = &kv[j * 2 * d + h * hd..j * 2 * d + (h + 1) * hd];
                    dq[h * hd..(h + 1) * hd]
                        .iter_mut()
                        .zip(k)
                        .for_each(|(g, k)| *g += ds * k);
                    let (dk, dv) = dkv[j * 2 * d..(j + 1) * 2 * d].split_at_mut(d);
                    for c in 0..hd {
                        dk[h * hd + c] = ds * qh[c];
                        dv[h * hd + c] = p[j] * dout_h[c];
                    }
                }
            }
        }
        self.linear_grad(&mv.kv, dkv, states, Some(dstates), grads, batch * n);
        let mut dlatent = vec![0.0; d];
        let latent = self.params.slice(&mv.latent);
        self.linear_grad(&mv.q, dq, latent, Some(&mut dlatent), grads, 1);
        add_assign(&mut grads[mv.latent.clone()], &dlatent);
    }

    /// Parameter ranges of the prefix tokens, one `(D)` row each, in token order: [class],
    /// [distillation], registers.
    fn prefix_rows(&self) -> Vec<Range<usize>> {
        let d = self.config.width;
        let v = &self.view;
        let mut rows: Vec<Range<usize>> = [&v.cls_token, &v.dist_token]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if let Some(r) = &v.reg_token {
            rows.extend(
                (0..self.config.reg_tokens).map(|i| r.start + i * d..r.start + (i + 1) * d),
            );
        }
        rows
    }

    fn attn_dims(&self, batch: usize) -> AttnDims {
        AttnDims {
            batch,
            tokens: self.config.num_tokens(),
            heads: self.config.heads,
            head_dim: self.config.head_dim(),
        }
    }

    /// The token sequence `(B, N, D)`: the prefix tokens ([class], [distillation], registers)
    /// then the patch projections `tokens (B·gh·gw, D)`, plus the position table `(T, D)`.
    /// Position row `i` goes on token `i` (T = N), or with `no_embed_class` on patch `i`
    /// only (T = gh·gw): the table's rows always cover the last T tokens.
    pub(crate) fn embed_tokens(&self, tokens: &[f32], x: &mut [f32], batch: usize) {
        let cfg = &self.config;
        let (n, d) = (cfg.num_tokens(), cfg.width);
        let npre = cfg.num_prefix_tokens();
        let first = n - cfg.pos_tokens();
        let prefix = self.prefix_rows();
        let pos = self.params.slice(&self.view.pos_embed);
        for (b, xb) in x.chunks_exact_mut(n * d).enumerate().take(batch) {
            let toks = &tokens[b * (n - npre) * d..(b + 1) * (n - npre) * d];
            for (t, row) in xb.chunks_exact_mut(d).enumerate() {
                let src = match prefix.get(t) {
                    Some(r) => self.params.slice(r),
                    None => &toks[(t - npre) * d..(t - npre + 1) * d],
                };
                if t >= first {
                    let p = &pos[(t - first) * d..(t - first + 1) * d];
                    for ((o, s), p) in row.iter_mut().zip(src).zip(p) {
                        *o = s + p;
                    }
                } else {
                    row.copy_from_slice(src);
                }
            }
        }
    }

    fn norm_train(&self, nv: &NormView, x: &[f32], acts: &mut NormActs) {
        acts.input.copy_from_slice(x);
        let c = &self.config;
        layernorm_train(
            &acts.input,
            &mut acts.output,
            self.params.slice(&nv.w),
            self.params.slice(&nv.b),
            c.width,
            c.layer_norm_eps,
            &mut acts.mean,
            &mut acts.rstd,
        );
    }

    /// `dx += ∂/∂input` of a LayerNorm, accumulating its γ/β gradients.
    fn norm_grad(
        &self,
        nv: &NormView,
        dy: &[f32],
        acts: &NormActs,
        dx: &mut [f32],
        grads: &mut [f32],
        partials: &mut Vec<f32>,
    ) {
        let (dg, db) = two_mut(grads, &nv.w, &nv.b);
        layernorm_backward(
            dy,
            &acts.input,
            &acts.mean,
            &acts.rstd,
            self.params.slice(&nv.w),
            dx,
            dg,
            db,
            self.config.width,
            partials,
        );
    }

    /// Gradients of a linear layer over `rows` rows: `dx = dy·W` (when asked), dW and db
    /// accumulated into `grads`.
    fn linear_grad(
        &self,
        l: &LinearView,
        dy: &[f32],
        x: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut [f32],
        rows: usize,
    ) {
        let w = self.params.slice(&l.w);
        let dims = (rows, l.inp, l.out);
        match &l.b {
            Some(br) => {
                let (dw, db) = two_mut(grads, &l.w, br);
                linear_backward(
                    &dy[..rows * l.out],
                    &x[..rows * l.inp],
                    w,
                    dx,
                    dw,
                    Some(db),
                    dims,
                );
            }
            None => linear_backward(
                &dy[..rows * l.out],
                &x[..rows * l.inp],
                w,
                dx,
                &mut grads[l.w.clone()],
                None,
                dims,
            ),
        }
    }
}

/// Token-free pooling of final token states `(B, N, D)` into `(B, D)`: the class token, or
/// the mean of the patch tokens (prefix tokens excluded). Attention pooling is
/// [`ViT::map_forward`].
pub(crate) fn pool_forward(cfg: &ViTConfig, states: &[f32], out: &mut [f32], batch: usize) {
    let (n, d, npre) = (cfg.num_tokens(), cfg.width, cfg.num_prefix_tokens());
    match cfg.pool {
        Pool::Cls => token_rows(states, out, batch, n, d, 0),
        Pool::Mean => {
            for (b, o) in out.chunks_exact_mut(d).enumerate().take(batch) {
                let xb = &states[b * n * d..(b + 1) * n * d];
                o.fill(0.0);
                for row in xb.chunks_exact(d).skip(npre) {
                    add_assign(o, row);
                }
                let inv = 1.0 / (n - npre) as f32;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
        Pool::Map => {}
    }
}

/// Row `t` of every image: `states (B, N, D)` -> `out (B, D)`.
pub(crate) fn token_rows(
    states: &[f32],
    out: &mut [f32],
    batch: usize,
    n: usize,
    d: usize,
    t: usize,
) {
    for (b, o) in out.chunks_exact_mut(d).enumerate().take(batch) {
        o.copy_from_slice(&states[(b * n + t) * d..(b * n + t + 1) * d]);
    }
}

/// `a = (a + b) / 2`, element-wise (DeiT's two heads).
pub(crate) fn average_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a = 0.5 * (*a + b));
}

/// Numerically stable softmax of one row, in place.
fn softmax_inplace(p: &mut [f32]) {
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in p.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|v| *v *= inv);
}
