//! Optimisers over the flat parameter buffer: AdamW (decoupled weight decay, Loshchilov &
//! Hutter 2019) and SGD with momentum (the paper's fine-tuning optimiser), plus global-norm
//! gradient clipping. Weight decay skips the parameters the model names as no-decay
//! (position embedding, class token, norms, biases).

use serde::{Deserialize, Serialize};

use crate::kernels::{team, SyncPtr};
use crate::model::Params;

/// Which optimiser, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    AdamW {
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_eps")]
        eps: f32,
        #[serde(default = "default_adamw_weight_decay")]
        weight_decay: f32,
    },
    Sgd {
        #[serde(default = "default_momentum")]
        momentum: f32,
        #[serde(default)]
        weight_decay: f32,
    },
}

// PyTorch's AdamW defaults (β 0.9/0.999, ε 1e-8, weight decay 0.01); the paper's SGD momentum
// 0.9. Every AdamW and SGD built without explicit values takes them from here.
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}
fn default_momentum() -> f32 {
    0.9
}
/// PyTorch's `torch.optim.AdamW` default weight decay.
pub const ADAMW_WEIGHT_DECAY: f32 = 0.01;
fn default_adamw_weight_decay() -> f32 {
    ADAMW_WEIGHT_DECAY
}

impl OptimizerKind {
    /// AdamW with PyTorch's β, ε and the given weight decay.
    pub fn adamw(weight_decay: f32) -> Self {
        OptimizerKind::AdamW {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay,
        }
    }

    /// SGD with the paper's momentum 0.9 and the given weight decay.
    pub fn sgd(weight_decay: f32) -> Self {
        OptimizerKind::Sgd {
            momentum: default_momentum(),
            weight_decay,
        }
    }

    /// The optimiser's weight decay, to read or override.
    pub fn weight_decay_mut(&mut self) -> &mut f32 {
        match self {
            OptimizerKind::AdamW { weight_decay, .. } | OptimizerKind::Sgd { weight_decay, .. } => {
                weight_decay
            }
        }
    }
}

/// A run without an `optimizer` uses AdamW with all of PyTorch's defaults.
impl Default for OptimizerKind {
    fn default() -> Self {
        OptimizerKind::adamw(ADAMW_WEIGHT_DECAY)
    }
}

/// Optimiser state: one or two moment buffers in the parameter layout.
#[derive(Clone, Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// First moment (AdamW) or momentum buffer (SGD).
    pub m: Vec<f32>,
    /// Second moment (AdamW only; empty for SGD).
    pub v: Vec<f32>,
    /// Steps taken (for Adam's bias correction).
    pub t: u64,
    /// Per element of the flat buffer: whether weight decay applies.
    decay: Vec<bool>,
    /// Per element: a factor on the learning rate (layer-wise decay; 0 freezes). None: all 1.
    scale: Option<Vec<f32>>,
}

/// Elements per parallel task in the update loops.
const CHUNK: usize = 1 << 14;

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &Params) -> Self {
        let n = params.count();
        let mut decay = vec![false; n];
        for e in params.entries().iter().filter(|e| !e.no_weight_decay()) {
            decay[e.range.clone()].fill(true);
        }
        Optimizer {
            kind,
            m: vec![0.0; n],
            v: if matches!(kind, OptimizerKind::AdamW { .. }) {
                vec![0.0; n]
            } else {
                vec![]
            },
            t: 0,
            decay,
            scale: None,
        }
    }

    /// Sets per-element learning-rate factors (see [`super::transfer::lr_scales`]); `None`
    /// trains every parameter at the scheduled rate.
    pub fn set_lr_scales(&mut self, scale: Option<Vec<f32>>) {
        debug_assert!(scale.as_ref().is_none_or(|s| s.len() == self.decay.len()));
        self.scale = scale;
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        // The updates below write m and v through raw pointers, at the parameters' offsets.
        let n = params.len();
        assert!(
            grads.len() == n && self.m.len() == n && self.decay.len() == n,
            "optimizer step: {n} parameters, {} gradients, state for {}",
            grads.len(),
            self.m.len()
        );
        if matches!(self.kind, OptimizerKind::AdamW { .. }) {
            assert_eq!(self.v.len(), n, "optimizer step: AdamW second moments");
        }
        self.t += 1;
        let mask = &self.decay;
        let scale = self.scale.as_deref();
        // This chunk's learning-rate factors, when there are any.
        let chunk_scale = |ci: usize, len: usize| scale.map(|s| &s[ci * CHUNK..ci * CHUNK + len]);
        match self.kind {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let bc1 = 1.0 - beta1.powi(self.t.min(i32::MAX as u64) as i32);
                let bc2 = 1.0 - beta2.powi(self.t.min(i32::MAX as u64) as i32);
                let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
                let h = AdamStep {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    bc1,
                    inv_sqrt_bc2,
                };
                let (mp, vp) = (SyncPtr(self.m.as_mut_ptr()), SyncPtr(self.v.as_mut_ptr()));
                team::for_chunks_mut(params, CHUNK, |ci, p| {
                    let at = ci * CHUNK;
                    let (g, dm) = (&grads[at..at + p.len()], &mask[at..at + p.len()]);
                    // SAFETY: elements at.. of m and v, like those of `p`, belong to this
                    // task alone (m and v are as long as the parameters).
                    let (m, v) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(mp.get().add(at), p.len()),
                            std::slice::from_raw_parts_mut(vp.get().add(at), p.len()),
                        )
                    };
                    adamw_chunk(p, g, m, v, dm, chunk_scale(ci, p.len()), &h);
                });
            }
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => {
                let mp = SyncPtr(self.m.as_mut_ptr());
                team::for_chunks_mut(params, CHUNK, |ci, p| {
                    let at = ci * CHUNK;
                    let (g, dm) = (&grads[at..at + p.len()], &mask[at..at + p.len()]);
                    // SAFETY: elements at.. of the momentum buffer belong to this task alone.
                    let buf = unsafe { std::slice::from_raw_parts_mut(mp.get().add(at), p.len()) };
                    let sc = chunk_scale(ci, p.len());
                    sgd_chunk(p, g, buf, dm, sc, &(lr, momentum, weight_decay));
                });
            }
        }
    }
}

/// One AdamW step's constants: the learning rate, β₁, β₂, ε, the weight decay, and the bias
/// corrections `1 − β₁ᵗ` and `1 / √(1 − β₂ᵗ)`.
#[derive(Clone, Copy, Debug)]
struct AdamStep {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    inv_sqrt_bc2: f32,
}

// The updates are written for the vectoriser (the weight decay a select, the learning-rate
// factors in a loop of their own) and compiled for each SIMD rung; the same operations in the
// same order as the references below, so every rung gives the same bits. As one scalar loop
// the baseline x86-64 build ran the AdamW update one `sqrtss` and two `divss` an element.
crate::kernels::simd_dispatch! {
    /// [`adamw_ref`] over one chunk: `p`, `g`, `m`, `v`, `decay` (and `scale`, the
    /// learning-rate factors, where given) as long as `p`.
    fn adamw_chunk(
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        decay: &[bool],
        scale: Option<&[f32]>,
        h: &AdamStep,
    ) {
        let n = p.len();
        let (g, m, v, decay) = (&g[..n], &mut m[..n], &mut v[..n], &decay[..n]);
        let h = *h;
        #[inline(always)]
        fn one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, decay: bool, lr: f32, h: AdamStep) {
            let decayed = *p - lr * h.weight_decay * *p;
            let pi = if decay { decayed } else { *p };
            *m = h.beta1 * *m + (1.0 - h.beta1) * g;
            *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
            *p = pi - lr / h.bc1 * *m / (v.sqrt() * h.inv_sqrt_bc2 + h.eps);
        }
        match scale {
            None => {
                for i in 0..n {
                    one(&mut p[i], g[i], &mut m[i], &mut v[i], decay[i], h.lr, h);
                }
            }
            Some(s) => {
                let s = &s[..n];
                for i in 0..n {
                    one(&mut p[i], g[i], &mut m[i], &mut v[i], decay[i], h.lr * s[i], h);
                }
            }
        }
    }
}

crate::kernels::simd_dispatch! {
    /// [`sgd_ref`] over one chunk, `(lr, momentum, weight decay)` in `h`; the slices as in
    /// [`adamw_chunk`], `buf` the momentum.
    fn sgd_chunk(
        p: &mut [f32],
        g: &[f32],
        buf: &mut [f32],
        decay: &[bool],
        scale: Option<&[f32]>,
        h: &(f32, f32, f32),
    ) {
        let n = p.len();
        let (g, buf, decay) = (&g[..n], &mut buf[..n], &decay[..n]);
        let (lr, momentum, weight_decay) = *h;
        #[inline(always)]
        fn one(p: &mut f32, g: f32, buf: &mut f32, decay: bool, lr: f32, (momentum, wd): (f32, f32)) {
            let decayed = g + wd * *p;
            let gi = if decay { decayed } else { g };
            *buf = momentum * *buf + gi;
            *p -= lr * *buf;
        }
        match scale {
            None => {
                for i in 0..n {
                    one(&mut p[i], g[i], &mut buf[i], decay[i], lr, (momentum, weight_decay));
                }
            }
            Some(s) => {
                let s = &s[..n];
                for i in 0..n {
                    one(&mut p[i], g[i], &mut buf[i], decay[i], lr * s[i], (momentum, weight_decay));
                }
            }
        }
    }
}

/// One AdamW step (PyTorch's `torch.optim.AdamW` formula) written out one element at a
/// time, the reference [`Optimizer::step`] is tested against: `t` is the step's count from
/// 1, `scale` the learning-rate factors.
#[allow(clippy::too_many_arguments)]
pub fn adamw_ref(
    (p, g, m, v): (&mut [f32], &[f32], &mut [f32], &mut [f32]),
    decay: &[bool],
    scale: Option<&[f32]>,
    lr: f32,
    (beta1, beta2, eps, weight_decay): (f32, f32, f32, f32),
    t: i32,
) {
    let bc1 = 1.0 - beta1.powi(t);
    let inv_sqrt_bc2 = 1.0 / (1.0 - beta2.powi(t)).sqrt();
    for i in 0..p.len() {
        let lr_i = scale.map_or(lr, |s| lr * s[i]);
        if decay[i] {
            p[i] -= lr_i * weight_decay * p[i];
        }
        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
        p[i] -= lr_i / bc1 * m[i] / (v[i].sqrt() * inv_sqrt_bc2 + eps);
    }
}

/// One SGD step with momentum (PyTorch's `torch.optim.SGD`, weight decay added to the
/// gradient) one element at a time, the reference for [`Optimizer::step`].
pub fn sgd_ref(
    (p, g, buf): (&mut [f32], &[f32], &mut [f32]),
    decay: &[bool],
    scale: Option<&[f32]>,
    lr: f32,
    (momentum, weight_decay): (f32, f32),
) {
    for i in 0..p.len() {
        let lr_i = scale.map_or(lr, |s| lr * s[i]);
        let gi = if decay[i] {
            g[i] + weight_decay * p[i]
        } else {
            g[i]
        };
        buf[i] = momentum * buf[i] + gi;
        p[i] -= lr_i * buf[i];
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    // Per chunk in f64, added in chunk order (the same norm on any number of threads).
    let mut part = vec![0.0f64; grads.len().div_ceil(CHUNK)];
    team::for_chunks_mut(&mut part, 1, |ci, out| {
        let c = &grads[ci * CHUNK..((ci + 1) * CHUNK).min(grads.len())];
        out[0] = c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>();
    });
    let sq: f64 = part.iter().sum();
    let norm = sq.sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        team::for_chunks_mut(grads, CHUNK, |_, c| c.iter_mut().for_each(|g| *g *= s));
    }
    norm
}

/// An exponential moving average of the weights (timm's `ModelEma`): after optimizer step `t`
/// (counted from 0), `avg ← d·avg + (1 − d)·params` with `d = min(decay, (1 + t) / (10 + t))`,
/// so that the first steps do not leave the random start in the average for long.
#[derive(Clone, Debug)]
pub struct Ema {
    pub decay: f32,
    /// The averaged weights, in the parameter layout.
    pub weights: Vec<f32>,
}

impl Ema {
    /// Starts the average at `params`.
    pub fn new(decay: f32, params: &[f32]) -> Self {
        Ema {
            decay,
            weights: params.to_vec(),
        }
    }

    /// The decay used after optimizer step `t`.
    pub fn decay_at(&self, t: u64) -> f32 {
        let warm = (1.0 + t as f64) / (10.0 + t as f64);
        self.decay.min(warm as f32)
    }

    /// Folds `params`, as they are after optimizer step `t`, into the average.
    pub fn update(&mut self, params: &[f32], t: u64) {
        debug_assert_eq!(params.len(), self.weights.len());
        let keep = self.decay_at(t);
        let take = 1.0 - keep;
        team::for_chunks_mut(&mut self.weights, CHUNK, |ci, a| {
            let p = &params[ci * CHUNK..ci * CHUNK + a.len()];
            for (a, &p) in a.iter_mut().zip(p) {
                *a = keep * *a + take * p;
            }
        });
    }
}

/// [`Ema::update`] written out one element at a time, the reference it is tested against.
pub fn ema_update_ref(avg: &mut [f32], params: &[f32], decay: f32, t: u64) {
    let d = decay.min(((1.0 + t as f64) / (10.0 + t as f64)) as f32);
    for i in 0..avg.len() {
        avg[i] = d * avg[i] + (1.0 - d) * params[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ViTConfig;
    use crate::model::ViT;

    fn tiny() -> ViT {
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        (
            c.width,
            c.depth,
            c.heads,
            c.mlp_dim,
            c.image_height,
            c.image_width,
            c.num_classes,
        ) = (4, 1, 1, 4, 16, 16, 2);
        ViT::random(c, 1).unwrap()
    }

    /// Learning-rate factors: 0 freezes a parameter exactly (weight decay included), 0.5
    /// halves its step, for both optimisers.
    #[test]
    fn lr_scales_freeze_and_scale_updates() {
        let m = tiny();
        let n = m.params().count();
        for kind in [
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            OptimizerKind::Sgd {
                momentum: 0.9,
                weight_decay: 0.1,
            },
        ] {
            let g: Vec<f32> = (0..n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
            let p0 = m.params().flat().to_vec();
            let mut full = Optimizer::new(kind, m.params());
            let mut pf = p0.clone();
            full.step(&mut pf, &g, 0.01);
            let mut scaled = Optimizer::new(kind, m.params());
            let s: Vec<f32> = (0..n).map(|i| [0.0, 0.5, 1.0][i % 3]).collect();
            scaled.set_lr_scales(Some(s));
            let mut ps = p0.clone();
            scaled.step(&mut ps, &g, 0.01);
            for i in 0..n {
                let (df, ds) = (pf[i] - p0[i], ps[i] - p0[i]);
                match i % 3 {
                    0 => assert_eq!(ps[i], p0[i], "frozen element {i} moved"),
                    // Within the rounding of p + Δp (an ulp of p is up to ~1e-7 here).
                    1 => assert!(
                        (ds - 0.5 * df).abs() <= 1e-7 + 1e-3 * df.abs(),
                        "{i}: {ds} vs {df}"
                    ),
                    _ => assert_eq!(ps[i], pf[i]),
                }
            }
        }
    }

    #[test]
    fn adamw_matches_pytorch_formula_and_skips_no_decay() {
        let m = tiny();
        let kind = OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = Optimizer::new(kind, m.params());
        let mut p = m.params().flat().to_vec();
        let p0 = p.clone();
        let g: Vec<f32> = (0..p.len())
            .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
            .collect();
        opt.step(&mut p, &g, 0.01);
        // First Adam step: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps) ≈ lr·sign(g).
        let pos = m.params().entry("pos_embed").unwrap().range.clone();
        let w = m
            .params()
            .entry("blocks.0.attn.qkv.weight")
            .unwrap()
            .range
            .clone();
        for i in [pos.start, w.start + 1] {
            let decayed = if w.contains(&i) {
                p0[i] * (1.0 - 0.01 * 0.1)
            } else {
                p0[i]
            };
            let want = decayed - 0.01 * g[i] / (g[i].abs() + 1e-8);
            assert!((p[i] - want).abs() < 1e-6, "{i}: {} vs {want}", p[i]);
        }
    }

    /// Both optimisers' vectorised steps against their one-element-at-a-time references, bit
    /// for bit, on the running rung (`VITRS_KERNELS` picks it): three steps over several
    /// chunks and a ragged one, decay on every third element, with and without learning-rate
    /// factors (0 among them).
    #[test]
    fn the_updates_are_their_references_bit_for_bit() {
        let n = 3 * CHUNK + 17;
        let decay: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        let p0: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 * 0.02 - 1.0)
            .collect();
        let grad = |step: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + 11 * step) * 53) % 97) as f32 * 1e-3 - 0.048)
                .collect()
        };
        let factors: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.25).collect();
        let hp = (0.9, 0.999, 1e-8, 0.05);
        for scale in [None, Some(factors)] {
            for adam in [true, false] {
                let kind = if adam {
                    OptimizerKind::AdamW {
                        beta1: hp.0,
                        beta2: hp.1,
                        eps: hp.2,
                        weight_decay: hp.3,
                    }
                } else {
                    OptimizerKind::Sgd {
                        momentum: 0.9,
                        weight_decay: hp.3,
                    }
                };
                let mut opt = Optimizer {
                    kind,
                    m: vec![0.0; n],
                    v: if adam { vec![0.0; n] } else { vec![] },
                    t: 0,
                    decay: decay.clone(),
                    scale: scale.clone(),
                };
                let (mut p, mut want) = (p0.clone(), p0.clone());
                let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
                for step in 1..=3 {
                    let g = grad(step);
                    let lr = 0.01 / step as f32;
                    opt.step(&mut p, &g, lr);
                    let sc = scale.as_deref();
                    if adam {
                        adamw_ref(
                            (&mut want, &g, &mut m, &mut v),
                            &decay,
                            sc,
                            lr,
                            hp,
                            step as i32,
                        );
                    } else {
                        sgd_ref((&mut want, &g, &mut m), &decay, sc, lr, (0.9, hp.3));
                    }
                    let same = p.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "adam {adam}, factors {}, step {step}",
                        scale.is_some()
                    );
                    assert_ne!(p, p0);
                }
            }
        }
    }

    #[test]
    fn sgd_momentum_accumulates() {
        let m = tiny();
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.9,
                weight_decay: 0.0,
            },
            m.params(),
        );
        let mut p = vec![1.0; m.params().count()];
        let g = vec![1.0; p.len()];
        opt.step(&mut p, &g, 0.1);
        opt.step(&mut p, &g, 0.1);
        // buf: 1, then 1.9 -> p = 1 - 0.1 - 0.19
        assert!((p[0] - 0.71).abs() < 1e-6);
    }

    #[test]
    fn ema_matches_the_reference_and_warms_up() {
        let n = 3 * CHUNK + 17;
        let mut p: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut ema = Ema::new(0.999, &p);
        let mut reference = p.clone();
        for t in 0..25 {
            p.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x += ((i + t as usize) % 5) as f32 * 0.01);
            ema.update(&p, t);
            ema_update_ref(&mut reference, &p, 0.999, t);
        }
        assert_eq!(ema.weights, reference);
        // Warm-up: 0.1 after the first step, then (1 + t)/(10 + t) until the decay caps it.
        assert!((ema.decay_at(0) - 0.1).abs() < 1e-7);
        assert!((ema.decay_at(90) - 0.91).abs() < 1e-6);
        assert_eq!(ema.decay_at(1_000_000), 0.999);
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!(((g[0] * g[0] + g[1] * g[1]).sqrt() - 1.0).abs() < 1e-5);
        let mut g = vec![0.3, 0.4];
        clip_global_norm(&mut g, 1.0);
        assert_eq!(g, vec![0.3, 0.4]);
    }
}
