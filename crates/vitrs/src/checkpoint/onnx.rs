//! Export to ONNX: the model's graph with its weights, for ONNX Runtime, TensorRT, OpenVINO,
//! browsers and phones.
//!
//! The graph is the forward of [`crate::model`] written in standard ONNX operators (opset 17
//! to 21): the patch projection as a `Conv` with stride = kernel = P; the prefix tokens and
//! position table as initializers (`Expand` to the batch, `Concat`, `Add`); each block's
//! `LayerNormalization`, `MatMul` + `Add` products against transposed weights, multi-head
//! attention as `Reshape`/`Transpose`/`MatMul`/`Softmax`, GELU in its exact (`Erf`) or tanh
//! form, LayerScale as `Mul`, pre- or post-norm; pooling by `Gather` (class token), `Slice` +
//! `ReduceMean` (mean of the patches) or attention pooling; `fc_norm`, tanh pre-logits, the
//! classifier(s). Preprocessing stays outside the graph and goes into the model's metadata
//! (`vitrs.preprocess`, with `vitrs.config` and `vitrs.labels`), as the native format stores it.
//!
//! The protobuf messages are the subset of `onnx.proto3` the export writes, declared by hand
//! with their field numbers (no `protoc`), and encoded by `prost`.

use std::path::Path;

use prost::Message;
use serde::Serialize;

use crate::config::{Gelu, Head, NormPlacement, Pool};
use crate::error::{Error, Result};
use crate::model::ViT;
use crate::preprocess::Preprocess;

/// The ONNX messages the export writes (`onnx.proto3`, field numbers as there).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(string, tag = "2")]
        pub producer_name: String,
        #[prost(string, tag = "3")]
        pub producer_version: String,
        #[prost(string, tag = "6")]
        pub doc_string: String,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "14")]
        pub metadata_props: Vec<StringStringEntryProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringStringEntryProto {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
    }

    /// `AttributeProto.AttributeType`.
    pub const ATTR_FLOAT: i32 = 1;
    pub const ATTR_INT: i32 = 2;
    pub const ATTR_INTS: i32 = 7;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(float, tag = "2")]
        pub f: f32,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        #[prost(int32, tag = "20")]
        pub r#type: i32,
    }

    /// `TensorProto.DataType`.
    pub const FLOAT: i32 = 1;
    pub const INT64: i32 = 7;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TypeProtoTensor>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProtoTensor {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(int64, tag = "1")]
        pub dim_value: i64,
        #[prost(string, tag = "2")]
        pub dim_param: String,
    }
}

use proto::*;

/// How to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnnxOptions {
    /// The ONNX opset, 17 (the first with `LayerNormalization`) to 21.
    pub opset: i64,
    /// A symbolic batch dimension (`batch`) instead of a fixed batch of 1.
    pub dynamic_batch: bool,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions {
            opset: 17,
            dynamic_batch: false,
        }
    }
}

/// The opsets the export writes.
pub const OPSETS: std::ops::RangeInclusive<i64> = 17..=21;

/// The graph under construction: nodes in order, initializers, and unique value names.
struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    next: usize,
    opset: i64,
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: ATTR_INTS,
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: ATTR_INT,
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: v,
        r#type: ATTR_FLOAT,
        ..Default::default()
    }
}

impl Graph {
    /// Adds `op(inputs)` with `attrs`; returns its (single) output's name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.ops(op, inputs, attrs, 1).remove(0)
    }

    /// Adds `op(inputs)` with `n` outputs.
    fn ops(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        self.next += 1;
        let id = self.next;
        let outputs: Vec<String> = (0..n).map(|i| format!("{op}_{id}_{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: format!("{op}_{id}"),
            op_type: op.into(),
            attribute: attrs,
        });
        outputs
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    fn init_i64(&mut self, name: &str, data: &[i64]) -> String {
        self.inits.push(TensorProto {
            dims: vec![data.len() as i64],
            data_type: INT64,
            name: name.into(),
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    /// A scalar f32 constant (shared by name).
    fn scalar(&mut self, name: &str, v: f32) -> String {
        if !self.inits.iter().any(|t| t.name == name) {
            self.init_f32(name, &[], &[v]);
        }
        name.into()
    }

    /// An i64 vector constant (shared by name).
    fn shape(&mut self, name: &str, v: &[i64]) -> String {
        if !self.inits.iter().any(|t| t.name == name) {
            self.init_i64(name, v);
        }
        name.into()
    }
}

/// What the export needs from the model: parameters by name.
struct Src<'a> {
    model: &'a ViT,
}

impl Src<'_> {
    fn get(&self, name: &str) -> Result<&[f32]> {
        self.model
            .params()
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                hint: Some("the model's layout lacks it; this is a bug in the exporter".into()),
            })
    }

    fn has(&self, name: &str) -> bool {
        self.model.params().get(name).is_some()
    }
}

/// `x (.., in) · Wᵀ + b` for the linear layer `name` (`W (out, in)`), the weight stored
/// transposed as initializer `name.weight_t`.
fn linear(g: &mut Graph, src: &Src, x: &str, name: &str, inp: usize, out: usize) -> Result<String> {
    let w = src.get(&format!("{name}.weight"))?;
    let mut wt = vec![0.0f32; inp * out];
    for o in 0..out {
        for i in 0..inp {
            wt[i * out + o] = w[o * inp + i];
        }
    }
    let wn = g.init_f32(&format!("{name}.weight_t"), &[inp, out], &wt);
    let y = g.op("MatMul", &[x, &wn], vec![]);
    let bias = format!("{name}.bias");
    if src.has(&bias) {
        let b = g.init_f32(&bias, &[out], src.get(&bias)?);
        Ok(g.op("Add", &[&y, &b], vec![]))
    } else {
        Ok(y)
    }
}

fn layer_norm(g: &mut Graph, src: &Src, x: &str, name: &str, d: usize, eps: f32) -> Result<String> {
    let w = g.init_f32(
        &format!("{name}.weight"),
        &[d],
        src.get(&format!("{name}.weight"))?,
    );
    let b = g.init_f32(
        &format!("{name}.bias"),
        &[d],
        src.get(&format!("{name}.bias"))?,
    );
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![int("axis", -1), float("epsilon", eps)],
    ))
}

fn gelu(g: &mut Graph, x: &str, kind: Gelu) -> String {
    let half = g.scalar("const.half", 0.5);
    let one = g.scalar("const.one", 1.0);
    let inner = match kind {
        // 0.5 · x · (1 + erf(x / √2))
        Gelu::Exact => {
            let s = g.scalar("const.inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2);
            let xs = g.op("Mul", &[x, &s], vec![]);
            g.op("Erf", &[&xs], vec![])
        }
        // 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))
        Gelu::Tanh => {
            let c = g.scalar("const.gelu_c", 0.044_715);
            let k = g.scalar("const.sqrt_2_over_pi", 0.797_884_6);
            let x2 = g.op("Mul", &[x, x], vec![]);
            let x3 = g.op("Mul", &[&x2, x], vec![]);
            let cx3 = g.op("Mul", &[&x3, &c], vec![]);
            let sum = g.op("Add", &[x, &cx3], vec![]);
            let arg = g.op("Mul", &[&sum, &k], vec![]);
            g.op("Tanh", &[&arg], vec![])
        }
    };
    let onep = g.op("Add", &[&inner, &one], vec![]);
    let hx = g.op("Mul", &[x, &half], vec![]);
    g.op("Mul", &[&hx, &onep], vec![])
}

/// `(B, N, D)` -> `(B, nh, N, hd)`.
fn heads(g: &mut Graph, x: &str, nh: usize, hd: usize) -> String {
    let shape = g.shape(
        &format!("shape.heads_{nh}_{hd}"),
        &[0, -1, nh as i64, hd as i64],
    );
    let r = g.op("Reshape", &[x, &shape], vec![]);
    g.op("Transpose", &[&r], vec![ints("perm", &[0, 2, 1, 3])])
}

/// `(B, nh, N, hd)` -> `(B, N, D)`.
fn merge_heads(g: &mut Graph, x: &str, d: usize) -> String {
    let t = g.op("Transpose", &[x], vec![ints("perm", &[0, 2, 1, 3])]);
    let shape = g.shape(&format!("shape.tokens_{d}"), &[0, -1, d as i64]);
    g.op("Reshape", &[&t, &shape], vec![])
}

/// Softmax(q·kᵀ / √hd)·v over `(B, nh, ·, hd)` operands.
fn attend(g: &mut Graph, q: &str, k: &str, v: &str, hd: usize) -> String {
    let kt = g.op("Transpose", &[k], vec![ints("perm", &[0, 1, 3, 2])]);
    let s = g.op("MatMul", &[q, &kt], vec![]);
    let scale = g.scalar(&format!("const.scale_{hd}"), 1.0 / (hd as f32).sqrt());
    let s = g.op("Mul", &[&s, &scale], vec![]);
    let p = g.op("Softmax", &[&s], vec![int("axis", -1)]);
    g.op("MatMul", &[&p, v], vec![])
}

/// Splits the last axis of `x` into `parts` equal pieces of `each`.
fn split(g: &mut Graph, x: &str, parts: usize, each: usize) -> Vec<String> {
    let sizes = g.shape(&format!("split.{parts}x{each}"), &vec![each as i64; parts]);
    g.ops("Split", &[x, &sizes], vec![int("axis", -1)], parts)
}

/// Row `t` of the token axis: `(B, N, D)` -> `(B, D)`.
fn token(g: &mut Graph, x: &str, t: i64) -> String {
    let idx = g.init_i64(&format!("index.token_{t}_{}", g.next), &[t]);
    let gathered = g.op("Gather", &[x, &idx], vec![int("axis", 1)]);
    let shape = g.shape("shape.squeeze_token", &[0, -1]);
    g.op("Reshape", &[&gathered, &shape], vec![])
}

/// The mean over axis 1 (opset 18 moved ReduceMean's axes from an attribute to an input).
fn mean_axis1(g: &mut Graph, x: &str) -> String {
    if g.opset >= 18 {
        let axes = g.shape("axes.1", &[1]);
        g.op("ReduceMean", &[x, &axes], vec![int("keepdims", 0)])
    } else {
        g.op(
            "ReduceMean",
            &[x],
            vec![ints("axes", &[1]), int("keepdims", 0)],
        )
    }
}

/// The model as an ONNX graph, encoded.
pub fn export(
    model: &ViT,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
    opts: OnnxOptions,
) -> Result<Vec<u8>> {
    if !OPSETS.contains(&opts.opset) {
        return Err(Error::InvalidConfig(format!(
            "ONNX opset {} is not supported: choose one of {}..={} (LayerNormalization came in 17)",
            opts.opset,
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let cfg = model.config();
    let src = Src { model };
    let mut g = Graph {
        nodes: vec![],
        inits: vec![],
        next: 0,
        opset: opts.opset,
    };
    let (d, nh, hd, m) = (cfg.width, cfg.heads, cfg.head_dim(), cfg.mlp_dim);
    let (c, h, w, p) = (
        cfg.channels,
        cfg.image_height,
        cfg.image_width,
        cfg.patch_size,
    );
    let (npre, np) = (cfg.num_prefix_tokens(), cfg.num_patches());
    let eps = cfg.layer_norm_eps;

    // Patch embedding: Conv (B, C, H, W) -> (B, D, gh, gw) -> (B, gh·gw, D).
    let pw = g.init_f32(
        "patch_embed.proj.weight",
        &[d, c, p, p],
        src.get("patch_embed.proj.weight")?,
    );
    let pb = g.init_f32(
        "patch_embed.proj.bias",
        &[d],
        src.get("patch_embed.proj.bias")?,
    );
    let conv = g.op(
        "Conv",
        &["pixel_values", &pw, &pb],
        vec![
            ints("kernel_shape", &[p as i64, p as i64]),
            ints("strides", &[p as i64, p as i64]),
        ],
    );
    let flat_shape = g.shape("shape.patches", &[0, d as i64, -1]);
    let flat = g.op("Reshape", &[&conv, &flat_shape], vec![]);
    let mut patches = g.op("Transpose", &[&flat], vec![ints("perm", &[0, 2, 1])]);

    // Prefix tokens [class][distillation][registers] (1, npre, D), expanded to the batch.
    let pos = src.get("pos_embed")?;
    if cfg.no_embed_class {
        // The position table covers the patches only (timm's no_embed_class).
        let pe = g.init_f32("pos_embed", &[1, np, d], pos);
        patches = g.op("Add", &[&patches, &pe], vec![]);
    }
    let mut x = patches;
    if npre > 0 {
        let mut prefix = vec![];
        for name in ["cls_token", "dist_token", "reg_token"] {
            if src.has(name) {
                prefix.extend_from_slice(src.get(name)?);
            }
        }
        let pre = g.init_f32("prefix_tokens", &[1, npre, d], &prefix);
        let shape = g.op("Shape", &[&x], vec![]);
        let starts = g.shape("slice.0", &[0]);
        let ends = g.shape("slice.1", &[1]);
        let batch = g.op("Slice", &[&shape, &starts, &ends], vec![]);
        let rest = g.shape("shape.prefix_rest", &[npre as i64, d as i64]);
        let target = g.op("Concat", &[&batch, &rest], vec![int("axis", 0)]);
        let expanded = g.op("Expand", &[&pre, &target], vec![]);
        x = g.op("Concat", &[&expanded, &x], vec![int("axis", 1)]);
    }
    if !cfg.no_embed_class {
        let pe = g.init_f32("pos_embed", &[1, cfg.pos_tokens(), d], pos);
        x = g.op("Add", &[&x, &pe], vec![]);
    }

    // Blocks.
    for l in 0..cfg.depth {
        let b = format!("blocks.{l}");
        let scaled = |g: &mut Graph, y: String, which: &str| -> Result<String> {
            let name = format!("{b}.{which}.gamma");
            if src.has(&name) {
                let gm = g.init_f32(&name, &[d], src.get(&name)?);
                Ok(g.op("Mul", &[&y, &gm], vec![]))
            } else {
                Ok(y)
            }
        };
        let attention = |g: &mut Graph, input: &str| -> Result<String> {
            let qkv = linear(g, &src, input, &format!("{b}.attn.qkv"), d, 3 * d)?;
            let parts = split(g, &qkv, 3, d);
            let (q, k, v) = (
                heads(g, &parts[0], nh, hd),
                heads(g, &parts[1], nh, hd),
                heads(g, &parts[2], nh, hd),
            );
            let o = attend(g, &q, &k, &v, hd);
            let o = merge_heads(g, &o, d);
            linear(g, &src, &o, &format!("{b}.attn.proj"), d, d)
        };
        let mlp = |g: &mut Graph, input: &str| -> Result<String> {
            let h1 = linear(g, &src, input, &format!("{b}.mlp.fc1"), d, m)?;
            let a = gelu(g, &h1, cfg.gelu);
            linear(g, &src, &a, &format!("{b}.mlp.fc2"), m, d)
        };
        match cfg.norm {
            NormPlacement::Pre => {
                let n1 = layer_norm(&mut g, &src, &x, &format!("{b}.norm1"), d, eps)?;
                let a = attention(&mut g, &n1)?;
                let a = scaled(&mut g, a, "ls1")?;
                x = g.op("Add", &[&x, &a], vec![]);
                let n2 = layer_norm(&mut g, &src, &x, &format!("{b}.norm2"), d, eps)?;
                let f = mlp(&mut g, &n2)?;
                let f = scaled(&mut g, f, "ls2")?;
                x = g.op("Add", &[&x, &f], vec![]);
            }
            NormPlacement::Post => {
                let a = attention(&mut g, &x)?;
                let a = scaled(&mut g, a, "ls1")?;
                let s = g.op("Add", &[&x, &a], vec![]);
                x = layer_norm(&mut g, &src, &s, &format!("{b}.norm1"), d, eps)?;
                let f = mlp(&mut g, &x)?;
                let f = scaled(&mut g, f, "ls2")?;
                let s = g.op("Add", &[&x, &f], vec![]);
                x = layer_norm(&mut g, &src, &s, &format!("{b}.norm2"), d, eps)?;
            }
        }
    }
    if cfg.has_final_norm() {
        x = layer_norm(&mut g, &src, &x, "norm", d, eps)?;
    }

    // Pooling (B, N, D) -> (B, D).
    let mut pooled = match cfg.pool {
        Pool::Cls => token(&mut g, &x, 0),
        Pool::Mean => {
            let starts = g.shape("slice.prefix_end", &[npre as i64]);
            let ends = g.shape("slice.end", &[i64::MAX]);
            let axes = g.shape("axes.1", &[1]);
            let patches = g.op("Slice", &[&x, &starts, &ends, &axes], vec![]);
            mean_axis1(&mut g, &patches)
        }
        Pool::Map => {
            // The learned query's projection is a constant: computed here, (1, nh, 1, hd).
            let latent = src.get("attn_pool.latent")?;
            let (qw, qb) = (src.get("attn_pool.q.weight")?, src.get("attn_pool.q.bias")?);
            let q: Vec<f32> = (0..d)
                .map(|o| qb[o] + (0..d).map(|i| qw[o * d + i] * latent[i]).sum::<f32>())
                .collect();
            let qn = g.init_f32("attn_pool.query", &[1, nh, 1, hd], &q);
            let kv = linear(&mut g, &src, &x, "attn_pool.kv", d, 2 * d)?;
            let parts = split(&mut g, &kv, 2, d);
            let (k, v) = (
                heads(&mut g, &parts[0], nh, hd),
                heads(&mut g, &parts[1], nh, hd),
            );
            let o = attend(&mut g, &qn, &k, &v, hd);
            let o = merge_heads(&mut g, &o, d);
            let shape = g.shape("shape.squeeze_token", &[0, -1]);
            let o = g.op("Reshape", &[&o, &shape], vec![]);
            let z = linear(&mut g, &src, &o, "attn_pool.proj", d, d)?;
            let n = layer_norm(&mut g, &src, &z, "attn_pool.norm", d, eps)?;
            let h1 = linear(&mut g, &src, &n, "attn_pool.mlp.fc1", d, m)?;
            let a = gelu(&mut g, &h1, cfg.gelu);
            let f = linear(&mut g, &src, &a, "attn_pool.mlp.fc2", m, d)?;
            g.op("Add", &[&z, &f], vec![])
        }
    };
    let dist = cfg.distilled.then(|| token(&mut g, &x, 1));
    if cfg.fc_norm {
        pooled = layer_norm(&mut g, &src, &pooled, "fc_norm", d, eps)?;
    }

    // Head.
    let f = cfg.feature_dim();
    let mut feats = pooled;
    if let Head::PreLogits { hidden } = cfg.head {
        let y = linear(&mut g, &src, &feats, "pre_logits.fc", d, hidden)?;
        feats = g.op("Tanh", &[&y], vec![]);
    }
    let k = cfg.num_classes;
    let (out, out_name, out_dim) = if k > 0 {
        let mut y = linear(&mut g, &src, &feats, "head", f, k)?;
        if let Some(dt) = &dist {
            // DeiT: the mean of the class-token and distillation-token heads.
            let yd = linear(&mut g, &src, dt, "head_dist", f, k)?;
            let s = g.op("Add", &[&y, &yd], vec![]);
            let hv = g.scalar("const.half", 0.5);
            y = g.op("Mul", &[&s, &hv], vec![]);
        }
        (y, "logits", k)
    } else {
        let mut y = feats;
        if let Some(dt) = &dist {
            let s = g.op("Add", &[&y, dt], vec![]);
            let hv = g.scalar("const.half", 0.5);
            y = g.op("Mul", &[&s, &hv], vec![]);
        }
        (y, "features", f)
    };
    g.nodes.push(NodeProto {
        input: vec![out],
        output: vec![out_name.into()],
        name: "output".into(),
        op_type: "Identity".into(),
        attribute: vec![],
    });

    let batch = |dims: &[usize]| -> TypeProto {
        let mut dim = vec![if opts.dynamic_batch {
            Dimension {
                dim_value: 0,
                dim_param: "batch".into(),
            }
        } else {
            Dimension {
                dim_value: 1,
                dim_param: String::new(),
            }
        }];
        dim.extend(dims.iter().map(|&v| Dimension {
            dim_value: v as i64,
            dim_param: String::new(),
        }));
        TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }
    };
    let mut metadata = vec![
        StringStringEntryProto {
            key: "vitrs.config".into(),
            value: cfg.to_json()?,
        },
        StringStringEntryProto {
            key: "vitrs.preprocess".into(),
            value: serde_json::to_string(preprocess)
                .map_err(|e| Error::serialize("the preprocessing", e))?,
        },
    ];
    if let Some(l) = labels {
        metadata.push(StringStringEntryProto {
            key: "vitrs.labels".into(),
            value: serde_json::to_string(l).map_err(|e| Error::serialize("the class labels", e))?,
        });
    }
    let model_proto = ModelProto {
        // IR version 8 goes with opsets 17-18; 9 with 19-20, 10 with 21.
        ir_version: match opts.opset {
            ..=18 => 8,
            19 | 20 => 9,
            _ => 10,
        },
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opts.opset,
        }],
        producer_name: "vitrs".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "Vision Transformer exported by vitrs: input pixel_values (B, {c}, {h}, {w}) already \
             preprocessed (see metadata vitrs.preprocess), output {out_name} (B, {out_dim})"
        ),
        graph: Some(GraphProto {
            node: g.nodes,
            name: "vit".into(),
            initializer: g.inits,
            input: vec![ValueInfoProto {
                name: "pixel_values".into(),
                r#type: Some(batch(&[c, h, w])),
            }],
            output: vec![ValueInfoProto {
                name: out_name.into(),
                r#type: Some(batch(&[out_dim])),
            }],
        }),
        metadata_props: metadata,
    };
    Ok(model_proto.encode_to_vec())
}

/// [`export`] to a file, written atomically.
pub fn save(
    path: &Path,
    model: &ViT,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
    opts: OnnxOptions,
) -> Result<()> {
    let bytes = export(model, preprocess, labels, opts)?;
    super::safetensors::write_atomic(path, &bytes)
}

/// An exported graph's structure: what a test compares with its committed expectation.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub opset: i64,
    /// `(name, dims)`; a symbolic dimension as -1.
    pub inputs: Vec<(String, Vec<i64>)>,
    pub outputs: Vec<(String, Vec<i64>)>,
    /// Every node's operator, in order.
    pub nodes: Vec<String>,
    /// `(name, dims)` of every initializer, in order.
    pub initializers: Vec<(String, Vec<i64>)>,
    pub metadata: Vec<String>,
}

/// Decodes an exported model into its [`Summary`] (and checks it is a model at all).
pub fn summarize(path: &Path, bytes: &[u8]) -> Result<Summary> {
    let m = ModelProto::decode(bytes)
        .map_err(|e| Error::malformed(path, "ONNX model", e.to_string()))?;
    let g = m
        .graph
        .ok_or_else(|| Error::malformed(path, "ONNX model", "no graph"))?;
    let dims = |v: &ValueInfoProto| -> Vec<i64> {
        v.r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .and_then(|t| t.shape.as_ref())
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| {
                        if d.dim_param.is_empty() {
                            d.dim_value
                        } else {
                            -1
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Summary {
        opset: m.opset_import.first().map_or(0, |o| o.version),
        inputs: g.input.iter().map(|v| (v.name.clone(), dims(v))).collect(),
        outputs: g.output.iter().map(|v| (v.name.clone(), dims(v))).collect(),
        nodes: g.node.iter().map(|n| n.op_type.clone()).collect(),
        initializers: g
            .initializer
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect(),
        metadata: m.metadata_props.iter().map(|e| e.key.clone()).collect(),
    })
}

/// The initializers of an exported model, by name, as f32 values (for tests).
pub fn initializers(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Vec<f32>)>> {
    let m = ModelProto::decode(bytes)
        .map_err(|e| Error::malformed(path, "ONNX model", e.to_string()))?;
    Ok(m.graph
        .map(|g| {
            g.initializer
                .into_iter()
                .filter(|t| t.data_type == FLOAT)
                .map(|t| {
                    let v = t
                        .raw_data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    (t.name, v)
                })
                .collect()
        })
        .unwrap_or_default())
}
