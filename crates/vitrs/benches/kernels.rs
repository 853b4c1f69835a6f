//! Kernel benchmarks at the ViT shapes. GEMM throughput is printed as GFLOP/s so it can be
//! compared with the machine's FMA peak (see `docs/perf.md`).
//!
//! `cargo bench -p vitrs --bench kernels` (set `RAYON_NUM_THREADS` to pin the thread count).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vitrs::kernels::attention::{attention, AttnDims};
use vitrs::kernels::gemm::{linear, Epilogue};
use vitrs::kernels::layernorm::layernorm;
use vitrs::kernels::math::gelu_inplace;
use vitrs::Gelu;

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

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

criterion_group!(benches, gemm, elementwise, attn);
criterion_main!(benches);
