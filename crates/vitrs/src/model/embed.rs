//! Stage 1, the embedding (paper §3.1, Eq. 1): the image is cut into P×P patches, each
//! flattened with its channels and projected to width D; the prefix tokens — \[class\], DeiT's
//! \[distillation\], registers — go in front, and the learned position embeddings are added.
//! Forward and backward.

use std::ops::Range;

use super::layers::Sizer;
use super::ViT;
use crate::config::ViTConfig;
use crate::kernels::gemm::{add_assign, Epilogue};
use crate::kernels::team;

/// The embedding's activations.
#[derive(Debug, Default)]
pub(crate) struct EmbedActs {
    /// Flattened patches `(B·gh·gw, C·P·P)`.
    pub patches: Vec<f32>,
    /// Patch projections `(B·gh·gw, D)`; in the backward, their gradient.
    pub tokens: Vec<f32>,
}

impl EmbedActs {
    pub(crate) fn size(&mut self, cfg: &ViTConfig, batch: usize, f: &mut Sizer) {
        let np = batch * cfg.num_patches();
        f(
            &mut self.patches,
            np * cfg.channels * cfg.patch_size * cfg.patch_size,
        );
        f(&mut self.tokens, np * cfg.width);
    }
}

impl ViT {
    /// Images to the token sequence that enters the first block.
    ///
    /// # Shapes
    /// `images (B, C, H, W)` -> patches `(B·gh·gw, C·P·P)` -> projections `(B·gh·gw, D)` ->
    /// `x (B, N, D)`.
    pub(crate) fn embed(&self, images: &[f32], batch: usize, acts: &mut EmbedActs, x: &mut [f32]) {
        let cfg = &self.config;
        patchify(images, &mut acts.patches, cfg, batch);
        self.linear(
            &self.view.patch_embed,
            &acts.patches,
            &mut acts.tokens,
            batch * cfg.num_patches(),
            Epilogue::None,
        );
        self.embed_tokens(&acts.tokens, x, batch);
    }

    /// The token sequence `(B, N, D)`: the prefix tokens (\[class\], \[distillation\], registers)
    /// then the patch projections `tokens (B·gh·gw, D)`, plus the position table `(T, D)`.
    /// Position row `i` goes on token `i` (T = N), or with `no_embed_class` on patch `i`
    /// only (T = gh·gw): the table's rows always cover the last T tokens.
    fn embed_tokens(&self, tokens: &[f32], x: &mut [f32], batch: usize) {
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

    /// Backward of [`Self::embed`] from `dx = ∂loss/∂x (B, N, D)`: the prefix tokens', the
    /// position table's and the patch projection's gradients are added to `grads`
    /// (`acts.tokens` is overwritten with the projections' gradient).
    pub(crate) fn embed_backward(
        &self,
        dx: &[f32],
        batch: usize,
        acts: &mut EmbedActs,
        grads: &mut [f32],
    ) {
        let cfg = &self.config;
        let v = &self.view;
        let (n, d, npre) = (cfg.num_tokens(), cfg.width, cfg.num_prefix_tokens());
        for (t, r) in self.prefix_rows().into_iter().enumerate() {
            for b in 0..batch {
                add_assign(
                    &mut grads[r.clone()],
                    &dx[(b * n + t) * d..(b * n + t + 1) * d],
                );
            }
        }
        // Position row i sits on token i, or on patch i with `no_embed_class`.
        let first = n - cfg.pos_tokens();
        let dpos = &mut grads[v.pos_embed.clone()];
        for b in 0..batch {
            add_assign(dpos, &dx[(b * n + first) * d..(b + 1) * n * d]);
        }
        // (B, N, D) -> the patch rows (B·gh·gw, D).
        let np = n - npre;
        for b in 0..batch {
            let src = &dx[(b * n + npre) * d..(b + 1) * n * d];
            acts.tokens[b * np * d..(b + 1) * np * d].copy_from_slice(src);
        }
        self.linear_grad(
            &v.patch_embed,
            &acts.tokens,
            &acts.patches,
            None,
            grads,
            batch * cfg.num_patches(),
        );
    }

    /// Parameter ranges of the prefix tokens, one `(D)` row each, in token order: \[class\],
    /// \[distillation\], registers.
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
}

/// Cuts images into flattened patches in the conv weight's (c, py, px) order, one row of
/// patches per parallel task.
///
/// # Shapes
/// `images (B, C, H, W)` -> `patches (B, gh, gw, C, P, P)` = `(B·gh·gw, C·P·P)`.
pub(crate) fn patchify(images: &[f32], patches: &mut [f32], cfg: &ViTConfig, batch: usize) {
    let (c, h, w, p) = (
        cfg.channels,
        cfg.image_height,
        cfg.image_width,
        cfg.patch_size,
    );
    let (gh, gw) = cfg.grid();
    // One task per row of patches: (gw, C, P, P) floats.
    let per_row = gw * c * p * p;
    team::for_chunks_mut(&mut patches[..batch * gh * per_row], per_row, |r, out| {
        let (b, gy) = (r / gh, r % gh);
        let mut o = 0;
        for gx in 0..gw {
            for ch in 0..c {
                for py in 0..p {
                    let src = ((b * c + ch) * h + gy * p + py) * w + gx * p;
                    // An element loop, not `copy_from_slice`: a call to memmove per
                    // P floats cost more than the copy.
                    for (d, s) in out[o..o + p].iter_mut().zip(&images[src..src + p]) {
                        *d = *s;
                    }
                    o += p;
                }
            }
        }
    });
}
