//! Stage 2, the encoder block (paper §3.1, Eqs. 2–3): multi-head self-attention, then an MLP
//! with GELU, each a residual branch with a LayerNorm — before the branch (pre-norm, the
//! paper's) or after the residual sum (post-norm, the original Transformer's). Each branch may
//! be scaled by LayerScale (CaiT/DeiT III) and, in training, dropped by dropout and stochastic
//! depth. Forward and backward side by side.

use std::ops::Range;

use super::layers::{MlpActs, NormActs, Sizer};
use super::params::{BlockView, LinearView};
use super::ViT;
use crate::config::{NormPlacement, ViTConfig};
use crate::kernels::attention::{
    attention, attention_backward, attention_first, attention_first_backward, AttnDims,
};
use crate::kernels::gemm::{add_assign, Epilogue};

/// One block's activations. Shapes `(B, N, D)` unless noted. Inference keeps one of these for
/// every block in turn and sizes only what it reads; training keeps one per block.
#[derive(Debug, Default)]
pub(crate) struct BlockActs {
    /// Block input (post-norm training only: pre-norm's backward reads LN1's saved input).
    pub x_in: Vec<f32>,
    /// First LayerNorm (pre-norm: of the block input; post-norm: of `x + attn`).
    pub ln1: NormActs,
    /// Fused q/k/v `(B, N, 3D)`.
    pub qkv: Vec<f32>,
    /// Attention probabilities `(B, nh, N, N)`, training only (inference writes captured maps
    /// straight into the caller's tensor).
    pub probs: Vec<f32>,
    /// Attention output, heads side by side.
    pub attn: Vec<f32>,
    /// Second LayerNorm (pre-norm: of the mid-block residual; post-norm: of `x + mlp`).
    pub ln2: NormActs,
    /// MLP hidden `(B, N, M)`.
    pub mlp: MlpActs,
    /// Dropout × stochastic-depth multipliers of the attention and MLP branch outputs,
    /// training only.
    pub mask_attn: Vec<f32>,
    pub mask_mlp: Vec<f32>,
    /// With LayerScale, the attention and MLP branch outputs before their gains.
    pub ls_attn: Vec<f32>,
    pub ls_mlp: Vec<f32>,
}

impl BlockActs {
    pub(crate) fn size(&mut self, cfg: &ViTConfig, batch: usize, train: bool, f: &mut Sizer) {
        let (n, d, m) = (cfg.num_tokens(), cfg.width, cfg.mlp_dim);
        let rows = batch * n;
        let t = |x: usize| if train { x } else { 0 };
        let post = cfg.norm == NormPlacement::Post;
        f(&mut self.x_in, if post { t(rows * d) } else { 0 });
        self.ln1.size(rows, d, train, f);
        f(&mut self.qkv, rows * 3 * d);
        f(&mut self.probs, t(batch * cfg.heads * n * n));
        f(&mut self.attn, rows * d);
        self.ln2.size(rows, d, train, f);
        self.mlp.size(rows, m, train, f);
        f(&mut self.mask_attn, t(rows * d));
        f(&mut self.mask_mlp, t(rows * d));
        let ls = if cfg.layer_scale.is_some() {
            rows * d
        } else {
            0
        };
        f(&mut self.ls_attn, ls);
        f(&mut self.ls_mlp, ls);
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
    pub(crate) fn active(&self) -> bool {
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

/// What a block's forward keeps and draws besides its output (the forward pass's mode, for
/// one block).
pub(crate) struct BlockPass<'a> {
    /// Keep the activations the backward reads (training).
    pub keep: bool,
    /// Dropout and stochastic-depth masks to draw (training with regularisation).
    pub reg: Option<Regularization>,
    /// Where this block's attention maps `(B, nh, N, N)` go when inferring with capture.
    pub capture: Option<&'a mut [f32]>,
    /// The last block, when pooling reads only the first few tokens of each image
    /// (`ViTConfig::pooled_prefix`): only those rows leave it, see [`ViT::block_forward`].
    pub queries: Option<usize>,
}

/// Which residual branch of a block.
#[derive(Clone, Copy)]
enum Branch {
    Attn,
    Mlp,
}

/// The workspace buffers a block's backward borrows, lent to the branch helpers together.
pub(crate) struct BranchBufs<'a> {
    /// A branch's masked or scaled output gradient `(B·N, D)`.
    pub branch: &'a mut [f32],
    /// `(B·N, M)`: ∂loss/∂(fc1 output), then ∂/∂(GELU input).
    pub dh: &'a mut [f32],
    /// `(B·N, D)`: ∂loss/∂(attention output, heads concatenated).
    pub dattn: &'a mut [f32],
    /// `(B·N, 3·D)`: ∂loss/∂(q, k, v).
    pub dqkv: &'a mut [f32],
    pub attn_scratch: &'a mut Vec<f32>,
    pub ln_partials: &'a mut Vec<f32>,
    pub grads: &'a mut [f32],
    /// Whether stochastic depth or dropout masks apply.
    pub masked: bool,
    pub batch: usize,
}

impl ViT {
    /// The attention kernel's dimensions for `batch` images.
    pub(crate) fn attn_dims(&self, batch: usize) -> AttnDims {
        AttnDims {
            batch,
            tokens: self.config.num_tokens(),
            heads: self.config.heads,
            head_dim: self.config.head_dim(),
        }
    }

    /// Block `l`, in place on the residual stream.
    ///
    /// Pre-norm: `x = x + γ1·attn(LN1(x))`, then `x = x + γ2·MLP(LN2(x))`.
    /// Post-norm: `x = LN1(x + γ1·attn(x))`, then `x = LN2(x + γ2·MLP(x))`.
    ///
    /// With `pass.queries = Some(q)` (the last block, its output read only at the first `q`
    /// tokens of each image) LN1 and qkv still run on every token, which the attention's keys
    /// and values need, but the attention runs for the first `q` queries alone, and what
    /// follows it (projection, residual, LN2, MLP) on those rows: ViT-B/16's last block costs
    /// a quarter of a full one (its qkv product). The stream `x` then holds `(B, q, D)` at its
    /// start.
    ///
    /// # Shapes
    /// `x (B, N, D)` → `(B, N, D)`, or `(B, q, D)`; `branch (B·N, D)` scratch; attention maps
    /// `(B, nh, N, N)` go to `acts.probs` (training) or `pass.capture` (inference), `(B, nh,
    /// q, N)` to `acts.probs` when training with `queries`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward(
        &self,
        l: usize,
        x: &mut [f32],
        acts: &mut BlockActs,
        branch: &mut [f32],
        attn_scratch: &mut Vec<f32>,
        batch: usize,
        pass: BlockPass<'_>,
    ) {
        let cfg = &self.config;
        let blk = &self.view.blocks[l];
        let (n, d) = (cfg.num_tokens(), cfg.width);
        let rows = batch * n;
        let dims = self.attn_dims(batch);
        let BlockPass {
            keep,
            reg,
            capture,
            queries,
        } = pass;
        // The rows that go on past the attention: all, or the first `q` of each image.
        let out_rows = queries.map_or(rows, |q| batch * q);
        if let Some(reg) = &reg {
            fill_mask(&mut acts.mask_attn, reg, l, cfg.depth, 0, (batch, n, d));
            fill_mask(&mut acts.mask_mlp, reg, l, cfg.depth, 1, (batch, n, d));
            if let Some(q) = queries {
                // The same draws as a full block's, those of the rows that go on.
                keep_first_rows(&mut acts.mask_attn, batch, n, q, d);
                keep_first_rows(&mut acts.mask_mlp, batch, n, q, d);
            }
        }
        let (mask_attn, mask_mlp) = match reg {
            Some(_) => (Some(&acts.mask_attn[..]), Some(&acts.mask_mlp[..])),
            None => (None, None),
        };
        let probs = if keep {
            Some(&mut acts.probs[..])
        } else {
            capture
        };
        let ls1 = blk.ls1.as_ref().map(|g| (g, &mut acts.ls_attn[..]));
        let ls2 = blk.ls2.as_ref().map(|g| (g, &mut acts.ls_mlp[..]));
        // The attention over `qkv`, for every query or the first `q` (then the stream keeps
        // those rows alone, at its start).
        let attend = |qkv: &[f32], attn: &mut [f32], x: &mut [f32]| match queries {
            None => attention(qkv, attn, probs, attn_scratch, dims),
            Some(q) => {
                let len = batch * cfg.heads * q * n;
                // Inferring, in the attention kernel's scratch (sized for them by
                // `Activations::prepare`).
                let p = match probs {
                    Some(p) => &mut p[..len],
                    None => &mut attn_scratch[..len],
                };
                attention_first(qkv, q, attn, p, dims);
                keep_first_rows(x, batch, n, q, d);
            }
        };
        let o = out_rows;
        match cfg.norm {
            NormPlacement::Pre => {
                self.norm(&blk.norm1, x, &mut acts.ln1, keep, rows);
                self.linear(
                    &blk.qkv,
                    &acts.ln1.output,
                    &mut acts.qkv,
                    rows,
                    Epilogue::None,
                );
                attend(&acts.qkv, &mut acts.attn, x);
                if keep || mask_attn.is_some() || ls1.is_some() {
                    self.add_branch(&blk.proj, &acts.attn, x, branch, mask_attn, ls1, o);
                    self.norm(&blk.norm2, x, &mut acts.ln2, keep, o);
                } else {
                    // Inference: the residual add and LN2 in one parallel region.
                    let normed = &mut acts.ln2.output;
                    self.linear_then_norm(&blk.proj, &acts.attn, x, &blk.norm2, normed, o);
                }
                self.mlp_hidden(&blk.fc1, &acts.ln2.output, &mut acts.mlp, o, keep);
                self.add_branch(&blk.fc2, &acts.mlp.h_act, x, branch, mask_mlp, ls2, o);
            }
            NormPlacement::Post => {
                if keep {
                    acts.x_in.copy_from_slice(x);
                }
                self.linear(&blk.qkv, x, &mut acts.qkv, rows, Epilogue::None);
                attend(&acts.qkv, &mut acts.attn, x);
                self.add_branch(&blk.proj, &acts.attn, x, branch, mask_attn, ls1, o);
                self.norm(&blk.norm1, x, &mut acts.ln1, keep, o);
                x[..o * d].copy_from_slice(&acts.ln1.output[..o * d]);
                self.mlp_hidden(&blk.fc1, x, &mut acts.mlp, o, keep);
                self.add_branch(&blk.fc2, &acts.mlp.h_act, x, branch, mask_mlp, ls2, o);
                self.norm(&blk.norm2, x, &mut acts.ln2, keep, o);
                x[..o * d].copy_from_slice(&acts.ln2.output[..o * d]);
            }
        }
    }

    /// `x += γ ⊙ mask ⊙ linear(input)`, or the fused in-place residual add when there is
    /// neither mask nor LayerScale. With LayerScale `(γ, saved)`, the branch output before
    /// its gain is kept in `saved` for the backward; otherwise `branch` is scratch.
    ///
    /// # Shapes
    /// `input (B·N, in)`, `x (B·N, D)`, `branch`, `mask`, `saved (B·N, D)`.
    #[allow(clippy::too_many_arguments)]
    fn add_branch(
        &self,
        l: &LinearView,
        input: &[f32],
        x: &mut [f32],
        branch: &mut [f32],
        mask: Option<&[f32]>,
        scale: Option<(&Range<usize>, &mut [f32])>,
        rows: usize,
    ) {
        if mask.is_none() && scale.is_none() {
            return self.linear(l, input, x, rows, Epilogue::Accumulate);
        }
        let (out, gamma) = match scale {
            Some((g, saved)) => (saved, Some(self.params.slice(g))),
            None => (branch, None),
        };
        self.linear(l, input, out, rows, Epilogue::None);
        let d = self.config.width;
        let (x, out) = (&mut x[..rows * d], &out[..rows * d]);
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

    /// Backward of [`Self::block_forward`] for block `l`: `dx` holds ∂loss/∂(block output)
    /// `(B·N, D)` on entry and ∂loss/∂(block input) on return; `dtmp (B·N, D)` is scratch.
    /// The block's parameter gradients are added to `bufs.grads`. With the forward's
    /// `queries = Some(q)`, `dx` holds `(B·q, D)` on entry, the gradient of the rows that left
    /// the block (the others fed nothing), and the attention half spreads it back to every
    /// token's row.
    pub(crate) fn block_backward(
        &self,
        l: usize,
        acts: &BlockActs,
        dx: &mut Vec<f32>,
        dtmp: &mut Vec<f32>,
        bufs: &mut BranchBufs,
        queries: Option<usize>,
    ) {
        let blk = &self.view.blocks[l];
        let (n, d) = (self.config.num_tokens(), self.config.width);
        let (batch, rows) = (bufs.batch, bufs.batch * n);
        // The rows after the attention (see `block_forward`).
        let out_rows = queries.map_or(rows, |q| batch * q);
        let spread = |dx: &mut [f32]| {
            if let Some(q) = queries {
                spread_first_rows(dx, batch, n, q, d);
            }
        };
        // The MLP half first (its norm is norm2/ln2), then the attention half (norm1/ln1).
        let halves = [
            (Branch::Mlp, &blk.norm2, &acts.ln2),
            (Branch::Attn, &blk.norm1, &acts.ln1),
        ];
        for (which, norm, ln) in halves {
            match self.config.norm {
                NormPlacement::Pre => {
                    // x_out = x + Branch(LN(x)): the branch's gradients but its first product's
                    // input gradient, which goes through LN straight into dx.
                    self.branch_backward(blk, acts, which, &ln.output, dx, None, bufs, queries);
                    let (first, dfirst, rows) = match which {
                        Branch::Mlp => (&blk.fc1, &*bufs.dh, out_rows),
                        Branch::Attn => {
                            // The residual's gradient reaches the first rows only.
                            spread(dx);
                            (&blk.qkv, &*bufs.dqkv, rows)
                        }
                    };
                    let (grads, partials) = (&mut *bufs.grads, &mut *bufs.ln_partials);
                    self.linear_norm_grad(first, dfirst, norm, ln, dx, grads, partials, rows);
                }
                NormPlacement::Post => {
                    // x_out = LN(s), s = x + Branch(x); the MLP's x is the middle state
                    // (LN1's output), attention's the block's input. Both norms saw the rows
                    // after the attention.
                    let o = out_rows;
                    dtmp[..o * d].fill(0.0);
                    self.norm_grad(norm, dx, ln, dtmp, bufs.grads, bufs.ln_partials, o);
                    std::mem::swap(dx, dtmp);
                    let input = match which {
                        Branch::Mlp => &acts.ln1.output,
                        Branch::Attn => &acts.x_in,
                    };
                    self.branch_backward(blk, acts, which, input, dx, Some(dtmp), bufs, queries);
                    let rows = match which {
                        Branch::Mlp => o,
                        Branch::Attn => {
                            spread(dx);
                            rows
                        }
                    };
                    add_assign(&mut dx[..rows * d], &dtmp[..rows * d]);
                }
            }
        }
    }

    /// One residual branch of a block, backwards — the MLP `γ2 ⊙ mask ⊙ fc2(GELU(fc1(input)))`
    /// or the attention `γ1 ⊙ mask ⊙ proj(attn(qkv(input)))`: from `dx = ∂loss/∂(residual sum)`
    /// `(B·N, D)` to `∂loss/∂input` `(B·N, D)`, written to `dinput` when given (otherwise the
    /// caller takes the first product's input gradient from `bufs.dh` or `bufs.dqkv`, its
    /// output gradient); the branch's parameter gradients are added to `bufs.grads`. `input`
    /// is what the branch's first product saw: the norm's output (pre-norm), or for post-norm
    /// the block's middle state (kept as LN1's output) for the MLP and the block's input for
    /// attention. With `queries = Some(q)` (see [`Self::block_backward`]) `dx` and the MLP's
    /// rows are the first `q` of each image, `(B·q, ·)`, and the attention's input gradient
    /// covers every row.
    #[allow(clippy::too_many_arguments)]
    fn branch_backward(
        &self,
        blk: &BlockView,
        acts: &BlockActs,
        which: Branch,
        input: &[f32],
        dx: &[f32],
        dinput: Option<&mut [f32]>,
        bufs: &mut BranchBufs,
        queries: Option<usize>,
    ) {
        let (mask, scale) = match which {
            Branch::Mlp => (&acts.mask_mlp, blk.ls2.as_ref().map(|g| (g, &acts.ls_mlp))),
            Branch::Attn => (
                &acts.mask_attn,
                blk.ls1.as_ref().map(|g| (g, &acts.ls_attn)),
            ),
        };
        let batch = bufs.batch;
        let rows = batch * self.config.num_tokens();
        let out_rows = queries.map_or(rows, |q| batch * q);
        let masked = bufs.masked.then_some(mask);
        let dy = self.branch_grad(dx, masked, scale, bufs.branch, bufs.grads, out_rows);
        match which {
            Branch::Mlp => {
                let (mlp, o) = (&acts.mlp, out_rows);
                // dh = (dy·W2) ⊙ GELU'(pre-activation), the derivative kept by the forward.
                let (h, dh) = (&mlp.h_act, &mut *bufs.dh);
                self.linear_grad_times(&blk.fc2, dy, h, dh, &mlp.h_grad, bufs.grads, o);
                self.linear_grad(&blk.fc1, bufs.dh, input, dinput, bufs.grads, o);
            }
            Branch::Attn => {
                let dattn = &mut *bufs.dattn;
                self.linear_grad(&blk.proj, dy, &acts.attn, Some(dattn), bufs.grads, out_rows);
                let dims = self.attn_dims(batch);
                let (qkv, probs, dqkv) = (&acts.qkv, &acts.probs, &mut *bufs.dqkv);
                match queries {
                    None => attention_backward(qkv, probs, dattn, dqkv, bufs.attn_scratch, dims),
                    Some(q) => attention_first_backward(qkv, q, probs, dattn, dqkv, dims),
                }
                self.linear_grad(&blk.qkv, bufs.dqkv, input, dinput, bufs.grads, rows);
            }
        }
    }

    /// The gradient reaching a branch `γ ⊙ mask ⊙ y` from `dx`: `dx ⊙ mask ⊙ γ` (written into
    /// `buf`), or `dx` itself; with LayerScale, `dγ += Σ_rows dx ⊙ mask ⊙ y` (`y` saved). Over
    /// the first `rows` rows of each.
    fn branch_grad<'a>(
        &self,
        dx: &'a [f32],
        mask: Option<&Vec<f32>>,
        scale: Option<(&Range<usize>, &Vec<f32>)>,
        buf: &'a mut [f32],
        grads: &mut [f32],
        rows: usize,
    ) -> &'a [f32] {
        let d = self.config.width;
        let dx = &dx[..rows * d];
        if mask.is_none() && scale.is_none() {
            return dx;
        }
        let buf = &mut buf[..rows * d];
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
}

/// Moves the first `q` rows of each of `batch` images of `n` rows (`d` floats each) to the
/// start of `x`, image after image: `(B, N, D)` → `(B, q, D)` in place.
pub(crate) fn keep_first_rows(x: &mut [f32], batch: usize, n: usize, q: usize, d: usize) {
    // Image b's rows go to b·q, never after where they are (b·n), so front to back is safe.
    for b in 1..batch {
        x.copy_within(b * n * d..(b * n + q) * d, b * q * d);
    }
}

/// The inverse of [`keep_first_rows`], zero elsewhere: `(B, q, D)` at the start of `x` →
/// `(B, N, D)`, rows `q..N` of each image zero.
pub(crate) fn spread_first_rows(x: &mut [f32], batch: usize, n: usize, q: usize, d: usize) {
    // Back to front: image b's rows move from b·q to b·n, never before where they are.
    for b in (0..batch).rev() {
        x.copy_within(b * q * d..(b + 1) * q * d, b * n * d);
        x[(b * n + q) * d..(b + 1) * n * d].fill(0.0);
    }
}
