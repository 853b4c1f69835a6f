//! `vit demo`: the two-minute tour ([`vitrs::demo`]), printed.

use std::path::PathBuf;

use anyhow::Result;
use vitrs::demo::{Demo, OUTPUTS};
use vitrs::train::trainer::MODEL;

use crate::progress::Bar;

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "demo-out")]
    out: PathBuf,
}

pub(crate) fn run(a: DemoArgs) -> Result<u8> {
    let demo = Demo::new(&a.out)?;
    eprintln!("vit demo: training a small ViT on {}", demo.source);
    let mut bar = Bar::new();
    let report = demo.run(&mut bar);
    bar.finish();
    let report = report?;
    for e in &report.examples {
        println!(
            "{:<28} true {:<12} predicted {:<12} ({:.2}){}",
            e.image.display().to_string(),
            e.truth,
            e.predicted,
            e.prob,
            if e.truth == e.predicted {
                ""
            } else {
                "  <- wrong"
            }
        );
    }
    println!(
        "\ntest top-1 {:.2}% on {} images",
        100.0 * report.result.top1,
        report.result.n
    );
    for (what, f) in OUTPUTS {
        println!("{what:<17} {}", a.out.join(f).display());
    }
    println!(
        "try: vit predict --model {} {}",
        a.out.join(MODEL).display(),
        report.images.display()
    );
    Ok(0)
}
