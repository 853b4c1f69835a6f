//! The ceiling every efficiency figure is measured against: the FMA peak of a rung of the
//! instruction-set ladder, per core and for a number of threads.
//!
//! A hand-written loop (inline assembly, so nothing but FMAs and the loop counter runs) keeps
//! more independent FMA chains in flight than latency × ports needs on any x86 core of the
//! last decade (latency 4–5 cycles, 2 FMA ports: 8–10 chains): 12 ymm chains for AVX2, 24 zmm
//! chains for AVX-512. Each chain adds a constant product to itself, so no value grows large,
//! denormal or NaN. The result is GFLOP/s: 2 FLOPs per lane per FMA.
//!
//! Where the products run on Intel's AMX tiles ([`super::amx`]), their ceiling is the tile
//! unit's instead: [`amx_peak`], the rate of its bf16 products in a loop of nothing else,
//! divided by the six tile products each f32 product takes there.

use rayon::prelude::*;

use super::Isa;

/// FMAs per loop trip and lanes per FMA of each rung's loop.
fn shape(isa: Isa) -> (u64, u64) {
    match isa {
        Isa::Avx512 => (24, 16),
        _ => (12, 8),
    }
}

/// Runs `trips` trips of `isa`'s FMA loop on the calling thread.
///
/// # Safety
/// The CPU must have `isa`'s features.
#[cfg(target_arch = "x86_64")]
unsafe fn fma_loop(isa: Isa, trips: u64) {
    match isa {
        Isa::Avx512 => fma_loop_avx512(trips),
        Isa::Avx2 => fma_loop_avx2(trips),
        Isa::Portable => {}
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(trips: u64) {
    std::arch::asm!(
        "vxorps ymm0, ymm0, ymm0",
        "vxorps ymm1, ymm1, ymm1",
        "vxorps ymm2, ymm2, ymm2",
        "vxorps ymm3, ymm3, ymm3",
        "vxorps ymm4, ymm4, ymm4",
        "vxorps ymm5, ymm5, ymm5",
        "vxorps ymm6, ymm6, ymm6",
        "vxorps ymm7, ymm7, ymm7",
        "vxorps ymm8, ymm8, ymm8",
        "vxorps ymm9, ymm9, ymm9",
        "vxorps ymm10, ymm10, ymm10",
        "vxorps ymm11, ymm11, ymm11",
        "vbroadcastss ymm12, [{m}]",
        "vbroadcastss ymm13, [{a}]",
        "2:",
        "vfmadd231ps ymm0, ymm12, ymm13",
        "vfmadd231ps ymm1, ymm12, ymm13",
        "vfmadd231ps ymm2, ymm12, ymm13",
        "vfmadd231ps ymm3, ymm12, ymm13",
        "vfmadd231ps ymm4, ymm12, ymm13",
        "vfmadd231ps ymm5, ymm12, ymm13",
        "vfmadd231ps ymm6, ymm12, ymm13",
        "vfmadd231ps ymm7, ymm12, ymm13",
        "vfmadd231ps ymm8, ymm12, ymm13",
        "vfmadd231ps ymm9, ymm12, ymm13",
        "vfmadd231ps ymm10, ymm12, ymm13",
        "vfmadd231ps ymm11, ymm12, ymm13",
        "dec {n}",
        "jnz 2b",
        "vzeroupper",
        m = in(reg) &1e-3f32,
        a = in(reg) &1e-4f32,
        n = inout(reg) trips.max(1) => _,
        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
        out("ymm12") _, out("ymm13") _,
        options(nostack),
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(trips: u64) {
    std::arch::asm!(
        "vxorps zmm0, zmm0, zmm0",
        "vxorps zmm1, zmm1, zmm1",
        "vxorps zmm2, zmm2, zmm2",
        "vxorps zmm3, zmm3, zmm3",
        "vxorps zmm4, zmm4, zmm4",
        "vxorps zmm5, zmm5, zmm5",
        "vxorps zmm6, zmm6, zmm6",
        "vxorps zmm7, zmm7, zmm7",
        "vxorps zmm8, zmm8, zmm8",
        "vxorps zmm9, zmm9, zmm9",
        "vxorps zmm10, zmm10, zmm10",
        "vxorps zmm11, zmm11, zmm11",
        "vxorps zmm12, zmm12, zmm12",
        "vxorps zmm13, zmm13, zmm13",
        "vxorps zmm14, zmm14, zmm14",
        "vxorps zmm15, zmm15, zmm15",
        "vxorps zmm16, zmm16, zmm16",
        "vxorps zmm17, zmm17, zmm17",
        "vxorps zmm18, zmm18, zmm18",
        "vxorps zmm19, zmm19, zmm19",
        "vxorps zmm20, zmm20, zmm20",
        "vxorps zmm21, zmm21, zmm21",
        "vxorps zmm22, zmm22, zmm22",
        "vxorps zmm23, zmm23, zmm23",
        "vbroadcastss zmm24, [{m}]",
        "vbroadcastss zmm25, [{a}]",
        "2:",
        "vfmadd231ps zmm0, zmm24, zmm25",
        "vfmadd231ps zmm1, zmm24, zmm25",
        "vfmadd231ps zmm2, zmm24, zmm25",
        "vfmadd231ps zmm3, zmm24, zmm25",
        "vfmadd231ps zmm4, zmm24, zmm25",
        "vfmadd231ps zmm5, zmm24, zmm25",
        "vfmadd231ps zmm6, zmm24, zmm25",
        "vfmadd231ps zmm7, zmm24, zmm25",
        "vfmadd231ps zmm8, zmm24, zmm25",
        "vfmadd231ps zmm9, zmm24, zmm25",
        "vfmadd231ps zmm10, zmm24, zmm25",
        "vfmadd231ps zmm11, zmm24, zmm25",
        "vfmadd231ps zmm12, zmm24, zmm25",
        "vfmadd231ps zmm13, zmm24, zmm25",
        "vfmadd231ps zmm14, zmm24, zmm25",
        "vfmadd231ps zmm15, zmm24, zmm25",
        "vfmadd231ps zmm16, zmm24, zmm25",
        "vfmadd231ps zmm17, zmm24, zmm25",
        "vfmadd231ps zmm18, zmm24, zmm25",
        "vfmadd231ps zmm19, zmm24, zmm25",
        "vfmadd231ps zmm20, zmm24, zmm25",
        "vfmadd231ps zmm21, zmm24, zmm25",
        "vfmadd231ps zmm22, zmm24, zmm25",
        "vfmadd231ps zmm23, zmm24, zmm25",
        "dec {n}",
        "jnz 2b",
        "vzeroupper",
        m = in(reg) &1e-3f32,
        a = in(reg) &1e-4f32,
        n = inout(reg) trips.max(1) => _,
        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
        out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
        out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
        out("zmm24") _, out("zmm25") _,
        options(nostack),
    );
}

/// Runs `trips` trips of `isa`'s FMA loop on each of `threads` threads of the current pool at
/// once; returns the FLOPs done, or `None` when this CPU lacks `isa` (or for the portable
/// rung). For a benchmark harness that does its own timing.
pub fn fma_loops(isa: Isa, threads: usize, trips: u64) -> Option<u64> {
    if isa == Isa::Portable || isa > super::cpu_isa() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (fmas, lanes) = shape(isa);
        let threads = threads.max(1);
        // SAFETY: the CPU has `isa` (checked above).
        (0..threads)
            .into_par_iter()
            .for_each(|_| unsafe { fma_loop(isa, trips) });
        Some(2 * lanes * fmas * trips.max(1) * threads as u64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, trips);
        None
    }
}

/// The FMA peak of `isa` in GFLOP/s with `threads` threads of the current pool each running
/// the loop for about `seconds`: the best of three rounds. `None` when this CPU lacks `isa`
/// (or for the portable rung, which has no FMA loop).
pub fn fma_peak(isa: Isa, threads: usize, seconds: f64) -> Option<f64> {
    if isa == Isa::Portable || isa > super::cpu_isa() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (fmas, lanes) = shape(isa);
        // SAFETY: the CPU has `isa` (checked above).
        let run = |trips| unsafe { fma_loop(isa, trips) };
        Some(best_rate(&run, 2 * lanes * fmas, threads, seconds))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, seconds);
        None
    }
}

/// The peak of the AMX engine in f32 GFLOP/s (its bf16 tile products' rate over the six each
/// f32 product takes), with `threads` threads each running [`super::amx`]'s product loop for
/// about `seconds`: the best of three rounds. `None` where the products do not run on the
/// tiles (no AMX, or `VITRS_AMX=0`; measured also while [`super::amx::adapt`] has the FMA
/// kernel running them). Also returns the bf16 rate itself.
pub fn amx_peak(threads: usize, seconds: f64) -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::amx;
        if !amx::available() {
            return None;
        }
        // SAFETY: the tile unit is enabled (checked above).
        let run = |trips| unsafe { amx::peak_loop(trips) };
        let bf16 = best_rate(
            &run,
            amx::PEAK_PRODUCTS * amx::PRODUCT_FLOPS,
            threads,
            seconds,
        );
        Some((bf16 / amx::PIECE_PRODUCTS as f64, bf16))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, seconds);
        None
    }
}

/// How much faster the tile unit is than the AVX-512 FMA units right now: its f32 rate (see
/// [`amx_peak`]) over the FMA peak, each the best of a few short runs (0.1–0.25 ms in all)
/// on every compute thread, the slowest thread's ratio ([`super::amx::adapt`]'s measure: the
/// threads split a product evenly, so the slowest sets its pace). `None` where the tiles
/// cannot run the products.
pub fn tile_advantage() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        if !super::amx::available() {
            return None;
        }
        // Positive floats order as their bits do.
        let worst = AtomicU64::new(f64::INFINITY.to_bits());
        super::team::for_each(super::team::threads(), |_| {
            if let Some(r) = tile_advantage_on_this_thread() {
                worst.fetch_min(r.to_bits(), Relaxed);
            }
        });
        let r = f64::from_bits(worst.into_inner());
        r.is_finite().then_some(r)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`tile_advantage`] on the calling thread alone (see `tile_advantage_here`): `None`
/// where the tile unit may not run.
pub(crate) fn tile_advantage_on_this_thread() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !super::amx::available() {
            return None;
        }
        // SAFETY: the tiles may run (checked above), on an AVX-512 CPU.
        let r = unsafe { tile_advantage_here() };
        r.is_finite().then_some(r)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The [`tile_advantage`] from which the adaptive engine runs the products on the tile unit,
/// and below which it moves them back to the FMA kernel (see [`super::amx::TILES_ON_FROM`]);
/// infinite where there is no tile unit.
pub fn tile_thresholds() -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    return (super::amx::TILES_ON_FROM, super::amx::TILES_OFF_BELOW);
    #[cfg(not(target_arch = "x86_64"))]
    (f64::INFINITY, f64::INFINITY)
}

/// [`tile_advantage`] on the calling thread: the best of six runs of 2048 tile products
/// (about 14 µs each at full speed) and of three of 24 K AVX-512 FMAs (about 5 µs). A tile
/// unit that was idle comes up to speed over the first 50–150 µs of products (on a Xeon
/// whose full speed was 2.35 bf16 TFLOP/s a core: 1.0–1.5, then 1.9, then 2.35 TFLOP/s, in
/// runs of 30 µs), so the best run is taken; one held back (another virtual machine's
/// hyperthread using it, or throttled) stays at 0.9–1.0 throughout.
///
/// # Safety
/// The CPU has AVX-512 and the tile unit, which this process may use.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_advantage_here() -> f64 {
    use super::amx;
    let best = |runs: usize, run: &dyn Fn()| {
        (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
            .max(1e-9)
    };
    const TILE_TRIPS: u64 = 256;
    const FMA_TRIPS: u64 = 1024;
    let tiles = best(6, &|| amx::peak_loop(TILE_TRIPS));
    let fmas = best(3, &|| fma_loop(Isa::Avx512, FMA_TRIPS));
    let (fmas_per_trip, lanes) = shape(Isa::Avx512);
    let tile_f32_flops =
        (TILE_TRIPS * amx::PEAK_PRODUCTS * amx::PRODUCT_FLOPS) as f64 / amx::PIECE_PRODUCTS as f64;
    let fma_flops = (FMA_TRIPS * fmas_per_trip * lanes * 2) as f64;
    (tile_f32_flops / tiles) / (fma_flops / fmas)
}

/// GFLOP/s of `run(trips)` (`flops_per_trip` each) on `threads` threads of the current pool
/// at once, the trips calibrated to about `seconds` on one thread: the best of three rounds.
#[cfg(target_arch = "x86_64")]
fn best_rate(run: &(dyn Fn(u64) + Sync), flops_per_trip: u64, threads: usize, seconds: f64) -> f64 {
    let probe = 1u64 << 16;
    let t = std::time::Instant::now();
    run(probe);
    let per_trip = t.elapsed().as_secs_f64() / probe as f64;
    let trips = ((seconds / per_trip.max(1e-12)) as u64).clamp(probe, 1 << 34);
    let threads = threads.max(1);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        (0..threads).into_par_iter().for_each(|_| run(trips));
        let secs = t.elapsed().as_secs_f64();
        let flops = (flops_per_trip * trips) as f64 * threads as f64;
        best = best.max(flops / secs / 1e9);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_measured_where_the_rung_exists() {
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            let p = fma_peak(isa, 1, 0.01);
            if isa == Isa::Portable || isa > crate::kernels::cpu_isa() {
                assert!(p.is_none());
            } else {
                // Any x86 core of the last decade: more than a GFLOP/s per thread.
                let p = p.unwrap();
                assert!(p.is_finite() && p > 1.0, "{isa:?}: {p}");
            }
        }
    }

    #[test]
    fn the_tile_peak_is_measured_where_the_tiles_run() {
        #[cfg(target_arch = "x86_64")]
        let on_tiles = crate::kernels::amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        let on_tiles = false;
        match amx_peak(1, 0.01) {
            Some((f32_rate, bf16)) => {
                assert!(on_tiles);
                // Six bf16 products per f32 one; any tile unit far above a GFLOP/s.
                assert!((bf16 / f32_rate - 6.0).abs() < 1e-9, "{bf16} / {f32_rate}");
                assert!(f32_rate.is_finite() && f32_rate > 10.0, "{f32_rate}");
                println!("tile unit: {f32_rate:.1} f32 GFLOP/s ({bf16:.1} bf16) on one thread");
            }
            None => assert!(!on_tiles),
        }
    }
}
