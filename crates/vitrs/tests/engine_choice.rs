//! The choice between the AMX tile unit and the AVX-512 FMA kernel (`kernels::adapt_engine`):
//! by default on an AMX CPU the engine follows the tile unit's speed, a pinned choice
//! (`VITRS_AMX=0|1`, `amx::set_enabled`) stays, and a weight packed for the tiles gives the
//! same products when they run on the FMA kernel instead (it is packed a second time for it),
//! and one packed for the FMA kernel the same products on the tiles; a move to an engine
//! the packed weights lack has a cost (`gemm::move_cost`) until they are packed for it.
//! Inference image by image lets each thread follow its own core's tile unit
//! (`amx::follow_here`), with the same logits.
//! The choice is a process-wide switch, so this file is its own test binary with one test.

use std::time::Duration;
use vitrs::kernels::gemm::{linear_packed, linear_ref, move_cost, Epilogue, PackedLinear};
use vitrs::kernels::{gemm_adaptive, isa, max_abs_diff, products_on_tiles, Isa};
use vitrs::{Capture, Gelu, Sizes, Tensor, ViT, ViTConfig, Workspace};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = vitrs::model::Rng::new(seed);
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

#[test]
fn the_engine_follows_the_tile_unit_unless_pinned_and_packings_follow_the_engine() {
    #[cfg(target_arch = "x86_64")]
    use vitrs::kernels::amx;
    #[cfg(target_arch = "x86_64")]
    let tiles = isa() == Isa::Avx512 && amx::supported();
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = false;
    let pinned = std::env::var("VITRS_AMX").is_ok_and(|v| !v.is_empty() && v != "auto");
    if !tiles {
        println!(
            "no tile unit on this rung ({}): the engine is fixed",
            isa().name()
        );
        assert!(!gemm_adaptive() && !products_on_tiles());
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(
            gemm_adaptive(),
            !pinned,
            "VITRS_AMX pins the engine, else it adapts"
        );
        // A model, packed for whichever engine runs now, and its logits with each thread of an
        // image-by-image pass on its own engine (where the engine adapts).
        let (model, images) = small_model();
        let mut ws = Workspace::new();
        let mut adaptive_logits = None;
        if !pinned {
            // A look at the tile unit's speed picks an engine (either, on a shared host).
            let on = amx::adapt();
            assert_eq!(on, amx::enabled());
            println!("the engine now: {}", vitrs::kernels::gemm_engine());
            // A thread's own engine: its products go where its guard says, another thread
            // keeps the process's, and the process's comes back when the guard drops.
            let global = amx::enabled();
            {
                let here = amx::follow_here().expect("the engine adapts");
                assert_eq!(products_on_tiles(), here.on());
                println!("this thread's own engine: tiles {}", here.on());
                std::thread::scope(|s| {
                    s.spawn(|| assert_eq!(products_on_tiles(), global));
                });
            }
            assert_eq!(products_on_tiles(), global);
            let out = model.forward(&images, Capture::default(), &mut ws).unwrap();
            adaptive_logits = Some(out.logits.into_data());
        }

        // A weight packed for the tiles, then read with the products on the FMA kernel.
        assert!(amx::set_enabled(true));
        assert!(!gemm_adaptive(), "set_enabled pins the choice");
        assert!(
            amx::follow_here().is_none(),
            "a pinned engine is every thread's"
        );
        let (m, k, n) = (197, 96, 160);
        let (x, w, b) = (rand_vec(m * k, 1), rand_vec(n * k, 2), rand_vec(n, 3));
        let packed = PackedLinear::new(&w, (n, k)).unwrap();
        let on_tiles_bytes = packed.bytes();
        assert!(
            move_cost(false) > Duration::ZERO,
            "a move to the FMA kernel would pack this weight"
        );
        let mut want = vec![0.0; m * n];
        linear_ref(
            &x,
            &w,
            Some(&b),
            &mut want,
            (m, k, n),
            Epilogue::Gelu(Gelu::Exact),
        );
        // The largest difference from the reference of the product with this packing of w.
        let error = |p: &PackedLinear| {
            let mut got = vec![0.0; m * n];
            let epi = Epilogue::Gelu(Gelu::Exact);
            linear_packed(&x, &w, Some(p), Some(&b), &mut got, (m, k, n), epi);
            max_abs_diff(&got, &want)
        };
        let run = || error(&packed);
        let tol = 1e-5;
        assert!(run() < tol, "on the tiles: {}", run());
        assert_eq!(
            packed.bytes(),
            on_tiles_bytes,
            "no second packing while on the tiles"
        );
        amx::set_enabled(false);
        assert!(!products_on_tiles() && !gemm_adaptive());
        assert!(run() < tol, "on the FMA kernel: {}", run());
        let both = packed.bytes();
        // f32 panels for the FMA kernel: 4 bytes an element (padded), beside 6 on the tiles.
        assert!(
            both >= on_tiles_bytes + 4 * n * k,
            "{both} vs {on_tiles_bytes}"
        );
        assert!(run() < tol);
        assert_eq!(packed.bytes(), both, "the FMA packing is made once");
        amx::set_enabled(true);
        assert!(run() < tol, "back on the tiles: {}", run());

        // The other way: a weight packed for the FMA kernel, then read on the tiles (packed a
        // second time for them, once).
        amx::set_enabled(false);
        let packed_fma = PackedLinear::new(&w, (n, k)).unwrap();
        assert!(!packed_fma.on_tiles());
        let fma_bytes = packed_fma.bytes();
        amx::set_enabled(true);
        let run_fma_first = || error(&packed_fma);
        assert!(run_fma_first() < tol, "on the tiles: {}", run_fma_first());
        let both = packed_fma.bytes();
        // bf16 pieces for the tiles: 6 bytes an element (padded), beside 4 for the FMA kernel.
        assert!(both >= fma_bytes + 6 * n * k, "{both} vs {fma_bytes}");
        assert!(run_fma_first() < tol);
        assert_eq!(packed_fma.bytes(), both, "the tiles' packing is made once");

        // The model packed once for inference gives the same logits on either engine, and
        // as where each thread chose its own.
        let mut logits = |on: bool| {
            amx::set_enabled(on);
            let out = model.forward(&images, Capture::default(), &mut ws).unwrap();
            assert_eq!(products_on_tiles(), on, "forward kept the pinned engine");
            out.logits.into_data()
        };
        let (a, b) = (logits(true), logits(false));
        let d = max_abs_diff(&a, &b);
        assert!(
            d < 1e-4,
            "logits on the tiles and on the FMA kernel differ by {d}"
        );
        assert!(a.iter().any(|v| *v != 0.0));
        if let Some(c) = adaptive_logits {
            let d = max_abs_diff(&a, &c);
            assert!(
                d < 1e-4,
                "logits with each thread's own engine differ by {d}"
            );
        }

        // Every weight now packed for both engines: a move packs nothing, either way. One
        // packed for the tiles alone makes a move to the FMA kernel cost again, until dropped.
        assert_eq!(
            (move_cost(false), move_cost(true)),
            (Duration::ZERO, Duration::ZERO)
        );
        amx::set_enabled(true);
        let lone = PackedLinear::new(&w, (n, k)).unwrap();
        assert!(move_cost(false) > Duration::ZERO && move_cost(true) == Duration::ZERO);
        drop(lone);
        assert_eq!(move_cost(false), Duration::ZERO);
    }
}

/// A small random model with every weight packed for inference, and a batch of 4 images
/// (image by image on 2 or 4 threads).
fn small_model() -> (ViT, Tensor) {
    let cfg = ViTConfig::paper(Sizes {
        image: (32, 32),
        channels: 3,
        patch: 8,
        width: 64,
        depth: 2,
        heads: 4,
        mlp: 128,
        classes: 10,
    });
    let mut model = ViT::random(cfg, 7).unwrap();
    // Every parameter random, the zero-initialised head too.
    let params = model.params_mut().flat_mut();
    let noise = rand_vec(params.len(), 8);
    for (p, e) in params.iter_mut().zip(noise) {
        *p += 0.1 * e;
    }
    model.pack_weights();
    let images = Tensor::new(vec![4, 3, 32, 32], rand_vec(4 * 3 * 32 * 32, 4)).unwrap();
    (model, images)
}
