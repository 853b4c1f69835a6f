//! Random initialisation, as timm's `init_weights` (truncated normal σ = 0.02 for weights and
//! embeddings, zeros for biases, ones for LayerNorm scales) and the paper's zero-initialised
//! classification head. Seeded and deterministic.

use super::params::Params;

/// A small, fast, seedable generator (SplitMix64), good enough for initialisation and tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize % n.max(1)
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Gamma(shape, 1) by Marsaglia & Tsang (2000), boosted for shape < 1.
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = self.uniform().max(f64::MIN_POSITIVE);
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = self.uniform();
            if u.max(f64::MIN_POSITIVE).ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, b) from two gamma draws.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y == 0.0 {
            0.5
        } else {
            x / (x + y)
        }
    }

    /// The generator's state, to save and restore a run exactly.
    pub fn state(&self) -> u64 {
        self.0
    }

    /// Normal with σ `std`, redrawn until within ±2 — absolute bounds, as timm's
    /// `trunc_normal_(std=.02)` (a = −2, b = 2), which for σ 0.02 never cut.
    pub fn trunc_normal(&mut self, std: f64) -> f32 {
        loop {
            let v = self.normal() * std;
            if v.abs() <= 2.0 {
                return v as f32;
            }
        }
    }
}

/// Fills `params` in place, as timm's `VisionTransformer` initialises itself (`weight_init=''`):
/// linear weights and the position embedding normal σ 0.02 (truncated at ±2), biases 0,
/// LayerNorm weights 1, the class and register tokens normal σ 1e-6, the distillation token
/// σ 0.02, the attention-pooling query σ 1/√D, LayerScale gains at `layer_scale`, and the
/// patch projection — a convolution, which timm leaves at PyTorch's default — uniform in
/// ±1/√fan_in (weight and bias, fan_in = C·P·P). The heads are zero (the paper's choice for
/// fine-tuning; harmless from scratch, where the first steps fill them).
pub(crate) fn init_params(params: &mut Params, seed: u64, layer_scale: Option<f32>) {
    let mut rng = Rng::new(seed);
    let entries = params.entries().to_vec();
    let patch_fan_in = params
        .entry("patch_embed.proj.weight")
        .map_or(1, |e| e.shape[1..].iter().product::<usize>().max(1));
    let patch_bound = 1.0 / (patch_fan_in as f64).sqrt();
    let flat = params.flat_mut();
    for e in entries {
        let dst = &mut flat[e.range.clone()];
        let is_norm = e.name.contains("norm");
        if e.name.starts_with("head.") || e.name.starts_with("head_dist.") {
            dst.fill(0.0); // zero-initialised head (paper, §3.1 fine-tuning)
        } else if e.name.ends_with(".gamma") {
            dst.fill(layer_scale.unwrap_or(1.0));
        } else if e.name == "attn_pool.latent" {
            let std = 1.0 / (dst.len() as f64).sqrt();
            dst.iter_mut().for_each(|v| *v = rng.trunc_normal(std));
        } else if e.name.starts_with("patch_embed.proj.") {
            dst.iter_mut()
                .for_each(|v| *v = ((2.0 * rng.uniform() - 1.0) * patch_bound) as f32);
        } else if e.name == "cls_token" || e.name == "reg_token" {
            dst.iter_mut()
                .for_each(|v| *v = (rng.normal() * 1e-6) as f32);
        } else if e.name.ends_with(".bias") {
            dst.fill(0.0);
        } else if is_norm && e.name.ends_with(".weight") {
            dst.fill(1.0);
        } else {
            dst.iter_mut().for_each(|v| *v = rng.trunc_normal(0.02));
        }
    }
}
