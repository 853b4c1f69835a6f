//! The forward pass — one for inference and training. [`ViT::forward_pass`] reads top to
//! bottom as the paper's model: embedding → blocks → final norm → pool → head; the [`Pass`]
//! says whether it keeps what the backward needs (training) or overwrites as it goes and
//! fuses where it can (inference). [`ViT::forward`] is the public inference entry point.

use super::block::{BlockPass, Regularization};
use super::workspace::{Activations, Workspace};
use super::ViT;
#[cfg(doc)]
use crate::config::ViTConfig;
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
    /// maps `(B, nh, N, N)` go (one plane of `(L, B, nh, N, N)`), and the rows that leave it
    /// (`queries`, the last block's; see [`Self::last_queries`]).
    fn block(&mut self, l: usize, plane: usize, queries: Option<usize>) -> BlockPass<'_> {
        match self {
            Pass::Train { reg } => BlockPass {
                keep: true,
                reg: reg.active().then_some(*reg),
                capture: None,
                queries,
            },
            Pass::Infer { attentions } => BlockPass {
                keep: false,
                reg: None,
                capture: attentions
                    .as_deref_mut()
                    .map(|t| &mut t[l * plane..(l + 1) * plane]),
                queries,
            },
        }
    }

    /// The tokens per image the last block computes past its attention, when fewer than all:
    /// those pooling reads ([`ViTConfig::pooled_prefix`]: the class token, DeiT's distillation
    /// token), unless every query row's attention map is captured. Nothing after the last
    /// block reads its other rows, and in training no gradient reaches them, so the logits,
    /// features and gradients are those of the whole block.
    fn last_queries(&self, model: &ViT) -> Option<usize> {
        match self {
            Pass::Infer {
                attentions: Some(_),
            } => None,
            _ if model.config.depth == 0 => None,
            _ => model.config.pooled_prefix(),
        }
    }
}

/// Whether an inference batch runs image by image: each image (or group of a few, see
/// [`images_per_task`]) a task of its own, a whole forward pass on one thread with its kernels
/// alone, the threads taking the next task as they finish (otherwise one pass over the
/// batch, each operation split among the threads).
///
/// A thread then never waits for another between operations (a pass of ViT-Ti/16 is 70 of
/// them; at batch 16 on a Zen 4 EPYC the two threads waited at the joins 3.6 % of the time,
/// and the one the host slowed set the pace), and one image's activations stay in L2. The
/// batch must be a multiple of the threads, so that they finish together; attention maps
/// (their `(L, B, …)` layout) are captured by one pass over the batch.
///
/// Against that pass (2 threads, the same Zen 4, A/B interleaved in one process): ViT-Ti/16
/// at batch 16 +5–7 %, batch 2 +29 %; S/16 at batch 16 +1–6 %; B/16 at batch 16 level in one
/// A/B and 4–5 % behind in another (each image streams all of its 340 MB of weights).
fn image_by_image(batch: usize, capture: Capture) -> bool {
    let threads = crate::kernels::team::threads();
    threads > 1 && batch.is_multiple_of(threads) && !capture.attentions
}

/// Images per task of a batch run image by image ([`image_by_image`]) when the products run
/// on the tile unit (`tiles`): 4, 2 or 1, the most that still gives every thread as many
/// tasks as the others; one elsewhere. A task of several images runs their pass together on
/// its thread: fewer partial tiles of rows in the products (one per task, not per image) and
/// fewer passes over the weights. AVX-512 + AMX Xeon, 2 threads, batch 16, against one image
/// a task: ViT-Ti/16 +9–12 %, S/16 +11–15 %, B/16 +5–9 % with 4 (with 8, one task a thread:
/// Ti/16 as 4, S/16 5 % behind it, B/16 4 % ahead). On the same Xeon's FMA kernels, 4 images
/// a task measured S/16 +4.5 % but Ti/16 −12 % (AVX-512, `VITRS_AMX=0`) and Ti/16 +5 %, S/16
/// +3 % (AVX2), not measured on AMD's cores, where one image a task was chosen: left at one.
fn images_per_task(batch: usize, threads: usize, tiles: bool) -> usize {
    [4, 2, 1]
        .into_iter()
        .filter(|&g| tiles || g == 1)
        .find(|g| batch.is_multiple_of(g * threads))
        .unwrap_or(1)
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
        crate::kernels::adapt_engine();
        let (f, k) = (cfg.feature_dim(), cfg.num_classes);
        // The logits `(B, K)` and, where needed, the features `(B, F)`.
        let want_feats = k == 0 || capture.pre_logits;
        let (logits, feats, attentions) = if image_by_image(batch, capture) {
            let (logits, feats) = self.forward_images(images.data(), batch, want_feats, ws);
            (logits, feats, None)
        } else {
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
            let feats = if want_feats {
                self.features(batch, &a.pool, &a.head)
            } else {
                Vec::new()
            };
            (a.head.logits[..batch * k].to_vec(), feats, attentions)
        };
        let logits = match k {
            0 => Tensor::new(vec![batch, f], feats.clone())?,
            k => Tensor::new(vec![batch, k], logits)?,
        };
        let pre_logits = capture
            .pre_logits
            .then(|| Tensor::new(vec![batch, f], feats))
            .transpose()?;
        Ok(ForwardOutput {
            logits,
            attentions,
            pre_logits,
        })
    }

    /// Inference image by image (see [`image_by_image`]): a task per group of
    /// [`images_per_task`] images, each running the whole forward pass over its images in
    /// their own activations (`ws.images`, one per task), on whichever thread claims it, its
    /// kernels on that thread alone. Returns the logits `(B, K)` and, with `want_feats`, the
    /// features `(B, F)` (else nothing).
    fn forward_images(
        &self,
        images: &[f32],
        batch: usize,
        want_feats: bool,
        ws: &mut Workspace,
    ) -> (Vec<f32>, Vec<f32>) {
        let cfg = &self.config;
        let (f, k) = (cfg.feature_dim(), cfg.num_classes);
        let image = cfg.channels * cfg.image_height * cfg.image_width;
        let tiles = crate::kernels::products_on_tiles();
        let g = images_per_task(batch, crate::kernels::team::threads(), tiles);
        let tasks = batch / g;
        ws.images.resize_with(tasks, Activations::default);
        for acts in &mut ws.images {
            acts.prepare_alone(cfg, g, false);
        }
        crate::kernels::team::for_chunks_mut(&mut ws.images[..tasks], 1, |i, acts| {
            // This thread's own engine for its images: its core's tile unit may be held back
            // while the other's runs at full speed (see `amx::follow_here`).
            let _engine = crate::kernels::follow_engine_here();
            let pass = Pass::Infer { attentions: None };
            self.forward_pass(
                &images[i * g * image..(i + 1) * g * image],
                g,
                &mut acts[0],
                pass,
            );
        });
        let mut logits = Vec::with_capacity(batch * k);
        let mut feats = Vec::with_capacity(if want_feats { batch * f } else { 0 });
        for a in &ws.images[..tasks] {
            logits.extend_from_slice(&a.head.logits[..g * k]);
            if want_feats {
                feats.extend(self.features(g, &a.pool, &a.head));
            }
        }
        (logits, feats)
    }

    /// The forward pass: leaves the logits `(B, K)` in `acts.head.logits` (and every
    /// activation the backward needs in `acts`, when training).
    ///
    /// # Shapes
    /// `images (B, C, H, W)` → tokens `x (B, N, D)` → L blocks `(B, N, D)` → final norm →
    /// pooled `(B, D)` → logits `(B, K)`. With a class-token head the last block leaves only
    /// the rows pooling reads, `(B, T, D)` with T = 1 (2 for DeiT), and the final norm runs on
    /// those ([`Pass::last_queries`]; `acts.tokens` records T, or N).
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
        let last = pass.last_queries(self);
        acts.tokens = last.unwrap_or(cfg.num_tokens());
        let Activations {
            embed,
            x,
            blocks,
            final_norm,
            pool,
            head,
            branch,
            attn_scratch,
            tokens,
            ..
        } = acts;
        self.embed(images, batch, embed, x);
        for l in 0..cfg.depth {
            // Training keeps every block's activations; inference reuses one set.
            let block_acts = &mut blocks[if keep { l } else { 0 }];
            let bp = pass.block(l, plane, last.filter(|_| l + 1 == cfg.depth));
            self.block_forward(l, x, block_acts, branch, attn_scratch, batch, bp);
        }
        // The stream is `(B, tokens, D)` now.
        if let Some(nv) = &self.view.norm {
            self.norm(nv, x, final_norm, keep, batch * *tokens);
        }
        let states = Activations::states(self, final_norm, x);
        self.pool(states, batch, *tokens, pool, keep);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Pool, Sizes, ViTConfig};

    /// A model of `cfg` with every parameter random (a new model's head is zero).
    fn random_model(cfg: &ViTConfig, seed: u64) -> ViT {
        let mut model = ViT::zeros(cfg.clone()).unwrap();
        let mut rng = crate::model::Rng::new(seed);
        let p = model.params_mut().flat_mut();
        p.iter_mut().for_each(|v| *v = (rng.normal() * 0.4) as f32);
        model
    }

    /// With a class-token head the last block leaves only the rows pooling reads (the class
    /// token; DeiT's distillation token too), inferring and training; the mean pool and
    /// captured maps keep every token. The logits are the whole block's, to f32 rounding.
    #[test]
    fn the_last_block_computes_only_the_rows_pooling_reads() {
        for (pool, distilled, kept) in [
            (Pool::Cls, false, Some(1)),
            (Pool::Cls, true, Some(2)),
            (Pool::Mean, false, None),
        ] {
            let mut cfg = ViTConfig::paper(Sizes {
                image: (8, 12),
                channels: 2,
                patch: 4,
                width: 16,
                depth: 2,
                heads: 2,
                mlp: 24,
                classes: 3,
            });
            cfg.pool = pool;
            cfg.distilled = distilled;
            cfg.validate().unwrap();
            let (n, batch) = (cfg.num_tokens(), 3);
            let model = random_model(&cfg, 11);
            let len = batch * cfg.channels * cfg.image_height * cfg.image_width;
            let images: Vec<f32> = (0..len).map(|i| (i % 13) as f32 / 6.0 - 1.0).collect();
            let k = cfg.num_classes;
            let run = |pass: Pass<'_>, train: bool| {
                let mut acts = Activations::default();
                acts.prepare(&cfg, batch, train);
                model.forward_pass(&images, batch, &mut acts, pass);
                (acts.tokens, acts.head.logits[..batch * k].to_vec())
            };
            let (tokens, logits) = run(Pass::Infer { attentions: None }, false);
            assert_eq!(tokens, kept.unwrap_or(n), "{pool:?}, distilled {distilled}");
            let mut maps = vec![0.0; cfg.depth * batch * cfg.heads * n * n];
            let capture = Pass::Infer {
                attentions: Some(&mut maps),
            };
            let (all, whole) = run(capture, false);
            assert_eq!(all, n, "capturing the maps needs every query row");
            let scale = whole.iter().fold(1f32, |m, v| m.max(v.abs()));
            let d = crate::kernels::max_abs_diff(&logits, &whole);
            assert!(d <= 1e-6 * scale, "{pool:?}: logits differ by {d}");
            let train = Pass::Train {
                reg: Regularization::default(),
            };
            let (tokens, trained) = run(train, true);
            assert_eq!(tokens, kept.unwrap_or(n), "training, {pool:?}");
            let d = crate::kernels::max_abs_diff(&trained, &whole);
            assert!(
                d <= 1e-5 * scale,
                "{pool:?}: training's logits differ by {d}"
            );
        }
    }

    /// A batch run image by image gives the logits and features of one pass over the whole
    /// batch (which capturing the attention maps forces), with and without a classifier.
    #[test]
    fn image_by_image_gives_the_whole_batch_pass() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for classes in [5, 0] {
            let cfg = ViTConfig::paper(Sizes {
                image: (12, 16),
                channels: 2,
                patch: 4,
                width: 16,
                depth: 2,
                heads: 2,
                mlp: 24,
                classes,
            });
            let mut model = random_model(&cfg, 3);
            model.pack_weights();
            // One, two and four images a task on the 2 threads.
            for batch in [2, 4, 8] {
                let n = batch * cfg.channels * cfg.image_height * cfg.image_width;
                let shape = vec![batch, cfg.channels, cfg.image_height, cfg.image_width];
                let x = Tensor::new(
                    shape,
                    (0..n).map(|i| (i % 23) as f32 / 11.0 - 1.0).collect(),
                )
                .unwrap();
                pool.install(|| {
                    let plain = Capture {
                        attentions: false,
                        pre_logits: true,
                    };
                    assert!(image_by_image(batch, plain));
                    assert!(
                        !image_by_image(3, plain),
                        "3 images do not split over 2 threads"
                    );
                    let mut ws = Workspace::new();
                    let each = model.forward(&x, plain, &mut ws).unwrap();
                    // On the tile unit a task a thread here, of 1, 2 and 4 images; one
                    // image a task elsewhere.
                    assert_eq!(images_per_task(batch, 2, true), batch / 2);
                    assert_eq!(images_per_task(batch, 2, false), 1);
                    let tasks = |tiles| batch / images_per_task(batch, 2, tiles);
                    // Where the engine follows the tile unit's speed, another test's forward
                    // may have moved it since this one ran.
                    let ran = if crate::kernels::gemm_adaptive() {
                        [tasks(true), tasks(false)].contains(&ws.images.len())
                    } else {
                        ws.images.len() == tasks(crate::kernels::products_on_tiles())
                    };
                    assert!(ran, "not run image by image: {} tasks", ws.images.len());
                    let all = Capture {
                        attentions: true,
                        pre_logits: true,
                    };
                    assert!(!image_by_image(batch, all));
                    let whole = model.forward(&x, all, &mut ws).unwrap();
                    let scale = whole.logits.data().iter().fold(1f32, |m, v| m.max(v.abs()));
                    let d = crate::kernels::max_abs_diff(each.logits.data(), whole.logits.data());
                    assert!(d <= 1e-6 * scale, "{classes} classes: logits differ by {d}");
                    assert_eq!(each.logits.shape(), whole.logits.shape());
                    let (pe, pw) = (each.pre_logits.unwrap(), whole.pre_logits.unwrap());
                    assert_eq!(pe.shape(), &[batch, cfg.feature_dim()][..]);
                    let d = crate::kernels::max_abs_diff(pe.data(), pw.data());
                    assert!(
                        d <= 1e-6 * scale,
                        "{classes} classes: features differ by {d}"
                    );
                    // The images differ, so would their logits.
                    let row = each.logits.shape()[1];
                    let first = &each.logits.data()[..row];
                    assert!(each.logits.data()[row..].chunks(row).any(|r| r != first));
                });
            }
        }
    }
}
