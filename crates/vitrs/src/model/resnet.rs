//! The ResNet baseline: the CIFAR ResNet of He et al. 2016 (§4.2), the CNN the ViT paper's
//! inductive-bias argument is about. A 3 × 3 convolution stem of `w` channels, three stages of
//! `n` basic blocks (widths `w`, `2w`, `4w`; the first block of stages 2 and 3 halves the
//! resolution), global average pooling and a linear classifier: `6n + 2` layers, so ResNet-20
//! is `n = 3`, `w = 16` (0.27 M parameters).
//!
//! A basic block is `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`. The shortcut is the
//! paper's **option A** for CIFAR: the identity, and where a block changes the resolution and
//! width, `x` subsampled with stride 2 and zero-padded with `(C_out − C_in) / 2` channels on
//! each side — no parameters. Convolutions have no bias (a batch norm follows each).
//!
//! Like the ViT: every parameter in one flat buffer under PyTorch's names (`conv1.weight`,
//! `bn1.weight`, `layer2.0.conv1.weight`, …, `fc.weight`), the running statistics in a second
//! one (`bn1.running_mean`, …), ONE forward for training and inference (batch statistics and
//! their running averages in training, the running statistics in evaluation), and a
//! hand-written backward. Activations are channels-last, `(B, H, W, C)`.

use std::ops::Range;

use super::init::Rng;
use super::params::{ParamEntry, Params};
use crate::error::{Error, Result};
use crate::kernels::batchnorm::{
    batchnorm_backward, batchnorm_eval, batchnorm_train, relu_mask, After,
};
use crate::kernels::conv::{conv2d, conv2d_backward, Conv2d, Layout};
use crate::kernels::gemm::{add_assign, linear, linear_backward, Epilogue};
use crate::kernels::loss::{cross_entropy, Targets};

/// The architecture.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResNetConfig {
    /// Layers, `6n + 2` (20, 32, 44, 56, 110, …).
    pub depth: usize,
    /// Channels of the first stage (16 in the paper).
    pub width: usize,
    pub channels: usize,
    pub image_height: usize,
    pub image_width: usize,
    pub num_classes: usize,
    pub bn_eps: f32,
    /// Weight of the batch's statistics in the running averages (PyTorch's 0.1).
    pub bn_momentum: f32,
}

impl ResNetConfig {
    /// ResNet-`depth` of width `width` for images of `channels × h × w` and `classes` classes,
    /// batch norm as PyTorch's defaults.
    pub fn cifar(
        depth: usize,
        width: usize,
        channels: usize,
        (h, w): (usize, usize),
        classes: usize,
    ) -> Self {
        ResNetConfig {
            depth,
            width,
            channels,
            image_height: h,
            image_width: w,
            num_classes: classes,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    /// A benchmark preset: `resnet{DEPTH}[w{WIDTH}][@{SIZE}[x{CHANNELS}]]`, e.g. `resnet20`
    /// (width 16, 32 × 32 × 3, the paper's CIFAR-10 model) or `resnet20@28x1` (Fashion-MNIST);
    /// 10 classes. `None` when `spec` is not of that form.
    pub fn preset(spec: &str) -> Option<Result<Self>> {
        let rest = spec.strip_prefix("resnet")?;
        let (arch, input) = rest.split_once('@').unwrap_or((rest, "32x3"));
        let (depth, width) = arch.split_once('w').unwrap_or((arch, "16"));
        let (size, channels) = input.split_once('x').unwrap_or((input, "3"));
        let num = |v: &str| v.parse::<usize>().ok();
        let cfg = match (num(depth), num(width), num(size), num(channels)) {
            (Some(d), Some(w), Some(s), Some(c)) => Self::cifar(d, w, c, (s, s), 10),
            _ => {
                return Some(Err(Error::InvalidConfig(format!(
                    "`{spec}` is not a ResNet preset: write resnet{{DEPTH}}[w{{WIDTH}}][@{{SIZE}}[x{{CHANNELS}}]], e.g. resnet20 or resnet20@28x1"
                ))))
            }
        };
        Some(cfg.validate().map(|_| cfg))
    }

    /// Basic blocks per stage, `n = (depth − 2) / 6`.
    pub fn blocks_per_stage(&self) -> Result<usize> {
        if self.depth < 8 || !(self.depth - 2).is_multiple_of(6) {
            return Err(Error::InvalidConfig(format!(
                "a CIFAR ResNet has 6n + 2 layers (8, 14, 20, 32, 44, 56, 110, ...); depth = {} is not one",
                self.depth
            )));
        }
        Ok((self.depth - 2) / 6)
    }

    /// Every convolution's geometry for one image, in forward order: the stem, then each
    /// block's two (the first block of stages 2 and 3 has stride 2).
    pub fn geometry(&self) -> Result<Vec<Conv2d>> {
        self.validate()?;
        let n = self.blocks_per_stage()?;
        let conv3 = |in_ch, (h, w), out_ch, stride| Conv2d {
            batch: 1,
            in_ch,
            h,
            w,
            out_ch,
            k: 3,
            stride,
            pad: 1,
        };
        let stem = conv3(
            self.channels,
            (self.image_height, self.image_width),
            self.width,
            1,
        );
        let mut out = vec![stem];
        let (mut hw, mut ch) = (stem.out_hw(), self.width);
        for stage in 0..3 {
            let width = self.width << stage;
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let g1 = conv3(ch, hw, width, stride);
                out.extend([g1, conv3(width, g1.out_hw(), width, 1)]);
                (hw, ch) = (g1.out_hw(), width);
            }
        }
        Ok(out)
    }

    /// Parameters of a model of this config, without allocating it.
    pub fn param_count(&self) -> Result<usize> {
        let g = self.geometry()?;
        let convs: usize = g.iter().map(|g| g.weight_len() + 2 * g.out_ch).sum();
        let feat = g.last().map_or(0, |g| g.out_ch);
        Ok(convs + (feat + 1) * self.num_classes)
    }

    /// Bytes of activations and their gradients one image holds in a training step (what
    /// [`ResNetWorkspace`] allocates per image, the im2col scratch included), without
    /// allocating a model.
    pub fn train_bytes_per_image(&self) -> Result<u64> {
        let g = self.geometry()?;
        let layers: usize = g.iter().map(|g| 2 * g.out_len()).sum();
        let widest = g
            .iter()
            .map(|g| g.out_len().max(g.rows() * g.cols()))
            .max()
            .unwrap_or(0);
        // z and y per layer; shortcut, dy, dx, dres and the two im2col buffers at the widest.
        Ok(4 * (layers + 6 * widest) as u64)
    }

    pub fn validate(&self) -> Result<()> {
        self.blocks_per_stage()?;
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.width == 0 || !self.width.is_multiple_of(2) || self.width > 4096 {
            return bad(format!(
                "ResNet width {} must be even (the shortcut pads half the new channels on each side) and at most 4096",
                self.width
            ));
        }
        if self.channels == 0 || self.image_height == 0 || self.image_width == 0 {
            return bad("ResNet input channels, height and width must be at least 1".into());
        }
        if self.bn_eps.is_nan() || self.bn_eps <= 0.0 || !(0.0..=1.0).contains(&self.bn_momentum) {
            return bad(format!(
                "batch norm eps {} must be > 0 and momentum {} in [0, 1]",
                self.bn_eps, self.bn_momentum
            ));
        }
        Ok(())
    }
}

/// A convolution followed by its batch norm: where their tensors live, and its geometry for
/// one image.
#[derive(Clone, Debug)]
struct ConvBn {
    /// `(C_out, C_in, 3, 3)`.
    conv: Range<usize>,
    gamma: Range<usize>,
    beta: Range<usize>,
    /// In the buffer of running statistics.
    mean: Range<usize>,
    var: Range<usize>,
    /// Geometry with `batch = 1`.
    geo: Conv2d,
}

impl ConvBn {
    fn geo(&self, batch: usize) -> Conv2d {
        Conv2d { batch, ..self.geo }
    }
    /// Values of the output for one image.
    fn out_per_image(&self) -> usize {
        self.geo.out_len()
    }
}

/// The layers in forward order: the stem, then each block's two (layer `1 + 2j` is block j's
/// first convolution, `2 + 2j` its second).
#[derive(Clone, Debug)]
struct View {
    layers: Vec<ConvBn>,
    fc_w: Range<usize>,
    fc_b: Range<usize>,
    /// Channels of the last stage (the pooled feature size).
    feat: usize,
}

struct Builder {
    entries: Vec<ParamEntry>,
    len: usize,
    buf_entries: Vec<ParamEntry>,
    buf_len: usize,
}

impl Builder {
    fn add(&mut self, name: String, shape: Vec<usize>) -> Range<usize> {
        let n: usize = shape.iter().product();
        let r = self.len..self.len + n;
        self.len += n;
        self.entries.push(ParamEntry {
            name,
            shape,
            range: r.clone(),
        });
        r
    }
    fn buffer(&mut self, name: String, n: usize) -> Range<usize> {
        let r = self.buf_len..self.buf_len + n;
        self.buf_len += n;
        self.buf_entries.push(ParamEntry {
            name,
            shape: vec![n],
            range: r.clone(),
        });
        r
    }
    fn conv_bn(&mut self, conv: &str, bn: &str, geo: Conv2d) -> ConvBn {
        let c = geo.out_ch;
        ConvBn {
            conv: self.add(format!("{conv}.weight"), vec![c, geo.in_ch, geo.k, geo.k]),
            gamma: self.add(format!("{bn}.weight"), vec![c]),
            beta: self.add(format!("{bn}.bias"), vec![c]),
            mean: self.buffer(format!("{bn}.running_mean"), c),
            var: self.buffer(format!("{bn}.running_var"), c),
            geo,
        }
    }
}

fn layout(cfg: &ResNetConfig) -> Result<(Params, Params, View)> {
    let geometry = cfg.geometry()?;
    let n = cfg.blocks_per_stage()?;
    let mut b = Builder {
        entries: vec![],
        len: 0,
        buf_entries: vec![],
        buf_len: 0,
    };
    let mut layers = Vec::with_capacity(geometry.len());
    for (li, g) in geometry.iter().enumerate() {
        layers.push(if li == 0 {
            b.conv_bn("conv1", "bn1", *g)
        } else {
            // Layer 1 + 2j is block j's first convolution, 2 + 2j its second.
            let j = (li - 1) / 2;
            let pre = format!("layer{}.{}", j / n + 1, j % n);
            let which = 2 - li % 2;
            b.conv_bn(
                &format!("{pre}.conv{which}"),
                &format!("{pre}.bn{which}"),
                *g,
            )
        });
    }
    let ch = geometry.last().map_or(cfg.width, |g| g.out_ch);
    let fc_w = b.add("fc.weight".into(), vec![cfg.num_classes, ch]);
    let fc_b = b.add("fc.bias".into(), vec![cfg.num_classes]);
    let params = Params::zeros(b.entries, b.len);
    let buffers = Params::zeros(b.buf_entries, b.buf_len);
    Ok((
        params,
        buffers,
        View {
            layers,
            fc_w,
            fc_b,
            feat: ch,
        },
    ))
}

/// A CIFAR ResNet with its parameters and running statistics.
#[derive(Clone, Debug)]
pub struct ResNet {
    config: ResNetConfig,
    params: Params,
    buffers: Params,
    view: View,
}

/// Batch statistics and their running averages (training), or the running statistics
/// (evaluation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// One layer's activations: the convolution's output `z` and the layer's output `y` (after
/// batch norm, the shortcut where there is one, and ReLU), both `(B, H, W, C)`, and the batch
/// statistics used.
#[derive(Default, Debug)]
struct LayerActs {
    z: Vec<f32>,
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// Activations and gradients of a batch, allocated once per batch size.
#[derive(Default, Debug)]
pub struct ResNetWorkspace {
    batch: usize,
    layers: Vec<LayerActs>,
    /// Each block's shortcut `(B, H, W, C_out)` (option A: subsampled, padded input).
    shortcut: Vec<f32>,
    /// `(B, C_last)` after global average pooling.
    pooled: Vec<f32>,
    /// `(B, K)`.
    logits: Vec<f32>,
    grads: Vec<f32>,
    dlogits: Vec<f32>,
    dpooled: Vec<f32>,
    dy: Vec<f32>,
    dx: Vec<f32>,
    /// The gradient reaching a block's output, kept for its shortcut.
    dres: Vec<f32>,
    cols: Vec<f32>,
    dcols: Vec<f32>,
}

impl ResNetWorkspace {
    pub fn new() -> Self {
        Self::default()
    }
    /// `(B, K)` logits of the last forward.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
    /// ∂loss/∂params, the parameters' layout.
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }
    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }
}

/// Option A's shortcut: `x (B, H, W, C_in)` subsampled by `stride` and placed at channels
/// `lo..lo + C_in` of `out (B, H_out, W_out, C_out)`, zeros elsewhere.
fn shortcut_a(x: &[f32], g: &Conv2d, out: &mut [f32]) {
    let (ho, wo) = g.out_hw();
    let (ci, co) = (g.in_ch, g.out_ch);
    let lo = (co - ci) / 2;
    out[..g.batch * ho * wo * co].fill(0.0);
    for b in 0..g.batch {
        for y in 0..ho {
            for xx in 0..wo {
                let src = ((b * g.h + y * g.stride) * g.w + xx * g.stride) * ci;
                let dst = ((b * ho + y) * wo + xx) * co + lo;
                out[dst..dst + ci].copy_from_slice(&x[src..src + ci]);
            }
        }
    }
}

/// The backward of [`shortcut_a`]: `dx += dout` at the positions read.
fn shortcut_a_backward(dout: &[f32], g: &Conv2d, dx: &mut [f32]) {
    let (ho, wo) = g.out_hw();
    let (ci, co) = (g.in_ch, g.out_ch);
    let lo = (co - ci) / 2;
    for b in 0..g.batch {
        for y in 0..ho {
            for xx in 0..wo {
                let src = ((b * ho + y) * wo + xx) * co + lo;
                let dst = ((b * g.h + y * g.stride) * g.w + xx * g.stride) * ci;
                dx[dst..dst + ci]
                    .iter_mut()
                    .zip(&dout[src..src + ci])
                    .for_each(|(d, v)| *d += v);
            }
        }
    }
}

impl ResNet {
    /// A model with He (Kaiming normal, fan-in) initialised convolutions, unit batch norms,
    /// running statistics at (0, 1) and PyTorch's default initialisation of the classifier.
    pub fn new(config: ResNetConfig, seed: u64) -> Result<Self> {
        let (params, buffers, view) = layout(&config)?;
        let mut m = ResNet {
            config,
            params,
            buffers,
            view,
        };
        let mut rng = Rng::new(seed);
        let layers = m.view.layers.clone();
        for l in &layers {
            let fan_in = (l.geo.in_ch * l.geo.k * l.geo.k) as f64;
            let std = (2.0 / fan_in).sqrt();
            let p = m.params.flat_mut();
            p[l.conv.clone()]
                .iter_mut()
                .for_each(|v| *v = (rng.normal() * std) as f32);
            p[l.gamma.clone()].fill(1.0);
            m.buffers.flat_mut()[l.var.clone()].fill(1.0);
        }
        let bound = 1.0 / (m.view.feat as f64).sqrt();
        let (fw, fb) = (m.view.fc_w.clone(), m.view.fc_b.clone());
        let p = m.params.flat_mut();
        for i in fw.chain(fb) {
            let v = &mut p[i];
            *v = ((rng.uniform() * 2.0 - 1.0) * bound) as f32;
        }
        Ok(m)
    }

    /// A model of `config` with every parameter and running statistic zero, to be filled by
    /// a loader.
    pub fn zeros(config: ResNetConfig) -> Result<Self> {
        let (params, buffers, view) = layout(&config)?;
        Ok(ResNet {
            config,
            params,
            buffers,
            view,
        })
    }

    /// A PyTorch ResNet's `state_dict` saved as safetensors (`safetensors.torch.save_file(
    /// model.state_dict(), path)`, PyTorch's names as in this module's layout), for images of
    /// `(h, w)`: depth, width, input channels and classes are read from the tensors' shapes;
    /// `num_batches_tracked` is ignored. A model with projection shortcuts (option B:
    /// `downsample` / `shortcut` tensors), or with any tensor this layout lacks, is refused
    /// with the tensor's name.
    pub fn from_state_dict(path: &std::path::Path, (h, w): (usize, usize)) -> Result<Self> {
        use crate::checkpoint::safetensors::SafeTensors;
        let st = SafeTensors::read(path)?;
        let bad = |why: String| Error::malformed(path, "ResNet state_dict", why);
        let shape = |name: &str| -> Result<Vec<usize>> {
            st.tensors()
                .get(name)
                .map(|t| t.shape.clone())
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    hint: Some(format!(
                        "{} is not a CIFAR ResNet state_dict (conv1, bn1, layer1..3, fc)",
                        path.display()
                    )),
                })
        };
        let stem = shape("conv1.weight")?;
        let fc = shape("fc.weight")?;
        let [width, channels, 3, 3] = stem[..] else {
            return Err(bad(format!(
                "conv1.weight has shape {stem:?}, where a CIFAR ResNet's stem is (width, channels, 3, 3)"
            )));
        };
        let n = (0..)
            .take_while(|i| {
                st.tensors()
                    .contains_key(&format!("layer1.{i}.conv1.weight"))
            })
            .count();
        if let Some(k) = st
            .tensors()
            .keys()
            .find(|k| k.contains(".downsample.") || k.contains(".shortcut."))
        {
            return Err(bad(format!(
                "`{k}`: this ResNet has projection shortcuts (option B); vitrs implements the \
                 parameter-free option A of He et al.'s CIFAR ResNets"
            )));
        }
        let classes = fc.first().copied().unwrap_or(0);
        let cfg = ResNetConfig::cifar(6 * n + 2, width, channels, (h, w), classes);
        let mut m = ResNet::zeros(cfg).map_err(|e| bad(e.to_string()))?;
        let mut known = std::collections::HashSet::new();
        for store in [&mut m.params, &mut m.buffers] {
            let entries = store.entries().to_vec();
            crate::checkpoint::read_prefixed(&st, "", &entries, store.flat_mut())?;
            known.extend(entries.into_iter().map(|e| e.name));
        }
        if let Some(extra) = st
            .tensors()
            .keys()
            .find(|k| !known.contains(*k) && !k.ends_with("num_batches_tracked"))
        {
            return Err(bad(format!(
                "`{extra}` has no place in a ResNet-{} of width {width} (is it another architecture?)",
                6 * n + 2
            )));
        }
        Ok(m)
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }
    pub fn params(&self) -> &Params {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }
    /// The running means and variances of every batch norm.
    pub fn buffers(&self) -> &Params {
        &self.buffers
    }
    pub fn buffers_mut(&mut self) -> &mut Params {
        &mut self.buffers
    }

    /// Multiply-adds × 2 of one image's forward (convolutions and classifier; batch norm,
    /// ReLU and pooling are a rounding error beside them).
    pub fn flops_per_image(&self) -> f64 {
        let conv: usize = self
            .view
            .layers
            .iter()
            .map(|l| 2 * l.geo.rows() * l.geo.cols() * l.geo.out_ch)
            .sum();
        (conv + 2 * self.view.feat * self.config.num_classes) as f64
    }

    /// The same model for images of `(h, w)`: convolutions and global average pooling take
    /// any size, so only the geometry changes (fine-tuning at a new resolution); every
    /// parameter and running statistic is kept.
    pub fn with_input(&self, (h, w): (usize, usize)) -> Result<Self> {
        let cfg = ResNetConfig {
            image_height: h,
            image_width: w,
            ..self.config.clone()
        };
        let mut m = ResNet::zeros(cfg)?;
        // Shapes do not depend on the image size: the same flat layouts.
        m.params.flat_mut().copy_from_slice(self.params.flat());
        m.buffers.flat_mut().copy_from_slice(self.buffers.flat());
        Ok(m)
    }

    /// Bytes of activations and their gradients one image holds in a training step.
    pub fn train_bytes_per_image(&self) -> u64 {
        // The config was validated when the model was built.
        self.config.train_bytes_per_image().unwrap_or(0)
    }

    /// Replaces the classifier by a zero-initialised one for `classes` classes (fine-tuning).
    pub fn reset_head(&mut self, classes: usize) -> Result<()> {
        let old = self.params.clone();
        self.config.num_classes = classes;
        let (mut params, _, view) = layout(&self.config)?;
        for e in old.entries() {
            if !e.name.starts_with("fc.") {
                if let Some(dst) = params.get_mut(&e.name) {
                    dst.copy_from_slice(&old.flat()[e.range.clone()]);
                }
            }
        }
        self.params = params;
        self.view = view;
        Ok(())
    }

    fn batch_of(&self, images: &[f32]) -> Result<usize> {
        let c = &self.config;
        let per = c.channels * c.image_height * c.image_width;
        if images.is_empty() || !images.len().is_multiple_of(per) {
            return Err(Error::BadInput(format!(
                "ResNet input: {} values are not a batch of ({}, {}, {}) images",
                images.len(),
                c.channels,
                c.image_height,
                c.image_width
            )));
        }
        Ok(images.len() / per)
    }

    fn prepare(&self, ws: &mut ResNetWorkspace, batch: usize) {
        ws.batch = batch;
        ws.layers
            .resize_with(self.view.layers.len(), LayerActs::default);
        for (a, l) in ws.layers.iter_mut().zip(&self.view.layers) {
            let n = batch * l.out_per_image();
            a.z.resize(n, 0.0);
            a.y.resize(n, 0.0);
            a.mean.resize(l.geo.out_ch, 0.0);
            a.rstd.resize(l.geo.out_ch, 0.0);
        }
        let widest = self
            .view
            .layers
            .iter()
            .map(|l| l.out_per_image())
            .max()
            .unwrap_or(0);
        let first = self.config.channels * self.config.image_height * self.config.image_width;
        ws.shortcut.resize(batch * widest, 0.0);
        ws.pooled.resize(batch * self.view.feat, 0.0);
        ws.logits.resize(batch * self.config.num_classes, 0.0);
        ws.grads.resize(self.params.count(), 0.0);
        ws.dlogits.resize(batch * self.config.num_classes, 0.0);
        ws.dpooled.resize(batch * self.view.feat, 0.0);
        for v in [&mut ws.dy, &mut ws.dx, &mut ws.dres] {
            v.resize(batch * widest.max(first), 0.0);
        }
    }

    /// The forward pass of `images (B, C, H, W)` into `ws` (logits in [`ResNetWorkspace::logits`]).
    /// In [`Mode::Train`] the batch norms use the batch's statistics and update the running
    /// ones; in [`Mode::Eval`] they use the running ones (and the model is only read: see
    /// [`forward_eval`](Self::forward_eval)).
    pub fn forward(&mut self, images: &[f32], mode: Mode, ws: &mut ResNetWorkspace) -> Result<()> {
        match mode {
            Mode::Eval => self.forward_eval(images, ws),
            Mode::Train => {
                // The running statistics are a few thousand values: updated in a copy while
                // the model is read, then stored.
                let mut running = self.buffers.flat().to_vec();
                self.run(images, ws, Some(&mut running))?;
                self.buffers.flat_mut().copy_from_slice(&running);
                Ok(())
            }
        }
    }

    /// [`forward`](Self::forward) in [`Mode::Eval`], through a shared reference: several
    /// threads may evaluate one model, each with its own workspace.
    pub fn forward_eval(&self, images: &[f32], ws: &mut ResNetWorkspace) -> Result<()> {
        self.run(images, ws, None)
    }

    /// The one forward: batch statistics, moving `update` (the running statistics' layout)
    /// toward them, when `update` is given; the model's running statistics otherwise.
    fn run(
        &self,
        images: &[f32],
        ws: &mut ResNetWorkspace,
        mut update: Option<&mut [f32]>,
    ) -> Result<()> {
        let batch = self.batch_of(images)?;
        self.prepare(ws, batch);
        let (eps, mom) = (self.config.bn_eps, self.config.bn_momentum);
        let p = self.params.flat();
        let view = &self.view;
        for (li, l) in view.layers.iter().enumerate() {
            let g = l.geo(batch);
            let (before, rest) = ws.layers.split_at_mut(li);
            let a = &mut rest[0];
            let (input, layout) = match before.last() {
                None => (images, Layout::Nchw),
                Some(prev) => (&prev.y[..], Layout::Nhwc),
            };
            conv2d(
                &g,
                input,
                layout,
                &p[l.conv.clone()],
                None,
                &mut a.z,
                &mut ws.cols,
            );
            // The second layer of a block adds the shortcut of the block's input (the output
            // of the layer before its first).
            let residual = if li > 0 && li % 2 == 0 {
                let first = &view.layers[li - 1];
                let bg = first.geo(batch);
                let block_in = &before[li - 2].y;
                let n = batch * l.out_per_image();
                if bg.stride == 1 && bg.in_ch == bg.out_ch {
                    // The identity: the block's input itself.
                    Some(&block_in[..n])
                } else {
                    shortcut_a(block_in, &bg, &mut ws.shortcut);
                    Some(&ws.shortcut[..n])
                }
            } else {
                None
            };
            let after = After {
                residual,
                relu: true,
            };
            let affine = (&p[l.gamma.clone()], &p[l.beta.clone()]);
            let c = l.geo.out_ch;
            match update.as_deref_mut() {
                Some(bufs) => {
                    let (rm, rv) = split_two(bufs, &l.mean, &l.var);
                    batchnorm_train(
                        &a.z,
                        &mut a.y,
                        affine,
                        c,
                        eps,
                        (&mut a.mean, &mut a.rstd),
                        (rm, rv, mom),
                        after,
                    );
                }
                None => {
                    let bufs = self.buffers.flat();
                    let running = (&bufs[l.mean.clone()], &bufs[l.var.clone()]);
                    batchnorm_eval(&a.z, &mut a.y, affine, c, eps, running, after);
                }
            }
        }
        // Global average pooling, then the classifier.
        let last = ws.layers.last().map(|a| &a.y[..]).unwrap_or(&[]);
        let feat = view.feat;
        let pixels = last.len() / (batch * feat).max(1);
        for (b, out) in ws.pooled.chunks_exact_mut(feat).enumerate() {
            out.fill(0.0);
            for px in last[b * pixels * feat..(b + 1) * pixels * feat].chunks_exact(feat) {
                out.iter_mut().zip(px).for_each(|(o, v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= pixels as f32);
        }
        let k = self.config.num_classes;
        linear(
            &ws.pooled,
            &p[view.fc_w.clone()],
            Some(&p[view.fc_b.clone()]),
            &mut ws.logits,
            (batch, feat, k),
            Epilogue::None,
        );
        Ok(())
    }

    /// Logits `(B, K)` of `images (B, C, H, W)` with the running statistics.
    pub fn predict(&self, images: &[f32], ws: &mut ResNetWorkspace) -> Result<Vec<f32>> {
        self.forward_eval(images, ws)?;
        Ok(ws.logits.clone())
    }

    /// One training step's maths: the forward in [`Mode::Train`] (which updates the running
    /// statistics), softmax cross-entropy against `targets`, and the backward **accumulating**
    /// ∂loss/∂params into `ws.grads()`. Returns the mean loss.
    pub fn forward_backward(
        &mut self,
        images: &[f32],
        targets: Targets<'_>,
        ws: &mut ResNetWorkspace,
    ) -> Result<f32> {
        self.forward(images, Mode::Train, ws)?;
        let k = self.config.num_classes;
        let loss = cross_entropy(&ws.logits, k, targets, &mut ws.dlogits)?;
        self.backward(images, ws);
        Ok(loss)
    }

    /// Backward from `ws.dlogits (B, K)`: the classifier, the pooling, then the layers last to
    /// first (each: ReLU mask, batch norm, convolution; a block's second layer passes its
    /// masked gradient to the shortcut, added to the block input's gradient after the first).
    fn backward(&self, images: &[f32], ws: &mut ResNetWorkspace) {
        let batch = ws.batch;
        let p = self.params.flat();
        let view = &self.view;
        let (feat, k) = (view.feat, self.config.num_classes);
        let ResNetWorkspace {
            layers,
            pooled,
            grads,
            dlogits,
            dpooled,
            dy,
            dx,
            dres,
            cols,
            dcols,
            ..
        } = ws;
        {
            let (gw, gb) = split_two(grads, &view.fc_w, &view.fc_b);
            linear_backward(
                dlogits,
                pooled,
                &p[view.fc_w.clone()],
                Some(dpooled),
                gw,
                Some(gb),
                (batch, feat, k),
            );
        }
        // ∂/∂(last output): each pixel gets its image's pooled gradient / pixels.
        let last_len = batch * view.layers.last().map_or(0, |l| l.out_per_image());
        let pixels = last_len / (batch * feat).max(1);
        for b in 0..batch {
            let d = &dpooled[b * feat..(b + 1) * feat];
            for px in dy[b * pixels * feat..(b + 1) * pixels * feat].chunks_exact_mut(feat) {
                px.iter_mut()
                    .zip(d)
                    .for_each(|(o, v)| *o = v / pixels as f32);
            }
        }
        for li in (0..view.layers.len()).rev() {
            let l = &view.layers[li];
            let g = l.geo(batch);
            let n = batch * l.out_per_image();
            let a = &layers[li];
            relu_mask(&a.y, &mut dy[..n]);
            let second = li > 0 && li % 2 == 0;
            if second {
                dres[..n].copy_from_slice(&dy[..n]);
            }
            // dz (in dx's buffer) from dy, through the batch norm.
            {
                let (gg, gb) = split_two(grads, &l.gamma, &l.beta);
                batchnorm_backward(
                    &a.z,
                    &dy[..n],
                    &mut dx[..n],
                    &p[l.gamma.clone()],
                    l.geo.out_ch,
                    (&a.mean, &a.rstd),
                    (gg, gb),
                );
            }
            std::mem::swap(dy, dx);
            let (input, layout) = match li {
                0 => (images, Layout::Nchw),
                _ => (&layers[li - 1].y[..], Layout::Nhwc),
            };
            let want_dx = li > 0;
            conv2d_backward(
                &g,
                input,
                layout,
                &p[l.conv.clone()],
                &dy[..n],
                want_dx.then_some(&mut dx[..g.in_len()]),
                &mut grads[l.conv.clone()],
                None,
                (cols, dcols),
            );
            if !want_dx {
                break;
            }
            std::mem::swap(dy, dx);
            // After a block's first layer, dy is ∂/∂(block input) through the residual branch;
            // add the shortcut's.
            if li % 2 == 1 {
                if g.stride == 1 && g.in_ch == g.out_ch {
                    let m = g.in_len();
                    add_assign(&mut dy[..m], &dres[..m]);
                } else {
                    shortcut_a_backward(dres, &g, dy);
                }
            }
        }
    }
}

/// Two disjoint ranges of one buffer, mutably.
fn split_two<'a>(
    buf: &'a mut [f32],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'a mut [f32], &'a mut [f32]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "overlapping ranges {a:?} {b:?}"
    );
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a.clone()], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet20_has_the_papers_size() {
        let m = ResNet::new(ResNetConfig::cifar(20, 16, 3, (32, 32), 10), 0).unwrap();
        // He et al. 2016, Table 6: 0.27 M parameters.
        let n = m.params().count();
        assert!((268_000..=275_000).contains(&n), "{n}");
        assert_eq!(
            m.params()
                .entries()
                .iter()
                .filter(|e| e.name.ends_with("conv1.weight"))
                .count(),
            10
        );
        assert!(ResNet::new(ResNetConfig::cifar(21, 16, 3, (32, 32), 10), 0).is_err());
        // He et al.: ResNet-20 is about 41 M multiply-adds on a 32 x 32 image.
        let macs = m.flops_per_image() / 2.0;
        assert!((40e6..42e6).contains(&macs), "{macs}");
        // The estimates made before allocating agree with the model built.
        assert_eq!(m.config().param_count().unwrap(), n);
        for (cfg, h) in [
            (ResNetConfig::cifar(8, 4, 1, (9, 7), 3), 9),
            (m.config().clone(), 32),
        ] {
            let r = ResNet::new(cfg.clone(), 0).unwrap();
            assert_eq!(cfg.param_count().unwrap(), r.params().count(), "{h}");
            let mut ws = ResNetWorkspace::new();
            let x = vec![0.5f32; 2 * cfg.channels * cfg.image_height * cfg.image_width];
            r.forward_eval(&x, &mut ws).unwrap();
            let held: usize = ws.layers.iter().map(|a| a.z.len() + a.y.len()).sum();
            assert!(4 * held as u64 <= 2 * cfg.train_bytes_per_image().unwrap());
        }
    }

    #[test]
    fn presets_name_depth_width_and_input() {
        let c = ResNetConfig::preset("resnet20@28x1").unwrap().unwrap();
        assert_eq!(
            (c.depth, c.width, c.image_height, c.channels),
            (20, 16, 28, 1)
        );
        let c = ResNetConfig::preset("resnet56w32").unwrap().unwrap();
        assert_eq!(
            (c.depth, c.width, c.image_height, c.channels),
            (56, 32, 32, 3)
        );
        assert!(ResNetConfig::preset("resnet21").unwrap().is_err());
        assert!(ResNetConfig::preset("resnetx").unwrap().is_err());
        assert!(ResNetConfig::preset("B/16").is_none());
    }

    /// A state_dict of this module's own model round-trips; one with a projection shortcut,
    /// an unknown tensor or a wrong shape is refused naming the tensor.
    #[test]
    fn state_dicts_round_trip_and_foreign_ones_are_named() {
        use crate::checkpoint::safetensors::{write, SaveDtype};
        let dir = std::env::temp_dir().join(format!("vitrs-resnet-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = ResNet::new(ResNetConfig::cifar(8, 4, 1, (8, 8), 3), 7).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
        for (store, e) in m
            .params()
            .entries()
            .iter()
            .map(|e| (m.params(), e))
            .chain(m.buffers().entries().iter().map(|e| (m.buffers(), e)))
        {
            tensors.push((
                e.name.clone(),
                e.shape.clone(),
                store.flat()[e.range.clone()].to_vec(),
            ));
        }
        let save = |name: &str, extra: Option<(&str, Vec<usize>)>, drop: Option<&str>| {
            let p = dir.join(name);
            let mut t: Vec<(&str, &[usize], &[f32])> = tensors
                .iter()
                .filter(|(n, _, _)| Some(n.as_str()) != drop)
                .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
                .collect();
            let zeros = vec![0.0; 64];
            if let Some((n, s)) = extra.as_ref() {
                t.push((n, s, &zeros[..s.iter().product::<usize>()]));
            }
            write(&p, &t, &Default::default(), SaveDtype::F32).unwrap();
            p
        };
        let back = ResNet::from_state_dict(&save("ok.safetensors", None, None), (8, 8)).unwrap();
        assert_eq!(back.params().flat(), m.params().flat());
        assert_eq!(back.buffers().flat(), m.buffers().flat());
        let err =
            |p: std::path::PathBuf| ResNet::from_state_dict(&p, (8, 8)).unwrap_err().to_string();
        let e = err(save(
            "b.safetensors",
            Some(("layer2.0.downsample.0.weight", vec![8, 4, 1, 1])),
            None,
        ));
        assert!(
            e.contains("layer2.0.downsample.0.weight") && e.contains("option A"),
            "{e}"
        );
        let e = err(save("x.safetensors", Some(("head.extra", vec![2])), None));
        assert!(e.contains("head.extra"), "{e}");
        let e = err(save(
            "m.safetensors",
            None,
            Some("layer3.0.bn2.running_var"),
        ));
        assert!(e.contains("layer3.0.bn2.running_var"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
