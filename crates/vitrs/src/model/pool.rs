//! Stage 4, pooling: the final token states `(B, N, D)` become one vector per image `(B, D)`
//! — the \[class\] token (the paper's), the mean of the patch tokens (`gap`), or attention
//! pooling (`map`: one learned query attends over the tokens, timm's `AttentionPoolLatent`,
//! big_vision's `MAPHead`). DeiT also reads its distillation token here. Forward and backward.

use super::layers::{MlpActs, NormActs, Sizer};
use super::params::MapView;
use super::ViT;
use crate::config::{Pool, ViTConfig};
use crate::kernels::attention::{attend_one, attend_one_backward};
use crate::kernels::gemm::{add_assign, Epilogue};

/// Pooling's activations: the pooled vectors, and attention pooling's intermediates.
#[derive(Debug, Default)]
pub(crate) struct PoolActs {
    /// `(B, D)`: the pooled vectors (fc_norm, in the head, rewrites them in place).
    pub pooled: Vec<f32>,
    /// `(B, D)`: the distillation token's final state (DeiT only).
    pub pooled_dist: Vec<f32>,
    /// Attention pooling (empty without it).
    pub map: MapActs,
}

impl PoolActs {
    pub(crate) fn size(&mut self, cfg: &ViTConfig, batch: usize, train: bool, f: &mut Sizer) {
        let d = cfg.width;
        f(&mut self.pooled, batch * d);
        f(
            &mut self.pooled_dist,
            if cfg.distilled { batch * d } else { 0 },
        );
        self.map.size(cfg, batch, train, f);
    }
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
    /// MLP hidden `(B, M)`.
    mlp: MlpActs,
    // Gradient scratch (training only).
    dq: Vec<f32>,
    dkv: Vec<f32>,
    dattn: Vec<f32>,
    dz: Vec<f32>,
    dh: Vec<f32>,
}

impl MapActs {
    fn size(&mut self, cfg: &ViTConfig, batch: usize, train: bool, f: &mut Sizer) {
        let (n, d, m) = (cfg.num_tokens(), cfg.width, cfg.mlp_dim);
        let on = cfg.pool == Pool::Map;
        // Everything is empty without attention pooling, the gradients without training.
        let a = |x: usize| if on { x } else { 0 };
        let g = |x: usize| if on && train { x } else { 0 };
        f(&mut self.q, a(d));
        f(&mut self.kv, a(batch * n * 2 * d));
        f(&mut self.probs, a(batch * cfg.heads * n));
        f(&mut self.attn, a(batch * d));
        f(&mut self.z, a(batch * d));
        self.ln.size(a(batch), d, train, f);
        self.mlp.size(a(batch), m, train, f);
        f(&mut self.dq, g(d));
        f(&mut self.dkv, g(batch * n * 2 * d));
        f(&mut self.dattn, g(batch * d));
        f(&mut self.dz, g(batch * d));
        f(&mut self.dh, g(batch * m));
    }
}

impl ViT {
    /// Pools the final token states into `acts.pooled` (and DeiT's distillation token into
    /// `acts.pooled_dist`); `keep` keeps what the backward needs. `tokens` is the states'
    /// tokens per image: N, or the
    /// [`ViTConfig::pooled_prefix`](crate::config::ViTConfig::pooled_prefix) the last block kept.
    ///
    /// # Shapes
    /// `states (B, tokens, D)` -> `pooled (B, D)`, `pooled_dist (B, D)`.
    pub(crate) fn pool(
        &self,
        states: &[f32],
        batch: usize,
        tokens: usize,
        acts: &mut PoolActs,
        keep: bool,
    ) {
        let cfg = &self.config;
        let (n, d, npre) = (tokens, cfg.width, cfg.num_prefix_tokens());
        match (&self.view.attn_pool, cfg.pool) {
            (Some(mv), _) => {
                self.map_forward(mv, states, batch, &mut acts.map, keep);
                acts.pooled.copy_from_slice(&acts.map.z);
                self.linear(
                    &mv.fc2,
                    &acts.map.mlp.h_act,
                    &mut acts.pooled,
                    batch,
                    Epilogue::Accumulate,
                );
            }
            (None, Pool::Mean) => {
                let inv = 1.0 / (n - npre) as f32;
                for (b, o) in acts.pooled.chunks_exact_mut(d).enumerate().take(batch) {
                    let xb = &states[b * n * d..(b + 1) * n * d];
                    o.fill(0.0);
                    for row in xb.chunks_exact(d).skip(npre) {
                        add_assign(o, row);
                    }
                    o.iter_mut().for_each(|v| *v *= inv);
                }
            }
            (None, _) => token_rows(states, &mut acts.pooled, batch, n, d, 0),
        }
        if cfg.distilled {
            token_rows(states, &mut acts.pooled_dist, batch, n, d, 1);
        }
    }

    /// Backward of [`Self::pool`]: from `(dpooled, dpooled_dist)`, each `(B, D)`, to
    /// `dstates (B, tokens, D)` (overwritten), parameter gradients accumulated.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pool_backward(
        &self,
        states: &[f32],
        batch: usize,
        tokens: usize,
        acts: &mut PoolActs,
        (dpooled, dpooled_dist): (&[f32], &[f32]),
        dstates: &mut [f32],
        grads: &mut [f32],
        partials: &mut Vec<f32>,
    ) {
        let cfg = &self.config;
        let (n, d, npre) = (tokens, cfg.width, cfg.num_prefix_tokens());
        let dstates = &mut dstates[..batch * n * d];
        dstates.fill(0.0);
        match (&self.view.attn_pool, cfg.pool) {
            (Some(mv), _) => self.map_backward(
                mv,
                states,
                batch,
                &mut acts.map,
                dpooled,
                dstates,
                grads,
                partials,
            ),
            (None, Pool::Mean) => {
                let inv = 1.0 / (n - npre) as f32;
                for (b, g) in dpooled.chunks_exact(d).enumerate().take(batch) {
                    for t in npre..n {
                        let row = &mut dstates[(b * n + t) * d..(b * n + t + 1) * d];
                        row.iter_mut().zip(g).for_each(|(r, v)| *r = v * inv);
                    }
                }
            }
            (None, _) => {
                for (b, g) in dpooled.chunks_exact(d).enumerate().take(batch) {
                    dstates[b * n * d..b * n * d + d].copy_from_slice(g);
                }
            }
        }
        if cfg.distilled {
            for (b, g) in dpooled_dist.chunks_exact(d).enumerate().take(batch) {
                dstates[(b * n + 1) * d..(b * n + 2) * d].copy_from_slice(g);
            }
        }
    }

    /// Attention pooling up to its MLP: the learned query attends over the final token states
    /// `(B, N, D)`, `z = proj(attn)`, and `acts.mlp` holds `GELU(fc1(LN(z)))`; [`Self::pool`]
    /// adds `fc2` of that to `z`.
    fn map_forward(
        &self,
        mv: &MapView,
        states: &[f32],
        batch: usize,
        acts: &mut MapActs,
        keep: bool,
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
                let o = &mut acts.attn[b * d + h * hd..b * d + (h + 1) * hd];
                attend_one(q, kv, (2 * d, h * hd, d + h * hd), scale, p, o);
            }
        }
        self.linear(&mv.proj, &acts.attn, &mut acts.z, batch, Epilogue::None);
        self.norm(&mv.norm, &acts.z, &mut acts.ln, keep, batch);
        self.mlp_hidden(&mv.fc1, &acts.ln.output, &mut acts.mlp, batch, keep);
    }

    /// Backward of attention pooling: `dout (B, D)` -> `dstates (B, N, D)` (overwritten),
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
            mlp,
            dq,
            dkv,
            dattn,
            dz,
            dh,
            ..
        } = acts;
        // out = z + fc2(GELU(fc1(LN(z)))).
        dz.copy_from_slice(&dout[..batch * d]);
        self.linear_grad_times(&mv.fc2, dout, &mlp.h_act, dh, &mlp.h_grad, grads, batch);
        // fc1's input gradient through the norm straight into dz, as in the blocks.
        self.linear_grad(&mv.fc1, dh, &ln.output, None, grads, batch);
        self.linear_norm_grad(&mv.fc1, dh, &mv.norm, ln, dz, grads, partials, batch);
        self.linear_grad(&mv.proj, dz, attn, Some(dattn), grads, batch);
        // o = Σ_j p_j v_j, p = softmax(scale · q·k_j); the query is shared by the batch.
        let scale = 1.0 / (hd as f32).sqrt();
        dq.fill(0.0);
        dkv.fill(0.0);
        for b in 0..batch {
            let kv = &kv[b * n * 2 * d..(b + 1) * n * 2 * d];
            let dkv = &mut dkv[b * n * 2 * d..(b + 1) * n * 2 * d];
            for h in 0..nh {
                let p = &probs[(b * nh + h) * n..(b * nh + h + 1) * n];
                let dout_h = &dattn[b * d + h * hd..b * d + (h + 1) * hd];
                let (qh, dqh) = (&q[h * hd..(h + 1) * hd], &mut dq[h * hd..(h + 1) * hd]);
                let layout = (2 * d, h * hd, d + h * hd);
                attend_one_backward(qh, kv, layout, scale, p, dout_h, dqh, dkv);
            }
        }
        self.linear_grad(&mv.kv, dkv, states, Some(dstates), grads, batch * n);
        let mut dlatent = vec![0.0; d];
        let latent = self.params.slice(&mv.latent);
        self.linear_grad(&mv.q, dq, latent, Some(&mut dlatent), grads, 1);
        add_assign(&mut grads[mv.latent.clone()], &dlatent);
    }
}

/// Row `t` of every image: `states (B, N, D)` -> `out (B, D)`.
fn token_rows(states: &[f32], out: &mut [f32], batch: usize, n: usize, d: usize, t: usize) {
    for (b, o) in out.chunks_exact_mut(d).enumerate().take(batch) {
        o.copy_from_slice(&states[(b * n + t) * d..(b * n + t + 1) * d]);
    }
}
