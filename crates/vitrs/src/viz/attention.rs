//! Attention figures: each image as the model sees it (the preprocessing undone), its
//! prediction, and its attention maps drawn over it — one figure row per image, for
//! `vit attention` and `vit demo`. The maps themselves are computed by [`crate::attnmap`].

use std::path::{Path, PathBuf};

use super::heatmap::{overlay, RgbImage, Row};
use crate::attnmap::{attention_map, image_attention, AttentionMap, Method};
use crate::error::{Error, Result};
use crate::model::{Capture, ViT, Workspace};
use crate::preprocess::Preprocess;
use crate::tensor::Tensor;

/// One explained image.
pub struct Explained {
    pub input: PathBuf,
    /// Top class and its probability (none for a model without a classifier).
    pub prediction: Option<(usize, f32)>,
    /// Each method's caption and map, in the order asked for.
    pub maps: Vec<(String, AttentionMap)>,
    /// The figure row: the image, then one overlay per map.
    pub row: Row,
}

/// Runs `model` on each image (one image per file) with its attention captured and computes
/// every `(caption, method)` map; the overlays blend the colour map at opacity `alpha`.
/// `label_of` names a class in the row's label.
pub fn explain(
    model: &ViT,
    pre: &Preprocess,
    label_of: &dyn Fn(usize) -> String,
    images: &[PathBuf],
    methods: &[(String, Method)],
    alpha: f32,
) -> Result<Vec<Explained>> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::BadInput(format!(
            "overlay opacity {alpha} must be between 0 and 1"
        )));
    }
    let cfg = model.config();
    let mut ws = Workspace::new();
    let mut out = vec![];
    for path in images {
        let x = pre.load(path)?;
        if x.shape()[0] != 1 {
            return Err(Error::BadInput(format!(
                "{}: one image per file (got a batch of {})",
                path.display(),
                x.shape()[0]
            )));
        }
        let capture = Capture {
            attentions: true,
            pre_logits: false,
        };
        let fwd = model.forward(&x, capture, &mut ws)?;
        let att = fwd
            .attentions
            .ok_or_else(|| Error::BadInput("the forward pass captured no attention".into()))?;
        let att = image_attention(cfg, att.data(), 1, 0);
        let prediction = (cfg.num_classes > 0)
            .then(|| crate::infer::top_k(fwd.logits.data(), 1).first().copied())
            .flatten();
        let name = file_name(path);
        let label = match prediction {
            Some((best, p)) => format!("{name}: {} ({p:.2})", label_of(best)),
            None => name,
        };
        let shown = display_image(pre, &x);
        let mut panels = vec![("image".to_string(), shown.clone())];
        let mut maps = vec![];
        for (caption, m) in methods {
            let map = attention_map(cfg, &att, *m)?;
            panels.push((
                caption.clone(),
                overlay(&shown, &map.normalized(), map.grid, alpha),
            ));
            maps.push((caption.clone(), map));
        }
        out.push(Explained {
            input: path.clone(),
            prediction,
            maps,
            row: Row { label, panels },
        });
    }
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

/// The model's input as a picture: the preprocessed tensor `(1, C, H, W)` with the
/// normalisation undone, enlarged to about 224 px.
pub fn display_image(p: &Preprocess, x: &Tensor) -> RgbImage {
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
