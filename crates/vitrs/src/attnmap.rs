//! Where the model looks: attention maps over the patch grid from captured attention
//! probabilities, and the paper's mean attention distance (Fig. 7).
//!
//! Every map is read from the attention of a *query* over the patch keys. The query is the
//! class token for models that classify from it (`pool = cls`, DeiT included); for mean- or
//! attention-pooled models no class token feeds the classifier, so the query is the average
//! over all patch queries — [`Query`] says which was used. Prefix tokens (class,
//! distillation, registers) take part in the rollout but are not drawn: maps cover patches.
//!
//! Methods:
//! - [`Method::Mean`]: one layer (the last by default), heads averaged — the paper's view.
//! - [`Method::Head`]: one head of one layer.
//! - [`Method::Rollout`]: attention rollout (Abnar & Zuidema 2020): per layer, fuse the heads
//!   (mean, max or min), optionally zero the weakest fraction of the patch-to-patch weights,
//!   add the identity for the residual path, renormalise every **row** (each query's weights
//!   over the keys sum to 1), and multiply the layers together, first layer rightmost.

use crate::config::{Pool, ViTConfig};
use crate::error::{Error, Result};

/// How per-head attention is combined into one `(N, N)` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadFusion {
    Mean,
    Max,
    Min,
}

impl HeadFusion {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mean" => Some(HeadFusion::Mean),
            "max" => Some(HeadFusion::Max),
            "min" => Some(HeadFusion::Min),
            _ => None,
        }
    }
}

/// Which map to compute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// One layer, heads fused (`fusion`, mean by default).
    Mean { layer: usize, fusion: HeadFusion },
    /// One head of one layer.
    Head { layer: usize, head: usize },
    /// Attention rollout through all layers.
    Rollout {
        fusion: HeadFusion,
        discard_ratio: f32,
    },
}

/// The query whose attention a map shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    /// The class token (models that classify from it).
    ClassToken,
    /// The mean over the patch tokens (mean-pooled models).
    PatchMean,
}

impl Query {
    /// The query a model's classifier reads from.
    pub fn for_model(cfg: &ViTConfig) -> Self {
        match cfg.pool {
            Pool::Cls => Query::ClassToken,
            Pool::Mean | Pool::Map => Query::PatchMean,
        }
    }

    /// One line for users: what the map shows.
    pub fn describe(self) -> &'static str {
        match self {
            Query::ClassToken => "the class token's attention to each patch",
            Query::PatchMean => {
                "mean- or attention-pooled model: the average attention of all patch tokens to \
                 each patch (no class token feeds its classifier)"
            }
        }
    }
}

/// An attention map over the patch grid, row-major `(gh, gw)`, raw (not rescaled).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionMap {
    pub grid: (usize, usize),
    pub values: Vec<f32>,
    pub query: Query,
}

impl AttentionMap {
    /// Values scaled to [0, 1] by the map's own minimum and maximum (a constant map gives 0.5).
    pub fn normalized(&self) -> Vec<f32> {
        let (lo, hi) = self
            .values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        // Also catches an empty map (lo = +inf, hi = -inf) and NaNs.
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            return vec![0.5; self.values.len()];
        }
        self.values.iter().map(|v| (v - lo) / (hi - lo)).collect()
    }
}

/// Fuses the heads of one layer's attention `(nh, N, N)` into `(N, N)`.
pub fn fuse_heads(att: &[f32], heads: usize, n: usize, fusion: HeadFusion) -> Vec<f64> {
    let plane = n * n;
    let mut out = vec![0.0f64; plane];
    for (i, o) in out.iter_mut().enumerate() {
        let vals = (0..heads).map(|h| att[h * plane + i] as f64);
        *o = match fusion {
            HeadFusion::Mean => vals.sum::<f64>() / heads as f64,
            HeadFusion::Max => vals.fold(f64::NEG_INFINITY, f64::max),
            HeadFusion::Min => vals.fold(f64::INFINITY, f64::min),
        };
    }
    out
}

/// Attention rollout for one image.
///
/// `layers` holds each layer's fused attention `(N, N)` (query rows, key columns), first layer
/// first; the first `prefix` tokens are the class/distillation/register tokens. Per layer: the
/// weakest `discard_ratio` of the entries between two patch tokens are set to zero (entries
/// of a prefix token are never discarded), then
/// `Â = (A + I) / 2` and each row of `Â` is divided by its own sum; the result is
/// `Â_L · … · Â_1`, `(N, N)`.
pub fn rollout(layers: &[Vec<f64>], n: usize, prefix: usize, discard_ratio: f32) -> Vec<f64> {
    let mut joint = identity(n);
    for a in layers {
        let mut a = a.clone();
        if discard_ratio > 0.0 {
            discard_weakest(&mut a, n, prefix, discard_ratio);
        }
        for i in 0..n {
            a[i * n + i] += 1.0;
        }
        for row in a.chunks_exact_mut(n) {
            let s: f64 = row.iter().sum();
            if s > 0.0 {
                row.iter_mut().for_each(|v| *v /= s);
            }
        }
        joint = matmul(&a, &joint, n);
    }
    joint
}

/// Zeroes the `ratio` fraction of smallest entries among those with both indices ≥ `prefix`.
fn discard_weakest(a: &mut [f64], n: usize, prefix: usize, ratio: f32) {
    let mut idx: Vec<usize> = (0..n * n)
        .filter(|&k| k / n >= prefix && k % n >= prefix)
        .collect();
    let drop = ((idx.len() as f64) * ratio.clamp(0.0, 1.0) as f64).floor() as usize;
    if drop == 0 {
        return;
    }
    idx.sort_by(|&x, &y| a[x].total_cmp(&a[y]));
    for &k in &idx[..drop] {
        a[k] = 0.0;
    }
}

fn identity(n: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        m[i * n + i] = 1.0;
    }
    m
}

/// `a (n, n) · b (n, n)`.
fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik != 0.0 {
                for j in 0..n {
                    c[i * n + j] += aik * b[k * n + j];
                }
            }
        }
    }
    c
}

/// The query's row over the patch keys of an `(N, N)` matrix whose first `prefix` tokens are
/// not patches (the class token, when there is one, first): `(gh·gw)` values.
fn read_query(m: &[f64], n: usize, prefix: usize, query: Query) -> Vec<f32> {
    match query {
        Query::ClassToken => m[prefix..n].iter().map(|&v| v as f32).collect(),
        Query::PatchMean => (prefix..n)
            .map(|j| ((prefix..n).map(|i| m[i * n + j]).sum::<f64>() / (n - prefix) as f64) as f32)
            .collect(),
    }
}

/// The map of one image from its captured attention `(L, nh, N, N)` (one image's slice of
/// the forward pass's `(L, B, nh, N, N)` capture; see [`image_attention`]).
pub fn attention_map(cfg: &ViTConfig, att: &[f32], method: Method) -> Result<AttentionMap> {
    let (l, nh, n) = (cfg.depth, cfg.heads, cfg.num_tokens());
    let plane = nh * n * n;
    if att.len() != l * plane {
        return Err(Error::ShapeMismatch {
            name: "attention probabilities (L, nh, N, N)".into(),
            expected: vec![l, nh, n, n],
            got: vec![att.len()],
        });
    }
    let layer_of = |layer: usize| -> Result<&[f32]> {
        if layer >= l {
            return Err(Error::BadInput(format!(
                "layer {layer} does not exist: the model has {l} layers (0..{})",
                l - 1
            )));
        }
        Ok(&att[layer * plane..(layer + 1) * plane])
    };
    let query = Query::for_model(cfg);
    let m = match method {
        Method::Mean { layer, fusion } => fuse_heads(layer_of(layer)?, nh, n, fusion),
        Method::Head { layer, head } => {
            if head >= nh {
                return Err(Error::BadInput(format!(
                    "head {head} does not exist: the model has {nh} heads (0..{})",
                    nh - 1
                )));
            }
            let a = layer_of(layer)?;
            a[head * n * n..(head + 1) * n * n]
                .iter()
                .map(|&v| v as f64)
                .collect()
        }
        Method::Rollout {
            fusion,
            discard_ratio,
        } => {
            if !(0.0..1.0).contains(&discard_ratio) {
                return Err(Error::BadInput(format!(
                    "discard ratio {discard_ratio} must be in [0, 1)"
                )));
            }
            let layers: Vec<Vec<f64>> = (0..l)
                .map(|i| fuse_heads(&att[i * plane..(i + 1) * plane], nh, n, fusion))
                .collect();
            rollout(&layers, n, cfg.num_prefix_tokens(), discard_ratio)
        }
    };
    Ok(AttentionMap {
        grid: cfg.grid(),
        values: read_query(&m, n, cfg.num_prefix_tokens(), query),
        query,
    })
}

/// Image `b`'s attention `(L, nh, N, N)` out of a batch capture `(L, B, nh, N, N)`.
pub fn image_attention(cfg: &ViTConfig, capture: &[f32], batch: usize, b: usize) -> Vec<f32> {
    let plane = cfg.heads * cfg.num_tokens() * cfg.num_tokens();
    (0..cfg.depth)
        .flat_map(|l| {
            let s = (l * batch + b) * plane;
            capture[s..s + plane].iter().copied()
        })
        .collect()
}

/// Mean attention distance per layer and head, in pixels (the paper's Fig. 7): for each
/// patch query, the distance to each patch key (centre to centre, `patch_size` pixels per
/// grid step) weighted by the query's attention over the patch keys (renormalised to sum to 1,
/// the prefix tokens left out), averaged over the queries and the images of `capture`
/// `(L, B, nh, N, N)`. Returns `(L, nh)` row-major.
pub fn mean_attention_distance(cfg: &ViTConfig, capture: &[f32], batch: usize) -> Vec<f64> {
    let (l, nh, n) = (cfg.depth, cfg.heads, cfg.num_tokens());
    let npre = cfg.num_prefix_tokens();
    let (_, gw) = cfg.grid();
    let p = cfg.patch_size as f64;
    let pos = |t: usize| (((t - npre) / gw) as f64, ((t - npre) % gw) as f64);
    let dist: Vec<f64> = (npre..n)
        .flat_map(|i| {
            (npre..n).map(move |j| {
                let ((yi, xi), (yj, xj)) = (pos(i), pos(j));
                p * ((yi - yj).powi(2) + (xi - xj).powi(2)).sqrt()
            })
        })
        .collect();
    let np = n - npre;
    let mut out = vec![0.0; l * nh];
    for layer in 0..l {
        for b in 0..batch {
            for h in 0..nh {
                let base = ((layer * batch + b) * nh + h) * n * n;
                let mut acc = 0.0;
                for i in npre..n {
                    let row = &capture[base + i * n + npre..base + (i + 1) * n];
                    let s: f64 = row.iter().map(|&v| v as f64).sum();
                    if s > 0.0 {
                        let d = &dist[(i - npre) * np..(i - npre + 1) * np];
                        acc += row.iter().zip(d).map(|(&a, &d)| a as f64 * d).sum::<f64>() / s;
                    }
                }
                out[layer * nh + h] += acc / np as f64;
            }
        }
    }
    out.iter_mut().for_each(|v| *v /= batch.max(1) as f64);
    out
}

/// [`mean_attention_distance`] over the first `limit` images of `data` (normalised with
/// `mean` and `std`, as the model expects): `(L, nh)` row-major, in pixels, and the number of
/// images it averaged over.
pub fn dataset_attention_distance(
    model: &crate::model::ViT,
    data: std::sync::Arc<dyn crate::data::Dataset>,
    mean: &[f32],
    std: &[f32],
    limit: usize,
) -> Result<(Vec<f64>, usize)> {
    use crate::data::loader::{Loader, LoaderConfig};
    use crate::model::{Capture, Workspace};
    let cfg = model.config();
    let n = limit.min(data.len()).max(1);
    if data.is_empty() {
        return Err(Error::BadInput("the dataset has no images".into()));
    }
    let first = std::sync::Arc::new(crate::data::Subset::new(data, (0..n).collect()));
    let loader = Loader::new(
        first,
        LoaderConfig::in_order(32, mean, std, cfg.num_classes.max(1)),
    )?;
    let capture = Capture {
        attentions: true,
        pre_logits: false,
    };
    let mut ws = Workspace::new();
    let mut total = vec![0.0f64; cfg.depth * cfg.heads];
    for batch in loader {
        let batch = batch?;
        let b = batch.labels.len();
        let out = model.forward(&batch.images, capture, &mut ws)?;
        let att = out
            .attentions
            .ok_or_else(|| Error::BadInput("the forward pass captured no attention".into()))?;
        // Each batch's mean, weighted by its size: the mean over all n images.
        for (t, v) in total
            .iter_mut()
            .zip(mean_attention_distance(cfg, att.data(), b))
        {
            *t += v * b as f64;
        }
    }
    total.iter_mut().for_each(|v| *v /= n as f64);
    Ok((total, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
    }

    /// Two layers, three tokens (class + 2 patches), worked by hand:
    /// Â = (A + I)/2 with rows renormalised, rollout = Â2 · Â1.
    #[test]
    fn rollout_matches_hand_computed_example() {
        let a1 = vec![
            0.5, 0.25, 0.25, //
            0.0, 1.0, 0.0, //
            0.2, 0.2, 0.6,
        ];
        let a2 = vec![
            0.0, 1.0, 0.0, //
            0.5, 0.5, 0.0, //
            0.0, 0.0, 1.0,
        ];
        // Rows of A already sum to 1, so Â = (A + I)/2 sums to 1 as well:
        // Â1 = [[.75,.125,.125],[0,1,0],[.1,.1,.8]], Â2 = [[.5,.5,0],[.25,.75,0],[0,0,1]].
        // Â2·Â1 row 0 = .5·[.75,.125,.125] + .5·[0,1,0] = [.375, .5625, .0625].
        let r = rollout(&[a1, a2], 3, 1, 0.0);
        assert!(close(&r[0..3], &[0.375, 0.5625, 0.0625], 1e-12), "{r:?}");
        // row 1 = .25·Â1[0] + .75·Â1[1] = [.1875, .78125, .03125]
        assert!(close(&r[3..6], &[0.1875, 0.78125, 0.03125], 1e-12), "{r:?}");
        // Every row of the product is a distribution.
        for row in r.chunks(3) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    /// Rows (queries) are renormalised, not columns: with unnormalised input whose row sums
    /// differ from its column sums, each row of Â sums to one. Dividing by the row sums along
    /// the wrong axis (a known bug elsewhere) fails this.
    #[test]
    fn rollout_renormalises_rows() {
        let a = vec![
            2.0, 0.0, 0.0, //
            1.0, 1.0, 1.0, //
            0.0, 0.0, 5.0,
        ];
        let r = rollout(&[a], 3, 1, 0.0);
        // Â = (A + I) row-normalised: row 0 = [3,0,0]/3, row 1 = [1,2,1]/4, row 2 = [0,0,6]/6.
        assert!(close(
            &r,
            &[1.0, 0.0, 0.0, 0.25, 0.5, 0.25, 0.0, 0.0, 1.0],
            1e-12
        ));
    }

    #[test]
    fn discarding_never_touches_the_class_token() {
        let n = 4;
        let a: Vec<f64> = (0..n * n).map(|k| 0.01 * (k as f64 + 1.0)).collect();
        let mut d = a.clone();
        discard_weakest(&mut d, n, 1, 0.5);
        for k in 0..n * n {
            if k / n == 0 || k % n == 0 {
                assert_eq!(d[k], a[k], "class-token entry {k} changed");
            }
        }
        // 9 patch-patch entries, half of them (4) dropped: the 4 smallest.
        assert_eq!(d.iter().filter(|&&v| v == 0.0).count(), 4);
        assert_eq!(d[n + 1], 0.0);
    }

    fn tiny(pool: Pool, h: usize, w: usize) -> ViTConfig {
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        c.image_height = h;
        c.image_width = w;
        c.patch_size = 4;
        c.depth = 2;
        c.heads = 2;
        c.width = 8;
        c.mlp_dim = 8;
        c.num_classes = 3;
        c.pool = pool;
        c
    }

    /// Uniform attention (every query attends equally to all keys) gives a uniform map with
    /// every method; so does identity attention (each token attends only to itself) for
    /// rollout, whose class row then stays on the class token.
    #[test]
    fn uniform_and_identity_attention_give_uniform_maps() {
        let cfg = tiny(Pool::Cls, 8, 12); // 2 x 3 grid, N = 7
        let n = cfg.num_tokens();
        let uniform = vec![1.0 / n as f32; cfg.depth * cfg.heads * n * n];
        for method in [
            Method::Mean {
                layer: 1,
                fusion: HeadFusion::Mean,
            },
            Method::Head { layer: 0, head: 1 },
            Method::Rollout {
                fusion: HeadFusion::Max,
                discard_ratio: 0.0,
            },
        ] {
            let m = attention_map(&cfg, &uniform, method).unwrap();
            assert_eq!(m.grid, (2, 3));
            assert_eq!(m.values.len(), 6);
            assert!(m.values.iter().all(|&v| (v - m.values[0]).abs() < 1e-7));
            assert_eq!(m.normalized(), vec![0.5; 6]);
        }
        let mut ident = vec![0.0f32; cfg.depth * cfg.heads * n * n];
        for lh in 0..cfg.depth * cfg.heads {
            for i in 0..n {
                ident[lh * n * n + i * n + i] = 1.0;
            }
        }
        let rollout = Method::Rollout {
            fusion: HeadFusion::Mean,
            discard_ratio: 0.0,
        };
        let m = attention_map(&cfg, &ident, rollout).unwrap();
        assert!(m.values.iter().all(|&v| v == 0.0));
    }

    /// A non-square grid, a class token attending to one patch: the map lights exactly that
    /// cell at (row 1, column 2) of a 2 x 3 grid; a mean-pooled model reads the patch queries.
    #[test]
    fn maps_follow_non_square_grids_and_the_pooling() {
        let cfg = tiny(Pool::Cls, 8, 12);
        let n = cfg.num_tokens();
        let mut att = vec![0.0f32; cfg.depth * cfg.heads * n * n];
        for lh in 0..cfg.depth * cfg.heads {
            let p = &mut att[lh * n * n..(lh + 1) * n * n];
            p[6] = 1.0; // class token -> patch 5 = (row 1, col 2)
            for i in 1..n {
                p[i * n + 1] = 1.0; // every patch -> patch 0
            }
        }
        let mean = Method::Mean {
            layer: 1,
            fusion: HeadFusion::Mean,
        };
        let m = attention_map(&cfg, &att, mean).unwrap();
        assert_eq!(m.query, Query::ClassToken);
        assert_eq!(m.values, vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let cfg_mean = tiny(Pool::Mean, 8, 12);
        let m = attention_map(&cfg_mean, &att, mean).unwrap();
        assert_eq!(m.query, Query::PatchMean);
        assert_eq!(m.values, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // Out-of-range layer and head are errors, not panics.
        assert!(attention_map(
            &cfg,
            &att,
            Method::Mean {
                layer: 2,
                fusion: HeadFusion::Mean
            }
        )
        .is_err());
        assert!(attention_map(&cfg, &att, Method::Head { layer: 0, head: 2 }).is_err());
        assert!(attention_map(&cfg, &att[1..], mean).is_err());
    }

    /// Attention that stays on the query's own patch has distance 0; attention spread
    /// uniformly over a 1 x 2 grid of 4-px patches has distance 2 px (half the keys are 4 px away).
    #[test]
    fn mean_attention_distance_in_pixels() {
        let cfg = tiny(Pool::Cls, 4, 8); // 1 x 2 grid, N = 3
        let n = 3;
        let mut cap = vec![0.0f32; cfg.depth * cfg.heads * n * n];
        for lh in 0..cfg.depth * cfg.heads {
            let p = &mut cap[lh * n * n..(lh + 1) * n * n];
            if lh / cfg.heads == 0 {
                p[n + 1] = 1.0;
                p[2 * n + 2] = 1.0;
            } else {
                for i in 0..n {
                    for j in 0..n {
                        p[i * n + j] = 1.0 / 3.0;
                    }
                }
            }
        }
        let d = mean_attention_distance(&cfg, &cap, 1);
        assert!(close(&d, &[0.0, 0.0, 2.0, 2.0], 1e-6), "{d:?}");
    }
}
