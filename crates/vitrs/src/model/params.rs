//! The parameter store: every weight in one flat `Vec<f32>`, with timm-named views.
//!
//! One buffer means the optimiser is one loop over one slice, save/load is one copy, and
//! gradients can mirror the layout exactly.

use std::collections::HashMap;
use std::ops::Range;

use crate::config::{Head, Pool, ViTConfig};

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
        self.shape.len() <= 1
            || matches!(
                self.name.as_str(),
                "pos_embed" | "cls_token" | "dist_token" | "reg_token" | "attn_pool.latent"
            )
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
    /// LayerScale gains `(D)` of the attention and MLP branches.
    pub ls1: Option<Range<usize>>,
    pub ls2: Option<Range<usize>>,
}

impl BlockView {
    /// The block's parameters, contiguous in the flat buffer: first to last entry.
    pub fn span(&self) -> Range<usize> {
        let mut all = vec![
            self.norm1.w.clone(),
            self.norm1.b.clone(),
            self.qkv.w.clone(),
            self.proj.w.clone(),
            self.norm2.w.clone(),
            self.norm2.b.clone(),
            self.fc1.w.clone(),
            self.fc2.w.clone(),
        ];
        all.extend(
            [
                &self.qkv.b,
                &self.proj.b,
                &self.fc1.b,
                &self.fc2.b,
                &self.ls1,
                &self.ls2,
            ]
            .into_iter()
            .flatten()
            .cloned(),
        );
        let start = all.iter().map(|r| r.start).min().unwrap_or(0);
        let end = all.iter().map(|r| r.end).max().unwrap_or(0);
        start..end
    }
}

/// Attention pooling (timm `AttentionPoolLatent`): a learned query `latent (1, 1, D)`, its
/// projection `q (D, D)`, keys/values of every token `kv (2D, D)`, output `proj (D, D)`, then
/// `x + fc2(GELU(fc1(norm(x))))`.
#[derive(Clone, Debug)]
pub(crate) struct MapView {
    pub latent: Range<usize>,
    pub q: LinearView,
    pub kv: LinearView,
    pub proj: LinearView,
    pub norm: NormView,
    pub fc1: LinearView,
    pub fc2: LinearView,
}

/// Where every parameter of a model lives, in forward order.
#[derive(Clone, Debug)]
pub(crate) struct ModelView {
    /// `(1, 1, D)` each, when the config has them.
    pub cls_token: Option<Range<usize>>,
    pub dist_token: Option<Range<usize>>,
    /// `(1, R, D)`.
    pub reg_token: Option<Range<usize>>,
    /// `(1, pos_tokens, D)`.
    pub pos_embed: Range<usize>,
    pub patch_embed: LinearView,
    pub blocks: Vec<BlockView>,
    pub norm: Option<NormView>,
    pub attn_pool: Option<MapView>,
    pub fc_norm: Option<NormView>,
    pub pre_logits: Option<LinearView>,
    pub head: Option<LinearView>,
    /// DeiT's classifier of the distillation token.
    pub head_dist: Option<LinearView>,
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
    let cls_token = cfg
        .class_token
        .then(|| bld.add("cls_token".into(), vec![1, 1, d]));
    let dist_token = cfg
        .distilled
        .then(|| bld.add("dist_token".into(), vec![1, 1, d]));
    let reg_token =
        (cfg.reg_tokens > 0).then(|| bld.add("reg_token".into(), vec![1, cfg.reg_tokens, d]));
    let pos_embed = bld.add("pos_embed".into(), vec![1, cfg.pos_tokens(), d]);
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
            let ls = cfg.layer_scale.is_some();
            let norm1 = bld.norm(&format!("{pre}.norm1"), d);
            let qkv = bld.linear(&format!("{pre}.attn.qkv"), 3 * d, d, cfg.qkv_bias);
            let proj = bld.linear(&format!("{pre}.attn.proj"), d, d, true);
            let ls1 = ls.then(|| bld.add(format!("{pre}.ls1.gamma"), vec![d]));
            let norm2 = bld.norm(&format!("{pre}.norm2"), d);
            let fc1 = bld.linear(&format!("{pre}.mlp.fc1"), m, d, true);
            let fc2 = bld.linear(&format!("{pre}.mlp.fc2"), d, m, true);
            let ls2 = ls.then(|| bld.add(format!("{pre}.ls2.gamma"), vec![d]));
            BlockView {
                norm1,
                qkv,
                proj,
                norm2,
                fc1,
                fc2,
                ls1,
                ls2,
            }
        })
        .collect();
    let norm = cfg.has_final_norm().then(|| bld.norm("norm", d));
    let attn_pool = (cfg.pool == Pool::Map).then(|| MapView {
        latent: bld.add("attn_pool.latent".into(), vec![1, 1, d]),
        q: bld.linear("attn_pool.q", d, d, true),
        kv: bld.linear("attn_pool.kv", 2 * d, d, true),
        proj: bld.linear("attn_pool.proj", d, d, true),
        norm: bld.norm("attn_pool.norm", d),
        fc1: bld.linear("attn_pool.mlp.fc1", m, d, true),
        fc2: bld.linear("attn_pool.mlp.fc2", d, m, true),
    });
    let fc_norm = cfg.fc_norm.then(|| bld.norm("fc_norm", d));
    let pre_logits = match cfg.head {
        Head::Linear => None,
        Head::PreLogits { hidden } => Some(bld.linear("pre_logits.fc", hidden, d, true)),
    };
    let head =
        (cfg.num_classes > 0).then(|| bld.linear("head", cfg.num_classes, cfg.feature_dim(), true));
    let head_dist = (cfg.num_classes > 0 && cfg.distilled)
        .then(|| bld.linear("head_dist", cfg.num_classes, cfg.feature_dim(), true));
    let view = ModelView {
        cls_token,
        dist_token,
        reg_token,
        pos_embed,
        patch_embed,
        blocks,
        norm,
        attn_pool,
        fc_norm,
        pre_logits,
        head,
        head_dist,
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
        // Mapped lazily (zeroed pages), so the advice comes before any page is touched.
        let data = vec![0.0; len];
        crate::alloc::advise_huge_pages(&data);
        Params {
            data,
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

    #[test]
    fn timm_families_have_their_published_parameter_counts() {
        // Counted with timm 1.0.31 (`sum(p.numel() for p in model.parameters())`), names too.
        for (arch, count, names) in [
            (
                "deit_tiny_distilled_patch16_224",
                5_910_800,
                &["dist_token", "head_dist.weight"][..],
            ),
            (
                "deit3_small_patch16_224",
                22_059_496,
                &["blocks.11.ls2.gamma"],
            ),
            (
                "vit_base_patch16_reg4_gap_256",
                86_615_272,
                &["reg_token", "fc_norm.bias"],
            ),
            (
                "vit_base_patch16_siglip_224",
                93_653_224,
                &[
                    "attn_pool.latent",
                    "attn_pool.kv.weight",
                    "attn_pool.mlp.fc2.bias",
                ],
            ),
        ] {
            let cfg = ViTConfig::preset(arch).unwrap();
            let (entries, _, len) = layout(&cfg);
            assert_eq!(len, count, "{arch}");
            for n in names {
                assert!(entries.iter().any(|e| e.name == *n), "{arch}: {n}");
            }
        }
    }
}
