//! Every rung of the instruction-set ladder this CPU has — AVX-512 and AVX2 + FMA where it has
//! them, the portable one always — held to the reference kernels and to PyTorch's logits. The
//! rung is a process-wide switch (`kernels::set_isa`), so this file is its own test binary
//! with a single test that takes the rungs one after the other and prints which it ran.
//!
//! (`VITRS_KERNELS=portable cargo test -p vitrs` runs the whole suite on the portable rung,
//! `VITRS_KERNELS=avx2` on AVX2 + FMA.)

use std::path::Path;

use vitrs::config::Gelu;
use vitrs::kernels::attention::{
    attention, attention_backward, attention_backward_ref, attention_ref, AttnDims,
};
use vitrs::kernels::conv::{conv2d, conv2d_ref, Conv2d, Layout};
use vitrs::kernels::gemm::{linear, linear_backward, linear_backward_ref, linear_ref, Epilogue};
use vitrs::kernels::layernorm::{layernorm, layernorm_ref};
use vitrs::kernels::math::{
    gelu_backward_par, gelu_grad_ref, gelu_inplace, gelu_ref, gelu_with_grad, scale_into,
    softmax_inplace, softmax_padded_rows, softmax_ref, SOFTMAX_CHUNK,
};
use vitrs::kernels::{available_isas, cpu_isa, isa, set_isa, Isa};
use vitrs::npy::read_npy;
use vitrs::{Capture, Workspace};

/// Deterministic values in [-1, 1) from the project's generator.
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = vitrs::model::Rng::new(seed);
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let worst = vitrs::kernels::max_abs_diff(got, want);
    assert!(worst <= tol, "{what}: max |diff| {worst:e} exceeds {tol:e}");
}

fn check_kernels(path: &str) {
    // Products: every epilogue; shapes for the single-thread, column- and row-split paths.
    for &(m, k, n) in &[(5, 7, 3), (17, 64, 100), (300, 33, 129)] {
        let (x, w, b) = (rand_vec(m * k, 1), rand_vec(n * k, 2), rand_vec(n, 3));
        for epi in Epilogue::ALL {
            let init = rand_vec(m * n, 4);
            let (mut got, mut want) = (init.clone(), init);
            linear(&x, &w, Some(&b), &mut got, (m, k, n), epi);
            linear_ref(&x, &w, Some(&b), &mut want, (m, k, n), epi);
            assert_close(
                &format!("{path}: linear {m}x{k}x{n} {epi:?}"),
                &got,
                &want,
                1e-4,
            );
        }
        let dy = rand_vec(m * n, 5);
        let (mut dx, mut dx_r) = (vec![0.0; m * k], vec![0.0; m * k]);
        let (mut dw, mut dw_r) = (rand_vec(n * k, 6), rand_vec(n * k, 6));
        let (mut db, mut db_r) = (vec![0.0; n], vec![0.0; n]);
        let dims = (m, k, n);
        linear_backward(&dy, &x, &w, Some(&mut dx), &mut dw, Some(&mut db), dims);
        linear_backward_ref(
            &dy,
            &x,
            &w,
            Some(&mut dx_r),
            &mut dw_r,
            Some(&mut db_r),
            dims,
        );
        let tol = 1e-4 * (m.max(n) as f32).sqrt();
        assert_close(&format!("{path}: linear dx {m}x{k}x{n}"), &dx, &dx_r, tol);
        assert_close(&format!("{path}: linear dW {m}x{k}x{n}"), &dw, &dw_r, tol);
        assert_close(&format!("{path}: linear db {m}x{k}x{n}"), &db, &db_r, tol);
    }

    // Attention, forward (with probabilities and without) and backward: head dims of whole
    // AVX2 vectors (8) and of whole AVX-512 ones (32, 64, 80), which the SIMD rungs run fused
    // per tile of query rows, token counts off the tile and panel sizes (ViT-B/16's 197).
    for (batch, tokens, heads, head_dim) in [
        (2, 17, 3, 8),
        (2, 50, 2, 32),
        (1, 197, 2, 64),
        (1, 9, 1, 80),
    ] {
        let dims = AttnDims {
            batch,
            tokens,
            heads,
            head_dim,
        };
        let (b, n, d) = (batch, tokens, heads * head_dim);
        let what = format!("{path}: attention {dims:?}");
        let qkv = rand_vec(b * n * 3 * d, 7);
        let (mut out, mut probs, mut scratch) =
            (vec![0.0; b * n * d], vec![0.0; b * heads * n * n], vec![]);
        attention(&qkv, &mut out, Some(&mut probs), &mut scratch, dims);
        let (want_out, want_probs) = attention_ref(&qkv, dims);
        assert_close(&format!("{what} out"), &out, &want_out, 1e-5);
        assert_close(&format!("{what} probs"), &probs, &want_probs, 1e-5);
        let mut out2 = vec![0.0; out.len()];
        attention(&qkv, &mut out2, None, &mut scratch, dims);
        assert_eq!(
            out, out2,
            "{what}: the same output with and without the maps"
        );
        let dout = rand_vec(b * n * d, 8);
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&qkv, &probs, &dout, &mut dqkv, &mut scratch, dims);
        let want = attention_backward_ref(&qkv, &dout, dims);
        assert_close(&format!("{what} backward"), &dqkv, &want, 1e-4);
    }

    // LayerNorm, GELU (value and gradient), softmax.
    let (rows, width) = (9, 70);
    let x = rand_vec(rows * width, 9);
    let (g, bt) = (rand_vec(width, 10), rand_vec(width, 11));
    let mut ln = vec![0.0; x.len()];
    layernorm(&x, &mut ln, &g, &bt, width, 1e-6);
    let want = layernorm_ref(&x, &g, &bt, width, 1e-6);
    assert_close(&format!("{path}: layernorm"), &ln, &want, 1e-4);
    for kind in [Gelu::Exact, Gelu::Tanh] {
        let mut y: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
        let want: Vec<f32> = y.iter().map(|&v| gelu_ref(v, kind)).collect();
        gelu_inplace(&mut y, kind);
        assert_close(&format!("{path}: gelu {kind:?}"), &y, &want, 1e-5);
        let xs: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
        let mut dy = rand_vec(xs.len(), 12);
        let want: Vec<f32> = xs
            .iter()
            .zip(&dy)
            .map(|(&v, &g)| g * gelu_grad_ref(v, kind))
            .collect();
        let (mut grad, mut value) = (xs.clone(), vec![0.0; xs.len()]);
        gelu_with_grad(&mut grad, &mut value, kind);
        assert_close(&format!("{path}: gelu with grad {kind:?}"), &value, &y, 0.0);
        gelu_backward_par(&grad, &mut dy);
        assert_close(&format!("{path}: gelu backward {kind:?}"), &dy, &want, 1e-5);
    }
    for len in [1, 7, 50, 197] {
        // Scales that are powers of two, so the reference sees exactly the scaled scores; a
        // spread of 100 underflows most exponentials.
        for (scale, spread) in [(1.0, 10.0), (0.125, 10.0), (1.0, 100.0)] {
            let mut row: Vec<f32> = rand_vec(len, 13).iter().map(|v| v * spread).collect();
            let scaled: Vec<f32> = row.iter().map(|v| v * scale).collect();
            let want = softmax_ref(&scaled);
            softmax_inplace(&mut row, scale);
            assert_close(
                &format!("{path}: softmax {len} x{scale} ±{spread}"),
                &row,
                &want,
                1e-6,
            );
        }
        // The padded rows' exponentials (the attention normalises its output rows instead),
        // a block of rows at a time, normalised by the factors returned: each row of 1, 5 and
        // 16 has its own scores (and so its own maximum and sum).
        let padded = len.div_ceil(SOFTMAX_CHUNK) * SOFTMAX_CHUNK;
        for rows in [1, 5, 16] {
            for (scale, spread) in [(1.0, 10.0), (0.125, 10.0), (1.0, 100.0)] {
                let scores: Vec<Vec<f32>> = (0..rows)
                    .map(|r| {
                        rand_vec(len, 40 + r as u64)
                            .iter()
                            .map(|v| v * spread)
                            .collect()
                    })
                    .collect();
                let mut block = vec![f32::NAN; rows * padded];
                for (dst, src) in block.chunks_exact_mut(padded).zip(&scores) {
                    dst[..len].copy_from_slice(src);
                }
                let mut inv = vec![0.0; rows];
                softmax_padded_rows(&mut block, padded, len, scale, &mut inv);
                for (r, src) in scores.iter().enumerate() {
                    let got = &block[r * padded..(r + 1) * padded];
                    let scaled: Vec<f32> = src.iter().map(|v| v * scale).collect();
                    let mut normed = vec![0.0; len];
                    scale_into(&mut normed, &got[..len], inv[r]);
                    assert_close(
                        &format!(
                            "{path}: softmax padded {len}, row {r} of {rows}, x{scale} ±{spread}"
                        ),
                        &normed,
                        &softmax_ref(&scaled),
                        1e-6,
                    );
                    assert!(got[len..].iter().all(|&v| v == 0.0), "{path}: padding");
                }
            }
        }
    }
    // Convolutions: gathered in place on the SIMD rungs, lowered on the portable one; strided,
    // padded, both input layouts, one that splits over the threads.
    for (batch, in_ch, hw, out_ch, stride, layout) in [
        (2, 3, 7, 5, 1, Layout::Nchw),
        (2, 8, 9, 16, 2, Layout::Nhwc),
        (16, 16, 14, 16, 1, Layout::Nhwc),
    ] {
        let g = Conv2d {
            batch,
            in_ch,
            h: hw,
            w: hw,
            out_ch,
            k: 3,
            stride,
            pad: 1,
        };
        let (x, w, b) = (
            rand_vec(g.in_len(), 14),
            rand_vec(g.weight_len(), 15),
            rand_vec(out_ch, 16),
        );
        let (mut got, mut want) = (vec![0.0; g.out_len()], vec![0.0; g.out_len()]);
        conv2d(&g, &x, layout, &w, Some(&b), &mut got, &mut vec![]);
        conv2d_ref(&g, &x, layout, &w, Some(&b), &mut want);
        assert_close(&format!("{path}: conv2d {g:?}"), &got, &want, 1e-4);
    }
}

/// The whole forward pass against PyTorch (transformers) on a committed fixture.
fn check_model(path: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_cls");
    let ck = vitrs::load(&dir).unwrap();
    let input = read_npy(&dir.join("ref/input.npy")).unwrap();
    let want = read_npy(&dir.join("ref/logits.npy")).unwrap();
    let out = ck
        .model
        .forward(&input, Capture::default(), &mut Workspace::new())
        .unwrap();
    assert_close(
        &format!("{path}: hf_cls logits vs PyTorch"),
        out.logits.data(),
        want.data(),
        1e-4,
    );
}

#[test]
fn every_kernel_path_matches_the_references() {
    // With VITRS_KERNELS set (CI runs the suite again on the portable rung) the kernels must
    // start on that rung, or that run would test nothing new.
    if let Some(want) = std::env::var("VITRS_KERNELS")
        .ok()
        .as_deref()
        .and_then(Isa::parse)
    {
        assert_eq!(
            isa(),
            want.min(cpu_isa()),
            "VITRS_KERNELS={} did not take",
            want.name()
        );
    }
    let rungs = available_isas();
    eprintln!(
        "this CPU has the rungs {:?}; running each",
        rungs.iter().map(|r| r.name()).collect::<Vec<_>>()
    );
    if !rungs.contains(&Isa::Avx512) {
        eprintln!("no AVX-512 here: its kernels are compiled but not run by this test");
    }
    for rung in rungs {
        assert_eq!(set_isa(rung), rung);
        assert_eq!(isa(), rung, "{}: the switch did not take", rung.name());
        eprintln!("rung {}: kernels and the whole model", rung.name());
        check_kernels(rung.name());
        check_model(rung.name());
    }
}
