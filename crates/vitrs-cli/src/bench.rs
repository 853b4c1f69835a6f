//! `vit bench`: images per second and GFLOP/s of inference or a training step on this machine,
//! the engine's matrix product alone (`--gemm`), and the FMA peak they are measured against
//! (`--peak`).

use anyhow::{Context, Result};
use serde_json::json;
use vitrs::bench::{run as measure, GemmOp, Workload};
use vitrs::kernels::peak::{amx_peak, fma_peak};
use vitrs::kernels::{available_isas, isa, Isa};

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// A preset such as `B/16`, `S/16@384`, `vit_tiny_patch16_224`, a ResNet baseline
    /// (`resnet20`, `resnet20@28x1`: resnet{DEPTH}[w{WIDTH}][@{SIZE}[x{CHANNELS}]]), a
    /// checkpoint path, or a run config (.toml) whose `[model]` is used.
    #[arg(long, value_name = "PRESET|PATH", required_unless_present_any = ["gemm", "peak", "data"])]
    model: Option<String>,
    /// Time the data loader alone on a dataset (a name, a directory, shards): images per
    /// second decoded, augmented and normalised, on --workers threads. With --model RUN.toml,
    /// at its model's image size and with its `[augment]`; otherwise unaugmented, at the
    /// dataset's own size (folders and shards without one: --image-size).
    #[arg(long, value_name = "DATASET", conflicts_with = "gemm")]
    data: Option<String>,
    /// With --data: loader threads (each one core's worth of decoding).
    #[arg(long, default_value_t = 1, requires = "data")]
    workers: usize,
    /// With --data: the size images are decoded to, for datasets without a fixed one.
    #[arg(long, default_value_t = 224, requires = "data")]
    image_size: usize,
    /// Time a training step instead of inference.
    #[arg(long)]
    train: bool,
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch_size: usize,
    /// Time the engine's matrix products instead of a model: a linear layer with input
    /// `(M, K)` and weight `(N, K)`, `MxKxN` for its forward (`197x768x2304`), `dx:MxKxN` for
    /// its backward to the input, `dw:MxKxN` to the weight; several separated by commas.
    #[arg(long, value_name = "MxKxN,...", conflicts_with = "model")]
    gemm: Option<String>,
    /// With --gemm: forwards with the weight packed once beforehand, as `vit` does for
    /// repeated inference.
    #[arg(long, requires = "gemm")]
    packed: bool,
    /// Measure the FMA peak (GFLOP/s) of every instruction set this CPU has, on one thread
    /// and on all, and the AMX tile unit's where the products run there; with --model or
    /// --gemm, report efficiency against the running rung's FMA peak (and the tile unit's
    /// where the products run there).
    #[arg(long)]
    peak: bool,
    /// Timed repetitions (the median is reported, and the fastest beside it).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed warm-up repetitions.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// One JSON object (per product with --gemm) instead of text.
    #[arg(long)]
    json: bool,
}

/// `[fwd:|dx:|dw:]197x768x2304` as the product and (M, K, N).
fn parse_shape(s: &str) -> Result<(GemmOp, (usize, usize, usize))> {
    let (op, dims) = match s.split_once(':') {
        Some((op, dims)) => match GemmOp::parse(op.trim()) {
            Some(g) => (g, dims),
            None => usage!("--gemm `{s}`: `{op}` is not fwd, dx or dw"),
        },
        None => (GemmOp::Fwd, s),
    };
    let Ok(v) = dims
        .split('x')
        .map(|t| t.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
    else {
        usage!("--gemm `{s}`: expected MxKxN, e.g. 197x768x2304")
    };
    match v[..] {
        [m, k, n]
            if m > 0
                && k > 0
                && n > 0
                && m.checked_mul(k)
                    .and_then(|mk| mk.checked_mul(n))
                    .is_some_and(|v| v <= 1 << 36) =>
        {
            Ok((op, (m, k, n)))
        }
        _ => usage!("--gemm `{s}`: expected three positive sizes MxKxN, e.g. 197x768x2304"),
    }
}

/// `--data`: the loader alone.
fn loader(a: &BenchArgs, spec: &str) -> Result<u8> {
    let (size, augment) = match a.model.as_deref() {
        Some(m) if m.ends_with(".toml") => {
            let text = std::fs::read_to_string(m).with_context(|| format!("cannot read {m}"))?;
            let run = vitrs::train::RunConfig::from_toml(&text, m)?;
            let s = run.model.image_size.unwrap_or(a.image_size);
            let c = run.model.channels.unwrap_or(3);
            let size = vitrs::data::known_shape(spec).map_or((c, s, s), |(k, _)| (k.0, s, s));
            (size, run.augment)
        }
        Some(m) => usage!(
            "--data takes a run config (.toml) as --model for its size and [augment], not `{m}`"
        ),
        None => (
            vitrs::data::known_shape(spec).map_or((3, a.image_size, a.image_size), |(k, _)| k),
            Default::default(),
        ),
    };
    let bs = if a.batch_size > 1 { a.batch_size } else { 128 };
    let r = vitrs::bench::loader(spec, size, augment, bs, a.workers, a.iters)?;
    if a.json {
        println!("{}", serde_json::to_value(&r)?);
    } else {
        println!(
            "{} (loader, {}x{}x{}, batch {}, {} worker(s)): {:.0} images/s, {:.0} per worker (over {} batches){}",
            r.dataset,
            r.shape[0],
            r.shape[1],
            r.shape[2],
            r.batch_size,
            r.workers,
            r.images_per_sec,
            r.images_per_sec_per_worker,
            r.batches,
            if r.skipped > 0 {
                format!("; {} undecodable image(s) left out", r.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(0)
}

pub(crate) fn run(a: BenchArgs) -> Result<u8> {
    if let Some(spec) = a.data.clone() {
        return loader(&a, &spec);
    }
    let threads = rayon::current_num_threads();
    // The peak of the rung that runs, for efficiency figures.
    let peak = a.peak.then(|| fma_peak(isa(), threads, 0.5)).flatten();
    // And the tile unit's f32 peak where the products ran there (they run past the FMA
    // peak), measured after them.
    let tile_peak = |gemm: &str| {
        (a.peak && gemm.starts_with("amx"))
            .then(|| amx_peak(threads, 0.5))
            .flatten()
            .map(|(f32_peak, _)| f32_peak)
    };
    let shares = |gflops: f64, tiles: Option<f64>| -> String {
        let fma = peak.map(|p| format!("{:.0} % of the FMA peak", 100.0 * gflops / p));
        let tile = tiles.map(|p| format!("{:.0} % of the tile unit's", 100.0 * gflops / p));
        fma.into_iter().chain(tile).collect::<Vec<_>>().join(", ")
    };
    if let Some(spec) = &a.gemm {
        for s in spec.split(',') {
            let (op, dims) = parse_shape(s)?;
            let r = vitrs::bench::gemm(op, dims, a.packed, a.iters, a.warmup);
            let eff = peak.map(|p| r.gflops_per_sec / p);
            let tiles = tile_peak(r.gemm);
            if a.json {
                let mut v = serde_json::to_value(&r)?;
                v["peak_gflops_per_sec"] = json!(peak);
                v["efficiency"] = json!(eff);
                v["tile_peak_gflops_per_sec"] = json!(tiles);
                v["tile_efficiency"] = json!(tiles.map(|p| r.gflops_per_sec / p));
                println!("{v}");
            } else {
                println!(
                    "gemm {:?} {}x{}x{} ({}, {} thread(s), {} kernels, {} GEMM): {:.1} GFLOP/s, {:.3} ms (median of {}; best {:.3}){}",
                    r.op,
                    r.m,
                    r.k,
                    r.n,
                    if r.packed {
                        "weight packed once"
                    } else {
                        "packed per call"
                    },
                    r.threads,
                    r.kernels,
                    r.gemm,
                    r.gflops_per_sec,
                    r.median_seconds * 1e3,
                    r.iters,
                    r.best_seconds * 1e3,
                    eff.map(|_| format!(", {}", shares(r.gflops_per_sec, tiles)))
                        .unwrap_or_default()
                );
            }
        }
        return Ok(0);
    }
    let Some(model) = &a.model else {
        // --peak alone: every rung, one thread and all, then the tile unit's where it runs
        // the products.
        for rung in available_isas().into_iter().filter(|&r| r != Isa::Portable) {
            let one = fma_peak(rung, 1, 0.5);
            let all = fma_peak(rung, threads, 0.5);
            if a.json {
                println!(
                    "{}",
                    json!({"kernels": rung.name(), "threads": threads, "peak_gflops_per_sec_1_thread": one, "peak_gflops_per_sec": all})
                );
            } else {
                println!(
                    "{} FMA peak: {:.1} GFLOP/s on 1 thread, {:.1} on {threads}",
                    rung.name(),
                    one.unwrap_or(f64::NAN),
                    all.unwrap_or(f64::NAN)
                );
            }
        }
        if let (Some((one, one_bf16)), Some((all, all_bf16))) =
            (amx_peak(1, 0.5), amx_peak(threads, 0.5))
        {
            // What the adaptive engine's look reads now (see `kernels::adapt_engine`).
            let advantage = vitrs::kernels::peak::tile_advantage();
            if a.json {
                println!(
                    "{}",
                    json!({"kernels": "amx-bf16x6", "threads": threads, "peak_gflops_per_sec_1_thread": one, "peak_gflops_per_sec": all, "bf16_gflops_per_sec_1_thread": one_bf16, "bf16_gflops_per_sec": all_bf16, "tile_advantage": advantage})
                );
            } else {
                println!(
                    "amx-bf16x6 peak (the AMX tiles, six bf16 products per f32 one): {one:.1} GFLOP/s on 1 thread, {all:.1} on {threads} (bf16: {one_bf16:.1}, {all_bf16:.1})"
                );
                if let Some(r) = advantage {
                    let (on, off) = vitrs::kernels::peak::tile_thresholds();
                    let patience = vitrs::kernels::amx::MOVE_PATIENCE;
                    let pinned = if vitrs::kernels::gemm_adaptive() {
                        ""
                    } else {
                        " (pinned by VITRS_AMX here)"
                    };
                    println!(
                        "the tile unit runs {r:.2}× the AVX-512 FMA units' rate now (a short look on each thread); the products move to the tiles from {on:.2}× and back to the FMA kernel below {off:.2}× (where the weights packed for inference lack the other engine's packing, once it has been the faster for {patience} times as long as packing them takes){pinned}"
                    );
                }
            }
        }
        return Ok(0);
    };
    let mut w = Workload::from_spec(model)?;
    let r = measure(&mut w, a.train, a.batch_size, a.iters, a.warmup)?;
    let eff = peak.map(|p| r.gflops_per_sec / p);
    let tiles = tile_peak(r.gemm);
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["peak_gflops_per_sec"] = json!(peak);
        v["efficiency"] = json!(eff);
        v["tile_peak_gflops_per_sec"] = json!(tiles);
        v["tile_efficiency"] = json!(tiles.map(|p| r.gflops_per_sec / p));
        println!("{v}");
    } else {
        let what = if a.train {
            "training step"
        } else {
            "inference"
        };
        println!(
            "{model} ({what}): batch {}, {} thread(s), {} kernels, {} GEMM: {:.2} images/s, {:.1} ms per batch (median of {}; best {:.1}), {:.1} GFLOP/s{}",
            r.batch_size,
            r.threads,
            r.kernels,
            r.gemm,
            r.images_per_sec,
            r.median_batch_seconds * 1e3,
            r.iters,
            r.best_batch_seconds * 1e3,
            r.gflops_per_sec,
            eff.map(|_| format!(" ({})", shares(r.gflops_per_sec, tiles)))
                .unwrap_or_default()
        );
    }
    Ok(0)
}
