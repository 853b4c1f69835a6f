//! 2-D convolution (square kernel, stride, zero padding), lowered onto the matrix product: the
//! input's k × k windows become the rows of a matrix (im2col), multiplied by the weight. A
//! window's values are ordered (row, column, channel), so that with channels-last input each
//! tap is one contiguous copy of `C_in` values; the weight, stored in PyTorch's
//! `(C_out, C_in, k, k)` layout, is read through a copy in that order `(C_out, k, k, C_in)`
//! ([`taps_last`]), and its gradient permuted back. The output is channels-last
//! (NHWC): one row of `C_out` per output pixel, what the next convolution's im2col and batch
//! normalisation read. The backward runs the same products transposed and scatters the window
//! gradients back (col2im). [`conv2d_ref`] and [`conv2d_backward_ref`] are the direct loops.

use super::team;

use super::gemm::{
    add_assign, gathered_accumulate, linear, linear_dw, linear_dx, linear_gathered, Epilogue,
};

/// Where a `(B, C, H, W)` tensor keeps its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `(B, C, H, W)`: the images as loaded.
    Nchw,
    /// `(B, H, W, C)`: every activation inside a CNN.
    Nhwc,
}

/// The geometry of one convolution over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub batch: usize,
    pub in_ch: usize,
    pub h: usize,
    pub w: usize,
    pub out_ch: usize,
    /// Square kernel side.
    pub k: usize,
    pub stride: usize,
    /// Zeros added on every side.
    pub pad: usize,
}

impl Conv2d {
    /// Output height and width: `(h + 2·pad − k) / stride + 1`.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.pad).saturating_sub(self.k) / self.stride.max(1) + 1;
        (o(self.h), o(self.w))
    }

    /// Rows of the lowered matrix: one per output pixel, `B·H_out·W_out`.
    pub fn rows(&self) -> usize {
        let (ho, wo) = self.out_hw();
        self.batch * ho * wo
    }

    /// Columns of the lowered matrix: one per weight of an output channel, `C_in·k·k`.
    pub fn cols(&self) -> usize {
        self.in_ch * self.k * self.k
    }

    /// Values in the input.
    pub fn in_len(&self) -> usize {
        self.batch * self.in_ch * self.h * self.w
    }

    /// Values in the output `(B, H_out, W_out, C_out)`.
    pub fn out_len(&self) -> usize {
        self.rows() * self.out_ch
    }

    /// Values in the weight `(C_out, C_in, k, k)`.
    pub fn weight_len(&self) -> usize {
        self.out_ch * self.cols()
    }

    /// The input pixel that tap `(ky, kx)` of output pixel `(oy, ox)` reads, or `None` in the
    /// zero padding.
    fn tap(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.stride + ky).checked_sub(self.pad)?;
        let x = (ox * self.stride + kx).checked_sub(self.pad)?;
        (y < self.h && x < self.w).then_some((y, x))
    }

    /// Strides of (b, c, y, x) in an input of `layout`.
    fn in_strides(&self, layout: Layout) -> [usize; 4] {
        let (c, h, w) = (self.in_ch, self.h, self.w);
        match layout {
            Layout::Nchw => [c * h * w, h * w, w, 1],
            Layout::Nhwc => [h * w * c, 1, w * c, c],
        }
    }
}

/// Rows of the lowered matrix per parallel task.
const ROWS_PER_TASK: usize = 256;

/// Lowers `x` into `cols (B·H_out·W_out, k·k·C_in)`: row `(b, oy, ox)` holds the window at
/// that output pixel, ordered (ky, kx, channel), zeros where it hangs over the border.
pub fn im2col(g: &Conv2d, x: &[f32], layout: Layout, cols: &mut [f32]) {
    super::check_len("im2col: x", x.len(), g.in_len());
    super::check_len("im2col: cols", cols.len(), g.rows() * g.cols());
    let (ho, wo) = g.out_hw();
    let [sb, sc, sy, sx] = g.in_strides(layout);
    let (k, ci) = (g.k, g.in_ch);
    let kk = g.cols();
    let fill = |r0: usize, chunk: &mut [f32]| {
        for (i, row) in chunk.chunks_exact_mut(kk).enumerate() {
            let r = r0 + i;
            let (b, oy, ox) = (r / (ho * wo), (r / wo) % ho, r % wo);
            for ky in 0..k {
                for kx in 0..k {
                    let out = &mut row[(ky * k + kx) * ci..(ky * k + kx + 1) * ci];
                    let Some((y, xx)) = g.tap(oy, ox, ky, kx) else {
                        out.fill(0.0);
                        continue;
                    };
                    let at = b * sb + y * sy + xx * sx;
                    if sc == 1 {
                        out.copy_from_slice(&x[at..at + ci]);
                    } else {
                        for (c, o) in out.iter_mut().enumerate() {
                            *o = x[at + c * sc];
                        }
                    }
                }
            }
        }
    };
    let cols = &mut cols[..g.rows() * kk];
    if g.rows() * kk < 1 << 16 {
        fill(0, cols);
    } else {
        team::for_chunks_mut(cols, kk * ROWS_PER_TASK, |t, chunk| {
            fill(t * ROWS_PER_TASK, chunk)
        });
    }
}

/// The adjoint of [`im2col`]: adds every window gradient of `dcols` back onto the input
/// positions it was read from, into `dx` (NHWC, accumulated). Images in parallel: each owns
/// its rows of `dcols` and its part of `dx`.
pub fn col2im_add(g: &Conv2d, dcols: &[f32], dx: &mut [f32]) {
    super::check_len("col2im: dcols", dcols.len(), g.rows() * g.cols());
    super::check_len("col2im: dx", dx.len(), g.in_len());
    let (ho, wo) = g.out_hw();
    let (k, ci) = (g.k, g.in_ch);
    let (kk, image) = (g.cols(), g.h * g.w * ci);
    let add = |dcols: &[f32], dx: &mut [f32]| {
        for (r, row) in dcols.chunks_exact(kk).enumerate() {
            let (oy, ox) = (r / wo, r % wo);
            for ky in 0..k {
                for kx in 0..k {
                    let Some((y, xx)) = g.tap(oy, ox, ky, kx) else {
                        continue;
                    };
                    let at = (y * g.w + xx) * ci;
                    let src = &row[(ky * k + kx) * ci..(ky * k + kx + 1) * ci];
                    dx[at..at + ci]
                        .iter_mut()
                        .zip(src)
                        .for_each(|(d, v)| *d += v);
                }
            }
        }
    };
    let per = ho * wo * kk;
    team::for_chunks_mut(&mut dx[..g.in_len()], image, |i, dx| {
        add(&dcols[i * per..(i + 1) * per], dx)
    });
}

/// The weight `(C_out, C_in, k, k)` reordered `(C_out, k, k, C_in)`, the order of [`im2col`]'s
/// columns, into `out`.
pub fn taps_last(g: &Conv2d, w: &[f32], out: &mut Vec<f32>) {
    let (ci, kk) = (g.in_ch, g.k * g.k);
    out.resize(g.weight_len(), 0.0);
    for o in 0..g.out_ch {
        for c in 0..ci {
            for t in 0..kk {
                out[(o * kk + t) * ci + c] = w[(o * ci + c) * kk + t];
            }
        }
    }
}

/// Adds a weight gradient over [`im2col`]'s columns back onto `dw` in PyTorch's order: `g_t`
/// is `(C_out, k·k·C_in)`, or with `transposed` `(k·k·C_in, C_out)`.
fn add_taps_first(g: &Conv2d, g_t: &[f32], transposed: bool, dw: &mut [f32]) {
    let (ci, co, kk) = (g.in_ch, g.out_ch, g.k * g.k);
    for o in 0..co {
        for c in 0..ci {
            for t in 0..kk {
                // Column (tap, channel) of output channel o.
                let col = t * ci + c;
                let at = if transposed {
                    col * co + o
                } else {
                    o * kk * ci + col
                };
                dw[(o * ci + c) * kk + t] += g_t[at];
            }
        }
    }
}

/// `out (B, H_out, W_out, C_out) = conv(x, w) + bias`, through `scratch`.
///
/// On the SIMD rungs the matrix product reads the windows where they are: `scratch` holds the
/// input zero-padded and channels-last (1.3 × the input for a 28 × 28 image, where the lowered
/// matrix would be 9 ×), and two offset tables say where each output pixel's window starts
/// and where each (tap, channel) is from there. The portable rung lowers the input (im2col)
/// into `scratch` and multiplies that.
///
/// # Shapes
/// `x (B, C_in, H, W)` in `layout`; `w (C_out, C_in, k, k)`; `bias (C_out)`.
pub fn conv2d(
    g: &Conv2d,
    x: &[f32],
    layout: Layout,
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    super::check_len("conv2d: x", x.len(), g.in_len());
    super::check_len("conv2d: w", w.len(), g.weight_len());
    super::check_len("conv2d: out", out.len(), g.out_len());
    let mut wt = Vec::new();
    taps_last(g, w, &mut wt);
    let dims = (g.rows(), g.cols(), g.out_ch);
    if super::isa() != super::Isa::Portable {
        let (rows, cols) = pad_channels_last(g, x, layout, scratch);
        let done = linear_gathered(scratch, (&rows, &cols), &wt, bias, out, dims);
        if done.is_some() {
            return;
        }
    }
    scratch.resize(g.rows() * g.cols(), 0.0);
    im2col(g, x, layout, scratch);
    // out (rows, C_out) = cols (rows, k·k·C_in) · wtᵀ.
    linear(scratch, &wt, bias, out, dims, Epilogue::None);
}

/// Writes `x` zero-padded by `pad` on every side, channels-last, `(B, H + 2p, W + 2p, C)`,
/// into `xp`, and returns the offset tables of its windows: each output pixel's window origin
/// (in [`Conv2d::rows`] order) and each (ky, kx, channel)'s offset from it (in [`im2col`]'s
/// column order).
fn pad_channels_last(
    g: &Conv2d,
    x: &[f32],
    layout: Layout,
    xp: &mut Vec<f32>,
) -> (Vec<isize>, Vec<isize>) {
    let (hp, wp, c, p) = (g.h + 2 * g.pad, g.w + 2 * g.pad, g.in_ch, g.pad);
    let image = hp * wp * c;
    // Every value is written below (the border zeros, the interior copied), so the buffer is
    // only grown, not cleared.
    xp.resize(g.batch * image, 0.0);
    let [_, sc, sy, sx] = g.in_strides(layout);
    let per_in = g.in_ch * g.h * g.w;
    team::for_chunks_mut(&mut xp[..g.batch * image], image, |i, dst| {
        let src = &x[i * per_in..(i + 1) * per_in];
        // Top and bottom border rows.
        dst[..p * wp * c].fill(0.0);
        dst[(p + g.h) * wp * c..].fill(0.0);
        for y in 0..g.h {
            let row = &mut dst[(y + p) * wp * c..(y + p + 1) * wp * c];
            row[..p * c].fill(0.0);
            row[(p + g.w) * c..].fill(0.0);
            let inner = &mut row[p * c..(p + g.w) * c];
            if sc == 1 {
                // Channels-last input: the image row is one contiguous run.
                inner.copy_from_slice(&src[y * sy..y * sy + g.w * c]);
            } else {
                for xx in 0..g.w {
                    for ch in 0..c {
                        inner[xx * c + ch] = src[y * sy + xx * sx + ch * sc];
                    }
                }
            }
        }
    });
    let (ho, wo) = g.out_hw();
    let s = g.stride;
    let mut rows = Vec::with_capacity(g.rows());
    for b in 0..g.batch {
        for oy in 0..ho {
            for ox in 0..wo {
                rows.push((b * image + (oy * s * wp + ox * s) * c) as isize);
            }
        }
    }
    let mut cols = Vec::with_capacity(g.cols());
    for ky in 0..g.k {
        for kx in 0..g.k {
            for ch in 0..c {
                cols.push(((ky * wp + kx) * c + ch) as isize);
            }
        }
    }
    (rows, cols)
}

/// The backward of [`conv2d`]: `dw += ∂/∂w`, `db += ∂/∂bias`, and, when asked, `dx`
/// (NHWC, **overwritten**) from `dy (B, H_out, W_out, C_out)`. `cols` and `dcols` are scratch.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    g: &Conv2d,
    x: &[f32],
    layout: Layout,
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    (cols, dcols): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let (m, kk, n) = (g.rows(), g.cols(), g.out_ch);
    super::check_len("conv2d_backward: dy", dy.len(), m * n);
    super::check_len("conv2d_backward: w", w.len(), g.weight_len());
    super::check_len("conv2d_backward: dw", dw.len(), g.weight_len());
    let mut dw_t = vec![0.0; g.weight_len()];
    let mut gathered = None;
    if super::isa() != super::Isa::Portable {
        // dWᵀ (k·k·C_in, C_out) += (lowered x)ᵀ · dy: the lowered input read in place, its
        // offset tables swapped so that it is the transposed operand.
        let (rows, offs) = pad_channels_last(g, x, layout, cols);
        gathered = gathered_accumulate(cols, (&offs, &rows), dy, &mut dw_t, (kk, m, n));
    }
    if gathered.is_none() {
        // dW (C_out, k·k·C_in) += dyᵀ · (lowered x).
        cols.resize(m * kk, 0.0);
        im2col(g, x, layout, cols);
        linear_dw(dy, cols, &mut dw_t, (m, kk, n));
    }
    add_taps_first(g, &dw_t, gathered.is_some(), dw);
    if let Some(db) = db {
        for row in dy.chunks_exact(n).take(m) {
            add_assign(&mut db[..n], row);
        }
    }
    let Some(dx) = dx else {
        return;
    };
    let (ho, wo) = g.out_hw();
    if g.stride == 1 && 2 * g.pad + 1 == g.k && (ho, wo) == (g.h, g.w) {
        // A "same" convolution's input gradient is itself a "same" convolution: of `dy`, by
        // the kernel turned half a turn with its channel axes swapped,
        // `w'[c, o, ky, kx] = w[o, c, k−1−ky, k−1−kx]` (gathered in place on the SIMD rungs).
        let (ci, co, k) = (g.in_ch, g.out_ch, g.k);
        let mut wr = vec![0.0; g.weight_len()];
        for o in 0..co {
            for c in 0..ci {
                for ky in 0..k {
                    for kx in 0..k {
                        wr[((c * co + o) * k + ky) * k + kx] =
                            w[((o * ci + c) * k + (k - 1 - ky)) * k + (k - 1 - kx)];
                    }
                }
            }
        }
        let gt = Conv2d {
            in_ch: co,
            out_ch: ci,
            ..*g
        };
        conv2d(
            &gt,
            dy,
            Layout::Nhwc,
            &wr,
            None,
            &mut dx[..g.in_len()],
            dcols,
        );
        return;
    }
    dcols.resize(m * kk, 0.0);
    let mut wt = Vec::new();
    taps_last(g, w, &mut wt);
    linear_dx(dy, &wt, dcols, (m, kk, n));
    dx[..g.in_len()].fill(0.0);
    col2im_add(g, dcols, dx);
}

/// Reference twin of [`conv2d`]: the direct six-deep loop.
pub fn conv2d_ref(
    g: &Conv2d,
    x: &[f32],
    layout: Layout,
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (ho, wo) = g.out_hw();
    let [sb, sc, sy, sx] = g.in_strides(layout);
    let k = g.k;
    for b in 0..g.batch {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..g.out_ch {
                    let mut acc = bias.map_or(0.0, |bb| bb[o]) as f64;
                    for c in 0..g.in_ch {
                        for ky in 0..k {
                            for kx in 0..k {
                                let Some((y, xx)) = g.tap(oy, ox, ky, kx) else {
                                    continue;
                                };
                                let v = x[b * sb + c * sc + y * sy + xx * sx];
                                acc += v as f64 * w[((o * g.in_ch + c) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    out[((b * ho + oy) * wo + ox) * g.out_ch + o] = acc as f32;
                }
            }
        }
    }
}

/// Reference twin of [`conv2d_backward`]: direct loops (`dx` NHWC, overwritten; `dw`, `db`
/// accumulated).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_ref(
    g: &Conv2d,
    x: &[f32],
    layout: Layout,
    w: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    dw: &mut [f32],
    mut db: Option<&mut [f32]>,
) {
    let (ho, wo) = g.out_hw();
    let [sb, sc, sy, sx] = g.in_strides(layout);
    let [tb, tc, ty, tx] = g.in_strides(Layout::Nhwc);
    let k = g.k;
    if let Some(dx) = dx.as_deref_mut() {
        dx[..g.in_len()].fill(0.0);
    }
    for b in 0..g.batch {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..g.out_ch {
                    let d = dy[((b * ho + oy) * wo + ox) * g.out_ch + o];
                    if let Some(db) = db.as_deref_mut() {
                        db[o] += d;
                    }
                    for c in 0..g.in_ch {
                        for ky in 0..k {
                            for kx in 0..k {
                                let Some((y, xx)) = g.tap(oy, ox, ky, kx) else {
                                    continue;
                                };
                                let wi = ((o * g.in_ch + c) * k + ky) * k + kx;
                                dw[wi] += d * x[b * sb + c * sc + y * sy + xx * sx];
                                if let Some(dx) = dx.as_deref_mut() {
                                    dx[b * tb + c * tc + y * ty + xx * tx] += d * w[wi];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs_diff;
    use crate::model::Rng;

    fn rand(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The lowered convolution and its backward match the direct loops on strided, padded,
    /// odd-sized, both-layout cases.
    #[test]
    fn lowered_convolution_matches_the_direct_loops() {
        let mut rng = Rng::new(5);
        let cases = [
            (2, 3, 7, 6, 5, 3, 1, 1, Layout::Nchw),
            (2, 4, 8, 8, 6, 3, 2, 1, Layout::Nhwc),
            (1, 2, 5, 9, 3, 1, 2, 0, Layout::Nhwc),
            (3, 1, 28, 28, 4, 3, 1, 1, Layout::Nchw),
            (1, 3, 4, 4, 2, 3, 1, 2, Layout::Nhwc),
            // Whole 16-wide panels of output channels: the weight gradient reads dy in place.
            (2, 8, 6, 5, 32, 3, 1, 1, Layout::Nhwc),
            (3, 16, 7, 7, 16, 3, 2, 1, Layout::Nhwc),
        ];
        for (batch, in_ch, h, w, out_ch, k, stride, pad, layout) in cases {
            let g = Conv2d {
                batch,
                in_ch,
                h,
                w,
                out_ch,
                k,
                stride,
                pad,
            };
            let x = rand(g.in_len(), &mut rng);
            let wt = rand(g.weight_len(), &mut rng);
            let bias = rand(out_ch, &mut rng);
            let (mut fast, mut slow) = (vec![0.0; g.out_len()], vec![0.0; g.out_len()]);
            let mut cols = vec![];
            conv2d(&g, &x, layout, &wt, Some(&bias), &mut fast, &mut cols);
            conv2d_ref(&g, &x, layout, &wt, Some(&bias), &mut slow);
            let d = max_abs_diff(&fast, &slow);
            assert!(d < 1e-4, "{g:?} forward: {d}");

            let dy = rand(g.out_len(), &mut rng);
            let mut dx = (vec![7.0; g.in_len()], vec![7.0; g.in_len()]);
            let mut dw = (vec![0.5; g.weight_len()], vec![0.5; g.weight_len()]);
            let mut db = (vec![0.25; out_ch], vec![0.25; out_ch]);
            let mut dcols = vec![];
            conv2d_backward(
                &g,
                &x,
                layout,
                &wt,
                &dy,
                Some(&mut dx.0),
                &mut dw.0,
                Some(&mut db.0),
                (&mut cols, &mut dcols),
            );
            conv2d_backward_ref(
                &g,
                &x,
                layout,
                &wt,
                &dy,
                Some(&mut dx.1),
                &mut dw.1,
                Some(&mut db.1),
            );
            for (what, a, b) in [
                ("dx", &dx.0, &dx.1),
                ("dw", &dw.0, &dw.1),
                ("db", &db.0, &db.1),
            ] {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-3, "{g:?} {what}: {d}");
            }
        }
    }

    #[test]
    fn output_sizes_follow_the_formula() {
        let g = |h, k, s, p| Conv2d {
            batch: 1,
            in_ch: 1,
            h,
            w: h,
            out_ch: 1,
            k,
            stride: s,
            pad: p,
        };
        assert_eq!(g(28, 3, 1, 1).out_hw(), (28, 28));
        assert_eq!(g(28, 3, 2, 1).out_hw(), (14, 14));
        assert_eq!(g(7, 3, 2, 1).out_hw(), (4, 4));
        assert_eq!(g(32, 1, 2, 0).out_hw(), (16, 16));
    }
}
