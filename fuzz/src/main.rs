//! `vitrs-fuzz TARGET|all [--seconds N] [--seed S] [--out DIR]`: fuzzes vitrs' parsers and
//! prints one line per target; exits 1 if anything panicked or held unbounded memory.
//! See `fuzz/README.md`.

use std::path::PathBuf;
use std::time::Duration;

use vitrs_fuzz::{campaign, Counting, Target, ALL};

#[global_allocator]
static ALLOC: Counting = Counting;

const USAGE: &str = "usage: vitrs-fuzz TARGET|all [--seconds N] [--seed S] [--out DIR]
targets: safetensors npz torch timm-config hf-config idx cifar image";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fail = |m: &str| -> ! {
        eprintln!("error: {m}\n{USAGE}");
        std::process::exit(2)
    };
    let Some(which) = args.first() else {
        fail("no target")
    };
    let targets: Vec<Target> = if which == "all" {
        ALL.to_vec()
    } else {
        vec![Target::parse(which).unwrap_or_else(|| fail(&format!("unknown target `{which}`")))]
    };
    let (mut seconds, mut seed, mut out) = (60u64, 1u64, PathBuf::from("fuzz/findings"));
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| fail(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--seconds" => seconds = val().parse().unwrap_or_else(|_| fail("bad --seconds")),
            "--seed" => seed = val().parse().unwrap_or_else(|_| fail("bad --seed")),
            "--out" => out = PathBuf::from(val()),
            _ => fail(&format!("unknown option `{a}`")),
        }
    }
    let mut found = 0;
    for t in targets {
        eprintln!(
            "fuzzing {} for {seconds} s (should the process die, the input that killed it is \
             in /dev/shm/vitrs-fuzz-{}-{seed}-{}/current.bin)",
            t.name(),
            t.name(),
            std::process::id()
        );
        let r = campaign(t, Duration::from_secs(seconds), seed, &out);
        println!(
            "{:<12} {:>7.1} s  {:>9} inputs ({:>7.0}/s)  parsed {:>7}  refused {:>9}  max heap {:>6.1} MiB  findings {}",
            r.target,
            r.seconds,
            r.inputs,
            r.inputs as f64 / r.seconds.max(1e-9),
            r.parsed,
            r.refused,
            r.max_peak as f64 / (1 << 20) as f64,
            r.findings.len()
        );
        for f in &r.findings {
            let why = std::fs::read_to_string(f.with_extension("txt")).unwrap_or_default();
            println!("  {}: {}", f.display(), why.lines().next().unwrap_or(""));
        }
        found += r.findings.len();
    }
    std::process::exit(if found > 0 { 1 } else { 0 });
}
