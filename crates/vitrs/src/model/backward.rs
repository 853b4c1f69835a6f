//! The training step's maths: the one forward pass keeping its activations, softmax
//! cross-entropy, and the hand-written backward — the stages in reverse (head → pool → final
//! norm → blocks → embedding), each stage's backward beside its forward in its own file.
//! Gradients live in one flat buffer with the parameters' layout.
//!
//! The layout is in forward order (embedding, blocks 0..L, final norm, pooling, head), so the
//! backward finishes it in contiguous pieces from the end: everything after the last block,
//! then each block, then the embedding. [`ViT::forward_backward_overlapped`] hands each piece
//! over the moment it is final, which is what lets data-parallel training start summing a
//! block's gradients over the ranks while the backward goes on with the blocks before it.

use std::ops::Range;

use super::block::BranchBufs;
use super::forward::Pass;
use super::head::HeadGrads;
use super::workspace::{Activations, TrainWorkspace};
use super::ViT;
use crate::error::{Error, Result};
use crate::kernels::loss::{cross_entropy, Targets};
use crate::tensor::Tensor;

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
        self.forward_backward_overlapped(images, targets, tw, &mut |_, _| {})
    }

    /// [`forward_backward`](Self::forward_backward), calling `ready(range, grads)` each time a
    /// piece of the gradient buffer is final: `range` of [`grad_pieces`](Self::grad_pieces), in
    /// that order, with `grads` the whole buffer (read `grads[range]`). Every piece is handed
    /// over exactly once per call, the last (the embedding's) just before this returns.
    pub fn forward_backward_overlapped(
        &self,
        images: &Tensor,
        targets: Targets<'_>,
        tw: &mut TrainWorkspace,
        ready: &mut dyn FnMut(Range<usize>, &[f32]),
    ) -> Result<f32> {
        let k = self.config.num_classes;
        if k == 0 {
            return Err(Error::InvalidConfig(
                "training needs a classifier: the model has num_classes = 0".into(),
            ));
        }
        let batch = self.batch_size_of(images, "training images (B, C, H, W)")?;
        crate::kernels::adapt_engine();
        tw.prepare(self, batch);
        let pass = Pass::Train { reg: tw.reg };
        self.forward_pass(images.data(), batch, &mut tw.acts, pass);
        let loss = cross_entropy(&tw.acts.head.logits, k, targets, &mut tw.g.dlogits)?;
        self.backward(batch, tw, ready);
        Ok(loss)
    }

    /// The gradient buffer in the pieces the backward finishes, in the order it finishes them:
    /// everything after the last block (final norm, pooling, head), the blocks last to first,
    /// then everything before the first block (tokens, position and patch embeddings).
    /// Contiguous, descending, together the whole buffer (a piece may be empty).
    pub fn grad_pieces(&self) -> Vec<Range<usize>> {
        let n = self.params.count();
        let blocks: Vec<Range<usize>> = self.view.blocks.iter().map(|b| b.span()).collect();
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return std::iter::once(0..n).collect();
        };
        let mut pieces: Vec<Range<usize>> = std::iter::once(last.end..n).collect();
        pieces.extend(blocks.iter().rev().cloned());
        pieces.push(0..first.start);
        pieces
    }

    /// Backward from `tw.g.dlogits (B, K)` to every parameter's gradient, handing each piece
    /// of [`grad_pieces`](Self::grad_pieces) to `ready` as it is final.
    fn backward(
        &self,
        batch: usize,
        tw: &mut TrainWorkspace,
        ready: &mut dyn FnMut(Range<usize>, &[f32]),
    ) {
        let pieces = self.grad_pieces();
        let mut next = pieces.into_iter();
        let mut hand_over = |grads: &[f32]| {
            if let Some(r) = next.next().filter(|r| !r.is_empty()) {
                ready(r, grads);
            }
        };
        let TrainWorkspace {
            acts: a,
            grads,
            reg,
            g,
        } = tw;
        let hg = HeadGrads {
            dlogits: &mut g.dlogits,
            dpre: &mut g.dpre,
            dpooled: &mut g.dpooled,
            dpooled_dist: &mut g.dpooled_dist,
            tmp: &mut g.dtmp,
        };
        self.head_backward(batch, &a.pool, &a.head, hg, grads, &mut g.ln_partials);
        let states = Activations::states(self, &a.final_norm, &a.x);
        let dp = (&g.dpooled[..], &g.dpooled_dist[..]);
        let parts = &mut g.ln_partials;
        // The final states are `(B, tokens, D)`: N tokens, or the few the last block kept.
        let tokens = a.tokens;
        let queries = (tokens < self.config.num_tokens()).then_some(tokens);
        self.pool_backward(
            states,
            batch,
            tokens,
            &mut a.pool,
            dp,
            &mut g.dx,
            grads,
            parts,
        );
        if let Some(norm) = &self.view.norm {
            let rows = batch * tokens;
            g.dtmp.fill(0.0);
            self.norm_grad(norm, &g.dx, &a.final_norm, &mut g.dtmp, grads, parts, rows);
            std::mem::swap(&mut g.dx, &mut g.dtmp);
        }
        // Without blocks the tail and the embedding are one piece, finished below.
        if !self.view.blocks.is_empty() {
            hand_over(grads);
        }
        // Blocks, last to first; dx holds ∂loss/∂(block output) on entry, ∂/∂(block input) after.
        let mut bufs = BranchBufs {
            branch: &mut a.branch,
            dh: &mut g.dh,
            dattn: &mut g.dattn,
            dqkv: &mut g.dqkv,
            attn_scratch: &mut a.attn_scratch,
            ln_partials: parts,
            grads,
            masked: reg.active(),
            batch,
        };
        let last = a.blocks.len().saturating_sub(1);
        for (l, block_acts) in a.blocks.iter().enumerate().rev() {
            let q = queries.filter(|_| l == last);
            self.block_backward(l, block_acts, &mut g.dx, &mut g.dtmp, &mut bufs, q);
            hand_over(bufs.grads);
        }
        self.embed_backward(&g.dx, batch, &mut a.embed, bufs.grads);
        hand_over(bufs.grads);
    }
}
