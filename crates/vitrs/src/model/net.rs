//! One type for the architectures the `vit` commands train, evaluate and predict with: the ViT
//! and the CIFAR ResNet baseline ([`super::resnet`]). The trainer, the evaluation and the
//! predictor hold a [`Net`] and ask it only what both architectures answer (parameters,
//! logits, one training step); what only a ViT has (attention maps, ONNX export, position
//! embeddings) asks for [`Net::vit`], which names the architecture it got instead.

use std::ops::Range;

use super::resnet::{ResNet, ResNetConfig, ResNetWorkspace};
use super::{Capture, Params, Regularization, TrainWorkspace, ViT, Workspace};
use crate::config::ViTConfig;
use crate::error::{Error, Result};
use crate::kernels::loss::Targets;
use crate::tensor::Tensor;

/// A model of either architecture.
// One or two per process: the ViT variant's size does not matter beside its weights.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Net {
    ViT(ViT),
    ResNet(ResNet),
}

/// The architecture and size of a model to build: what `[model]` resolves to.
#[derive(Clone, Debug, PartialEq)]
pub enum NetConfig {
    ViT(ViTConfig),
    ResNet(ResNetConfig),
}

impl NetConfig {
    /// A randomly initialised model, deterministic in `seed`.
    pub fn build(&self, seed: u64) -> Result<Net> {
        Ok(match self {
            NetConfig::ViT(c) => Net::ViT(ViT::random(c.clone(), seed)?),
            NetConfig::ResNet(c) => Net::ResNet(ResNet::new(c.clone(), seed)?),
        })
    }

    /// Parameters, and bytes of activations one image holds in a training step, of a model
    /// of this config, without allocating it (to refuse a run that cannot fit first).
    pub fn train_footprint(&self) -> Result<(usize, u64)> {
        Ok(match self {
            NetConfig::ViT(c) => (ViT::param_count(c), TrainWorkspace::bytes_per_image(c)),
            NetConfig::ResNet(c) => (c.param_count()?, c.train_bytes_per_image()?),
        })
    }
}

impl From<ViT> for Net {
    fn from(m: ViT) -> Self {
        Net::ViT(m)
    }
}

impl From<ResNet> for Net {
    fn from(m: ResNet) -> Self {
        Net::ResNet(m)
    }
}

impl Net {
    /// A one-line description of the size: `D=64 L=6 heads=4 patch=4` for a ViT,
    /// `ResNet-20 (width 16)`.
    pub fn describe(&self) -> String {
        match self {
            Net::ViT(m) => {
                let c = m.config();
                format!(
                    "D={} L={} heads={} patch={}",
                    c.width, c.depth, c.heads, c.patch_size
                )
            }
            Net::ResNet(m) => {
                let c = m.config();
                format!("ResNet-{} (width {})", c.depth, c.width)
            }
        }
    }

    /// The ViT, or an error naming what `what` (a command, a feature) needs and what the
    /// model is instead.
    pub fn vit(&self, what: &str) -> Result<&ViT> {
        match self {
            Net::ViT(m) => Ok(m),
            Net::ResNet(m) => Err(Error::BadInput(format!(
                "{what} needs a ViT; this model is a ResNet-{} (arch = \"resnet\")",
                m.config().depth
            ))),
        }
    }

    /// [`Net::vit`], by value.
    pub fn into_vit(self, what: &str) -> Result<ViT> {
        match self {
            Net::ViT(m) => Ok(m),
            other => other.vit(what).cloned(),
        }
    }

    /// The trainable parameters (a ResNet's running statistics are not among them).
    pub fn params(&self) -> &Params {
        match self {
            Net::ViT(m) => m.params(),
            Net::ResNet(m) => m.params(),
        }
    }

    pub fn params_mut(&mut self) -> &mut Params {
        match self {
            Net::ViT(m) => m.params_mut(),
            Net::ResNet(m) => m.params_mut(),
        }
    }

    /// State that is not trained by gradients: a ResNet's batch-norm running statistics.
    pub fn buffers(&self) -> Option<&Params> {
        match self {
            Net::ViT(_) => None,
            Net::ResNet(m) => Some(m.buffers()),
        }
    }

    pub fn buffers_mut(&mut self) -> Option<&mut Params> {
        match self {
            Net::ViT(_) => None,
            Net::ResNet(m) => Some(m.buffers_mut()),
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Net::ViT(m) => m.config().num_classes,
            Net::ResNet(m) => m.config().num_classes,
        }
    }

    /// `(channels, height, width)` of the input images.
    pub fn input(&self) -> (usize, usize, usize) {
        match self {
            Net::ViT(m) => {
                let c = m.config();
                (c.channels, c.image_height, c.image_width)
            }
            Net::ResNet(m) => {
                let c = m.config();
                (c.channels, c.image_height, c.image_width)
            }
        }
    }

    /// Multiply-adds × 2 of one image's forward, as it runs (a ViT's
    /// [`ViTConfig::flops_run_per_image`]).
    pub fn flops_per_image(&self) -> f64 {
        match self {
            Net::ViT(m) => m.config().flops_run_per_image(),
            Net::ResNet(m) => m.flops_per_image(),
        }
    }

    /// Bytes of activations one image holds in a training step.
    pub fn train_bytes_per_image(&self) -> u64 {
        match self {
            Net::ViT(m) => TrainWorkspace::bytes_per_image(m.config()),
            Net::ResNet(m) => m.train_bytes_per_image(),
        }
    }

    /// Logits `(B, K)` of `images (B, C, H, W)` in evaluation mode (a ResNet's running
    /// statistics); the model is only read.
    pub fn logits<'w>(&self, images: &Tensor, ws: &'w mut NetWorkspace) -> Result<&'w [f32]> {
        match self {
            Net::ViT(m) => {
                let out = m.forward(images, Capture::default(), &mut ws.vit)?;
                ws.logits = out.logits.into_data();
                Ok(&ws.logits)
            }
            Net::ResNet(m) => {
                m.forward_eval(images.data(), &mut ws.resnet)?;
                Ok(ws.resnet.logits())
            }
        }
    }

    /// One training forward and backward on `images (B, C, H, W)`, **adding** ∂loss/∂params
    /// to [`NetWorkspace::grads`]; the mean loss. A ResNet's batch norms use the batch's
    /// statistics and move their running averages; a ViT draws its dropout and drop-path
    /// masks from `reg`, which a ResNet (no dropout) ignores. `ready` receives each piece of
    /// the gradient buffer once it is final (a ViT's backward hands them over block by
    /// block; a ResNet's, all of it at the end).
    pub fn forward_backward(
        &mut self,
        images: &Tensor,
        targets: Targets<'_>,
        reg: Regularization,
        ws: &mut NetWorkspace,
        ready: &mut dyn FnMut(Range<usize>, &[f32]),
    ) -> Result<f32> {
        match self {
            Net::ViT(m) => {
                ws.train.reg = reg;
                m.forward_backward_overlapped(images, targets, &mut ws.train, ready)
            }
            Net::ResNet(m) => {
                let loss = m.forward_backward(images.data(), targets, &mut ws.resnet)?;
                let g = ws.resnet.grads();
                ready(0..g.len(), g);
                Ok(loss)
            }
        }
    }
}

/// Scratch for a [`Net`]: what each architecture needs, allocated on first use and reused.
#[derive(Debug, Default)]
pub struct NetWorkspace {
    vit: Workspace,
    train: TrainWorkspace,
    resnet: ResNetWorkspace,
    logits: Vec<f32>,
    /// Whether this is a ResNet's workspace (set by [`NetWorkspace::for_net`]): where the
    /// gradients and the training logits are.
    resnet_trained: bool,
}

impl NetWorkspace {
    /// Scratch for training or evaluating `net`.
    pub fn for_net(net: &Net) -> Self {
        NetWorkspace {
            resnet_trained: matches!(net, Net::ResNet(_)),
            ..Default::default()
        }
    }

    /// ∂loss/∂params accumulated by [`Net::forward_backward`], the parameters' layout.
    pub fn grads(&self) -> &[f32] {
        if self.resnet_trained {
            self.resnet.grads()
        } else {
            self.train.grads()
        }
    }

    pub fn grads_mut(&mut self) -> &mut [f32] {
        if self.resnet_trained {
            self.resnet.grads_mut()
        } else {
            self.train.grads_mut()
        }
    }

    pub fn zero_grads(&mut self) {
        self.resnet.zero_grads();
        self.train.zero_grads();
    }

    /// `(B, K)` logits of the last training forward.
    pub fn train_logits(&self) -> &[f32] {
        if self.resnet_trained {
            self.resnet.logits()
        } else {
            self.train.logits()
        }
    }
}
