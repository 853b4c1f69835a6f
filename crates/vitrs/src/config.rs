//! `ViTConfig`: the architecture, as typed options, plus the preset table.
//!
//! Shapes use the legend of the [`crate::model`] module docs.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the encoder output is reduced to one vector per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The final \[class\] token (the paper; timm `global_pool='token'`).
    Cls,
    /// Mean over the patch tokens, prefix tokens (class, distillation, registers) excluded
    /// (timm `global_pool='avg'`, big_vision `pool_type='gap'`).
    Mean,
    /// Multi-head attention pooling: one learned query attends over every token, then a
    /// pre-norm MLP with a residual (timm `global_pool='map'`, big_vision `MAPHead`).
    Map,
}

/// The classification head on the pooled vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// A single linear layer (the paper's fine-tuning head).
    Linear,
    /// Dense to `hidden` + tanh, then linear (the paper's pre-training head; HF's pooler).
    PreLogits { hidden: usize },
}

/// Where each block's LayerNorms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// `x + f(LN(x))`: the paper and every released checkpoint; a final LayerNorm follows the blocks.
    Pre,
    /// `LN(x + f(x))`: the original Transformer; no final LayerNorm (the blocks end normalised).
    Post,
}

/// Which GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gelu {
    /// `x Φ(x)` with the exact error function (PyTorch `nn.GELU()`, timm, HF `"gelu"`).
    Exact,
    /// The tanh approximation (Flax's default, HF `"gelu_new"` / `"gelu_pytorch_tanh"`).
    Tanh,
}

/// The whole architecture of a ViT. Every checkpoint carries one; nothing is guessed from flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViTConfig {
    /// Input height H in pixels.
    pub image_height: usize,
    /// Input width W in pixels (may differ from H).
    pub image_width: usize,
    /// Patch side P; H and W must be multiples of it.
    pub patch_size: usize,
    /// Input channels C.
    pub channels: usize,
    /// Token width D.
    pub width: usize,
    /// Number of encoder blocks L.
    pub depth: usize,
    /// Attention heads nh; D must be a multiple.
    pub heads: usize,
    /// MLP hidden width M.
    pub mlp_dim: usize,
    /// Output classes K; 0 means no classifier (the forward returns the pooled features).
    pub num_classes: usize,
    pub pool: Pool,
    pub head: Head,
    pub norm: NormPlacement,
    pub gelu: Gelu,
    /// LayerNorm after pooling instead of before it (timm's `fc_norm`, used with mean pooling).
    #[serde(default)]
    pub fc_norm: bool,
    /// Whether the q/k/v projection has a bias (true in the paper and timm).
    pub qkv_bias: bool,
    /// LayerNorm epsilon: 1e-6 in timm/JAX checkpoints, 1e-12 in Hugging Face's.
    pub layer_norm_eps: f32,
    /// Whether a learned \[class\] token is prepended (the paper; timm `class_token`). Models
    /// without one pool with `mean` or `map` (big_vision, SigLIP, timm `*_gap`).
    #[serde(default = "default_true")]
    pub class_token: bool,
    /// DeiT's distillation token: a second prefix token read by its own classifier
    /// (`head_dist`); the logits are the mean of both heads, as DeiT evaluates.
    #[serde(default)]
    pub distilled: bool,
    /// Register tokens (Darcet et al. 2024, timm `reg_tokens`): learned prefix tokens that
    /// take part in attention and are read by nothing.
    #[serde(default)]
    pub reg_tokens: usize,
    /// Position embeddings cover the patches only and are added before the prefix tokens are
    /// prepended (timm `no_embed_class`: DeiT III, big_vision, register models).
    #[serde(default)]
    pub no_embed_class: bool,
    /// LayerScale (Touvron et al. 2021, timm `init_values`): a learned per-channel gain on
    /// each residual branch, initialised to this value.
    #[serde(default)]
    pub layer_scale: Option<f32>,
}

fn default_true() -> bool {
    true
}

/// The sizes of a ViT; [`ViTConfig::paper`] makes the paper's model of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// `(H, W)` in pixels.
    pub image: (usize, usize),
    pub channels: usize,
    pub patch: usize,
    /// D.
    pub width: usize,
    /// L.
    pub depth: usize,
    pub heads: usize,
    /// M.
    pub mlp: usize,
    /// K (0: no classifier).
    pub classes: usize,
}

/// One row of the preset table.
struct Variant {
    name: &'static str,
    long: &'static str,
    width: usize,
    depth: usize,
    heads: usize,
    mlp_dim: usize,
}

/// What a timm architecture name adds to the plain ViT of its size.
#[derive(Default)]
struct Extras {
    distilled: bool,
    reg_tokens: usize,
    gap: bool,
    map: bool,
    deit3: bool,
}

/// Model variants. B, L, H: Dosovitskiy et al. 2021, Table 1. Ti and S: Touvron et al. 2021
/// (DeiT), Table 1, the sizes timm names `tiny` and `small`.
const VARIANTS: &[Variant] = &[
    Variant {
        name: "Ti",
        long: "tiny",
        width: 192,
        depth: 12,
        heads: 3,
        mlp_dim: 768,
    },
    Variant {
        name: "S",
        long: "small",
        width: 384,
        depth: 12,
        heads: 6,
        mlp_dim: 1536,
    },
    Variant {
        name: "B",
        long: "base",
        width: 768,
        depth: 12,
        heads: 12,
        mlp_dim: 3072,
    },
    Variant {
        name: "L",
        long: "large",
        width: 1024,
        depth: 24,
        heads: 16,
        mlp_dim: 4096,
    },
    Variant {
        name: "H",
        long: "huge",
        width: 1280,
        depth: 32,
        heads: 16,
        mlp_dim: 5120,
    },
];

impl ViTConfig {
    /// The paper's ViT of these sizes: pre-norm blocks, a \[class\] token read by a linear head,
    /// learned position embeddings for every token, exact GELU, qkv bias, and LayerNorm eps
    /// 1e-6 (timm's and the JAX originals'). Every other option starts from here.
    pub fn paper(s: Sizes) -> Self {
        ViTConfig {
            image_height: s.image.0,
            image_width: s.image.1,
            patch_size: s.patch,
            channels: s.channels,
            width: s.width,
            depth: s.depth,
            heads: s.heads,
            mlp_dim: s.mlp,
            num_classes: s.classes,
            pool: Pool::Cls,
            head: Head::Linear,
            norm: NormPlacement::Pre,
            gelu: Gelu::Exact,
            fc_norm: false,
            qkv_bias: true,
            layer_norm_eps: 1e-6,
            class_token: true,
            distilled: false,
            reg_tokens: 0,
            no_embed_class: false,
            layer_scale: None,
        }
    }

    /// A preset: `"B/16"`, `"S/32@384"` (variant / patch @ resolution, default 224), or a timm
    /// architecture name (a `.tag` suffix is ignored):
    ///
    /// | timm name | model |
    /// |---|---|
    /// | `vit_base_patch16_224` | the paper's ViT |
    /// | `vit_base_patch16_reg4_gap_256` | 4 register tokens, no class token, mean pooling |
    /// | `vit_base_patch16_siglip_224` | no class token, attention pooling (MAP) |
    /// | `deit_tiny_patch16_224`, `deit_tiny_distilled_patch16_224` | DeiT, with the distillation token |
    /// | `deit3_small_patch16_224` | DeiT III: LayerScale, position embeddings for patches only |
    ///
    /// Classes default to 1000 (ImageNet) with timm's defaults: exact GELU, eps 1e-6, qkv bias.
    pub fn preset(name: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidConfig(format!(
                "unknown preset `{name}`: {why}; expected e.g. `B/16`, `Ti/16@384`, `vit_base_patch16_224`, \
                 `deit_small_distilled_patch16_224` or `vit_base_patch16_reg4_gap_256` \
                 (variants Ti, S, B, L, H; patch 8, 14, 16 or 32)"
            ))
        };
        let size = |long: &str| {
            VARIANTS
                .iter()
                .find(|v| v.long == long)
                .ok_or_else(|| bad("unknown size"))
        };
        // timm names: {vit,deit,deit3}_SIZE[_distilled]_patchP[_regN][_gap|_siglip]_RES
        let timm = ["vit_", "deit_", "deit3_"]
            .iter()
            .find_map(|f| name.strip_prefix(f).map(|rest| (&f[..f.len() - 1], rest)));
        let mut extra = Extras::default();
        let (variant, patch, res) = if let Some((family, rest)) = timm {
            let rest = rest.split('.').next().unwrap_or(rest);
            let parts: Vec<&str> = rest.split('_').collect();
            if parts.len() < 3 {
                return Err(bad("not of the form vit_SIZE_patchP_RES"));
            }
            let v = size(parts[0])?;
            let (mut patch, mut res) = (None, None);
            for (i, part) in parts.iter().enumerate().skip(1) {
                let last = i == parts.len() - 1;
                if let Some(p) = part.strip_prefix("patch") {
                    patch = Some(p.parse().map_err(|_| bad("bad patch"))?);
                } else if let Some(r) = part.strip_prefix("reg").filter(|r| !r.is_empty()) {
                    extra.reg_tokens = r.parse().map_err(|_| bad("bad register count"))?;
                } else if *part == "distilled" && family == "deit" {
                    extra.distilled = true;
                } else if *part == "gap" {
                    extra.gap = true;
                } else if *part == "siglip" {
                    extra.map = true;
                } else if last {
                    res = Some(part.parse().map_err(|_| bad("bad resolution"))?);
                } else {
                    return Err(bad(&format!("unsupported architecture part `{part}`")));
                }
            }
            extra.deit3 = family == "deit3";
            let patch = patch.ok_or_else(|| bad("missing patchP"))?;
            (v, patch, res.ok_or_else(|| bad("missing resolution"))?)
        } else {
            let (body, res) = match name.split_once('@') {
                Some((b, r)) => (b, r.parse().map_err(|_| bad("bad resolution"))?),
                None => (name, 224usize),
            };
            let (v, p) = body
                .split_once('/')
                .ok_or_else(|| bad("missing `/patch`"))?;
            let v = VARIANTS
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case(v) || x.long.eq_ignore_ascii_case(v))
                .ok_or_else(|| bad("unknown variant"))?;
            (v, p.parse().map_err(|_| bad("bad patch"))?, res)
        };
        if ![8, 14, 16, 32].contains(&patch) {
            return Err(bad("patch must be 8, 14, 16 or 32"));
        }
        if !(32..=4096).contains(&res) {
            return Err(bad("resolution must be between 32 and 4096"));
        }
        // 384 is not a multiple of 14: patch-14 models at "384" use the nearest grid that tiles,
        // 27 x 27 patches = 378 px (the CLIP/DINOv2 convention), since we never drop pixels.
        let res = res / patch * patch;
        let mut cfg = ViTConfig::paper(Sizes {
            image: (res, res),
            channels: 3,
            patch,
            width: variant.width,
            depth: variant.depth,
            heads: variant.heads,
            mlp: variant.mlp_dim,
            classes: 1000,
        });
        cfg.distilled = extra.distilled;
        cfg.reg_tokens = extra.reg_tokens;
        if extra.deit3 {
            // timm's deit3_*: no_embed_class=True, init_values=1e-6.
            cfg.no_embed_class = true;
            cfg.layer_scale = Some(1e-6);
        }
        if extra.gap {
            // timm's *_gap_* (with registers): class_token=False, no_embed_class=True,
            // global_pool='avg' (so fc_norm, no final norm).
            cfg.class_token = false;
            cfg.no_embed_class = true;
            cfg.pool = Pool::Mean;
            cfg.fc_norm = true;
        }
        if extra.map {
            // timm's *_siglip_*: class_token=False, global_pool='map'.
            cfg.class_token = false;
            cfg.pool = Pool::Map;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the options fit together; the error says which and why.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::InvalidConfig(m));
        if self.patch_size == 0 || self.channels == 0 || self.width == 0 || self.depth == 0 {
            return err("patch_size, channels, width and depth must all be at least 1".into());
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return err(format!(
                "width {} is not divisible by heads {}",
                self.width, self.heads
            ));
        }
        if self.mlp_dim == 0 {
            return err("mlp_dim must be at least 1".into());
        }
        if self.image_height == 0
            || self.image_width == 0
            || !self.image_height.is_multiple_of(self.patch_size)
            || !self.image_width.is_multiple_of(self.patch_size)
        {
            return err(format!(
                "image size {}x{} is not a positive multiple of patch size {}",
                self.image_height, self.image_width, self.patch_size
            ));
        }
        if self.fc_norm && self.pool != Pool::Mean {
            return err("fc_norm (LayerNorm after pooling) is only used with mean pooling".into());
        }
        if self.pool == Pool::Cls && !self.class_token {
            return err(
                "pool `cls` reads the class token, but class_token is false; use `mean` or `map`"
                    .into(),
            );
        }
        if self.distilled && !(self.class_token && self.pool == Pool::Cls) {
            return err(
                "a distillation token needs a class token and `cls` pooling (DeiT reads both tokens)"
                    .into(),
            );
        }
        if self.distilled && self.head != Head::Linear {
            return err("a distilled model has linear heads, not a pre-logits layer".into());
        }
        if self.reg_tokens > 1024 {
            return err(format!(
                "reg_tokens {} is implausibly large (at most 1024)",
                self.reg_tokens
            ));
        }
        if let Some(g) = self.layer_scale {
            if !g.is_finite() {
                return err(format!("layer_scale must be finite, got {g}"));
            }
        }
        if self.fc_norm && self.norm == NormPlacement::Post {
            return err("fc_norm with post-norm blocks would normalise twice".into());
        }
        if let Head::PreLogits { hidden: 0 } = self.head {
            return err("pre-logits head needs a hidden width of at least 1".into());
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return err(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        // Bound sizes so a hostile config cannot ask for absurd allocations.
        if self.channels > 1024 {
            return err(format!(
                "{} input channels is implausibly many (at most 1024)",
                self.channels
            ));
        }
        let big = |x: usize| x > 1 << 16;
        if big(self.width) || big(self.mlp_dim) || self.depth > 1024 || big(self.num_classes) {
            return err(
                "dimensions are implausibly large (width/mlp/classes > 65536 or depth > 1024)"
                    .into(),
            );
        }
        if self.image_height > 1 << 14 || self.image_width > 1 << 14 {
            return err("image size above 16384 pixels is not supported".into());
        }
        if self.num_tokens() > 1 << 16 {
            return err(format!(
                "{} tokens per image is too many (at most 65536): the image is too large for \
                 patch size {}",
                self.num_tokens(),
                self.patch_size
            ));
        }
        Ok(())
    }

    /// Patch grid (gh, gw).
    pub fn grid(&self) -> (usize, usize) {
        (
            self.image_height / self.patch_size,
            self.image_width / self.patch_size,
        )
    }

    /// Number of patches gh·gw.
    pub fn num_patches(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }

    /// Prefix tokens before the patches: \[class\], \[distillation\], then the registers.
    pub fn num_prefix_tokens(&self) -> usize {
        self.class_token as usize + self.distilled as usize + self.reg_tokens
    }

    /// Tokens N = prefix tokens + patches.
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + self.num_prefix_tokens()
    }

    /// Prefix tokens that have a row in the position table (0 with `no_embed_class`).
    pub fn pos_prefix_tokens(&self) -> usize {
        if self.no_embed_class {
            0
        } else {
            self.num_prefix_tokens()
        }
    }

    /// Rows of the position table: `pos_prefix_tokens() + gh·gw`.
    pub fn pos_tokens(&self) -> usize {
        self.num_patches() + self.pos_prefix_tokens()
    }

    /// One line for users: the token sequence, where the position table applies and whether
    /// the blocks have LayerScale, e.g. `class + distillation + 16 patches; positions on every
    /// token`.
    pub fn token_summary(&self) -> String {
        let mut parts = vec![];
        if self.class_token {
            parts.push("class".to_string());
        }
        if self.distilled {
            parts.push("distillation".into());
        }
        if self.reg_tokens > 0 {
            parts.push(format!("{} register(s)", self.reg_tokens));
        }
        parts.push(format!("{} patches", self.num_patches()));
        let pos = if self.no_embed_class && self.num_prefix_tokens() > 0 {
            "positions on patches only"
        } else {
            "positions on every token"
        };
        let ls = match self.layer_scale {
            Some(g) => format!("; LayerScale (init {g:e})"),
            None => String::new(),
        };
        format!("{}; {pos}{ls}", parts.join(" + "))
    }

    /// Head dim hd = D / nh.
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    /// Whether a LayerNorm (`norm`) follows the last block.
    pub fn has_final_norm(&self) -> bool {
        self.norm == NormPlacement::Pre && !self.fc_norm
    }

    /// Width of the vector fed to the final classifier (or returned when K = 0).
    pub fn feature_dim(&self) -> usize {
        match self.head {
            Head::Linear => self.width,
            Head::PreLogits { hidden } => hidden,
        }
    }

    /// Multiply-adds ×2 of one forward pass for one image (matrix products and attention;
    /// element-wise work is ignored, as is customary).
    pub fn flops_per_image(&self) -> f64 {
        let n = self.num_tokens() as f64;
        let d = self.width as f64;
        let m = self.mlp_dim as f64;
        let pd = (self.channels * self.patch_size * self.patch_size) as f64;
        let embed = 2.0 * self.num_patches() as f64 * pd * d;
        let (qkv, after) = self.block_row_flops();
        let block = n * (qkv + after);
        let map_pool = if self.pool == Pool::Map {
            // k/v of every token, the query's scores and sum, proj, MLP of one token.
            2.0 * n * d * 2.0 * d + 2.0 * 2.0 * n * d + 2.0 * d * d + 2.0 * 2.0 * d * m
        } else {
            0.0
        };
        let heads = if self.distilled { 2.0 } else { 1.0 };
        let head = match self.head {
            Head::Linear => heads * 2.0 * d * self.num_classes as f64,
            Head::PreLogits { hidden } => {
                2.0 * d * hidden as f64 + 2.0 * hidden as f64 * self.num_classes as f64
            }
        };
        embed + self.depth as f64 * block + map_pool + head
    }

    /// FLOPs of one token's row through a block: its qkv product, and what comes after
    /// (its query's q·kᵀ and p·v over the N tokens, proj, fc1 and fc2).
    fn block_row_flops(&self) -> (f64, f64) {
        let (n, d, m) = (self.num_tokens(), self.width, self.mlp_dim);
        let (n, d, m) = (n as f64, d as f64, m as f64);
        let qkv = 2.0 * d * 3.0 * d;
        let after = 2.0 * 2.0 * n * d + 2.0 * d * d + 2.0 * 2.0 * d * m;
        (qkv, after)
    }

    /// The tokens per image pooling reads when they are the first few — the class token, and
    /// DeiT's distillation token after it — or `None` where it reads every token (the mean,
    /// attention pooling). Only these rows of the last block's output are needed: its
    /// attention still attends over every token, but the forward runs its projection, MLP
    /// and the final norm on these alone.
    pub fn pooled_prefix(&self) -> Option<usize> {
        (self.pool == Pool::Cls && self.class_token).then_some(1 + self.distilled as usize)
    }

    /// [`Self::flops_per_image`] as vitrs runs the model (what the benchmarks' GFLOP/s and
    /// share of the peak count): with a [`Self::pooled_prefix`] the last block's attention,
    /// projection and MLP run for those rows alone (its qkv product for every token). ViT-B/16:
    /// 32.9 of its 35.1 GFLOP.
    pub fn flops_run_per_image(&self) -> f64 {
        let full = self.flops_per_image();
        match self.pooled_prefix() {
            // The last block's other rows skip all but their qkv product.
            Some(q) if self.depth > 0 => {
                full - (self.num_tokens() - q) as f64 * self.block_row_flops().1
            }
            _ => full,
        }
    }

    /// Serialises to JSON (the form stored in native checkpoints).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::serialize("the model config", e))
    }

    /// Parses the JSON form and validates it.
    pub fn from_json(s: &str) -> Result<Self> {
        let cfg: ViTConfig = serde_json::from_str(s)
            .map_err(|e| Error::InvalidConfig(format!("cannot parse ViTConfig JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_paper_table() {
        let b = ViTConfig::preset("B/16").unwrap();
        assert_eq!((b.width, b.depth, b.heads, b.mlp_dim), (768, 12, 12, 3072));
        assert_eq!(b.num_tokens(), 197);
        let l = ViTConfig::preset("vit_large_patch32_384.augreg_in21k").unwrap();
        assert_eq!(
            (l.width, l.depth, l.heads, l.image_height, l.patch_size),
            (1024, 24, 16, 384, 32)
        );
        let h = ViTConfig::preset("H/14").unwrap();
        assert_eq!(h.grid(), (16, 16));
        assert!(ViTConfig::preset("B/15").is_err());
        assert!(ViTConfig::preset("Q/16").is_err());
    }

    #[test]
    fn every_standard_timm_name_resolves() {
        for size in ["tiny", "small", "base", "large", "huge"] {
            for p in [8, 14, 16, 32] {
                for r in [224, 384] {
                    let name = format!("vit_{size}_patch{p}_{r}");
                    ViTConfig::preset(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
        }
    }

    #[test]
    fn timm_family_names_set_their_tokens_and_pooling() {
        let d = ViTConfig::preset("deit_tiny_distilled_patch16_224.fb_in1k").unwrap();
        assert!(d.distilled && d.class_token && d.pool == Pool::Cls);
        assert_eq!(
            (d.num_prefix_tokens(), d.num_tokens(), d.pos_tokens()),
            (2, 198, 198)
        );
        let r = ViTConfig::preset("vit_base_patch16_reg4_gap_256").unwrap();
        assert!(!r.class_token && r.no_embed_class && r.fc_norm && r.pool == Pool::Mean);
        assert_eq!(
            (r.num_tokens(), r.pos_tokens(), r.image_height),
            (260, 256, 256)
        );
        let s = ViTConfig::preset("vit_base_patch16_siglip_224").unwrap();
        assert!(!s.class_token && s.pool == Pool::Map && s.has_final_norm());
        assert_eq!(s.num_tokens(), 196);
        let t = ViTConfig::preset("deit3_small_patch16_224").unwrap();
        assert_eq!(t.layer_scale, Some(1e-6));
        assert!(t.no_embed_class && t.class_token);
        assert_eq!((t.num_tokens(), t.pos_tokens()), (197, 196));
        for bad in [
            "vit_base_patch16_distilled_224",
            "vit_base_patch16_clip_224",
            "vit_base_patch16",
        ] {
            assert!(ViTConfig::preset(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_options_are_checked() {
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        c.class_token = false;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("class_token"));
        c.pool = Pool::Map;
        c.validate().unwrap();
        c.distilled = true;
        assert!(c.validate().is_err());
        // An old checkpoint's JSON (no token fields) still parses, with a class token.
        let mut v: serde_json::Value =
            serde_json::from_str(&ViTConfig::preset("Ti/16").unwrap().to_json().unwrap()).unwrap();
        for k in [
            "class_token",
            "distilled",
            "reg_tokens",
            "no_embed_class",
            "layer_scale",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let old = ViTConfig::from_json(&v.to_string()).unwrap();
        assert!(old.class_token && old.num_tokens() == 197);
    }

    #[test]
    fn flops_of_b16_match_the_usual_figure() {
        // ViT-B/16 at 224 is usually quoted as 17.6 GMACs = 35.1 GFLOP.
        let b16 = ViTConfig::preset("B/16").unwrap();
        let g = b16.flops_per_image() / 1e9;
        assert!((g - 35.1).abs() < 0.3, "{g}");
        // The last block's class row alone past its qkv: 196 rows × (2·2·197·768 attention +
        // 2·768² proj + 2·2·768·3072 MLP) = 2.20 GFLOP fewer.
        let run = b16.flops_run_per_image() / 1e9;
        assert!((g - run - 2.20).abs() < 0.01, "{g} - {run}");
        let mut mean = b16.clone();
        mean.pool = Pool::Mean;
        assert_eq!(mean.flops_run_per_image(), mean.flops_per_image());
    }

    #[test]
    fn validate_names_the_problem() {
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        c.heads = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not divisible by heads 5"), "{e}");
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        c.image_width = 225;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of patch"));
        let mut c = ViTConfig::preset("Ti/16").unwrap();
        c.fc_norm = true;
        assert!(c.validate().is_err());
    }

    /// Configs found by `vitrs-fuzz` (timm-config and hf-config targets): `num_classes`
    /// 2^64 − 1 overflowed the size check and then the parameter layout (a panic);
    /// `in_chans` 2^32 asked the preprocessing for a 16 GiB mean vector (a hang); 2^26 tokens.
    #[test]
    fn fuzzer_found_sizes_are_refused() {
        let base = ViTConfig::preset("Ti/16").unwrap();
        let mut c = base.clone();
        c.num_classes = usize::MAX;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("implausibly large"));
        let mut c = base.clone();
        c.channels = 1 << 32;
        assert!(c.validate().unwrap_err().to_string().contains("channels"));
        let mut c = base;
        (c.image_height, c.image_width, c.patch_size) = (8192, 8192, 1);
        assert!(c.validate().unwrap_err().to_string().contains("tokens"));
    }

    #[test]
    fn json_round_trip() {
        let mut c = ViTConfig::preset("S/32").unwrap();
        c.head = Head::PreLogits { hidden: 7 };
        c.pool = Pool::Mean;
        c.fc_norm = true;
        let back = ViTConfig::from_json(&c.to_json().unwrap()).unwrap();
        assert_eq!(c, back);
    }
}
