//! The fast forward against a plain reference forward written from the paper's equations
//! with the kernels' reference twins (f64 accumulation), over option combinations the
//! PyTorch fixtures cannot reach: post-norm blocks, the pre-training head (dense + tanh, then
//! a classifier), mean pooling with and without fc_norm, several batch sizes.

use vitrs::attnmap::{attention_map, image_attention, HeadFusion, Method};
use vitrs::kernels::attention::{attention_ref, AttnDims};
use vitrs::kernels::gemm::{linear_ref, Epilogue};
use vitrs::kernels::layernorm::layernorm_ref;
use vitrs::{Capture, Gelu, Head, NormPlacement, Pool, Sizes, Tensor, ViT, ViTConfig, Workspace};

fn base() -> ViTConfig {
    ViTConfig::paper(Sizes {
        image: (12, 16),
        channels: 2,
        patch: 4,
        width: 12,
        depth: 2,
        heads: 3,
        mlp: 20,
        classes: 5,
    })
}

/// A model whose every parameter is a distinct non-trivial value.
fn model(cfg: ViTConfig, seed: u64) -> ViT {
    let mut m = ViT::zeros(cfg).unwrap();
    let mut rng = vitrs::model::Rng::new(seed);
    m.params_mut()
        .flat_mut()
        .iter_mut()
        .for_each(|v| *v = (rng.normal() * 0.3) as f32);
    m
}

struct Ref<'a>(&'a ViT);

impl Ref<'_> {
    fn p(&self, name: &str) -> &[f32] {
        self.0
            .params()
            .get(name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn linear(&self, name: &str, x: &[f32], rows: usize, k: usize, epi: Epilogue) -> Vec<f32> {
        let w = self.p(&format!("{name}.weight"));
        let n = w.len() / k;
        let b = self.0.params().get(&format!("{name}.bias"));
        let mut out = vec![0.0; rows * n];
        linear_ref(x, w, b, &mut out, (rows, k, n), epi);
        out
    }

    fn norm(&self, name: &str, x: &[f32]) -> Vec<f32> {
        let c = self.0.config();
        layernorm_ref(
            x,
            self.p(&format!("{name}.weight")),
            self.p(&format!("{name}.bias")),
            c.width,
            c.layer_norm_eps,
        )
    }

    /// Returns (logits, attentions) for images (B, C, H, W).
    fn forward(&self, x: &Tensor) -> (Vec<f32>, Vec<f32>) {
        let c = self.0.config();
        let b = x.shape()[0];
        let (gh, gw) = c.grid();
        let (p, d, n) = (c.patch_size, c.width, c.num_tokens());
        // Patch (gy, gx) of image bi flattened in (channel, row, column) order.
        let mut patches = vec![];
        for bi in 0..b {
            for gy in 0..gh {
                for gx in 0..gw {
                    for ch in 0..c.channels {
                        for py in 0..p {
                            for px in 0..p {
                                let (yy, xx) = (gy * p + py, gx * p + px);
                                patches.push(
                                    x.data()[((bi * c.channels + ch) * c.image_height + yy)
                                        * c.image_width
                                        + xx],
                                );
                            }
                        }
                    }
                }
            }
        }
        let tok = self.linear(
            "patch_embed.proj",
            &patches,
            b * gh * gw,
            c.channels * p * p,
            Epilogue::None,
        );
        // Prefix tokens in timm's order: class, distillation, registers.
        let mut prefix: Vec<&[f32]> = vec![];
        if c.class_token {
            prefix.push(self.p("cls_token"));
        }
        if c.distilled {
            prefix.push(self.p("dist_token"));
        }
        for r in 0..c.reg_tokens {
            prefix.push(&self.p("reg_token")[r * d..(r + 1) * d]);
        }
        let npre = prefix.len();
        let pos = self.p("pos_embed");
        let mut h = vec![0.0; b * n * d];
        for bi in 0..b {
            for t in 0..n {
                for j in 0..d {
                    let v = if t < npre {
                        prefix[t][j]
                    } else {
                        tok[(bi * (n - npre) + t - npre) * d + j]
                    };
                    // no_embed_class: position rows for the patches only.
                    let pe = if !c.no_embed_class {
                        pos[t * d + j]
                    } else if t >= npre {
                        pos[(t - npre) * d + j]
                    } else {
                        0.0
                    };
                    h[(bi * n + t) * d + j] = v + pe;
                }
            }
        }
        let dims = AttnDims {
            batch: b,
            tokens: n,
            heads: c.heads,
            head_dim: d / c.heads,
        };
        let mut attns = vec![];
        for l in 0..c.depth {
            let blk = |s: &str| format!("blocks.{l}.{s}");
            // x += γ ⊙ branch (γ = 1 without LayerScale).
            let add = |a: &mut Vec<f32>, r: &[f32], ls: &str| {
                let g = c.layer_scale.map(|_| self.p(&blk(ls)));
                for (i, (x, y)) in a.iter_mut().zip(r).enumerate() {
                    *x += g.map_or(1.0, |g| g[i % d]) * y;
                }
            };
            let attn_branch = |inp: &[f32], attns: &mut Vec<f32>| {
                let qkv = self.linear(&blk("attn.qkv"), inp, b * n, d, Epilogue::None);
                let (o, pr) = attention_ref(&qkv, dims);
                attns.extend(pr);
                self.linear(&blk("attn.proj"), &o, b * n, d, Epilogue::None)
            };
            let mlp_branch = |inp: &[f32]| {
                let hid = self.linear(&blk("mlp.fc1"), inp, b * n, d, Epilogue::Gelu(c.gelu));
                self.linear(&blk("mlp.fc2"), &hid, b * n, c.mlp_dim, Epilogue::None)
            };
            match c.norm {
                NormPlacement::Pre => {
                    let a = attn_branch(&self.norm(&blk("norm1"), &h), &mut attns);
                    add(&mut h, &a, "ls1.gamma");
                    let m = mlp_branch(&self.norm(&blk("norm2"), &h));
                    add(&mut h, &m, "ls2.gamma");
                }
                NormPlacement::Post => {
                    let a = attn_branch(&h, &mut attns);
                    add(&mut h, &a, "ls1.gamma");
                    h = self.norm(&blk("norm1"), &h);
                    let m = mlp_branch(&h);
                    add(&mut h, &m, "ls2.gamma");
                    h = self.norm(&blk("norm2"), &h);
                }
            }
        }
        if c.has_final_norm() {
            h = self.norm("norm", &h);
        }
        let token = |t: usize| -> Vec<f32> {
            (0..b)
                .flat_map(|bi| h[(bi * n + t) * d..(bi * n + t + 1) * d].to_vec())
                .collect()
        };
        let mut pooled = match c.pool {
            Pool::Cls => token(0),
            Pool::Mean => (0..b * d)
                .map(|i| {
                    let (bi, j) = (i / d, i % d);
                    (npre..n)
                        .map(|t| h[(bi * n + t) * d + j] as f64)
                        .sum::<f64>() as f32
                        / (n - npre) as f32
                })
                .collect(),
            Pool::Map => self.map_pool(&h, b),
        };
        if c.fc_norm {
            pooled = self.norm("fc_norm", &pooled);
        }
        let feats = match c.head {
            Head::Linear => pooled,
            Head::PreLogits { .. } => self.linear("pre_logits.fc", &pooled, b, d, Epilogue::Tanh),
        };
        let mut logits = if c.num_classes > 0 {
            self.linear("head", &feats, b, c.feature_dim(), Epilogue::None)
        } else {
            feats
        };
        if c.distilled {
            // DeiT: the mean of both heads (or of both tokens without a classifier).
            let dist = if c.num_classes > 0 {
                self.linear("head_dist", &token(1), b, d, Epilogue::None)
            } else {
                token(1)
            };
            for (l, v) in logits.iter_mut().zip(dist) {
                *l = (*l + v) / 2.0;
            }
        }
        (logits, attns)
    }

    /// timm's AttentionPoolLatent, written out: q from the latent, k/v from every token,
    /// softmax over tokens per head, proj, then z + MLP(LN(z)).
    fn map_pool(&self, h: &[f32], b: usize) -> Vec<f32> {
        let c = self.0.config();
        let (d, n, nh) = (c.width, c.num_tokens(), c.heads);
        let hd = d / nh;
        let q = self.linear(
            "attn_pool.q",
            self.p("attn_pool.latent"),
            1,
            d,
            Epilogue::None,
        );
        let kv = self.linear("attn_pool.kv", h, b * n, d, Epilogue::None);
        let mut o = vec![0.0f32; b * d];
        for bi in 0..b {
            for head in 0..nh {
                let score = |t: usize| -> f64 {
                    (0..hd)
                        .map(|e| {
                            q[head * hd + e] as f64
                                * kv[(bi * n + t) * 2 * d + head * hd + e] as f64
                        })
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                };
                let s: Vec<f64> = (0..n).map(score).collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for e in 0..hd {
                    o[bi * d + head * hd + e] = (0..n)
                        .map(|t| {
                            (s[t] - mx).exp() / z
                                * kv[(bi * n + t) * 2 * d + d + head * hd + e] as f64
                        })
                        .sum::<f64>() as f32;
                }
            }
        }
        let z = self.linear("attn_pool.proj", &o, b, d, Epilogue::None);
        let y = self.norm("attn_pool.norm", &z);
        let hid = self.linear("attn_pool.mlp.fc1", &y, b, d, Epilogue::Gelu(c.gelu));
        let m = self.linear("attn_pool.mlp.fc2", &hid, b, c.mlp_dim, Epilogue::None);
        z.iter().zip(&m).map(|(a, b)| a + b).collect()
    }
}

fn check(cfg: ViTConfig, batch: usize) {
    let m = model(cfg.clone(), 7);
    let numel = batch * cfg.channels * cfg.image_height * cfg.image_width;
    let mut rng = vitrs::model::Rng::new(99);
    let x = Tensor::new(
        vec![batch, cfg.channels, cfg.image_height, cfg.image_width],
        (0..numel).map(|_| rng.normal() as f32).collect(),
    )
    .unwrap();
    let (want_logits, want_attn) = Ref(&m).forward(&x);
    let out = m
        .forward(
            &x,
            Capture {
                attentions: true,
                pre_logits: true,
            },
            &mut Workspace::new(),
        )
        .unwrap();
    let diff = vitrs::kernels::max_abs_diff;
    assert_eq!(out.logits.numel(), want_logits.len(), "{cfg:?}");
    let dl = diff(out.logits.data(), &want_logits);
    let da = diff(out.attentions.as_ref().unwrap().data(), &want_attn);
    assert!(dl < 1e-4, "logits differ by {dl} for {cfg:?}");
    assert!(da < 1e-5, "attentions differ by {da} for {cfg:?}");
    // Attention maps built from the fast path's capture equal those from the reference path.
    let fast = out.attentions.as_ref().unwrap().data();
    let methods = [
        Method::Rollout {
            fusion: HeadFusion::Mean,
            discard_ratio: 0.2,
        },
        Method::Mean {
            layer: cfg.depth - 1,
            fusion: HeadFusion::Max,
        },
        Method::Head { layer: 0, head: 1 },
    ];
    for b in 0..batch {
        for &method in &methods {
            let got = attention_map(&cfg, &image_attention(&cfg, fast, batch, b), method).unwrap();
            let want =
                attention_map(&cfg, &image_attention(&cfg, &want_attn, batch, b), method).unwrap();
            assert_eq!(got.grid, cfg.grid());
            let dm = diff(&got.values, &want.values);
            assert!(dm < 1e-5, "{method:?} maps differ by {dm} for {cfg:?}");
        }
    }
    assert_eq!(out.pre_logits.unwrap().shape(), &[batch, cfg.feature_dim()]);
}

#[test]
fn pre_norm_paper_model() {
    check(base(), 3);
}

#[test]
fn post_norm_blocks() {
    let mut c = base();
    c.norm = NormPlacement::Post;
    check(c.clone(), 2);
    c.gelu = Gelu::Tanh;
    check(c, 1);
}

#[test]
fn pre_training_head_with_classifier_and_without() {
    let mut c = base();
    c.head = Head::PreLogits { hidden: 7 };
    check(c.clone(), 2);
    c.num_classes = 0;
    check(c, 2);
}

#[test]
fn mean_pooling_with_and_without_fc_norm() {
    let mut c = base();
    c.pool = Pool::Mean;
    check(c.clone(), 2);
    c.fc_norm = true;
    c.qkv_bias = false;
    check(c, 4);
}

#[test]
fn deit_distillation_token_and_registers() {
    let mut c = base();
    c.distilled = true;
    check(c.clone(), 2);
    c.reg_tokens = 2;
    c.no_embed_class = true;
    check(c.clone(), 2);
    c.num_classes = 0;
    check(c, 1);
}

#[test]
fn no_class_token_with_registers_layer_scale_and_mean_pooling() {
    let mut c = base();
    c.class_token = false;
    c.pool = Pool::Mean;
    c.fc_norm = true;
    c.reg_tokens = 3;
    c.no_embed_class = true;
    c.layer_scale = Some(0.1);
    check(c.clone(), 2);
    c.norm = NormPlacement::Post;
    c.fc_norm = false;
    check(c, 2);
}

#[test]
fn attention_pooling() {
    let mut c = base();
    c.class_token = false;
    c.pool = Pool::Map;
    check(c.clone(), 3);
    // With a class token and registers in the sequence too (MAP attends over every token).
    c.class_token = true;
    c.reg_tokens = 1;
    c.layer_scale = Some(0.5);
    c.head = Head::PreLogits { hidden: 5 };
    check(c, 2);
}

#[test]
fn bad_input_shape_is_an_error_not_a_panic() {
    let m = model(base(), 1);
    let x = Tensor::zeros(vec![1, 3, 12, 16]);
    let e = m.logits(&x).unwrap_err().to_string();
    assert!(
        e.contains("[1, 2, 12, 16]") && e.contains("[1, 3, 12, 16]"),
        "{e}"
    );
}

#[test]
fn workspace_is_reused_across_batch_sizes() {
    let m = model(base(), 3);
    let mut ws = Workspace::new();
    for b in [2, 1, 2] {
        let x = Tensor::new(vec![b, 2, 12, 16], vec![0.5; b * 2 * 12 * 16]).unwrap();
        let a = m.forward(&x, Capture::default(), &mut ws).unwrap().logits;
        assert_eq!(a, m.logits(&x).unwrap());
    }
}
