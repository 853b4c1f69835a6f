//! The parameter store: every weight in one flat `Vec<f32>`, with timm-named views.
//!
//! One buffer means the optimiser is one loop over one slice, save/load is one copy, and
//! gradients can mirror the layout exactly.

use std::collections::HashMap;
use std::ops::Range;

use crate::config::{Head, ViTConfig};

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    /// Canonical (timm) name, e.g. `blocks.0.attn.qkv.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Element range in the flat buffer.
    pub range: Range<usize>,
}

impl ParamEntry {
    /// Parameters that weight decay must not touch: position embedding, class token, norms
    /// and biases (the paper/timm convention).
    pub fn no_weight_decay(&self) -> bool {
        self.shape.len() <= 1 || self.name == "pos_embed" || self.name == "cls_token"
    }
}

/// A linear layer's views: weight `(out, in)`, optional bias `(out)`.
#[derive(Clone, Debug)]
pub(crate) struct LinearView {
    pub w: Range<usize>,
    pub b: Option<Range<usize>>,
    pub out: usize,
    pub inp: usize,
}

/// A LayerNorm's views: weight and bias `(D)`.
#[derive(Clone, Debug)]
pub(crate) struct NormView {
    pub w: Range<usize>,
    pub b: Range<usize>,
}

#[derive(Clone, Debug)]
pub(crate) struct BlockView {
    pub norm1: NormView,
    pub qkv: LinearView,
    pub proj: LinearView,
    pub norm2: NormView,
    pub fc1: LinearView,
    pub fc2: LinearView,
}

/// Where every parameter of a model lives, in forward order.
#[derive(Clone, Debug)]
pub(crate) struct ModelView {
    pub cls_token: Range<usize>,
    pub pos_embed: Range<usize>,
    pub patch_embed: LinearView,
    pub blocks: Vec<BlockView>,
    pub norm: Option<NormView>,
    pub fc_norm: Option<NormView>,
    pub pre_logits: Option<LinearView>,
    pub head: Option<LinearView>,
}

struct Builder {
    entries: Vec<ParamEntry>,
    len: usize,
}

impl Builder {
    fn add(&mut self, name: String, shape: Vec<usize>) -> Range<usize> {
        let n: usize = shape.iter().product();
        let range = self.len..self.len + n;
        self.len += n;
        self.entries.push(ParamEntry {
            name,
            shape,
            range: range.clone(),
        });
        range
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> LinearView {
        let w = self.add(format!("{name}.weight"), vec![out, inp]);
        let b = bias.then(|| self.add(format!("{name}.bias"), vec![out]));
        LinearView { w, b, out, inp }
    }

    fn norm(&mut self, name: &str, d: usize) -> NormView {
        NormView {
            w: self.add(format!("{name}.weight"), vec![d]),
            b: self.add(format!("{name}.bias"), vec![d]),
        }
    }
}

/// The parameter layout of `cfg`: the named entries and the typed views used by the forward.
pub(crate) fn layout(cfg: &ViTConfig) -> (Vec<ParamEntry>, ModelView, usize) {
    let (d, m, c, p) = (cfg.width, cfg.mlp_dim, cfg.channels, cfg.patch_size);
    let mut bld = Builder {
        entries: Vec::new(),
        len: 0,
    };
    let cls_token = bld.add("cls_token".into(), vec![1, 1, d]);
    let pos_embed = bld.add("pos_embed".into(), vec![1, cfg.num_tokens(), d]);
    // The patch projection is a conv with kernel = stride = P: weight (D, C, P, P), which the
    // forward treats as a linear layer (D, C·P·P) over flattened patches.
    let pw = bld.add("patch_embed.proj.weight".into(), vec![d, c, p, p]);
    let pb = bld.add("patch_embed.proj.bias".into(), vec![d]);
    let patch_embed = LinearView {
        w: pw,
        b: Some(pb),
        out: d,
        inp: c * p * p,
    };
    let blocks = (0..cfg.depth)
        .map(|i| {
            let pre = format!("blocks.{i}");
            BlockView {
                norm1: bld.norm(&format!("{pre}.norm1"), d),
                qkv: bld.linear(&format!("{pre}.attn.qkv"), 3 * d, d, cfg.qkv_bias),
                proj: bld.linear(&format!("{pre}.attn.proj"), d, d, true),
                norm2: bld.norm(&format!("{pre}.norm2"), d),
                fc1: bld.linear(&format!("{pre}.mlp.fc1"), m, d, true),
                fc2: bld.linear(&format!("{pre}.mlp.fc2"), d, m, true),
            }
        })
        .collect();
    let norm = cfg.has_final_norm().then(|| bld.norm("norm", d));
    let fc_norm = cfg.fc_norm.then(|| bld.norm("fc_norm", d));
    let pre_logits = match cfg.head {
        Head::Linear => None,
        Head::PreLogits { hidden } => Some(bld.linear("pre_logits.fc", hidden, d, true)),
    };
    let head =
        (cfg.num_classes > 0).then(|| bld.linear("head", cfg.num_classes, cfg.feature_dim(), true));
    let view = ModelView {
        cls_token,
        pos_embed,
        patch_embed,
        blocks,
        norm,
        fc_norm,
        pre_logits,
        head,
    };
    (bld.entries, view, bld.len)
}

/// All parameters of a model in one buffer.
#[derive(Clone, Debug)]
pub struct Params {
    data: Vec<f32>,
    entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
}

impl Params {
    pub(crate) fn zeros(entries: Vec<ParamEntry>, len: usize) -> Self {
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Params {
            data: vec![0.0; len],
            entries,
            index,
        }
    }

    /// Every entry, in forward order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    pub fn entry(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entry(name).map(|e| &self.data[e.range.clone()])
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let r = self.entry(name)?.range.clone();
        Some(&mut self.data[r])
    }

    /// The whole flat buffer.
    pub fn flat(&self) -> &[f32] {
        &self.data
    }

    pub fn flat_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Total number of parameters.
    pub fn count(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn slice(&self, r: &Range<usize>) -> &[f32] {
        &self.data[r.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b16_has_the_published_parameter_count() {
        // timm's vit_base_patch16_224: 86,567,656 parameters.
        let cfg = ViTConfig::preset("B/16").unwrap();
        let (entries, _, len) = layout(&cfg);
        assert_eq!(len, 86_567_656);
        assert_eq!(entries.last().unwrap().name, "head.bias");
        let p = Params::zeros(entries, len);
        assert!(p.entry("pos_embed").unwrap().no_weight_decay());
        assert!(p.entry("blocks.3.norm1.weight").unwrap().no_weight_decay());
        assert!(!p
            .entry("blocks.3.attn.qkv.weight")
            .unwrap()
            .no_weight_decay());
    }
}
