//! Multi-head scaled dot-product attention over a fused qkv buffer.
//!
//! Per (image, head, block of query rows): `S = q·kᵀ` and `O = softmax(S / sqrt(hd))·v`.
//!
//! On the SIMD rungs (head dims a multiple of the vector width) the three steps are fused per
//! register tile of query rows: `kᵀ` is packed once per head into the micro-kernel's panels,
//! then each tile of rows runs `S` tile by tile into a small scratch block that stays in L1,
//! the scaled softmax's exponentials over its rows, and `O = P·v` reading `v`'s rows in place
//! (or, where the tile is narrower than a head, `v` packed once per head too), straight into
//! the output, whose rows then take the softmax's normalisation (`hd` floats a row instead of
//! `N`). Attention maps, when captured (or kept for the backward), are the
//! block's rows normalised as they are copied out, the same products as a normalised softmax:
//! the output is the same with and without them.
//!
//! Elsewhere (the portable rung, odd head dims) the two products run whole per block of rows
//! on the engine's SGEMM ([`super::sgemm`]), reading strided views of the qkv buffer in place,
//! with the scores in a per-thread scratch tile of `rows × N` (or in the caller's probability
//! buffer when maps are captured).

use super::math::{
    dot_lanes, scale_inplace, scale_into, softmax_inplace, softmax_padded_rows, softmax_ref,
    SOFTMAX_CHUNK,
};
use super::sgemm::{
    gemm, pack_panels, prefetch_l2, row_tile, row_tile_shape, BRef, MatRef, Out, TileA,
};
use super::{team, Isa, Split, Strided, SyncPtr};

/// `C (m, n) = A (m, k) · B (k, n)` on this thread, on the running rung's SGEMM; `C` has unit
/// column stride and row stride `c.1`.
///
/// # Safety
/// As [`super::sgemm::gemm`]: each pointer addresses a matrix of the given shape and strides,
/// `c` aliases neither `a` nor `b`, and no other thread writes the same elements of `c`.
unsafe fn product(
    isa: Isa,
    (m, k, n): (usize, usize, usize),
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    c: (*mut f32, isize),
) {
    let mat = |(ptr, rs, cs): Strided<*const f32>| MatRef { ptr, rs, cs };
    gemm(
        isa,
        m,
        n,
        k,
        mat(a),
        BRef::Mat(mat(b)),
        Out::plain(c.0, c.1),
    );
}

/// Query rows per task are never split below this.
const MIN_ROWS: usize = 16;

/// Dimensions of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    /// Batch B.
    pub batch: usize,
    /// Tokens N.
    pub tokens: usize,
    /// Heads nh.
    pub heads: usize,
    /// Head dim hd.
    pub head_dim: usize,
}

impl AttnDims {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Where head `h` of image `b` (`bh = b·nh + h`) starts: its q columns' first row in the
    /// fused qkv buffer `(B, N, 3D)`, and its columns' first row in an output or output
    /// gradient `(B, N, D)`.
    fn head_offsets(&self, bh: usize) -> (usize, usize) {
        let (b, h, d) = (bh / self.heads, bh % self.heads, self.width());
        let col = h * self.head_dim;
        (b * self.tokens * 3 * d + col, b * self.tokens * d + col)
    }

    /// How the work is cut: (query blocks per head, rows per block).
    fn plan(&self, threads: usize) -> (usize, usize) {
        let units = self.batch * self.heads;
        // Enough tasks to keep every thread busy when B·nh is small (batch 1).
        let want = (2 * threads).div_ceil(units.max(1));
        let max_blocks = self.tokens.div_ceil(MIN_ROWS).max(1);
        let blocks = want.clamp(1, max_blocks);
        (blocks, self.tokens.div_ceil(blocks))
    }

    /// Scratch floats needed by [`attention`] with `threads` threads.
    pub fn scratch_len(&self, threads: usize) -> usize {
        let (_, rows) = self.plan(threads);
        threads.max(1) * self.tile_len(rows, fused_tile(super::isa(), self.head_dim))
    }

    /// Per-thread scratch of [`attention_backward`]: with the fused kernel's tile, vᵀ's
    /// panels and a `dS` block (see [`backward_head`]); otherwise `dS (N, N)`.
    fn backward_tile_len(&self, fused: Option<(usize, usize)>) -> usize {
        let n = self.tokens;
        match fused {
            Some((_, nr)) => n.div_ceil(nr) * nr * self.head_dim + n * backward_row_stride(n),
            None => n * n,
        }
    }

    /// Per-thread scratch of the forward pass: with the fused kernel's tile `(rows, cols)`,
    /// `kᵀ` in panels `[⌈N / cols⌉][hd][cols]`, `v` in panels `[⌈hd / cols⌉][N][cols]` where
    /// the tile is narrower than a head ([`packs_v`]), and a `rows × N` score block (N rounded
    /// up to whole chunks of the softmax); otherwise a `rows × N` score tile.
    fn tile_len(&self, rows: usize, fused: Option<(usize, usize)>) -> usize {
        let (n, hd) = (self.tokens, self.head_dim);
        match fused {
            Some((mr, nr)) => {
                let kt = n.div_ceil(nr) * nr * hd;
                kt + v_panels_len(nr, hd, n) + mr * n.next_multiple_of(SOFTMAX_CHUNK)
            }
            None => rows * n,
        }
    }
}

/// Whether the fused kernel with tiles `cols` wide packs a head's `v` (`hd` wide) into
/// column panels. A tile narrower than the head (AVX2's 16 columns against 64) runs `P·v` in
/// `hd / cols` passes down all N rows of `v`, each reading a 64-byte piece of rows 3D floats
/// apart; packed once per head, each pass reads contiguous memory instead. AVX2 rung of an
/// AVX-512 Xeon, 2 threads, alternating within one process: the attention at batch 16 of
/// ViT-B/16 +5–9 %, of S/16 +2 %, of Ti/16 +3–4 %; whole forwards at batch 16 S/16
/// +1.6–3.2 %, Ti/16 +0.2–1.7 %, B/16 +0.6 % (median of six). AVX-512's tile is a whole head
/// wide and reads each row of `v` in place in one piece: there packing cost what it saved
/// (whole forwards −1.3 to +0.4 %).
fn packs_v(cols: usize, hd: usize) -> bool {
    cols < hd
}

/// Floats of `v`'s column panels: `⌈hd / cols⌉` panels of `N × cols` where [`packs_v`], none
/// otherwise.
fn v_panels_len(cols: usize, hd: usize, n: usize) -> usize {
    if packs_v(cols, hd) {
        hd.div_ceil(cols) * cols * n
    } else {
        0
    }
}

/// The register tile `(rows, cols)` of the fused kernel on rung `isa` for head dim `hd`: the
/// SIMD rungs, where `hd` is whole vectors (`v` is read a vector at a time, in place or packed);
/// score rows are padded to whole chunks of the softmax, which must be whole vectors.
fn fused_tile(isa: Isa, hd: usize) -> Option<(usize, usize)> {
    row_tile_shape(isa)
        .filter(|&(_, _, lanes)| hd.is_multiple_of(lanes) && SOFTMAX_CHUNK.is_multiple_of(lanes))
        .map(|(mr, nr, _)| (mr, nr))
}

/// Attention for all images and heads.
///
/// # Shapes
/// `qkv (B, N, 3, nh, hd)` (timm's fused layout, i.e. `(B, N, 3D)`), `out (B, N, D)` with head
/// `h` in columns `h·hd..(h+1)·hd`, `probs` (when given) `(B, nh, N, N)`. `scratch` is grown to
/// [`AttnDims::scratch_len`] on first use and reused afterwards.
///
/// # Panics
/// When a slice is shorter than its shape (checked in every build: the tiles are written
/// through raw pointers).
pub fn attention(
    qkv: &[f32],
    out: &mut [f32],
    probs: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
    dims: AttnDims,
) {
    let AttnDims {
        batch,
        tokens: n,
        heads,
        head_dim: hd,
    } = dims;
    let d = dims.width();
    super::check_len("attention: qkv", qkv.len(), batch * n * 3 * d);
    super::check_len("attention: out", out.len(), batch * n * d);
    if let Some(p) = probs.as_deref() {
        super::check_len("attention: probs", p.len(), batch * heads * n * n);
    }
    let threads = team::threads();
    let (blocks, rows) = dims.plan(threads);
    let tasks = batch * heads * blocks;
    let groups = Split::new(tasks, threads, 1);
    // One scratch tile per group; its score part is unused (but still handed out) when
    // probabilities are captured.
    let isa = super::isa();
    let fused = fused_tile(isa, hd);
    let tile_len = dims.tile_len(rows, fused);
    let need = groups.count * tile_len;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let outp = SyncPtr(out.as_mut_ptr());
    let probp = probs.map(|p| SyncPtr(p.as_mut_ptr()));
    let scale = 1.0 / (hd as f32).sqrt();
    let ld3 = (3 * d) as isize;
    team::for_chunks_mut(&mut scratch[..need], tile_len, |g, tile| {
        let (t0, t1) = groups.get(g);
        // The (image, head) whose kᵀ the fused kernel last packed into this group's scratch.
        let mut packed = None;
        for t in t0..t1 {
            // task t -> (image b, head h, query block qb)
            let (bh, qb) = (t / blocks, t % blocks);
            let (b, h) = (bh / heads, bh % heads);
            let r0 = qb * rows;
            let r1 = (r0 + rows).min(n);
            if r0 >= r1 {
                continue;
            }
            let nr = r1 - r0;
            // Head h of image b: q, k and v rows N apart by 3D, columns h·hd.. of each third.
            let (base, out_at) = dims.head_offsets(bh);
            if let Some(shape) = fused {
                let head = Head::at(qkv, base, dims);
                let pack = packed != Some(bh);
                packed = Some(bh);
                // The next task's head, when it is another one: its rows are asked into L2
                // while this one runs.
                let next = (t + 1 < t1 && (t + 1) / blocks != bh)
                    .then(|| qkv[dims.head_offsets((t + 1) / blocks).0..].as_ptr());
                // SAFETY: as below; `head` addresses image b's q, k and v rows of head h, and
                // `next` another head's (only prefetched).
                unsafe {
                    let o = outp.get().add(out_at + r0 * d);
                    let p = probp.map(|p| p.get().add(((b * heads + h) * n + r0) * n));
                    let to = (o, d, p);
                    fused_rows(isa, shape, &head, pack, next, r0..r1, scale, to, tile);
                }
                continue;
            }
            // SAFETY: each task owns rows r0..r1 of head h of image b, in both `out`
            // (columns h·hd..) and `probs` (plane (b, h)); tasks are disjoint, and the
            // products read `qkv` only inside image b.
            unsafe {
                let s: &mut [f32] = match probp {
                    Some(p) => std::slice::from_raw_parts_mut(
                        p.get().add(((b * heads + h) * n + r0) * n),
                        nr * n,
                    ),
                    None => &mut tile[..nr * n],
                };
                let q = qkv.as_ptr().add(base + r0 * 3 * d);
                let k = qkv.as_ptr().add(base + d);
                let v = qkv.as_ptr().add(base + 2 * d);
                // S (nr, N) = q (nr, hd) · kᵀ (hd, N): kᵀ read as k's rows transposed.
                product(
                    isa,
                    (nr, hd, n),
                    (q, ld3, 1),
                    (k, 1, ld3),
                    (s.as_mut_ptr(), n as isize),
                );
                for row in s.chunks_exact_mut(n) {
                    softmax_inplace(row, scale);
                }
                // O (nr, hd) = P (nr, N) · v (N, hd), written into out[b, r0.., h·hd..].
                product(
                    isa,
                    (nr, n, hd),
                    (s.as_ptr(), n as isize, 1),
                    (v, ld3, 1),
                    (outp.get().add((b * n + r0) * d + h * hd), d as isize),
                );
            }
        }
    });
}

/// One head of one image in the fused qkv buffer: q's row `i` at `q + i·ld`, k's at `q + D +
/// i·ld` and v's at `q + 2D + i·ld` (`ld = 3D`), `dim` floats each.
struct Head {
    q: *const f32,
    ld: isize,
    tokens: usize,
    dim: usize,
}

impl Head {
    /// The head whose q row 0 starts at `qkv[base]` (see [`AttnDims::head_offsets`]).
    fn at(qkv: &[f32], base: usize, dims: AttnDims) -> Self {
        Head {
            q: qkv[base..].as_ptr(),
            ld: (3 * dims.width()) as isize,
            tokens: dims.tokens,
            dim: dims.head_dim,
        }
    }
}

/// The fused kernel for query rows `rows` of one head, on the calling thread, register tile
/// `(mr, nr)` of rung `isa`: `out` row `i` (row `rows.start + i`, at `out + i·ldo`) gets
/// `softmax(scale · q_i·kᵀ)·v`, and `probs` (when given, row `i` at `probs + i·N`) the
/// probabilities. `scratch` holds `kᵀ`'s panels and, where [`packs_v`], `v`'s (packed here
/// when `pack`, else left from the previous call for this head), then the score block.
/// `next`, another head's q (same strides), is prefetched into L2 a share per tile of rows.
///
/// # Safety
/// `head` addresses `tokens` rows of q, k and v; `out` and `probs` address the block's rows,
/// written by no one else; `scratch` holds [`AttnDims::tile_len`]'s fused floats; `isa` is
/// the CPU's or below and [`fused_tile`] gave the tile.
#[allow(clippy::too_many_arguments)]
unsafe fn fused_rows(
    isa: Isa,
    (mr, nr): (usize, usize),
    head: &Head,
    pack: bool,
    next: Option<*const f32>,
    rows: std::ops::Range<usize>,
    scale: f32,
    (out, ldo, probs): (*mut f32, usize, Option<*mut f32>),
    scratch: &mut [f32],
) {
    let (n, hd, ld) = (head.tokens, head.dim, head.ld);
    let d = ld / 3;
    let (k, v) = (head.q.offset(d), head.q.offset(2 * d));
    let panels = n.div_ceil(nr);
    // The score block's row stride: whole chunks of the softmax (the tile of the last panel
    // stores only its real columns).
    let padded = n.next_multiple_of(SOFTMAX_CHUNK);
    let (kt, rest) = scratch.split_at_mut(panels * nr * hd);
    // v's panels, empty where v is read in place.
    let (vp, block) = rest.split_at_mut(v_panels_len(nr, hd, n));
    if pack && !vp.is_empty() {
        // v (N, hd) in column panels [⌈hd / nr⌉][N][nr], the last zero-padded.
        let v_ref = MatRef {
            ptr: v,
            rs: ld,
            cs: 1,
        };
        pack_panels(v_ref, n, hd, nr, vp);
    }
    if pack {
        // kᵀ (hd, N): k's rows read as columns.
        let kt_ref = MatRef {
            ptr: k,
            rs: 1,
            cs: ld,
        };
        pack_panels(kt_ref, hd, n, nr, kt);
    }
    let block = &mut block[..mr * padded];
    // Tokens of the next head prefetched per tile of rows.
    let per_tile = n.div_ceil(rows.len().div_ceil(mr));
    for (ti, i0) in rows.clone().step_by(mr).enumerate() {
        let tr = mr.min(rows.end - i0);
        if let Some(nq) = next {
            for t in (ti * per_tile).min(n)..((ti + 1) * per_tile).min(n) {
                for part in 0..3 {
                    let row = nq.offset(t as isize * ld + part * d);
                    for c in (0..hd).step_by(16) {
                        prefetch_l2(row.add(c));
                    }
                }
            }
        }
        let mut a = [std::ptr::null::<f32>(); 16];
        // S (tr, N) = q (tr, hd) · kᵀ (hd, N), panel by panel, into the block (row stride
        // `padded`).
        for (i, p) in a[..tr].iter_mut().enumerate() {
            *p = head.q.offset((i0 + i) as isize * ld);
        }
        let c = (block.as_mut_ptr(), padded as isize);
        times_panels(isa, nr, &a[..tr], kt, (hd, n), c);
        // P = softmax(scale · S), row by row: the block keeps the exponentials and `inv` the
        // rows' normalisations, applied to the output rows after `P·v` (`hd` floats each
        // instead of `N`); captured probabilities are the normalised rows.
        let mut inv = [1.0f32; 16];
        softmax_padded_rows(block, padded, n, scale, &mut inv[..tr]);
        if let Some(p) = probs {
            for (i, row) in block.chunks_exact(padded).take(tr).enumerate() {
                let at = p.add((i0 - rows.start + i) * n);
                scale_into(std::slice::from_raw_parts_mut(at, n), &row[..n], inv[i]);
            }
        }
        // O (tr, hd) = P (tr, N) · v (N, hd), a tile's columns at a time: v's panels, or its
        // rows read in place (whole vectors: hd is).
        for (i, p) in a[..tr].iter_mut().enumerate() {
            *p = block.as_ptr().add(i * padded);
        }
        let o = out.add((i0 - rows.start) * ldo);
        for c0 in (0..hd).step_by(nr) {
            // Columns c0.. of v: their panel, or v's rows in place.
            let (b, ldb) = if vp.is_empty() {
                (v.add(c0), ld)
            } else {
                (vp.as_ptr().add(c0 * n), nr as isize)
            };
            row_tile(
                isa,
                n,
                TileA::Rows(&a[..tr]),
                b,
                ldb,
                (o.add(c0), ldo as isize),
                nr.min(hd - c0),
            );
        }
        // The softmax's normalisation, on the output rows (in L1).
        for (i, &s) in inv[..tr].iter().enumerate() {
            let row = std::slice::from_raw_parts_mut(o.add(i * ldo), hd);
            scale_inplace(row, s);
        }
    }
}

/// Backward of [`attention`], from the probabilities it saved.
///
/// Per (image, head), with `P` the probabilities and `dO` the output gradient:
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P)) / sqrt(hd)`, `dQ = dS·K`,
/// `dK = dSᵀ·Q`. Every element of `dqkv` is written.
///
/// # Shapes
/// `qkv, dqkv (B, N, 3D)`, `probs (B, nh, N, N)`, `dout (B, N, D)`; `scratch` grows to
/// what the per-head kernel needs per thread (`N · N` on the portable rung).
///
/// # Panics
/// When a slice is shorter than its shape (checked in every build).
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
    scratch: &mut Vec<f32>,
    dims: AttnDims,
) {
    let AttnDims {
        batch,
        tokens: n,
        heads,
        head_dim: hd,
    } = dims;
    let d = dims.width();
    super::check_len("attention_backward: qkv", qkv.len(), batch * n * 3 * d);
    super::check_len(
        "attention_backward: probs",
        probs.len(),
        batch * heads * n * n,
    );
    super::check_len("attention_backward: dout", dout.len(), batch * n * d);
    super::check_len("attention_backward: dqkv", dqkv.len(), batch * n * 3 * d);
    let groups = Split::new(batch * heads, team::threads(), 1);
    let isa = super::isa();
    let fused = fused_tile(isa, hd).filter(|&(mr, _)| n >= mr);
    let tile_len = dims.backward_tile_len(fused);
    let need = groups.count * tile_len;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let dp = SyncPtr(dqkv.as_mut_ptr());
    let scale = 1.0 / (hd as f32).sqrt();
    let (ld3, ld, ldn) = ((3 * d) as isize, d as isize, n as isize);
    team::for_chunks_mut(&mut scratch[..need], tile_len, |g, ds| {
        let (t0, t1) = groups.get(g);
        for t in t0..t1 {
            let p = &probs[t * n * n..(t + 1) * n * n];
            // Task t is head t % nh of image t / nh.
            let (base, dout_at) = dims.head_offsets(t);
            if let Some(shape) = fused {
                let head = Head::at(qkv, base, dims);
                // The next task's head: its rows are asked into L2 while this one runs.
                let next = (t + 1 < t1).then(|| {
                    let (nq, ndo) = dims.head_offsets(t + 1);
                    let np = &probs[(t + 1) * n * n..];
                    (qkv[nq..].as_ptr(), dout[ndo..].as_ptr(), np.as_ptr())
                });
                // SAFETY: as below; `head` addresses image b's q, k and v rows of head h, and
                // `next` another head's (only prefetched).
                unsafe {
                    let grads = (dp.get().add(base), dout.as_ptr().add(dout_at));
                    backward_head(isa, shape, &head, p, grads, next, scale, ds);
                }
                continue;
            }
            // SAFETY: task (b, h) alone writes the q/k/v columns of head h of image b in
            // dqkv; the products read qkv, probs and dout only inside image b.
            unsafe {
                let q = qkv.as_ptr().add(base);
                let (k, v) = (q.add(d), q.add(2 * d));
                let dbase = dp.get().add(base);
                let (dq, dk, dv) = (dbase, dbase.add(d), dbase.add(2 * d));
                let dob = dout.as_ptr().add(dout_at);
                // dV (N, hd) = Pᵀ (N, N) · dO (N, hd)
                product(
                    isa,
                    (n, n, hd),
                    (p.as_ptr(), 1, ldn),
                    (dob, ld, 1),
                    (dv, ld3),
                );
                // dP (N, N) = dO (N, hd) · vᵀ (hd, N)
                product(
                    isa,
                    (n, hd, n),
                    (dob, ld, 1),
                    (v, 1, ld3),
                    (ds.as_mut_ptr(), ldn),
                );
                for (dsr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                    softmax_backward_row(pr, dsr, scale);
                }
                // dQ (N, hd) = dS (N, N) · K (N, hd);  dK (N, hd) = dSᵀ (N, N) · Q (N, hd)
                product(
                    isa,
                    (n, n, hd),
                    (ds.as_ptr(), ldn, 1),
                    (k, ld3, 1),
                    (dq, ld3),
                );
                product(
                    isa,
                    (n, n, hd),
                    (ds.as_ptr(), 1, ldn),
                    (q, ld3, 1),
                    (dk, ld3),
                );
            }
        }
    });
}

/// `C (rows, N) = A (rows, hd) · B (hd, N)` for one tile of rows, B in the panels
/// [`pack_panels`] made (`[N / nr][hd][nr]`), panel by panel: A's row `i` at `a[i]`, C's at
/// `c + i·ldc` (only the `N` real columns of the last panel written).
///
/// # Safety
/// As [`row_tile`]: `a` has at most the tile's rows, each addressing `hd` floats; `panels`
/// holds B's panels; C addresses `rows × N` elements apart from both.
unsafe fn times_panels(
    isa: Isa,
    nr: usize,
    a: &[*const f32],
    panels: &[f32],
    (hd, n): (usize, usize),
    (c, ldc): (*mut f32, isize),
) {
    for jp in 0..n.div_ceil(nr) {
        let j0 = jp * nr;
        let (b, cols) = (panels.as_ptr().add(jp * hd * nr), nr.min(n - j0));
        row_tile(
            isa,
            hd,
            TileA::Rows(a),
            b,
            nr as isize,
            (c.add(j0), ldc),
            cols,
        );
    }
}

/// The backward of one head of one image with the fused kernel's register tile `(mr, nr)`
/// (the tiles driven here, as in [`fused_rows`], instead of four generic products per head,
/// whose packing and set-up were half of a 50-token product's time: the bench-train
/// attention's backward alone 3.95 → 3.50 ms on the AVX2 rung of an AVX-512 Xeon, 2 threads,
/// interleaved; its training step +0.6 %). Per tile of `mr` query rows, `dP = dO·vᵀ`
/// (vᵀ packed once per head), the softmax's backward into `dS`, and `dQ = dS·k` while those
/// rows are in L1; then `dK = dSᵀ·q` and `dV = Pᵀ·dO`, A read transposed in place, in whole
/// tiles of rows, the last overlapping its neighbour (its shared rows computed again, bit for
/// bit) so that no read passes the `N` columns.
///
/// `(dqkv, dout)`: head h of image b's place in `dqkv` (its dq, dk and dv rows `3D` apart,
/// `D` and `2D` after dq, as in `qkv`) and its `dO` rows (`D` apart).
///
/// # Safety
/// `head` addresses `N ≥ mr` rows of q, k and v; `p` is the head's `(N, N)` probabilities;
/// `dqkv` addresses the head's gradient rows, written by no one else; `scratch` holds
/// [`AttnDims::backward_tile_len`]'s floats; `isa` is the CPU's or below and [`fused_tile`]
/// gave the tile.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_head(
    isa: Isa,
    (mr, nr): (usize, usize),
    head: &Head,
    p: &[f32],
    (dq, dout): (*mut f32, *const f32),
    next: Option<(*const f32, *const f32, *const f32)>,
    scale: f32,
    scratch: &mut [f32],
) {
    let (n, hd, ld3) = (head.tokens, head.dim, head.ld);
    let d = ld3 / 3;
    let (q, k, v) = (head.q, head.q.offset(d), head.q.offset(2 * d));
    let (dk, dv) = (dq.offset(d), dq.offset(2 * d));
    let panels = n.div_ceil(nr);
    let padded = backward_row_stride(n);
    // vᵀ (hd, N) in panels [N / nr][hd][nr], then dS (N, N) with rows `padded` apart.
    let (vt, ds) = scratch.split_at_mut(panels * nr * hd);
    let vt_ref = MatRef {
        ptr: v,
        rs: 1,
        cs: ld3,
    };
    pack_panels(vt_ref, hd, n, nr, vt);
    let ds = ds.as_mut_ptr();
    let mut a = [std::ptr::null::<f32>(); 16];
    // Tokens of the next head prefetched per tile of rows.
    let per_tile = n.div_ceil(n.div_ceil(mr));
    for (ti, i0) in (0..n).step_by(mr).enumerate() {
        let tr = mr.min(n - i0);
        if let Some((nq, ndo, np)) = next {
            for t in (ti * per_tile).min(n)..((ti + 1) * per_tile).min(n) {
                for c in (0..hd).step_by(16) {
                    for part in 0..3 {
                        prefetch_l2(nq.offset(t as isize * ld3 + part * d).add(c));
                    }
                    prefetch_l2(ndo.offset(t as isize * d).add(c));
                }
                for c in (0..n).step_by(16) {
                    prefetch_l2(np.add(t * n + c));
                }
            }
        }
        // dP (tr, N) = dO (tr, hd) · vᵀ (hd, N), panel by panel.
        for (i, r) in a[..tr].iter_mut().enumerate() {
            *r = dout.offset((i0 + i) as isize * d);
        }
        let c = (ds.add(i0 * padded), padded as isize);
        times_panels(isa, nr, &a[..tr], vt, (hd, n), c);
        // dS = scale · P ⊙ (dP − Σ dP ⊙ P), row by row.
        for (i, slot) in a[..tr].iter_mut().enumerate() {
            let r = i0 + i;
            let dsr = std::slice::from_raw_parts_mut(ds.add(r * padded), n);
            softmax_backward_row(&p[r * n..(r + 1) * n], dsr, scale);
            *slot = dsr.as_ptr();
        }
        // dQ (tr, hd) = dS (tr, N) · k (N, hd): k's rows in place.
        for c0 in (0..hd).step_by(nr) {
            let c = (dq.offset(i0 as isize * ld3).add(c0), ld3);
            row_tile(
                isa,
                n,
                TileA::Rows(&a[..tr]),
                k.add(c0),
                ld3,
                c,
                nr.min(hd - c0),
            );
        }
    }
    // dK (N, hd) = dSᵀ (N, N) · q (N, hd) and dV (N, hd) = Pᵀ (N, N) · dO (N, hd): whole tiles,
    // the last one moved back to end at row N.
    for i0 in (0..n).step_by(mr).map(|i| i.min(n - mr)) {
        let dst = i0 as isize * ld3;
        for c0 in (0..hd).step_by(nr) {
            let cols = nr.min(hd - c0);
            let ds_t = TileA::Transposed {
                ptr: ds.add(i0),
                ld: padded as isize,
                rows: mr,
            };
            row_tile(
                isa,
                n,
                ds_t,
                q.add(c0),
                ld3,
                (dk.offset(dst).add(c0), ld3),
                cols,
            );
            let pt = TileA::Transposed {
                ptr: p.as_ptr().add(i0),
                ld: n as isize,
                rows: mr,
            };
            row_tile(
                isa,
                n,
                pt,
                dout.add(c0),
                d,
                (dv.offset(dst).add(c0), ld3),
                cols,
            );
        }
    }
}

/// One query of one head against `n` keys and values: `p = softmax(scale · q·kⱼ)` `(n)` and
/// `o = Σⱼ pⱼ vⱼ` `(hd)`, key `j` at `kv[j·stride + ko..][..hd]` and value `j` at
/// `kv[j·stride + vo..][..hd]` (a fused qkv or kv buffer read in place). For the few queries a
/// forward needs alone: attention pooling's latent, and the last block's class token
/// ([`attention_first`]).
pub(crate) fn attend_one(
    q: &[f32],
    kv: &[f32],
    (stride, ko, vo): (usize, usize, usize),
    scale: f32,
    p: &mut [f32],
    o: &mut [f32],
) {
    let hd = q.len();
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = dot_lanes(q, &kv[j * stride + ko..][..hd]);
    }
    softmax_inplace(p, scale);
    o.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        let v = &kv[j * stride + vo..][..hd];
        o.iter_mut().zip(v).for_each(|(o, v)| *o += pj * v);
    }
}

/// Backward of [`attend_one`] given `dout = ∂loss/∂o` `(hd)` and its probabilities `p`:
/// **adds** `∂loss/∂q` to `dq` `(hd)`, and `∂loss/∂kⱼ`, `∂loss/∂vⱼ` to `dkv` (laid out as
/// `kv`). With `dpⱼ = dout·vⱼ` and `s = Σⱼ pⱼ dpⱼ`: `dsⱼ = pⱼ (dpⱼ − s) · scale`,
/// `dq += Σⱼ dsⱼ kⱼ`, `dkⱼ += dsⱼ q`, `dvⱼ += pⱼ dout` (each `dpⱼ` computed twice rather than
/// kept: no scratch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_one_backward(
    q: &[f32],
    kv: &[f32],
    (stride, ko, vo): (usize, usize, usize),
    scale: f32,
    p: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dkv: &mut [f32],
) {
    let hd = q.len();
    let dp = |j: usize| dot_lanes(dout, &kv[j * stride + vo..][..hd]);
    let s: f32 = p.iter().enumerate().map(|(j, pj)| pj * dp(j)).sum();
    for (j, &pj) in p.iter().enumerate() {
        let ds = pj * (dp(j) - s) * scale;
        let k = &kv[j * stride + ko..][..hd];
        dq.iter_mut().zip(k).for_each(|(g, k)| *g += ds * k);
        let dk = &mut dkv[j * stride + ko..][..hd];
        dk.iter_mut().zip(q).for_each(|(g, q)| *g += ds * q);
        let dv = &mut dkv[j * stride + vo..][..hd];
        dv.iter_mut().zip(dout).for_each(|(g, d)| *g += pj * d);
    }
}

/// Attention for the first `queries` tokens of each image only, over all N keys: the rows a
/// class-token head reads from the last block (its other rows feed nothing, so the block's
/// projection and MLP run on these alone). Each query row as in [`attention`].
///
/// # Shapes
/// `qkv (B, N, 3D)` → `out (B, queries, D)`, heads side by side; `probs (B, nh, queries, N)`
/// (always written: the backward reads them).
///
/// # Panics
/// When a slice is shorter than its shape, or `queries > N`.
pub fn attention_first(
    qkv: &[f32],
    queries: usize,
    out: &mut [f32],
    probs: &mut [f32],
    dims: AttnDims,
) {
    let AttnDims {
        batch,
        tokens: n,
        heads,
        head_dim: hd,
    } = dims;
    let d = dims.width();
    assert!(
        queries <= n,
        "attention_first: {queries} queries of {n} tokens"
    );
    super::check_len("attention_first: qkv", qkv.len(), batch * n * 3 * d);
    super::check_len("attention_first: out", out.len(), batch * queries * d);
    super::check_len(
        "attention_first: probs",
        probs.len(),
        batch * heads * queries * n,
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let pp = SyncPtr(probs.as_mut_ptr());
    // One task an image: its `(queries, D)` rows of `out` and `(nh, queries, N)` of `probs`.
    team::for_chunks_mut(&mut out[..batch * queries * d], queries * d, |b, out| {
        let plane = heads * queries * n;
        // SAFETY: image `b`'s plane of `probs`, inside it (checked above), one task's alone.
        let p = unsafe { std::slice::from_raw_parts_mut(pp.get().add(b * plane), plane) };
        let img = &qkv[b * n * 3 * d..(b + 1) * n * 3 * d];
        for h in 0..heads {
            for i in 0..queries {
                let q = &img[i * 3 * d + h * hd..][..hd];
                let layout = (3 * d, d + h * hd, 2 * d + h * hd);
                let pi = &mut p[(h * queries + i) * n..][..n];
                attend_one(q, img, layout, scale, pi, &mut out[i * d + h * hd..][..hd]);
            }
        }
    });
}

/// Backward of [`attention_first`]: from `dout (B, queries, D)` and its `probs (B, nh,
/// queries, N)` to `dqkv (B, N, 3D)`, overwritten — the query gradients of the other rows
/// are zero, the keys' and values' those the first `queries` rows' attention gives them.
///
/// # Panics
/// When a slice is shorter than its shape.
pub fn attention_first_backward(
    qkv: &[f32],
    queries: usize,
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
    dims: AttnDims,
) {
    let AttnDims {
        batch,
        tokens: n,
        heads,
        head_dim: hd,
    } = dims;
    let d = dims.width();
    let what = "attention_first_backward";
    super::check_len(what, qkv.len(), batch * n * 3 * d);
    super::check_len(what, probs.len(), batch * heads * queries * n);
    super::check_len(what, dout.len(), batch * queries * d);
    super::check_len(what, dqkv.len(), batch * n * 3 * d);
    let scale = 1.0 / (hd as f32).sqrt();
    team::for_chunks_mut(&mut dqkv[..batch * n * 3 * d], n * 3 * d, |b, dimg| {
        dimg.fill(0.0);
        let img = &qkv[b * n * 3 * d..(b + 1) * n * 3 * d];
        // One query's gradient at a time, written to its row when its keys are done (the
        // query rows are also key rows of `dimg`).
        let mut dq = vec![0.0; hd];
        for h in 0..heads {
            for i in 0..queries {
                let q = &img[i * 3 * d + h * hd..][..hd];
                let layout = (3 * d, d + h * hd, 2 * d + h * hd);
                let p = &probs[((b * heads + h) * queries + i) * n..][..n];
                let g = &dout[(b * queries + i) * d + h * hd..][..hd];
                dq.fill(0.0);
                attend_one_backward(q, img, layout, scale, p, g, &mut dq, dimg);
                dimg[i * 3 * d + h * hd..][..hd].copy_from_slice(&dq);
            }
        }
    });
}

/// The row stride of the backward's `dS` block: whole cache lines.
fn backward_row_stride(n: usize) -> usize {
    n.next_multiple_of(16)
}

super::simd_dispatch! {
    /// `ds ← scale · p ⊙ (ds − Σ ds ⊙ p)` for one row (`ds` holds dP on entry).
    fn softmax_backward_row(p: &[f32], ds: &mut [f32], scale: f32) {
        let dot = dot_lanes(p, ds);
        for (g, &pv) in ds.iter_mut().zip(p) {
            *g = scale * pv * (*g - dot);
        }
    }
}

/// Reference twin of [`attention_backward`] in f64, recomputing the probabilities.
pub fn attention_backward_ref(qkv: &[f32], dout: &[f32], dims: AttnDims) -> Vec<f32> {
    let AttnDims {
        batch,
        tokens: n,
        heads,
        head_dim: hd,
    } = dims;
    let d = dims.width();
    let (_, probs) = attention_ref(qkv, dims);
    let at = |b: usize, t: usize, which: usize, h: usize, i: usize| {
        qkv[((b * n + t) * 3 + which) * d + h * hd + i] as f64
    };
    let mut dqkv = vec![0.0f64; qkv.len()];
    let scale = 1.0 / (hd as f64).sqrt();
    for b in 0..batch {
        for h in 0..heads {
            let p = |i: usize, j: usize| probs[((b * heads + h) * n + i) * n + j] as f64;
            let dout_at = |i: usize, c: usize| dout[(b * n + i) * d + h * hd + c] as f64;
            for i in 0..n {
                let dp: Vec<f64> = (0..n)
                    .map(|j| (0..hd).map(|c| dout_at(i, c) * at(b, j, 2, h, c)).sum())
                    .collect();
                let dot: f64 = (0..n).map(|j| dp[j] * p(i, j)).sum();
                for j in 0..n {
                    let dsij = p(i, j) * (dp[j] - dot) * scale;
                    for c in 0..hd {
                        dqkv[((b * n + i) * 3) * d + h * hd + c] += dsij * at(b, j, 1, h, c);
                        dqkv[((b * n + j) * 3 + 1) * d + h * hd + c] += dsij * at(b, i, 0, h, c);
                        dqkv[((b * n + j) * 3 + 2) * d + h * hd + c] += p(i, j) * dout_at(i, c);
                    }
                }
            }
        }
    }
    dqkv.iter().map(|&v| v as f32).collect()
}

/// Reference twin: explicit loops in f64 per (image, head, query). Returns
/// `(out (B, N, D), probs (B, nh, N, N))`.
pub fn attention_ref(qkv: &[f32], dims: AttnDims) -> (Vec<f32>, Vec<f32>) {
    let AttnDims {
        batch,
        tokens: n,
        heads,
        head_dim: hd,
    } = dims;
    let d = dims.width();
    let at = |b: usize, t: usize, which: usize, h: usize, i: usize| {
        qkv[((b * n + t) * 3 + which) * d + h * hd + i] as f64
    };
    let mut out = vec![0.0; batch * n * d];
    let mut probs = vec![0.0; batch * heads * n * n];
    let scale = 1.0 / (hd as f64).sqrt();
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..n {
                let scores: Vec<f32> = (0..n)
                    .map(|j| {
                        ((0..hd)
                            .map(|c| at(b, i, 0, h, c) * at(b, j, 1, h, c))
                            .sum::<f64>()
                            * scale) as f32
                    })
                    .collect();
                let p = softmax_ref(&scores);
                for c in 0..hd {
                    let o: f64 = (0..n).map(|j| p[j] as f64 * at(b, j, 2, h, c)).sum();
                    out[(b * n + i) * d + h * hd + c] = o as f32;
                }
                probs[((b * heads + h) * n + i) * n..][..n].copy_from_slice(&p);
            }
        }
    }
    (out, probs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;

    #[test]
    fn attention_backward_matches_reference() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // Head dims of whole vectors take the tiles driven per head (`backward_head`) on the
        // SIMD rungs: N a multiple of the tile's rows or not, one token short of a panel or
        // over several; the others, and the portable rung, the generic products.
        let shapes = [
            (1, 5, 1, 4),
            (2, 17, 3, 8),
            (3, 10, 2, 6),
            (1, 6, 1, 16),
            (1, 7, 2, 32),
            (2, 13, 2, 48),
            (2, 50, 3, 64),
            (1, 197, 1, 64),
        ];
        let isa = super::super::isa();
        for &(batch, n, heads, hd) in &shapes {
            let fused = fused_tile(isa, hd).filter(|&(mr, _)| n >= mr);
            eprintln!("{} N {n} hd {hd}: tiles per head {fused:?}", isa.name());
            let dims = AttnDims {
                batch,
                tokens: n,
                heads,
                head_dim: hd,
            };
            let qkv: Vec<f32> = rand_vec(batch * n * 3 * heads * hd, 31)
                .iter()
                .map(|v| v * 2.0)
                .collect();
            let dout = rand_vec(batch * n * heads * hd, 32);
            let mut out = vec![0.0; batch * n * heads * hd];
            let mut probs = vec![0.0; batch * heads * n * n];
            let mut scratch = Vec::new();
            pool.install(|| attention(&qkv, &mut out, Some(&mut probs), &mut scratch, dims));
            let mut dqkv = vec![f32::NAN; qkv.len()];
            pool.install(|| attention_backward(&qkv, &probs, &dout, &mut dqkv, &mut scratch, dims));
            let want = attention_backward_ref(&qkv, &dout, dims);
            let diff = max_abs_diff(&dqkv, &want);
            assert!(diff < 1e-5, "{dims:?}: {diff}");
        }
    }

    /// The first rows' attention is the reference's first rows, and its backward the
    /// reference backward of an output gradient that is zero on every other row.
    #[test]
    fn attention_of_the_first_rows_matches_the_reference() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(batch, n, heads, hd, queries) in &[
            (1, 5, 1, 4, 1),
            (2, 17, 3, 8, 2),
            (3, 50, 3, 64, 1),
            (2, 197, 2, 64, 2),
        ] {
            let dims = AttnDims {
                batch,
                tokens: n,
                heads,
                head_dim: hd,
            };
            let d = heads * hd;
            let qkv: Vec<f32> = rand_vec(batch * n * 3 * d, 41)
                .iter()
                .map(|v| v * 2.0)
                .collect();
            let (want_out, want_p) = attention_ref(&qkv, dims);
            let mut out = vec![f32::NAN; batch * queries * d];
            let mut probs = vec![f32::NAN; batch * heads * queries * n];
            pool.install(|| attention_first(&qkv, queries, &mut out, &mut probs, dims));
            let first = |x: &[f32], row: usize, per: usize| -> Vec<f32> {
                x.chunks(per * row)
                    .flat_map(|c| c[..queries * row].to_vec())
                    .collect()
            };
            let diff = max_abs_diff(&out, &first(&want_out, d, n));
            assert!(diff < 2e-6, "{dims:?} out: {diff}");
            let diff = max_abs_diff(&probs, &first(&want_p, n, n));
            assert!(diff < 1e-6, "{dims:?} probs: {diff}");
            // ∂loss/∂out on the first rows only.
            let g = rand_vec(batch * queries * d, 42);
            let mut dout = vec![0.0; batch * n * d];
            for b in 0..batch {
                dout[b * n * d..][..queries * d]
                    .copy_from_slice(&g[b * queries * d..][..queries * d]);
            }
            let mut dqkv = vec![f32::NAN; qkv.len()];
            pool.install(|| attention_first_backward(&qkv, queries, &probs, &g, &mut dqkv, dims));
            let want = attention_backward_ref(&qkv, &dout, dims);
            let diff = max_abs_diff(&dqkv, &want);
            assert!(diff < 1e-5, "{dims:?} backward: {diff}");
        }
    }

    #[test]
    fn fast_attention_matches_reference_with_and_without_capture() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(batch, n, heads, hd) in &[
            (1, 5, 1, 4),
            (2, 17, 3, 8),
            (1, 65, 2, 16),
            (3, 40, 4, 6),
            (1, 30, 3, 48),
            // On AVX2, v packed into column panels, the last zero-padded (40 = 16 + 16 + 8).
            (2, 33, 2, 40),
            (2, 197, 2, 64),
        ] {
            let dims = AttnDims {
                batch,
                tokens: n,
                heads,
                head_dim: hd,
            };
            let qkv: Vec<f32> = rand_vec(batch * n * 3 * heads * hd, 11)
                .iter()
                .map(|v| v * 2.0)
                .collect();
            let (want_out, want_p) = attention_ref(&qkv, dims);
            let mut out = vec![0.0; batch * n * heads * hd];
            let mut scratch = Vec::new();
            pool.install(|| attention(&qkv, &mut out, None, &mut scratch, dims));
            assert!(max_abs_diff(&out, &want_out) < 2e-6, "{dims:?}");
            let mut out2 = vec![0.0; out.len()];
            let mut probs = vec![0.0; batch * heads * n * n];
            pool.install(|| attention(&qkv, &mut out2, Some(&mut probs), &mut scratch, dims));
            assert!(max_abs_diff(&probs, &want_p) < 1e-6);
            // The capture path computes the very same output.
            assert_eq!(out, out2);
            for row in probs.chunks(n) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
}
