//! The two layers every stage is built from — a linear layer and a LayerNorm — forward and
//! backward, over the parameter views of [`super::params`]. The stages (`embed`, `block`,
//! `pool`, `head`) call these and never the kernels' parameter plumbing directly.

use std::ops::Range;

use super::params::{LinearView, NormView};
use super::ViT;
use crate::kernels::gemm::{
    linear_add_norm, linear_backward, linear_backward_times, linear_dx_blocks,
    linear_gelu_with_grad, linear_packed, Epilogue, PackedLinear,
};
use crate::kernels::layernorm::{
    add_partials, layernorm, layernorm_backward, layernorm_backward_rows, layernorm_train, LnSaved,
};
use crate::kernels::SyncPtr;

/// Sizes one activation buffer: `f(buffer, floats)`. The workspaces pass a closure that
/// resizes, the memory estimates one that only counts, so both read the same list.
pub(crate) type Sizer<'a> = dyn FnMut(&mut Vec<f32>, usize) + 'a;

/// One LayerNorm's activations: the output, and when training the input and the per-row mean
/// and 1/std its backward needs.
#[derive(Debug, Default)]
pub(crate) struct NormActs {
    /// `(rows, D)`, training only.
    pub input: Vec<f32>,
    /// `(rows, D)`.
    pub output: Vec<f32>,
    /// `(rows)` each, training only.
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

impl NormActs {
    pub(crate) fn size(&mut self, rows: usize, d: usize, train: bool, f: &mut Sizer) {
        let t = |n: usize| if train { n } else { 0 };
        f(&mut self.output, rows * d);
        f(&mut self.input, t(rows * d));
        f(&mut self.mean, t(rows));
        f(&mut self.rstd, t(rows));
    }
}

/// The MLP hidden layer `GELU(x·W1ᵀ + b1)` `(rows, M)`: the activation `h_act` and, when
/// training, the GELU's derivative at the pre-activation `h_grad` (all its backward needs).
/// Inference fuses the GELU into the product and keeps only `h_act`.
#[derive(Debug, Default)]
pub(crate) struct MlpActs {
    /// `(rows, M)`, training only: the pre-activation, then (after the GELU) its derivative.
    pub h_grad: Vec<f32>,
    /// `(rows, M)`.
    pub h_act: Vec<f32>,
}

impl MlpActs {
    pub(crate) fn size(&mut self, rows: usize, m: usize, train: bool, f: &mut Sizer) {
        f(&mut self.h_grad, if train { rows * m } else { 0 });
        f(&mut self.h_act, rows * m);
    }
}

/// Two disjoint mutable ranges of one buffer (`a` must end before `b` starts).
pub(crate) fn two_mut<'a>(
    buf: &'a mut [f32],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'a mut [f32], &'a mut [f32]) {
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a.clone()], &mut hi[..b.len()])
}

impl ViT {
    /// `out = epilogue(x·Wᵀ + b)` over `rows` rows.
    ///
    /// # Shapes
    /// `x (rows, in)` -> `out (rows, out)`.
    pub(crate) fn linear(
        &self,
        l: &LinearView,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        epi: Epilogue,
    ) {
        let (w, b, packed) = self.linear_operands(l);
        linear_packed(
            &x[..rows * l.inp],
            w,
            packed,
            b,
            &mut out[..rows * l.out],
            (rows, l.inp, l.out),
            epi,
        );
    }

    /// A linear layer's weight, bias and packed weight (when inference packed it).
    fn linear_operands(&self, l: &LinearView) -> (&[f32], Option<&[f32]>, Option<&PackedLinear>) {
        let w = self.params.slice(&l.w);
        let b = l.b.as_ref().map(|r| self.params.slice(r));
        (w, b, self.packed.as_ref().and_then(|p| p.get(&l.w.start)))
    }

    /// `x += linear(input)` (a residual branch), then `normed = LayerNorm(x)` with `nv`'s
    /// parameters, fused where the threads split the rows (inference; see
    /// [`linear_add_norm`]).
    ///
    /// # Shapes
    /// `input (rows, in)`, `x (rows, out)`, `normed (rows, out)`.
    pub(crate) fn linear_then_norm(
        &self,
        l: &LinearView,
        input: &[f32],
        x: &mut [f32],
        nv: &NormView,
        normed: &mut [f32],
        rows: usize,
    ) {
        let (w, b, packed) = self.linear_operands(l);
        let (g, beta) = (self.params.slice(&nv.w), self.params.slice(&nv.b));
        let eps = self.config.layer_norm_eps;
        linear_add_norm(
            &input[..rows * l.inp],
            w,
            packed,
            b,
            &mut x[..rows * l.out],
            (&mut normed[..rows * l.out], g, beta, eps),
            (rows, l.inp, l.out),
        );
    }

    /// Gradients of a linear layer over `rows` rows: `dx = dy·W` (when asked), dW and db
    /// accumulated into `grads`.
    ///
    /// # Shapes
    /// `dy (rows, out)`, `x (rows, in)`, `dx (rows, in)`.
    pub(crate) fn linear_grad(
        &self,
        l: &LinearView,
        dy: &[f32],
        x: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut [f32],
        rows: usize,
    ) {
        self.linear_grad_impl(l, dy, x, dx.map(|d| (d, None)), grads, rows);
    }

    /// [`Self::linear_grad`] with `dx` multiplied element-wise by `times (rows, in)` as it is
    /// written (see [`linear_backward_times`]): the MLP's fc2 backward through GELU, given its
    /// derivative.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_grad_times(
        &self,
        l: &LinearView,
        dy: &[f32],
        x: &[f32],
        dx: &mut [f32],
        times: &[f32],
        grads: &mut [f32],
        rows: usize,
    ) {
        self.linear_grad_impl(l, dy, x, Some((dx, Some(times))), grads, rows);
    }

    #[allow(clippy::type_complexity)]
    fn linear_grad_impl(
        &self,
        l: &LinearView,
        dy: &[f32],
        x: &[f32],
        dx: Option<(&mut [f32], Option<&[f32]>)>,
        grads: &mut [f32],
        rows: usize,
    ) {
        let w = self.params.slice(&l.w);
        let dims = (rows, l.inp, l.out);
        let (dy, x) = (&dy[..rows * l.out], &x[..rows * l.inp]);
        let n = rows * l.inp;
        let (dw, db) = match &l.b {
            Some(br) => {
                let (dw, db) = two_mut(grads, &l.w, br);
                (dw, Some(db))
            }
            None => (&mut grads[l.w.clone()], None),
        };
        match dx {
            Some((dx, Some(t))) => {
                linear_backward_times(dy, x, w, &mut dx[..n], &t[..n], dw, db, dims)
            }
            dx => linear_backward(dy, x, w, dx.map(|(d, _)| &mut d[..n]), dw, db, dims),
        }
    }

    /// The MLP hidden layer `GELU(x·W1ᵀ + b1)` into `acts.h_act`, fused into the product's
    /// tiles; when training (`keep`) GELU's derivative at the pre-activation goes to
    /// `acts.h_grad` from the same evaluation, for the backward.
    ///
    /// # Shapes
    /// `x (rows, D)` -> `acts.h_act (rows, M)`.
    pub(crate) fn mlp_hidden(
        &self,
        fc1: &LinearView,
        x: &[f32],
        acts: &mut MlpActs,
        rows: usize,
        keep: bool,
    ) {
        let gelu = self.config.gelu;
        if keep {
            // The derivative left in `h_grad` for the backward, from the same evaluation.
            let (w, b, _) = self.linear_operands(fc1);
            let (h_grad, h_act) = (&mut acts.h_grad, &mut acts.h_act);
            linear_gelu_with_grad(
                &x[..rows * fc1.inp],
                w,
                b,
                &mut h_grad[..rows * fc1.out],
                &mut h_act[..rows * fc1.out],
                (rows, fc1.inp, fc1.out),
                gelu,
            );
        } else {
            self.linear(fc1, x, &mut acts.h_act, rows, Epilogue::Gelu(gelu));
        }
    }

    /// LayerNorm of the first `rows` rows of `x` into `acts.output`; when training (`keep`)
    /// the input, mean and 1/std are kept for [`Self::norm_grad`].
    ///
    /// # Shapes
    /// `x (rows, D)` -> `acts.output (rows, D)` (each buffer may be longer).
    pub(crate) fn norm(
        &self,
        nv: &NormView,
        x: &[f32],
        acts: &mut NormActs,
        keep: bool,
        rows: usize,
    ) {
        let (d, eps) = (self.config.width, self.config.layer_norm_eps);
        let (w, b) = (self.params.slice(&nv.w), self.params.slice(&nv.b));
        let (x, out) = (&x[..rows * d], &mut acts.output[..rows * d]);
        if keep {
            let saved = LnSaved {
                input: &mut acts.input[..rows * d],
                mean: &mut acts.mean[..rows],
                rstd: &mut acts.rstd[..rows],
            };
            layernorm_train(x, out, w, b, d, eps, saved);
        } else {
            layernorm(x, out, w, b, d, eps);
        }
    }

    /// `dx += ∂loss/∂(norm input)` through linear layer `l` and the LayerNorm before it, given
    /// the layer's output gradient `dy (rows, out)`; the norm's γ/β gradients added to `grads`
    /// (the layer's own come from [`Self::linear_grad`] without `dx`). The product's rows go
    /// to the norm's backward a block at a time while in cache ([`linear_dx_blocks`]) instead
    /// of being written out and read back: the pre-norm block's qkv and fc1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_norm_grad(
        &self,
        l: &LinearView,
        dy: &[f32],
        nv: &NormView,
        acts: &NormActs,
        dx: &mut [f32],
        grads: &mut [f32],
        partials: &mut Vec<f32>,
        rows: usize,
    ) {
        let d = l.inp;
        let gamma = self.params.slice(&nv.w);
        // One `[dγ | dβ]` per part of the rows.
        let len = crate::kernels::gemm::linear_dx_parts(rows) * 2 * d;
        partials.clear();
        partials.resize(len, 0.0);
        crate::kernels::check_len("linear_norm_grad: dx", dx.len(), rows * d);
        let (dxp, pp) = (SyncPtr(dx.as_mut_ptr()), SyncPtr(partials.as_mut_ptr()));
        let dims = (rows, d, l.out);
        let w = self.params.slice(&l.w);
        linear_dx_blocks(&dy[..rows * l.out], w, dims, |part, r0, block| {
            let n = block.len() / d;
            let (at, stats) = (r0 * d..(r0 + n) * d, r0..r0 + n);
            // SAFETY: the blocks are disjoint rows of dx (checked to hold every row), and
            // part `part` (< linear_dx_parts) is one thread's alone.
            let (dxr, partial) = unsafe {
                let dxr = std::slice::from_raw_parts_mut(dxp.get().add(r0 * d), n * d);
                (
                    dxr,
                    std::slice::from_raw_parts_mut(pp.get().add(part * 2 * d), 2 * d),
                )
            };
            let stats = (&acts.mean[stats.clone()], &acts.rstd[stats]);
            layernorm_backward_rows(block, &acts.input[at], stats, gamma, dxr, partial);
        });
        let (dg, db) = two_mut(grads, &nv.w, &nv.b);
        add_partials(partials, dg, db);
    }

    /// `dx += ∂loss/∂input` of a LayerNorm given `dy = ∂loss/∂output`, over the first `rows`
    /// rows (those [`Self::norm`] saw), accumulating its γ/β gradients into `grads`.
    ///
    /// # Shapes
    /// `dy, dx (rows, D)` (each buffer may be longer).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn norm_grad(
        &self,
        nv: &NormView,
        dy: &[f32],
        acts: &NormActs,
        dx: &mut [f32],
        grads: &mut [f32],
        partials: &mut Vec<f32>,
        rows: usize,
    ) {
        let d = self.config.width;
        let (dg, db) = two_mut(grads, &nv.w, &nv.b);
        layernorm_backward(
            &dy[..rows * d],
            &acts.input[..rows * d],
            &acts.mean[..rows],
            &acts.rstd[..rows],
            self.params.slice(&nv.w),
            &mut dx[..rows * d],
            dg,
            db,
            d,
            partials,
        );
    }
}
