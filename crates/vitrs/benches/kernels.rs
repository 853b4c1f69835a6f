//! Kernel benchmarks at the ViT shapes, and the whole model's forward and training step.
//! GEMM and model throughput is printed as GFLOP/s so it can be compared with the machine's
//! FMA peak (see `docs/perf.md`).
//!
//! `cargo bench -p vitrs --bench kernels` (set `RAYON_NUM_THREADS` to pin the thread count).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vitrs::kernels::attention::{attention, AttnDims};
use vitrs::kernels::gemm::{linear, Epilogue};
use vitrs::kernels::layernorm::layernorm;
use vitrs::kernels::loss::Targets;
use vitrs::kernels::math::gelu_inplace;
use vitrs::model::TrainWorkspace;
use vitrs::train::optim::{Optimizer, OptimizerKind};
use vitrs::train::RunConfig;
use vitrs::{Capture, Gelu, Tensor, ViT, ViTConfig, Workspace};

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// The FMA peak: 12 independent 8-wide FMA chains (enough to hide the FMA latency on two
/// pipes), `ITERS` rounds, on every thread of the pool at once. FLOPs = 2 · 8 · 12 · ITERS per
/// thread.
#[cfg(target_arch = "x86_64")]
fn fma_peak(c: &mut Criterion) {
    use std::arch::x86_64::*;
    const ITERS: usize = 1 << 20;
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chains(seed: f32) -> f32 {
        // Twelve named accumulators so they stay in registers (an array may be spilled).
        let m = _mm256_set1_ps(0.999_999);
        let a = _mm256_set1_ps(1e-7);
        let s = _mm256_set1_ps(seed);
        let (mut x0, mut x1, mut x2, mut x3, mut x4, mut x5) = (s, s, s, s, s, s);
        let (mut x6, mut x7, mut x8, mut x9, mut x10, mut x11) = (s, s, s, s, s, s);
        for _ in 0..ITERS {
            x0 = _mm256_fmadd_ps(x0, m, a);
            x1 = _mm256_fmadd_ps(x1, m, a);
            x2 = _mm256_fmadd_ps(x2, m, a);
            x3 = _mm256_fmadd_ps(x3, m, a);
            x4 = _mm256_fmadd_ps(x4, m, a);
            x5 = _mm256_fmadd_ps(x5, m, a);
            x6 = _mm256_fmadd_ps(x6, m, a);
            x7 = _mm256_fmadd_ps(x7, m, a);
            x8 = _mm256_fmadd_ps(x8, m, a);
            x9 = _mm256_fmadd_ps(x9, m, a);
            x10 = _mm256_fmadd_ps(x10, m, a);
            x11 = _mm256_fmadd_ps(x11, m, a);
        }
        let sum = [x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11]
            .iter()
            .fold(x0, |acc, x| _mm256_add_ps(acc, *x));
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
        out.iter().sum()
    }
    if !vitrs::kernels::has_avx2_fma() {
        return;
    }
    let mut g = c.benchmark_group("fma_peak");
    g.sample_size(10);
    let threads = rayon::current_num_threads();
    for t in [1, threads] {
        g.throughput(Throughput::Elements((2 * 8 * 12 * ITERS * t) as u64));
        g.bench_function(BenchmarkId::new("threads", t), |b| {
            b.iter(|| {
                use rayon::prelude::*;
                (0..t)
                    .into_par_iter()
                    // SAFETY: AVX2 and FMA were checked above.
                    .map(|i| unsafe { chains(i as f32) })
                    .sum::<f32>()
            })
        });
    }
    g.finish();
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak(_: &mut Criterion) {}

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    // (name, m, k, n): ViT-B/16 at batch 1 (197 tokens) and batch 16 (3152 tokens).
    for &(name, m, k, n) in &[
        ("b1_qkv", 197, 768, 2304),
        ("b1_fc1", 197, 768, 3072),
        ("b1_fc2", 197, 3072, 768),
        ("b16_qkv", 3152, 768, 2304),
        ("b16_fc1", 3152, 768, 3072),
        ("b16_fc2", 3152, 3072, 768),
    ] {
        let (x, w, b) = (data(m * k), data(n * k), data(n));
        let mut out = vec![0.0; m * n];
        // Criterion's "elements" are FLOPs here: its elem/s figure reads as FLOP/s.
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |bch| {
            bch.iter(|| linear(&x, &w, Some(&b), &mut out, (m, k, n), Epilogue::None))
        });
    }
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let (rows, d, m) = (3152, 768, 3072);
    let x = data(rows * d);
    let (gamma, beta) = (data(d), data(d));
    let mut out = vec![0.0; rows * d];
    g.throughput(Throughput::Elements((rows * d) as u64));
    g.bench_function("layernorm_3152x768", |b| {
        b.iter(|| layernorm(&x, &mut out, &gamma, &beta, d, 1e-6))
    });
    let mut h = data(rows * m);
    g.throughput(Throughput::Elements((rows * m) as u64));
    g.bench_function("gelu_exact_3152x3072", |b| {
        b.iter(|| gelu_inplace(&mut h, Gelu::Exact))
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
/// "elements" are FLOPs (`ViTConfig::flops_per_image`, three forwards for a training step).
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
        g.throughput(Throughput::Elements(vit.config().flops_per_image() as u64));
        g.bench_function(BenchmarkId::new("forward_b1", preset), |b| {
            b.iter(|| vit.forward(&x, Capture::default(), &mut ws).unwrap())
        });
    }
    let toml = include_str!("../../../configs/bench-train.toml");
    let run = RunConfig::from_toml(toml, "configs/bench-train.toml").unwrap();
    let mut vit = ViT::random(run.model.resolve((1, 28, 28), 10).unwrap(), 0).unwrap();
    let batch = 32;
    let x = input(vit.config(), batch);
    let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    let mut tw = TrainWorkspace::new();
    let mut opt = Optimizer::new(OptimizerKind::adamw(0.05), vit.params());
    g.throughput(Throughput::Elements(
        (3.0 * vit.config().flops_per_image() * batch as f64) as u64,
    ));
    g.bench_function("train_step_bench_train_b32", |b| {
        b.iter(|| {
            tw.zero_grads();
            let t = Targets::Labels {
                labels: &labels,
                smoothing: 0.0,
            };
            vit.forward_backward(&x, t, &mut tw).unwrap();
            opt.step(vit.params_mut().flat_mut(), tw.grads(), 1e-4);
        })
    });
    g.finish();
}

criterion_group!(benches, fma_peak, gemm, elementwise, attn, model);
criterion_main!(benches);
