//! `vit attention`: where the model looks (maps over images), or how far each head looks
//! (mean attention distance over a dataset, the paper's Fig. 7).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::json;
use vitrs::attnmap::{
    attention_map, image_attention, mean_attention_distance, HeadFusion, Method, Query,
};
use vitrs::data::loader::{Loader, LoaderConfig};
use vitrs::data::{Dataset, Subset};
use vitrs::preprocess::Preprocess;
use vitrs::viz::heatmap::{overlay, plot_distance, plot_rows, RgbImage, Row};
use vitrs::{Capture, Checkpoint, Tensor, ViT, Workspace};

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
    /// Checkpoint: a native .safetensors file, or a Hugging Face / timm directory.
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

pub(crate) fn attention(a: AttentionArgs) -> Result<u8> {
    let ck = crate::load(&a.model)?;
    if a.distance {
        return distance(&ck, &a);
    }
    if !(0.0..=1.0).contains(&a.alpha) {
        bail!("--alpha {} must be between 0 and 1", a.alpha);
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
    let method_name = a
        .method
        .to_possible_value()
        .map(|v| v.get_name().to_string());
    let rows = figure_rows(
        &ck.model,
        &ck.preprocess,
        &|i| ck.label(i),
        &a.images,
        &methods,
        a.alpha,
        a.json.then_some(method_name.as_deref().unwrap_or("")),
    )?;
    let title = format!(
        "{} - {}",
        a.model.display(),
        match query {
            Query::ClassToken => "class token's attention",
            Query::PatchMean => "mean patch attention (mean-pooled model)",
        }
    );
    plot_rows(&a.out, &title, &rows)?;
    eprintln!("wrote {}", a.out.display());
    Ok(0)
}

/// One figure row per image: the image as the model sees it, then one overlay per method.
/// With `json` (the method's name), also prints one JSON object per image.
pub(crate) fn figure_rows(
    model: &ViT,
    pre: &Preprocess,
    label_of: &dyn Fn(usize) -> String,
    images: &[PathBuf],
    methods: &[(String, Method)],
    alpha: f32,
    json: Option<&str>,
) -> Result<Vec<Row>> {
    let cfg = model.config();
    let query = Query::for_model(cfg);
    let mut ws = Workspace::new();
    let mut rows = vec![];
    for path in images {
        let x = pre.load(path)?;
        if x.shape()[0] != 1 {
            bail!(
                "{}: one image per --image (got a batch of {})",
                path.display(),
                x.shape()[0]
            );
        }
        let out = model.forward(
            &x,
            Capture {
                attentions: true,
                pre_logits: false,
            },
            &mut ws,
        )?;
        let att = out
            .attentions
            .context("the forward pass returned no attention maps")?;
        let att = image_attention(cfg, att.data(), 1, 0);
        let (best, p) = vitrs::infer::top_k(out.logits.data(), 1)
            .first()
            .copied()
            .unwrap_or((0, 0.0));
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        let label = if cfg.num_classes > 0 {
            format!("{name}: {} ({p:.2})", label_of(best))
        } else {
            name
        };
        let shown = display_image(pre, &x);
        let mut panels = vec![("image".to_string(), shown.clone())];
        let mut maps_json = vec![];
        for (caption, m) in methods {
            let map = attention_map(cfg, &att, *m)?;
            panels.push((
                caption.clone(),
                overlay(&shown, &map.normalized(), map.grid, alpha),
            ));
            let (gh, gw) = map.grid;
            let grid: Vec<&[f32]> = map.values.chunks(gw).take(gh).collect();
            maps_json.push(json!({"map": caption, "values": grid}));
        }
        if let Some(method) = json {
            let prediction = if cfg.num_classes > 0 {
                json!({"class": best, "label": label_of(best), "prob": p})
            } else {
                json!(null)
            };
            let query = match query {
                Query::ClassToken => "class_token",
                Query::PatchMean => "patch_mean",
            };
            println!(
                "{}",
                json!({
                    "image": path,
                    "prediction": prediction,
                    "method": method,
                    "query": query,
                    "grid": [cfg.grid().0, cfg.grid().1],
                    "maps": maps_json,
                })
            );
        }
        rows.push(Row { label, panels });
    }
    Ok(rows)
}

fn fusion_name(f: Fusion) -> &'static str {
    match f {
        Fusion::Mean => "mean",
        Fusion::Max => "max",
        Fusion::Min => "min",
    }
}

/// The model's input as a picture: the preprocessed tensor `(1, C, H, W)` with the
/// normalisation undone, enlarged to about 224 px.
fn display_image(p: &Preprocess, x: &Tensor) -> RgbImage {
    let (c, h, w) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    let mut planes = vec![0u8; c * h * w];
    for ch in 0..c {
        let (m, s) = (p.mean[ch], p.std[ch]);
        for i in 0..h * w {
            let v = (x.data()[ch * h * w + i] * s + m) / p.rescale;
            planes[ch * h * w + i] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    let img = RgbImage::from_planes(&planes, (c, h, w));
    let scale = (224 / h.max(w)).max(1);
    img.scaled(scale)
}

fn distance(ck: &Checkpoint, a: &AttentionArgs) -> Result<u8> {
    let Some(dataset) = &a.dataset else {
        bail!("--distance needs --dataset (a name such as fashion-mnist, or a directory)");
    };
    let cfg = ck.model.config().clone();
    let size = (cfg.channels, cfg.image_height, cfg.image_width);
    let data = vitrs::data::open(dataset, vitrs::data::Split::Test, size)?;
    if data.shape() != size {
        bail!(
            "dataset images are {:?} (C, H, W) but the model takes {size:?}",
            data.shape()
        );
    }
    let n = a.limit.min(data.len()).max(1);
    let first: Arc<dyn Dataset> = Arc::new(Subset::new(data, (0..n).collect()));
    let (mean, std) = (&ck.preprocess.mean, &ck.preprocess.std);
    let loader = Loader::new(
        first,
        LoaderConfig::in_order(32, mean, std, cfg.num_classes.max(1)),
    )?;
    let mut ws = Workspace::new();
    let mut total = vec![0.0f64; cfg.depth * cfg.heads];
    for batch in loader {
        let batch = batch?;
        let (x, b) = (&batch.images, batch.labels.len());
        let out = ck.model.forward(
            x,
            Capture {
                attentions: true,
                pre_logits: false,
            },
            &mut ws,
        )?;
        let att = out.attentions.context("no attention maps captured")?;
        let d = mean_attention_distance(&cfg, att.data(), b);
        for (t, v) in total.iter_mut().zip(d) {
            *t += v * b as f64;
        }
    }
    total.iter_mut().for_each(|v| *v /= n as f64);
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
    eprintln!("wrote {}", Path::new(&a.out).display());
    Ok(0)
}
