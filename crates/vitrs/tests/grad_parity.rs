//! The hand-written backward pass against PyTorch's autograd (loss and every parameter's
//! gradient, from `tools/make_fixtures.py`, post-norm blocks included), and a
//! finite-difference spot check for every option, including the one no PyTorch model has (the
//! pre-training head's tanh pre-logits).

use std::path::{Path, PathBuf};

use serde_json::Value;
use vitrs::checkpoint::safetensors::SafeTensors;
use vitrs::kernels::loss::Targets;
use vitrs::model::{Regularization, TrainWorkspace};
use vitrs::npy::read_npy;
use vitrs::{Gelu, Head, NormPlacement, Pool, Sizes, Tensor, ViT, ViTConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn check(name: &str) {
    let dir = fixtures().join(name);
    // Hugging Face and timm fixtures are directories; native ones a file that carries its config.
    let ck = match dir.join("config.json").is_file() {
        true => vitrs::load(&dir),
        false => vitrs::load(&dir.join("model.safetensors")),
    }
    .unwrap();
    let x = read_npy(&dir.join("ref/input.npy")).unwrap();
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref/grads.json")).unwrap())
            .unwrap();
    let labels: Vec<usize> = info["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let smoothing = info["label_smoothing"].as_f64().unwrap() as f32;
    let mut tw = TrainWorkspace::new();
    let loss = ck
        .model
        .forward_backward(
            &x,
            Targets::Labels {
                labels: &labels,
                smoothing,
            },
            &mut tw,
        )
        .unwrap();
    let want_loss = info["loss"].as_f64().unwrap() as f32;
    assert!(
        (loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
        "{name}: loss {loss} vs {want_loss}"
    );
    let refs = SafeTensors::read(&dir.join("ref/grads.safetensors")).unwrap();
    let params = ck.model.params();
    assert_eq!(
        refs.tensors().len(),
        params.entries().len(),
        "{name}: every parameter has a reference gradient"
    );
    let mut worst = (0.0f32, String::new());
    for e in params.entries() {
        let want = refs
            .tensor(&e.name)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        let got = &tw.grads()[e.range.clone()];
        let scale = want
            .data()
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        let diff = vitrs::kernels::max_abs_diff(got, want.data());
        let rel = diff / scale;
        if rel > worst.0 {
            worst = (rel, e.name.clone());
        }
        assert!(
            rel <= 1e-4,
            "{name}: gradient of `{}` differs by {diff:e} (max |ref| {scale:e}, relative {rel:e}); first values {:?} vs {:?}",
            e.name,
            &got[..got.len().min(4)],
            &want.data()[..got.len().min(4)]
        );
    }
    eprintln!(
        "{name}: loss {loss} vs {want_loss}; worst relative gradient error {:.2e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn hf_classifier_gradients() {
    check("hf_cls");
}

#[test]
fn hf_nonsquare_tanh_gelu_no_qkv_bias_gradients() {
    check("hf_nonsquare");
}

#[test]
fn timm_named_gradients() {
    check("timm_tiny_named");
}

#[test]
fn timm_mean_pool_fc_norm_gradients() {
    check("timm_mean_nonsquare");
}

#[test]
fn timm_patch8_no_qkv_bias_gradients() {
    check("timm_p8_nobias");
}

#[test]
fn timm_deit_distilled_gradients() {
    check("timm_deit_distilled");
}

#[test]
fn timm_deit3_layer_scale_gradients() {
    check("timm_deit3");
}

#[test]
fn timm_registers_gap_gradients() {
    check("timm_reg_gap");
}

#[test]
fn timm_attention_pooling_gradients() {
    check("timm_siglip_map");
}

/// Post-norm blocks (the original Transformer's) with LayerScale and tanh GELU, built in
/// PyTorch from timm's parts (`tools/make_fixtures.py`, `PostNormBlock`).
#[test]
fn post_norm_layer_scale_gradients() {
    check("native_postnorm");
}

/// Central differences of the loss for a few entries of every parameter tensor.
fn finite_difference(cfg: ViTConfig) {
    finite_difference_with(cfg, Regularization::default());
}

fn finite_difference_with(cfg: ViTConfig, reg: Regularization) {
    let mut m = ViT::zeros(cfg.clone()).unwrap();
    let mut rng = vitrs::model::Rng::new(5);
    m.params_mut()
        .flat_mut()
        .iter_mut()
        .for_each(|v| *v = (rng.normal() * 0.3) as f32);
    let numel = 2 * cfg.channels * cfg.image_height * cfg.image_width;
    let x = Tensor::new(
        vec![2, cfg.channels, cfg.image_height, cfg.image_width],
        (0..numel).map(|_| rng.normal() as f32).collect(),
    )
    .unwrap();
    let labels = [1, 2];
    let t = Targets::Labels {
        labels: &labels,
        smoothing: 0.1,
    };
    let mut tw = TrainWorkspace::new();
    // The same seed gives the same dropout masks on every call, so the loss is a fixed function.
    tw.reg = reg;
    m.forward_backward(&x, t, &mut tw).unwrap();
    let grads = tw.grads().to_vec();
    let entries = m.params().entries().to_vec();
    let h = 1e-2f32;
    for e in entries {
        for j in [0, e.range.len() / 2, e.range.len() - 1] {
            let i = e.range.start + j;
            let orig = m.params().flat()[i];
            m.params_mut().flat_mut()[i] = orig + h;
            let lp = m.forward_backward(&x, t, &mut tw).unwrap() as f64;
            m.params_mut().flat_mut()[i] = orig - h;
            let lm = m.forward_backward(&x, t, &mut tw).unwrap() as f64;
            m.params_mut().flat_mut()[i] = orig;
            let fd = (lp - lm) / (2.0 * h as f64);
            let g = grads[i] as f64;
            assert!(
                (fd - g).abs() < 2e-3 + 2e-2 * g.abs(),
                "{}[{j}]: analytic {g:e}, finite difference {fd:e}",
                e.name
            );
        }
    }
}

fn small() -> ViTConfig {
    ViTConfig::paper(Sizes {
        image: (8, 12),
        channels: 2,
        patch: 4,
        width: 8,
        depth: 2,
        heads: 2,
        mlp: 12,
        classes: 3,
    })
}

#[test]
fn finite_differences_pre_norm() {
    finite_difference(small());
}

#[test]
fn finite_differences_post_norm_pre_logits_tanh_gelu() {
    let mut c = small();
    c.norm = NormPlacement::Post;
    c.head = Head::PreLogits { hidden: 5 };
    c.gelu = Gelu::Tanh;
    finite_difference(c);
}

#[test]
fn finite_differences_mean_pool_fc_norm() {
    let mut c = small();
    c.pool = Pool::Mean;
    c.fc_norm = true;
    finite_difference(c);
}

#[test]
fn finite_differences_with_dropout_and_stochastic_depth() {
    let mut c = small();
    c.depth = 3;
    finite_difference_with(
        c.clone(),
        Regularization {
            dropout: 0.2,
            drop_path: 0.5,
            seed: 9,
        },
    );
    c.norm = NormPlacement::Post;
    finite_difference_with(
        c,
        Regularization {
            dropout: 0.3,
            drop_path: 0.0,
            seed: 4,
        },
    );
}

#[test]
fn finite_differences_deit_distillation_token() {
    let mut c = small();
    c.distilled = true;
    finite_difference(c.clone());
    c.reg_tokens = 2;
    c.no_embed_class = true;
    finite_difference(c);
}

#[test]
fn finite_differences_registers_layer_scale_no_class_token() {
    let mut c = small();
    c.class_token = false;
    c.pool = Pool::Mean;
    c.fc_norm = true;
    c.reg_tokens = 2;
    c.no_embed_class = true;
    c.layer_scale = Some(0.5);
    finite_difference(c.clone());
    // LayerScale under masks, post-norm.
    c.norm = NormPlacement::Post;
    c.fc_norm = false;
    finite_difference_with(
        c,
        Regularization {
            dropout: 0.2,
            drop_path: 0.3,
            seed: 3,
        },
    );
}

#[test]
fn finite_differences_attention_pooling() {
    let mut c = small();
    c.class_token = false;
    c.pool = Pool::Map;
    finite_difference(c.clone());
    c.class_token = true;
    c.reg_tokens = 1;
    c.head = Head::PreLogits { hidden: 5 };
    finite_difference(c);
}
