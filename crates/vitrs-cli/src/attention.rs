//! `vit attention`: where the model looks (maps over images), or how far each head looks
//! (mean attention distance over a dataset, the paper's Fig. 7).

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use serde_json::json;
use vitrs::attnmap::{dataset_attention_distance, HeadFusion, Method, Query};
use vitrs::data::{open_for_model, ForModel, Split};
use vitrs::viz::attention::{explain, Explained};
use vitrs::viz::heatmap::{plot_distance, plot_rows};
use vitrs::{Checkpoint, ViTConfig};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MapMethod {
    /// Attention rollout through all layers (Abnar & Zuidema 2020).
    Rollout,
    /// One layer (the last unless --layer), heads fused (--head-fusion, mean by default).
    Mean,
    /// One head (--head), or a grid of every head of the layer.
    Head,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Fusion {
    Mean,
    Max,
    Min,
}

#[derive(clap::Args)]
pub(crate) struct AttentionArgs {
    /// Checkpoint: a native .safetensors file, a Hugging Face / timm directory, or a hub id
    /// (`ORG/NAME[@REVISION]`) found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Image(s) to explain; several give one row each in the PNG.
    #[arg(
        long = "image",
        value_name = "IMG",
        required_unless_present = "distance"
    )]
    images: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = MapMethod::Rollout)]
    method: MapMethod,
    /// Layer for `mean` and `head`, counted from 0 (default: the last).
    #[arg(long, value_name = "L")]
    layer: Option<usize>,
    /// Head for `head`, counted from 0 (default: a grid of every head).
    #[arg(long, value_name = "H")]
    head: Option<usize>,
    /// How heads are combined for `rollout` and `mean`.
    #[arg(long, value_enum, default_value_t = Fusion::Mean)]
    head_fusion: Fusion,
    /// Rollout only: zero this fraction of the weakest patch-to-patch weights per layer.
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    discard_ratio: f32,
    /// Opacity of the heat map over the image.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Print the raw grid values as JSON (one object per image) instead of only drawing.
    #[arg(long)]
    json: bool,
    /// Mean attention distance per head and layer over --dataset, plotted against depth.
    #[arg(long)]
    distance: bool,
    /// Dataset for --distance (test split): a name or a directory.
    #[arg(long, requires = "distance")]
    dataset: Option<String>,
    /// Images of the dataset used by --distance.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    limit: usize,
    /// Output PNG.
    #[arg(long, value_name = "FILE", default_value = "attention.png")]
    out: PathBuf,
}

pub(crate) fn run(a: AttentionArgs) -> Result<u8> {
    let ck = crate::load(&a.model)?;
    if a.distance {
        return distance(&ck, &a);
    }
    if !(0.0..=1.0).contains(&a.alpha) {
        usage!("--alpha {} must be between 0 and 1", a.alpha);
    }
    let cfg = ck.model.config().clone();
    let fusion = match a.head_fusion {
        Fusion::Mean => HeadFusion::Mean,
        Fusion::Max => HeadFusion::Max,
        Fusion::Min => HeadFusion::Min,
    };
    let layer = a.layer.unwrap_or(cfg.depth - 1);
    // Every map this run draws per image: (caption, method).
    let methods: Vec<(String, Method)> = match a.method {
        MapMethod::Rollout => vec![(
            format!("rollout ({})", fusion_name(a.head_fusion)),
            Method::Rollout {
                fusion,
                discard_ratio: a.discard_ratio,
            },
        )],
        MapMethod::Mean => vec![(
            format!("layer {layer}, heads {}", fusion_name(a.head_fusion)),
            Method::Mean { layer, fusion },
        )],
        MapMethod::Head => match a.head {
            Some(h) => vec![(
                format!("layer {layer} head {h}"),
                Method::Head { layer, head: h },
            )],
            None => (0..cfg.heads)
                .map(|h| (format!("head {h}"), Method::Head { layer, head: h }))
                .collect(),
        },
    };
    let query = Query::for_model(&cfg);
    eprintln!("showing {}", query.describe());
    let label_of = |i: usize| ck.label(i);
    let explained = explain(
        &ck.model,
        &ck.preprocess,
        &label_of,
        &a.images,
        &methods,
        a.alpha,
    )?;
    if a.json {
        let method = a
            .method
            .to_possible_value()
            .map(|v| v.get_name().to_string());
        for e in &explained {
            print_json(e, &cfg, query, method.as_deref().unwrap_or(""), &label_of);
        }
    }
    let title = format!(
        "{} - {}",
        a.model.display(),
        match query {
            Query::ClassToken => "class token's attention",
            Query::PatchMean => "mean patch attention (mean-pooled model)",
        }
    );
    let rows: Vec<_> = explained.into_iter().map(|e| e.row).collect();
    plot_rows(&a.out, &title, &rows)?;
    eprintln!("wrote {}", a.out.display());
    Ok(0)
}

/// One image's maps as one JSON line: `{"image", "prediction", "method", "query", "grid",
/// "maps": [{"map", "values": [[...], ...]}]}`.
fn print_json(
    e: &Explained,
    cfg: &ViTConfig,
    query: Query,
    method: &str,
    label_of: &dyn Fn(usize) -> String,
) {
    let prediction = match e.prediction {
        Some((best, p)) => json!({"class": best, "label": label_of(best), "prob": p}),
        None => json!(null),
    };
    let maps: Vec<_> = e
        .maps
        .iter()
        .map(|(caption, map)| {
            let (gh, gw) = map.grid;
            let grid: Vec<&[f32]> = map.values.chunks(gw).take(gh).collect();
            json!({"map": caption, "values": grid})
        })
        .collect();
    let query = match query {
        Query::ClassToken => "class_token",
        Query::PatchMean => "patch_mean",
    };
    println!(
        "{}",
        json!({
            "image": e.input,
            "prediction": prediction,
            "method": method,
            "query": query,
            "grid": [cfg.grid().0, cfg.grid().1],
            "maps": maps,
        })
    );
}

fn fusion_name(f: Fusion) -> &'static str {
    match f {
        Fusion::Mean => "mean",
        Fusion::Max => "max",
        Fusion::Min => "min",
    }
}

fn distance(ck: &Checkpoint, a: &AttentionArgs) -> Result<u8> {
    let Some(dataset) = &a.dataset else {
        usage!("--distance needs --dataset (a name such as fashion-mnist, or a directory)");
    };
    let cfg = ck.model.config().clone();
    let input = (cfg.channels, cfg.image_height, cfg.image_width);
    let data = open_for_model(
        dataset,
        Split::Test,
        (input, cfg.num_classes),
        &ForModel::default(),
    )?;
    let (mean, std) = (&ck.preprocess.mean, &ck.preprocess.std);
    let (total, n) = dataset_attention_distance(&ck.model, data, mean, std, a.limit)?;
    plot_distance(
        &a.out,
        &format!("mean attention distance, {n} images of {dataset}"),
        &total,
        (cfg.depth, cfg.heads),
        cfg.image_height.max(cfg.image_width) as f64,
    )?;
    let rows: Vec<&[f64]> = total.chunks(cfg.heads).collect();
    if a.json {
        println!(
            "{}",
            json!({"images": n, "layers": cfg.depth, "heads": cfg.heads, "distance_px": rows})
        );
    } else {
        println!(
            "mean attention distance (pixels) over {n} images; rows = layers, columns = heads"
        );
        for (l, r) in rows.iter().enumerate() {
            let cells: Vec<String> = r.iter().map(|v| format!("{v:6.2}")).collect();
            println!("  layer {l:>2}: {}", cells.join(" "));
        }
    }
    eprintln!("wrote {}", a.out.display());
    Ok(0)
}
