//! `ViTConfig`: the architecture, as typed options, plus the preset table.
//!
//! Shapes use the legend of the [`crate::model`] module docs.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the encoder output is reduced to one vector per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The final [class] token (the paper; timm `global_pool='token'`).
    Cls,
    /// Mean over the patch tokens, class token excluded (timm `global_pool='avg'`).
    Mean,
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
    /// A preset: `"B/16"`, `"S/32@384"` (variant / patch @ resolution, default 224), or a timm
    /// architecture name such as `vit_base_patch16_224` (a `.tag` suffix is ignored).
    /// Classes default to 1000 (ImageNet) with timm's defaults: exact GELU, eps 1e-6, qkv bias.
    pub fn preset(name: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidConfig(format!(
                "unknown preset `{name}`: {why}; expected e.g. `B/16`, `Ti/16@384` or `vit_base_patch16_224` \
                 (variants Ti, S, B, L, H; patch 8, 14, 16 or 32; resolution 224 or 384)"
            ))
        };
        let (variant, patch, res) = if let Some(rest) = name.strip_prefix("vit_") {
            // timm: vit_{tiny,small,base,large,huge}_patch{P}_{R}[.tag]
            let rest = rest.split('.').next().unwrap_or(rest);
            let parts: Vec<&str> = rest.split('_').collect();
            if parts.len() != 3 {
                return Err(bad("not of the form vit_SIZE_patchP_RES"));
            }
            let v = VARIANTS
                .iter()
                .find(|v| v.long == parts[0])
                .ok_or_else(|| bad("unknown size"))?;
            let p = parts[1]
                .strip_prefix("patch")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad("bad patch"))?;
            let r = parts[2].parse().map_err(|_| bad("bad resolution"))?;
            (v, p, r)
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
        if ![224, 384].contains(&res) {
            return Err(bad("resolution must be 224 or 384"));
        }
        // 384 is not a multiple of 14: patch-14 models at "384" use the nearest grid that tiles,
        // 27 x 27 patches = 378 px (the CLIP/DINOv2 convention), since we never drop pixels.
        let res = res / patch * patch;
        let cfg = ViTConfig {
            image_height: res,
            image_width: res,
            patch_size: patch,
            channels: 3,
            width: variant.width,
            depth: variant.depth,
            heads: variant.heads,
            mlp_dim: variant.mlp_dim,
            num_classes: 1000,
            pool: Pool::Cls,
            head: Head::Linear,
            norm: NormPlacement::Pre,
            gelu: Gelu::Exact,
            fc_norm: false,
            qkv_bias: true,
            // timm and the JAX originals use 1e-6.
            layer_norm_eps: 1e-6,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the options fit together; the error says which and why.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::InvalidConfig(m));
        if self.patch_size == 0 || self.channels == 0 || self.width == 0 || self.depth == 0 {
            return err("patch_size, channels, width and depth must all be at least 1".into());
        }
        if self.heads == 0 || self.width % self.heads != 0 {
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
            || self.image_height % self.patch_size != 0
            || self.image_width % self.patch_size != 0
        {
            return err(format!(
                "image size {}x{} is not a positive multiple of patch size {}",
                self.image_height, self.image_width, self.patch_size
            ));
        }
        if self.fc_norm && self.pool != Pool::Mean {
            return err("fc_norm (LayerNorm after pooling) is only used with mean pooling".into());
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
        let big = |x: usize| x > 1 << 16;
        if big(self.width) || big(self.mlp_dim) || self.depth > 1024 || big(self.num_classes + 1) {
            return err(
                "dimensions are implausibly large (width/mlp/classes > 65536 or depth > 1024)"
                    .into(),
            );
        }
        if self.image_height > 1 << 14 || self.image_width > 1 << 14 {
            return err("image size above 16384 pixels is not supported".into());
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

    /// Tokens N = patches + the [class] token.
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + 1
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
        let block = 2.0 * n * d * 3.0 * d // qkv
            + 2.0 * 2.0 * n * n * d // q·kᵀ and p·v
            + 2.0 * n * d * d // proj
            + 2.0 * 2.0 * n * d * m; // fc1 + fc2
        let head = match self.head {
            Head::Linear => 2.0 * d * self.num_classes as f64,
            Head::PreLogits { hidden } => {
                2.0 * d * hidden as f64 + 2.0 * hidden as f64 * self.num_classes as f64
            }
        };
        embed + self.depth as f64 * block + head
    }

    /// Serialises to JSON (the form stored in native checkpoints).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
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
    fn flops_of_b16_match_the_usual_figure() {
        // ViT-B/16 at 224 is usually quoted as 17.6 GMACs = 35.1 GFLOP.
        let g = ViTConfig::preset("B/16").unwrap().flops_per_image() / 1e9;
        assert!((g - 35.1).abs() < 0.3, "{g}");
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

    #[test]
    fn json_round_trip() {
        let mut c = ViTConfig::preset("S/32").unwrap();
        c.head = Head::PreLogits { hidden: 7 };
        c.pool = Pool::Mean;
        c.fc_norm = true;
        let back = ViTConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(c, back);
    }
}
