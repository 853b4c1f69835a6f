//! Stage 5, the head (paper §3.1): the pooled vector, optionally normalised (`fc_norm`, with
//! mean pooling), goes through the pre-training MLP head's tanh hidden layer when the model
//! has one (`pre_logits`), then the linear classifier. DeiT averages the classifier of the
//! class token and `head_dist` of the distillation token. Forward and backward.

use super::layers::{NormActs, Sizer};
use super::pool::PoolActs;
use super::ViT;
use crate::config::ViTConfig;
use crate::kernels::gemm::Epilogue;
use crate::kernels::math::tanh_backward_inplace;

/// The head's activations.
#[derive(Debug, Default)]
pub(crate) struct HeadActs {
    /// fc_norm over the pooled vectors `(B, D)` (empty without it).
    pub fc_norm: NormActs,
    /// Pre-logits `tanh(dense(pooled))` `(B, F)` (empty without them).
    pub pre: Vec<f32>,
    /// `(B, K)`.
    pub logits: Vec<f32>,
    /// DeiT's distillation-head logits `(B, K)` (empty otherwise).
    pub logits_dist: Vec<f32>,
}

impl HeadActs {
    pub(crate) fn size(&mut self, cfg: &ViTConfig, batch: usize, train: bool, f: &mut Sizer) {
        let k = cfg.num_classes;
        let rows = if cfg.fc_norm { batch } else { 0 };
        self.fc_norm.size(rows, cfg.width, train, f);
        let pre = match cfg.head {
            crate::config::Head::PreLogits { hidden } => batch * hidden,
            crate::config::Head::Linear => 0,
        };
        f(&mut self.pre, pre);
        f(&mut self.logits, batch * k);
        f(
            &mut self.logits_dist,
            if cfg.distilled { batch * k } else { 0 },
        );
    }
}

/// Gradient scratch of the head's backward.
pub(crate) struct HeadGrads<'a> {
    /// ∂loss/∂logits `(B, K)` on entry (scaled in place for DeiT's two heads).
    pub dlogits: &'a mut [f32],
    /// ∂loss/∂pre-logits `(B, F)`.
    pub dpre: &'a mut [f32],
    /// ∂loss/∂pooled `(B, D)`, and DeiT's ∂loss/∂pooled_dist `(B, D)`: the results.
    pub dpooled: &'a mut [f32],
    pub dpooled_dist: &'a mut [f32],
    /// `(B, D)` scratch.
    pub tmp: &'a mut [f32],
}

impl ViT {
    /// The head over the pooled vectors: \[fc_norm\] → \[pre-logits\] → classifier(s) into
    /// `acts.logits`; fc_norm rewrites `pool.pooled` with its output. `keep` keeps what the
    /// backward needs.
    ///
    /// # Shapes
    /// `pooled (B, D)` -> [pre-logits `(B, F)`] -> logits `(B, K)`.
    pub(crate) fn head(&self, batch: usize, pool: &mut PoolActs, acts: &mut HeadActs, keep: bool) {
        let v = &self.view;
        if let Some(fc) = &v.fc_norm {
            self.norm(fc, &pool.pooled, &mut acts.fc_norm, keep, batch);
            pool.pooled.copy_from_slice(&acts.fc_norm.output);
        }
        if let Some(pre) = &v.pre_logits {
            self.linear(pre, &pool.pooled, &mut acts.pre, batch, Epilogue::Tanh);
        }
        let feats = if v.pre_logits.is_some() {
            &acts.pre
        } else {
            &pool.pooled
        };
        if let Some(head) = &v.head {
            self.linear(head, feats, &mut acts.logits, batch, Epilogue::None);
        }
        if let Some(hd) = &v.head_dist {
            // DeiT: logits = (head(class token) + head_dist(distillation token)) / 2.
            let dist = &mut acts.logits_dist;
            self.linear(hd, &pool.pooled_dist, dist, batch, Epilogue::None);
            average_into(&mut acts.logits, dist);
        }
    }

    /// The model's features `(B, F)` as returned to users: the vector fed to the classifier
    /// (pre-logits, or the pooled vector), for DeiT averaged with the distillation token's
    /// (timm's `pre_logits`).
    pub(crate) fn features(&self, batch: usize, pool: &PoolActs, acts: &HeadActs) -> Vec<f32> {
        let f = self.config.feature_dim();
        let feats = if self.view.pre_logits.is_some() {
            &acts.pre
        } else {
            &pool.pooled
        };
        let mut out = feats[..batch * f].to_vec();
        if self.config.distilled {
            average_into(&mut out, &pool.pooled_dist[..batch * f]);
        }
        out
    }

    /// Backward of [`Self::head`]: from `g.dlogits` to `g.dpooled` (and `g.dpooled_dist`),
    /// parameter gradients accumulated into `grads`.
    pub(crate) fn head_backward(
        &self,
        batch: usize,
        pool: &PoolActs,
        acts: &HeadActs,
        g: HeadGrads<'_>,
        grads: &mut [f32],
        partials: &mut Vec<f32>,
    ) {
        let v = &self.view;
        let d = self.config.width;
        let has_pre = v.pre_logits.is_some();
        if let Some(hd) = &v.head_dist {
            // Each of DeiT's two heads gets half the gradient of their mean.
            g.dlogits.iter_mut().for_each(|x| *x *= 0.5);
            let dd = Some(&mut *g.dpooled_dist);
            self.linear_grad(hd, g.dlogits, &pool.pooled_dist, dd, grads, batch);
        }
        if let Some(head) = &v.head {
            let feats: &[f32] = if has_pre { &acts.pre } else { &pool.pooled };
            let dfeats: &mut [f32] = if has_pre { g.dpre } else { g.dpooled };
            self.linear_grad(head, g.dlogits, feats, Some(dfeats), grads, batch);
        }
        if let Some(pl) = &v.pre_logits {
            tanh_backward_inplace(&acts.pre, g.dpre);
            self.linear_grad(pl, g.dpre, &pool.pooled, Some(g.dpooled), grads, batch);
        }
        if let Some(fc) = &v.fc_norm {
            let tmp = &mut g.tmp[..batch * d];
            tmp.fill(0.0);
            self.norm_grad(fc, g.dpooled, &acts.fc_norm, tmp, grads, partials, batch);
            g.dpooled.copy_from_slice(tmp);
        }
    }
}

/// `a = (a + b) / 2`, element-wise (DeiT's two heads).
fn average_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a = 0.5 * (*a + b));
}
