//! Kernel benchmarks at the ViT shapes, and the whole model's forward and training step; the
//! ResNet baseline's convolution and training step (`-- resnet`).
//! GEMM and model throughput is printed as GFLOP/s so it can be compared with the machine's
//! FMA peak (see `docs/perf.md`).
//!
//! `cargo bench -p vitrs --bench kernels` (set `RAYON_NUM_THREADS` to pin the thread count).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vitrs::kernels::attention::{attention, AttnDims};
use vitrs::kernels::gemm::Epilogue;
use vitrs::kernels::layernorm::layernorm;
use vitrs::kernels::loss::Targets;
use vitrs::kernels::math::{gelu_inplace, gelu_with_grad};
use vitrs::model::{Net, NetWorkspace, Regularization};
use vitrs::train::optim::{adamw_ref, Optimizer, OptimizerKind};
use vitrs::train::RunConfig;
use vitrs::{Capture, Gelu, Tensor, ViT, ViTConfig, Workspace};

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// The FMA peak of every rung this CPU has (`kernels::peak`: a hand-written assembly loop of
/// 12 ymm or 24 zmm independent chains), on one thread and on every thread of the pool; its
/// throughput reads as FLOP/s.
fn fma_peak(c: &mut Criterion) {
    use vitrs::kernels::peak::fma_loops;
    let mut g = c.benchmark_group("fma_peak");
    g.sample_size(10);
    let threads = rayon::current_num_threads();
    const TRIPS: u64 = 1 << 20;
    for isa in vitrs::kernels::available_isas() {
        for t in [1, threads] {
            let Some(flops) = fma_loops(isa, t, TRIPS) else {
                continue;
            };
            g.throughput(Throughput::Elements(flops));
            g.bench_function(BenchmarkId::new(isa.name(), format!("{t}_threads")), |b| {
                b.iter(|| fma_loops(isa, t, TRIPS))
            });
        }
    }
    g.finish();
}

/// The engine's products at the ViT-B/16 shapes (batch 1 and 16) and the training shapes of
/// `configs/bench-train.toml` at batch 128, on the running rung — packed per call, and for
/// the inference shapes with the weight packed once — and on the portable rung, which is
/// `matrixmultiply`: the reference the engine's GEMM must beat.
fn gemm(c: &mut Criterion) {
    use vitrs::bench::GemmOp;
    use vitrs::kernels::gemm::{linear_dw, linear_dx, linear_packed, PackedLinear};
    use vitrs::kernels::{isa, set_isa, Isa};
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    let rung = isa();
    // (name, op, m, k, n): x (m, k), W (n, k).
    for &(name, op, m, k, n) in &[
        ("b1_qkv", GemmOp::Fwd, 197, 768, 2304),
        ("b1_fc1", GemmOp::Fwd, 197, 768, 3072),
        ("b1_fc2", GemmOp::Fwd, 197, 3072, 768),
        ("b16_qkv", GemmOp::Fwd, 3152, 768, 2304),
        ("b16_fc1", GemmOp::Fwd, 3152, 768, 3072),
        ("b16_fc2", GemmOp::Fwd, 3152, 3072, 768),
        ("train_fc1_fwd", GemmOp::Fwd, 6400, 192, 768),
        ("train_fc1_dx", GemmOp::Dx, 6400, 192, 768),
        ("train_fc1_dw", GemmOp::Dw, 6400, 192, 768),
        ("train_fc2_dw", GemmOp::Dw, 6400, 768, 192),
    ] {
        let (x, w, b, dy) = (data(m * k), data(n * k), data(n), data(m * n));
        let mut out = vec![0.0; m * n.max(k)];
        let mut dw = vec![0.0; n * k];
        // Criterion's "elements" are FLOPs here: its elem/s figure reads as FLOP/s.
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let mut variants = vec![(rung, false), (Isa::Portable, false)];
        if op == GemmOp::Fwd && rung != Isa::Portable {
            variants.push((rung, true));
        }
        for (variant, packed) in variants {
            set_isa(variant);
            let pw = packed.then(|| PackedLinear::new(&w, (n, k))).flatten();
            let label = match (variant, packed) {
                (Isa::Portable, _) => "matrixmultiply".to_string(),
                (r, true) => format!("{}_packed", r.name()),
                (r, false) => r.name().to_string(),
            };
            g.bench_function(BenchmarkId::new(name, label), |bch| {
                bch.iter(|| match op {
                    GemmOp::Fwd => linear_packed(
                        &x,
                        &w,
                        pw.as_ref(),
                        Some(&b),
                        &mut out[..m * n],
                        (m, k, n),
                        Epilogue::None,
                    ),
                    GemmOp::Dx => linear_dx(&dy, &w, &mut out[..m * k], (m, k, n)),
                    GemmOp::Dw => linear_dw(&dy, &x, &mut dw, (m, k, n)),
                })
            });
        }
        set_isa(rung);
    }
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let (rows, d) = (3152, 768);
    let x = data(rows * d);
    let (gamma, beta) = (data(d), data(d));
    let mut out = vec![0.0; rows * d];
    g.throughput(Throughput::Elements((rows * d) as u64));
    g.bench_function("layernorm_3152x768", |b| {
        b.iter(|| layernorm(&x, &mut out, &gamma, &beta, d, 1e-6))
    });
    // GELU over 16384 floats (in L2), the inputs copied back in each time: applied to its
    // own output over and over, the values sank into subnormals, hundreds of times slower.
    let (pre, mut h) = (data(1 << 14), vec![0.0; 1 << 14]);
    g.throughput(Throughput::Elements(1 << 14));
    g.bench_function("gelu_exact_16384", |b| {
        b.iter(|| {
            h.copy_from_slice(&pre);
            gelu_inplace(&mut h, Gelu::Exact)
        })
    });
    // The training forward's GELU with its derivative, one task's 16384 floats (in L2); the
    // pre-activations are copied back in each time, as the derivative overwrites them.
    let (mut hg, mut act) = (vec![0.0; 1 << 14], vec![0.0; 1 << 14]);
    g.throughput(Throughput::Elements(1 << 14));
    g.bench_function("gelu_exact_with_grad_16384", |b| {
        b.iter(|| {
            hg.copy_from_slice(&pre);
            gelu_with_grad(&mut hg, &mut act, Gelu::Exact)
        })
    });
    // One AdamW update of ViT-Ti/16's 5.7 M parameters (its optimizer state out of L2), on
    // the pool's threads and rung; beside it the one-element-at-a-time reference on one
    // thread, the update's form before it was written for the vectoriser.
    let ti = ViT::zeros(ViTConfig::preset("Ti/16").unwrap()).unwrap();
    let n = ti.params().count();
    let adamw = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let mut opt = Optimizer::new(adamw, ti.params());
    let (mut p, grads) = (data(n), data(n));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("adamw_step_ti16", |b| {
        b.iter(|| opt.step(&mut p, &grads, 1e-4))
    });
    let (mut m, mut v, decay) = (vec![0.0; n], vec![0.0; n], vec![true; n]);
    let hp = (0.9, 0.999, 1e-8, 0.05);
    g.bench_function("adamw_step_ti16_reference_one_thread", |b| {
        b.iter(|| adamw_ref((&mut p, &grads, &mut m, &mut v), &decay, None, 1e-4, hp, 1))
    });
    g.finish();
}

fn attn(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    for batch in [1, 16] {
        let dims = AttnDims {
            batch,
            tokens: 197,
            heads: 12,
            head_dim: 64,
        };
        let qkv = data(batch * 197 * 3 * 768);
        let mut out = vec![0.0; batch * 197 * 768];
        let mut scratch = Vec::new();
        g.throughput(Throughput::Elements((4 * batch * 197 * 197 * 768) as u64));
        g.bench_function(BenchmarkId::new("b16_layer", batch), |b| {
            b.iter(|| attention(&qkv, &mut out, None, &mut scratch, dims))
        });
    }
    g.finish();
}

/// The whole model: ViT-Ti/16 and ViT-B/16 inference at batch 1, and a full training step
/// (forward, backward, AdamW) of `configs/bench-train.toml`'s model at batch 32. Criterion's
/// "elements" are FLOPs as run (`ViTConfig::flops_run_per_image`, three forwards for a training
/// step).
fn model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    let input = |cfg: &ViTConfig, batch: usize| {
        let shape = vec![batch, cfg.channels, cfg.image_height, cfg.image_width];
        let n = shape.iter().product();
        Tensor::new(shape, data(n)).unwrap()
    };
    for preset in ["Ti/16", "B/16"] {
        let vit = ViT::random(ViTConfig::preset(preset).unwrap(), 0).unwrap();
        let x = input(vit.config(), 1);
        let mut ws = Workspace::new();
        g.throughput(Throughput::Elements(
            vit.config().flops_run_per_image() as u64
        ));
        g.bench_function(BenchmarkId::new("forward_b1", preset), |b| {
            b.iter(|| vit.forward(&x, Capture::default(), &mut ws).unwrap())
        });
    }
    let toml = include_str!("../../../configs/bench-train.toml");
    let run = RunConfig::from_toml(toml, "configs/bench-train.toml").unwrap();
    let vit = ViT::random(run.model.resolve((1, 28, 28), 10).unwrap(), 0).unwrap();
    let x = input(vit.config(), 32);
    train_step(&mut g, "train_step_bench_train_b32", Net::ViT(vit), &x);
    g.finish();
}

/// One training step of `net` on `x (B, C, H, W)` (labels `i mod classes`, AdamW), the
/// throughput in FLOPs (three forwards).
fn train_step(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut net: Net,
    x: &Tensor,
) {
    let batch = x.shape()[0];
    let k = net.num_classes();
    let labels: Vec<usize> = (0..batch).map(|i| i % k).collect();
    let mut ws = NetWorkspace::for_net(&net);
    let mut opt = Optimizer::new(OptimizerKind::adamw(0.05), net.params());
    g.throughput(Throughput::Elements(
        (3.0 * net.flops_per_image() * batch as f64) as u64,
    ));
    g.bench_function(name, |b| {
        b.iter(|| {
            ws.zero_grads();
            let t = Targets::Labels {
                labels: &labels,
                smoothing: 0.0,
            };
            let reg = Regularization::default();
            net.forward_backward(x, t, reg, &mut ws, &mut |_, _| {})
                .unwrap();
            opt.step(net.params_mut().flat_mut(), ws.grads(), 1e-4);
        })
    });
}

/// The ResNet baseline: the first stage's convolution (ResNet-20 on Fashion-MNIST, batch 128,
/// 16 → 16 channels at 28 × 28) read in place on the running rung and lowered (im2col, what
/// the portable rung does), its backward, and the whole training step of ResNet-20 at batch 32.
fn resnet(c: &mut Criterion) {
    use vitrs::kernels::conv::{conv2d, conv2d_backward, im2col, Conv2d, Layout};
    use vitrs::kernels::gemm::linear;
    use vitrs::model::resnet::{ResNet, ResNetConfig};
    let mut g = c.benchmark_group("resnet");
    g.sample_size(10);
    let cv = Conv2d {
        batch: 128,
        in_ch: 16,
        h: 28,
        w: 28,
        out_ch: 16,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let (x, w) = (data(cv.in_len()), data(cv.weight_len()));
    let mut out = vec![0.0; cv.out_len()];
    let (mut s1, mut s2) = (vec![], vec![]);
    g.throughput(Throughput::Elements(
        2 * (cv.rows() * cv.cols() * cv.out_ch) as u64,
    ));
    g.bench_function("conv3x3_b128_28x28x16_in_place", |b| {
        b.iter(|| conv2d(&cv, &x, Layout::Nhwc, &w, None, &mut out, &mut s1))
    });
    // The lowered product the same way the portable rung runs it, with this rung's GEMM:
    // im2col, then the weight (already in the windows' order here) times the columns.
    g.bench_function("conv3x3_b128_28x28x16_lowered", |b| {
        b.iter(|| {
            s1.resize(cv.rows() * cv.cols(), 0.0);
            im2col(&cv, &x, Layout::Nhwc, &mut s1);
            let dims = (cv.rows(), cv.cols(), cv.out_ch);
            linear(&s1, &w, None, &mut out, dims, Epilogue::None)
        })
    });
    let dy = data(cv.out_len());
    let (mut dx, mut dw) = (vec![0.0; cv.in_len()], vec![0.0; cv.weight_len()]);
    g.throughput(Throughput::Elements(
        4 * (cv.rows() * cv.cols() * cv.out_ch) as u64,
    ));
    g.bench_function("conv3x3_b128_28x28x16_backward", |b| {
        b.iter(|| {
            let d = Some(&mut dx[..]);
            conv2d_backward(
                &cv,
                &x,
                Layout::Nhwc,
                &w,
                &dy,
                d,
                &mut dw,
                None,
                (&mut s1, &mut s2),
            )
        })
    });
    let m = ResNet::new(ResNetConfig::cifar(20, 16, 1, (28, 28), 10), 0).unwrap();
    let xs = Tensor::new(vec![32, 1, 28, 28], data(32 * 28 * 28)).unwrap();
    train_step(&mut g, "resnet20_28x28_train_step_b32", Net::ResNet(m), &xs);
    g.finish();
}

criterion_group!(benches, fma_peak, gemm, elementwise, attn, model, resnet);
criterion_main!(benches);
