//! Inference and training share one forward pass: on every configuration the library
//! supports, the training forward (no dropout) gives the inference forward's logits. The two
//! differ only where inference may fuse and overwrite (the MLP's GELU fused into its product,
//! one set of block buffers for every block, LayerNorm without saved statistics, attention
//! maps only when captured), so a stage broken on either side fails here. The training
//! backward of each hands over its gradient pieces final and in order (what data-parallel
//! training overlaps its all-reduce with).

use vitrs::kernels::loss::Targets;
use vitrs::kernels::max_abs_diff;
use vitrs::model::{Rng, TrainWorkspace};
use vitrs::{Capture, Gelu, Head, NormPlacement, Pool, Sizes, Tensor, ViT, ViTConfig, Workspace};

fn base() -> ViTConfig {
    ViTConfig::paper(Sizes {
        image: (12, 16),
        channels: 2,
        patch: 4,
        width: 16,
        depth: 3,
        heads: 2,
        mlp: 24,
        classes: 5,
    })
}

/// Every architecture option the library supports, alone and in the combinations the
/// checkpoint families use.
fn configurations() -> Vec<(&'static str, ViTConfig)> {
    let c = base;
    let with = |f: &dyn Fn(&mut ViTConfig)| {
        let mut cfg = c();
        f(&mut cfg);
        cfg
    };
    vec![
        ("pre-norm, class token (the paper's)", c()),
        (
            "pre-norm, tanh GELU, no qkv bias, eps 1e-12",
            with(&|c| {
                c.gelu = Gelu::Tanh;
                c.qkv_bias = false;
                c.layer_norm_eps = 1e-12;
            }),
        ),
        (
            "pre-training head (tanh pre-logits)",
            with(&|c| c.head = Head::PreLogits { hidden: 7 }),
        ),
        ("post-norm", with(&|c| c.norm = NormPlacement::Post)),
        (
            "post-norm, pre-logits, tanh GELU",
            with(&|c| {
                c.norm = NormPlacement::Post;
                c.head = Head::PreLogits { hidden: 6 };
                c.gelu = Gelu::Tanh;
            }),
        ),
        (
            "mean pooling with fc_norm",
            with(&|c| {
                c.pool = Pool::Mean;
                c.fc_norm = true;
            }),
        ),
        (
            "post-norm, mean pooling, LayerScale",
            with(&|c| {
                c.norm = NormPlacement::Post;
                c.pool = Pool::Mean;
                c.layer_scale = Some(0.3);
            }),
        ),
        (
            "registers, no class token, no_embed_class, LayerScale, mean pooling",
            with(&|c| {
                c.class_token = false;
                c.reg_tokens = 3;
                c.no_embed_class = true;
                c.layer_scale = Some(0.5);
                c.pool = Pool::Mean;
                c.fc_norm = true;
            }),
        ),
        (
            "attention pooling, no class token",
            with(&|c| {
                c.class_token = false;
                c.pool = Pool::Map;
            }),
        ),
        (
            "attention pooling, class token, registers, pre-logits",
            with(&|c| {
                c.pool = Pool::Map;
                c.reg_tokens = 1;
                c.head = Head::PreLogits { hidden: 5 };
            }),
        ),
        (
            "post-norm, attention pooling",
            with(&|c| {
                c.norm = NormPlacement::Post;
                c.pool = Pool::Map;
            }),
        ),
        ("DeiT distillation token", with(&|c| c.distilled = true)),
        (
            "DeiT distillation token, registers, no_embed_class",
            with(&|c| {
                c.distilled = true;
                c.reg_tokens = 2;
                c.no_embed_class = true;
            }),
        ),
        (
            "DeiT III: LayerScale, no_embed_class",
            with(&|c| {
                c.layer_scale = Some(0.1);
                c.no_embed_class = true;
            }),
        ),
    ]
}

/// A model of `cfg` with every parameter random (no zero head, gains away from 1).
fn random_model(cfg: &ViTConfig, seed: u64) -> ViT {
    let mut m = ViT::zeros(cfg.clone()).unwrap();
    let mut rng = Rng::new(seed);
    m.params_mut()
        .flat_mut()
        .iter_mut()
        .for_each(|v| *v = (rng.normal() * 0.4) as f32);
    m
}

fn images(cfg: &ViTConfig, batch: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let shape = vec![batch, cfg.channels, cfg.image_height, cfg.image_width];
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| rng.normal() as f32).collect()).unwrap()
}

#[test]
fn training_and_inference_forwards_give_the_same_logits_on_every_configuration() {
    for (i, (name, cfg)) in configurations().into_iter().enumerate() {
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = random_model(&cfg, 100 + i as u64);
        let batch = 3;
        let x = images(&cfg, batch, 7 + i as u64);
        let mut ws = Workspace::new();
        let inferred = model.forward(&x, Capture::default(), &mut ws).unwrap();
        // With the attention maps captured, the same logits again.
        let captured = model
            .forward(
                &x,
                Capture {
                    attentions: true,
                    pre_logits: true,
                },
                &mut ws,
            )
            .unwrap();
        let scale = inferred
            .logits
            .data()
            .iter()
            .fold(1f32, |s, v| s.max(v.abs()));
        // Equal to f32 rounding: without capture a class-token head's last block runs past
        // its attention on the rows pooling reads alone (another kernel for that attention,
        // another order of summation); capturing every map runs the whole block.
        let d = max_abs_diff(captured.logits.data(), inferred.logits.data());
        assert!(
            d <= 1e-6 * scale,
            "{name}: capture changed the logits by {d} (largest logit {scale})"
        );
        // With the weights packed once for the GEMM kernel, the same logits again.
        let mut packed_model = model.clone();
        packed_model.pack_weights();
        let packed = packed_model.logits(&x).unwrap();
        // Equal to f32 rounding: on a CPU with AMX the packed products run on the tile unit
        // (f32 accuracy, another order of summation), the unpacked ones of this small model
        // on the FMA kernel.
        let d = max_abs_diff(packed.data(), inferred.logits.data());
        assert!(
            d <= 1e-6 * scale,
            "{name}: packed weights changed the logits by {d} (largest logit {scale})"
        );
        let portable = vitrs::kernels::isa() == vitrs::kernels::Isa::Portable;
        assert!(
            portable || packed_model.packed_bytes() > 0,
            "{name}: nothing packed"
        );
        // A change of the parameters drops the packing.
        packed_model.params_mut();
        assert_eq!(packed_model.packed_bytes(), 0);

        let labels: Vec<usize> = (0..batch).map(|b| b % cfg.num_classes).collect();
        let mut tw = TrainWorkspace::new();
        // The backward hands over each piece of the gradient buffer once, in order, final.
        let mut handed: Vec<(std::ops::Range<usize>, Vec<f32>)> = vec![];
        model
            .forward_backward_overlapped(
                &x,
                Targets::Labels {
                    labels: &labels,
                    smoothing: 0.0,
                },
                &mut tw,
                &mut |r, g| handed.push((r.clone(), g[r].to_vec())),
            )
            .unwrap();
        let pieces: Vec<_> = model
            .grad_pieces()
            .into_iter()
            .filter(|r| !r.is_empty())
            .collect();
        assert_eq!(
            handed.iter().map(|h| h.0.clone()).collect::<Vec<_>>(),
            pieces,
            "{name}: pieces handed over out of order"
        );
        let mut end = tw.grads().len();
        for (r, snapshot) in &handed {
            assert_eq!(r.end, end, "{name}: pieces not contiguous");
            end = r.start;
            assert_eq!(
                &tw.grads()[r.clone()],
                &snapshot[..],
                "{name}: gradients {r:?} changed after they were handed over"
            );
            assert!(snapshot.iter().any(|&g| g != 0.0), "{name}: {r:?} all zero");
        }
        assert_eq!(end, 0, "{name}: pieces do not cover the buffer");
        let want = inferred.logits.data();
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(tw.logits(), want);
        eprintln!("{name}: max |Δlogit| {diff:e} (logits up to {scale:.2})");
        assert!(
            diff <= 1e-5 * scale,
            "{name}: the training forward's logits differ from inference's by {diff:e}\n  \
             training  {:?}\n  inference {:?}",
            &tw.logits()[..want.len().min(5)],
            &want[..want.len().min(5)]
        );
        // The logits are not all alike (a model that ignores its input would pass the above).
        assert!(
            want.iter().any(|v| (v - want[0]).abs() > 1e-3),
            "{name}: degenerate logits {want:?}"
        );
    }
}
