//! SGEMM throughput of `gemm` and `matrixmultiply` (its own threading) on the ViT-B/16 shapes,
//! `C (m, n) = A (m, k) · B (k, n)` with B read transposed as the engine does (weights `(n, k)`).
//! Median of 7 runs after 2 warm-ups, all threads of the machine; GFLOP/s = 2mkn / time.

use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    f();
    median(
        (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("threads: {threads}");
    println!("| shape (m x k x n) | matrixmultiply GFLOP/s | gemm GFLOP/s |");
    println!("|---|---|---|");
    for &(m, k, n) in &[
        (197, 768, 2304),
        (197, 768, 3072),
        (197, 3072, 768),
        (3152, 768, 2304),
        (3152, 768, 3072),
        (3152, 3072, 768),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let flop = 2.0 * (m * k * n) as f64;
        let t_mm = time(|| unsafe {
            matrixmultiply::sgemm(
                m, k, n, 1.0, a.as_ptr(), k as isize, 1, w.as_ptr(), 1, k as isize, 0.0,
                c.as_mut_ptr(), n as isize, 1,
            )
        });
        let t_gemm = time(|| unsafe {
            gemm::gemm(
                m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize,
                w.as_ptr(), k as isize, 1, 0.0f32, 1.0f32, false, false, false,
                gemm::Parallelism::Rayon(threads),
            )
        });
        println!("| {m} x {k} x {n} | {:.1} | {:.1} |", flop / t_mm / 1e9, flop / t_gemm / 1e9);
    }
}
