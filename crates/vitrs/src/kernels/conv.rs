//! 2-D convolution (square kernel, stride, zero padding), lowered onto the matrix product: the
//! input's k × k windows become the rows of a matrix (im2col), multiplied by the weight in
//! PyTorch's `(C_out, C_in, k, k)` layout, which is already a `(C_out, C_in·k·k)` matrix when
//! the window's values are ordered (channel, row, column). The output is channels-last
//! (NHWC): one row of `C_out` per output pixel, what the next convolution's im2col and batch
//! normalisation read. The backward runs the same products transposed and scatters the window
//! gradients back (col2im). [`conv2d_ref`] and [`conv2d_backward_ref`] are the direct loops.

use super::gemm::{linear, linear_dw, linear_dx, Epilogue};

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

    /// Strides of (b, c, y, x) in an input of `layout`.
    fn in_strides(&self, layout: Layout) -> [usize; 4] {
        let (c, h, w) = (self.in_ch, self.h, self.w);
        match layout {
            Layout::Nchw => [c * h * w, h * w, w, 1],
            Layout::Nhwc => [h * w * c, 1, w * c, c],
        }
    }
}

/// Lowers `x` into `cols (B·H_out·W_out, C_in·k·k)`: row `(b, oy, ox)` holds the window at
/// that output pixel, ordered (channel, ky, kx), zeros where it hangs over the border.
pub fn im2col(g: &Conv2d, x: &[f32], layout: Layout, cols: &mut [f32]) {
    super::check_len("im2col: x", x.len(), g.in_len());
    super::check_len("im2col: cols", cols.len(), g.rows() * g.cols());
    let (ho, wo) = g.out_hw();
    let [sb, sc, sy, sx] = g.in_strides(layout);
    let (k, s, p) = (g.k, g.stride, g.pad as isize);
    let kk = g.cols();
    for (r, row) in cols.chunks_exact_mut(kk).take(g.rows()).enumerate() {
        let (b, oy, ox) = (r / (ho * wo), (r / wo) % ho, r % wo);
        let (y0, x0) = ((oy * s) as isize - p, (ox * s) as isize - p);
        for c in 0..g.in_ch {
            for ky in 0..k {
                let y = y0 + ky as isize;
                let out = &mut row[(c * k + ky) * k..(c * k + ky + 1) * k];
                if y < 0 || y >= g.h as isize {
                    out.fill(0.0);
                    continue;
                }
                let base = b * sb + c * sc + y as usize * sy;
                for (kx, o) in out.iter_mut().enumerate() {
                    let xx = x0 + kx as isize;
                    *o = if xx < 0 || xx >= g.w as isize {
                        0.0
                    } else {
                        x[base + xx as usize * sx]
                    };
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every window gradient of `dcols` back onto the input
/// positions it was read from, into `dx` (NHWC, accumulated).
pub fn col2im_add(g: &Conv2d, dcols: &[f32], dx: &mut [f32]) {
    super::check_len("col2im: dcols", dcols.len(), g.rows() * g.cols());
    super::check_len("col2im: dx", dx.len(), g.in_len());
    let (ho, wo) = g.out_hw();
    let [sb, _, sy, sx] = g.in_strides(Layout::Nhwc);
    let (k, s, p) = (g.k, g.stride, g.pad as isize);
    for (r, row) in dcols.chunks_exact(g.cols()).take(g.rows()).enumerate() {
        let (b, oy, ox) = (r / (ho * wo), (r / wo) % ho, r % wo);
        let (y0, x0) = ((oy * s) as isize - p, (ox * s) as isize - p);
        for ky in 0..k {
            let y = y0 + ky as isize;
            if y < 0 || y >= g.h as isize {
                continue;
            }
            for kx in 0..k {
                let xx = x0 + kx as isize;
                if xx < 0 || xx >= g.w as isize {
                    continue;
                }
                // The input pixel's channels are contiguous in NHWC.
                let at = b * sb + y as usize * sy + xx as usize * sx;
                let px = &mut dx[at..at + g.in_ch];
                for (c, d) in px.iter_mut().enumerate() {
                    *d += row[(c * k + ky) * k + kx];
                }
            }
        }
    }
}

/// `out (B, H_out, W_out, C_out) = conv(x, w) + bias`, through `cols` (scratch of
/// `rows · cols` values).
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
    cols: &mut Vec<f32>,
) {
    cols.resize(g.rows() * g.cols(), 0.0);
    im2col(g, x, layout, cols);
    // out (rows, C_out) = cols (rows, C_in·k·k) · wᵀ.
    let dims = (g.rows(), g.cols(), g.out_ch);
    linear(cols, w, bias, out, dims, Epilogue::None);
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
    cols.resize(m * kk, 0.0);
    im2col(g, x, layout, cols);
    linear_dw(dy, cols, dw, (m, kk, n));
    if let Some(db) = db {
        for row in dy.chunks_exact(n).take(m) {
            db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
        }
    }
    if let Some(dx) = dx {
        dcols.resize(m * kk, 0.0);
        linear_dx(dy, w, dcols, (m, kk, n));
        dx[..g.in_len()].fill(0.0);
        col2im_add(g, dcols, dx);
    }
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
                                let y = (oy * g.stride + ky) as isize - g.pad as isize;
                                let xx = (ox * g.stride + kx) as isize - g.pad as isize;
                                if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
                                    continue;
                                }
                                let v = x[b * sb + c * sc + y as usize * sy + xx as usize * sx];
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
                                let y = (oy * g.stride + ky) as isize - g.pad as isize;
                                let xx = (ox * g.stride + kx) as isize - g.pad as isize;
                                if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
                                    continue;
                                }
                                let (y, xx) = (y as usize, xx as usize);
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
