//! `vit info`: what a checkpoint is — format, architecture, size, cost, preprocessing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use vitrs::checkpoint::Checkpoint;
use vitrs::model::resnet::ResNet;
use vitrs::model::Net;

#[derive(clap::Args)]
pub(crate) struct InfoArgs {
    /// Checkpoint: a native .safetensors file, a Hugging Face / timm directory, or a hub id
    /// (`ORG/NAME[@REVISION]`) found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: InfoArgs) -> Result<u8> {
    let ck = vitrs::checkpoint::load_net(&a.model).context("cannot load model")?;
    if let Net::ResNet(m) = &ck.model {
        return resnet(&ck, m, a.json);
    }
    let ck = ck.map_model(|m| m.into_vit("vit info"))?;
    let cfg = ck.model.config();
    let gflops = cfg.flops_per_image() / 1e9;
    let params = ck.model.params().count();
    let kernels = vitrs::kernels::isa().name();
    if a.json {
        let v = json!({
            "format": ck.report.format,
            "weights": ck.report.weights,
            "config": cfg,
            "parameters": params,
            "gflops_per_image": gflops,
            "preprocess": ck.preprocess,
            "labels": ck.labels,
            "conversions": ck.report.conversions,
            "unexpected": ck.report.unexpected,
            "kernels": kernels,
            "gemm": vitrs::kernels::gemm_engine(),
            "gemm_adaptive": vitrs::kernels::gemm_adaptive(),
        });
        println!("{v}");
        return Ok(0);
    }
    let (gh, gw) = cfg.grid();
    println!("format:        {}", ck.report.format);
    println!("weights:       {}", ck.report.weights.display());
    println!(
        "architecture:  D={} L={} heads={} MLP={} patch={} ({}x{} grid, {} tokens)",
        cfg.width,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.patch_size,
        gh,
        gw,
        cfg.num_tokens()
    );
    println!("tokens:        {}", cfg.token_summary());
    println!(
        "input:         {}x{}x{} (C x H x W)",
        cfg.channels, cfg.image_height, cfg.image_width
    );
    println!(
        "options:       pool={:?} head={:?} norm={:?} gelu={:?} qkv_bias={} fc_norm={} eps={:e}",
        cfg.pool, cfg.head, cfg.norm, cfg.gelu, cfg.qkv_bias, cfg.fc_norm, cfg.layer_norm_eps
    );
    println!("classes:       {}", cfg.num_classes);
    println!("parameters:    {params} ({:.2} M)", params as f64 / 1e6);
    println!("cost:          {gflops:.3} GFLOP per image");
    print_preprocess(&ck.preprocess, ck.labels.as_deref());
    for c in &ck.report.conversions {
        println!("conversion:    {c}");
    }
    for u in &ck.report.unexpected {
        println!("unused:        {u}");
    }
    println!("kernels:       {kernels} (this CPU's path; VITRS_KERNELS=portable forces the portable one)");
    println!("gemm:          {}", gemm_line());
    Ok(0)
}

/// `vit info` of a ResNet baseline model.
fn resnet(ck: &Checkpoint<Net>, m: &ResNet, json: bool) -> Result<u8> {
    let cfg = m.config();
    let gflops = m.flops_per_image() / 1e9;
    let params = m.params().count();
    if json {
        let v = json!({
            "format": ck.report.format,
            "weights": ck.report.weights,
            "arch": "resnet",
            "config": cfg,
            "kernels": vitrs::kernels::isa().name(),
            "gemm": vitrs::kernels::gemm_engine(),
            "gemm_adaptive": vitrs::kernels::gemm_adaptive(),
            "parameters": params,
            "gflops_per_image": gflops,
            "preprocess": ck.preprocess,
            "labels": ck.labels,
            "conversions": ck.report.conversions,
        });
        println!("{v}");
        return Ok(0);
    }
    println!("format:        {}", ck.report.format);
    println!("weights:       {}", ck.report.weights.display());
    println!(
        "architecture:  {} (CIFAR ResNet, option A shortcuts, batch norm eps {:e} momentum {})",
        ck.model.describe(),
        cfg.bn_eps,
        cfg.bn_momentum
    );
    println!(
        "input:         {}x{}x{} (C x H x W)",
        cfg.channels, cfg.image_height, cfg.image_width
    );
    println!("classes:       {}", cfg.num_classes);
    println!("parameters:    {params} ({:.2} M)", params as f64 / 1e6);
    println!("cost:          {gflops:.3} GFLOP per image");
    print_preprocess(&ck.preprocess, ck.labels.as_deref());
    println!("kernels:       {}", vitrs::kernels::isa().name());
    println!("gemm:          {}", gemm_line());
    Ok(0)
}

/// What runs the matrix products, and how to pin it, for `vit info`.
fn gemm_line() -> String {
    let engine = vitrs::kernels::gemm_engine();
    if vitrs::kernels::gemm_adaptive() {
        format!(
            "{engine}, moved to fma while the AMX tile unit runs slower than the FMA units (a busy neighbour on its core); VITRS_AMX=1 keeps the tiles, VITRS_AMX=0 the FMA kernel"
        )
    } else {
        format!("{engine} (VITRS_AMX=0 keeps AMX CPUs on the FMA kernel)")
    }
}

/// The preprocessing and the first labels, as both architectures print them.
fn print_preprocess(p: &vitrs::preprocess::Preprocess, labels: Option<&[String]>) {
    println!(
        "preprocess:    {:?}, {:?}, rescale {:.6}, mean {:?}, std {:?}",
        p.resize, p.interpolation, p.rescale, p.mean, p.std
    );
    if let Some(l) = labels {
        let shown: Vec<&str> = l.iter().take(5).map(String::as_str).collect();
        println!(
            "labels:        {}{}",
            shown.join(", "),
            if l.len() > 5 { ", ..." } else { "" }
        );
    }
}
