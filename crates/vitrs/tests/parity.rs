//! Logit, attention and preprocessing parity against PyTorch (transformers and timm), on the
//! fixtures made by `tools/make_fixtures.py`. Tolerances are the engine's contract:
//! |Δlogit| ≤ 1e-4, |Δattention| ≤ 1e-5, |Δpixel| ≤ 2e-2 after normalisation.

use std::path::{Path, PathBuf};

use vitrs::checkpoint::safetensors::SaveDtype;
use vitrs::npy::read_npy;
use vitrs::{Capture, Format, Tensor, Workspace};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Asserts `got ≈ want` within `tol`, printing the first values side by side on failure.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    let diffs: Vec<f32> = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(a, b)| (a - b).abs())
        .collect();
    let (worst_i, worst) = diffs
        .iter()
        .copied()
        .enumerate()
        .fold((0, 0.0f32), |acc, (i, d)| {
            if d > acc.1 || d.is_nan() {
                (i, d)
            } else {
                acc
            }
        });
    eprintln!("{what}: max |diff| {worst:.2e} (tolerance {tol:e})");
    if worst.is_nan() || worst > tol {
        let side: Vec<String> = got
            .data()
            .iter()
            .zip(want.data())
            .take(8)
            .map(|(a, b)| format!("{a:+.6} vs {b:+.6}"))
            .collect();
        panic!(
            "{what}: max |diff| {worst:e} at flat index {worst_i} exceeds {tol:e}\nfirst values (ours vs reference):\n  {}",
            side.join("\n  ")
        );
    }
}

fn check_fixture(name: &str, format: Format) {
    let dir = fixtures().join(name);
    let ck = vitrs::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(ck.report.format, format, "{name}");
    assert!(ck.report.missing.is_empty() && ck.report.mismatched.is_empty());
    let r = dir.join("ref");
    let input = read_npy(&r.join("input.npy")).unwrap();
    let want_logits = read_npy(&r.join("logits.npy")).unwrap();
    let want_attn = read_npy(&r.join("attentions.npy")).unwrap();

    let capture = Capture {
        attentions: true,
        pre_logits: true,
    };
    let out = ck
        .model
        .forward(&input, capture, &mut Workspace::new())
        .unwrap();
    assert_close(&format!("{name} logits"), &out.logits, &want_logits, 1e-4);
    assert_close(
        &format!("{name} attentions"),
        out.attentions.as_ref().unwrap(),
        &want_attn,
        1e-5,
    );

    // The fast path (no capture) gives the same logits as the capturing path.
    let fast = ck.model.logits(&input).unwrap();
    assert_close(&format!("{name} fast path"), &fast, &out.logits, 1e-6);

    // Preprocessing of the model-size and the larger, odd-sized image.
    for (img, px) in [
        ("image.png", "pixels.npy"),
        ("image_large.png", "pixels_large.npy"),
    ] {
        let got = ck.preprocess.load(&r.join(img)).unwrap();
        let want = read_npy(&r.join(px)).unwrap();
        // The issue asks for 2e-2; the Pillow-exact resampler gives ~1e-6, so guard that.
        assert_close(&format!("{name} preprocess {img}"), &got, &want, 1e-4);
    }

    // Converting to the native format and back changes nothing.
    let tmp = std::env::temp_dir().join(format!(
        "vitrs-parity-{name}-{}.safetensors",
        std::process::id()
    ));
    vitrs::checkpoint::save_native(
        &tmp,
        &ck.model,
        &ck.preprocess,
        ck.labels.as_deref(),
        SaveDtype::F32,
    )
    .unwrap();
    let back = vitrs::load(&tmp).unwrap();
    // The native file is read straight into the parameter buffer; one flipped bit in its
    // data is caught by the checksum on that path too.
    let mut bytes = std::fs::read(&tmp).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&tmp, &bytes).unwrap();
    let Err(e) = vitrs::load(&tmp) else {
        panic!("{name}: a damaged native file loaded")
    };
    assert!(e.to_string().contains("checksum mismatch"), "{name}: {e}");
    std::fs::remove_file(&tmp).ok();
    assert_eq!(back.report.format, Format::Native);
    assert_eq!(back.model.config(), ck.model.config());
    assert_eq!(back.preprocess, ck.preprocess);
    assert_eq!(back.labels, ck.labels);
    assert_eq!(back.model.logits(&input).unwrap(), fast);
}

#[test]
fn hf_classifier_square() {
    check_fixture("hf_cls", Format::HuggingFace);
}

#[test]
fn hf_nonsquare_no_qkv_bias_tanh_gelu() {
    check_fixture("hf_nonsquare", Format::HuggingFace);
}

#[test]
fn hf_bare_vitmodel_pooler_output() {
    check_fixture("hf_bare", Format::HuggingFace);
}

#[test]
fn timm_named_architecture_with_overrides() {
    check_fixture("timm_tiny_named", Format::Timm);
}

#[test]
fn timm_mean_pool_nonsquare() {
    check_fixture("timm_mean_nonsquare", Format::Timm);
}

#[test]
fn timm_patch8_no_qkv_bias() {
    check_fixture("timm_p8_nobias", Format::Timm);
}

#[test]
fn timm_deit_distillation_token() {
    check_fixture("timm_deit_distilled", Format::Timm);
}

#[test]
fn timm_deit3_layer_scale_patch_only_positions() {
    check_fixture("timm_deit3", Format::Timm);
}

#[test]
fn timm_registers_without_class_token() {
    check_fixture("timm_reg_gap", Format::Timm);
}

#[test]
fn timm_attention_pooling() {
    check_fixture("timm_siglip_map", Format::Timm);
}

/// Post-norm blocks (the original Transformer's: `x = LN(x + branch(x))`) with LayerScale and
/// tanh GELU and no final norm, which no library ships: built in PyTorch from timm's parts and
/// saved in the native format by `tools/make_fixtures.py`.
#[test]
fn native_post_norm_matches_pytorch() {
    let dir = fixtures().join("native_postnorm");
    let ck = vitrs::load(&dir.join("model.safetensors")).unwrap();
    assert_eq!(ck.report.format, Format::Native);
    assert_eq!(ck.model.config().norm, vitrs::NormPlacement::Post);
    assert!(ck.model.params().get("norm.weight").is_none());
    let r = dir.join("ref");
    let input = read_npy(&r.join("input.npy")).unwrap();
    let capture = Capture {
        attentions: true,
        pre_logits: false,
    };
    let out = ck
        .model
        .forward(&input, capture, &mut Workspace::new())
        .unwrap();
    let want = read_npy(&r.join("logits.npy")).unwrap();
    assert_close("native_postnorm logits", &out.logits, &want, 1e-4);
    let want = read_npy(&r.join("attentions.npy")).unwrap();
    let got = out.attentions.as_ref().unwrap();
    assert_close("native_postnorm attentions", got, &want, 1e-5);
}

#[test]
fn hf_labels_and_config_are_read() {
    let ck = vitrs::load(&fixtures().join("hf_cls")).unwrap();
    assert_eq!(
        ck.labels.as_deref().unwrap()[..2],
        ["cat".to_string(), "dog".to_string()]
    );
    assert_eq!(ck.model.config().layer_norm_eps, 1e-12);
    // Placeholder LABEL_i names are not labels.
    let ck = vitrs::load(&fixtures().join("hf_nonsquare")).unwrap();
    assert!(ck.labels.is_none());
    assert_eq!(ck.label(2), "class_2");
}

/// Loads `name`, checks the logits for `ref/input.npy`, returns the checkpoint.
fn logits_match(name: &str) -> vitrs::Checkpoint {
    let dir = fixtures().join(name);
    let ck = vitrs::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let input = read_npy(&dir.join("ref/input.npy")).unwrap();
    let want = read_npy(&dir.join("ref/logits.npy")).unwrap();
    assert_close(
        &format!("{name} logits"),
        &ck.model.logits(&input).unwrap(),
        &want,
        1e-4,
    );
    ck
}

#[test]
fn hf_transformers5_in_memory_key_names() {
    let ck = logits_match("hf_v5_names");
    assert!(
        ck.report
            .conversions
            .iter()
            .any(|c| c.contains("transformers 5.x layout")),
        "{:?}",
        ck.report.conversions
    );
    // hf_cls itself is the 4.x layout that save_pretrained writes.
    let ck = vitrs::load(&fixtures().join("hf_cls")).unwrap();
    assert!(ck
        .report
        .conversions
        .iter()
        .any(|c| c.contains("transformers 4.x layout")));
}

#[test]
fn timm_position_table_is_resampled_like_timm() {
    let ck = logits_match("timm_resample");
    assert!(
        ck.report
            .conversions
            .iter()
            .any(|c| c.contains("resampled pos_embed from a 2x2 to a 3x3 grid")),
        "{:?}",
        ck.report.conversions
    );
    let want = read_npy(&fixtures().join("timm_resample/ref/pos_embed.npy")).unwrap();
    let got = Tensor::new(
        vec![1, 10, 48],
        ck.model.params().get("pos_embed").unwrap().to_vec(),
    )
    .unwrap();
    assert_close("timm_resample pos_embed", &got, &want, 1e-5);
}

/// Google `.npz` checkpoints in both layouts (vision_transformer with a pre-logits layer,
/// f32; big_vision with scan-stacked blocks, bf16) against logits computed by JAX
/// (`tools/make_npz_fixtures.py`).
#[test]
fn google_npz_layouts_match_jax() {
    for name in [
        "npz-vit",
        "npz-bigvision",
        "npz-bigvision-gap",
        "npz-bigvision-map",
    ] {
        let dir = fixtures().join(name);
        let ck = vitrs::load(&dir.join("model.npz")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ck.report.format, Format::GoogleNpz, "{name}");
        assert!(
            ck.report.unexpected.is_empty(),
            "{name}: {:?}",
            ck.report.unexpected
        );
        assert_eq!(ck.model.config().gelu, vitrs::config::Gelu::Tanh);
        let x = read_npy(&dir.join("input.npy")).unwrap();
        let want = read_npy(&dir.join("logits.npy")).unwrap();
        let got = ck.model.logits(&x).unwrap();
        assert_close(name, &got, &want, 1e-4);
        let cfg = ck.model.config();
        let want_pool = match name {
            "npz-bigvision-gap" => vitrs::Pool::Mean,
            "npz-bigvision-map" => vitrs::Pool::Map,
            _ => vitrs::Pool::Cls,
        };
        assert_eq!(cfg.pool, want_pool, "{name}");
        assert_eq!(cfg.class_token, want_pool == vitrs::Pool::Cls, "{name}");
    }
}

/// Fortran-ordered arrays (what NumPy writes for a transposed array; made by
/// `tools/make_fortran_fixtures.py`): an `.npz` checkpoint whose kernels are column-major and
/// a column-major `.npy` input load as their C-ordered twins and give JAX's and PyTorch's
/// logits.
#[test]
fn fortran_ordered_npz_and_npy_load_like_their_c_twins() {
    let f = fixtures().join("fortran");
    let c = fixtures().join("npz-vit");
    let ck = vitrs::load(&f.join("model_f.npz")).unwrap();
    let twin = vitrs::load(&c.join("model.npz")).unwrap();
    assert_eq!(ck.model.params().flat(), twin.model.params().flat());
    let x = read_npy(&c.join("input.npy")).unwrap();
    let want = read_npy(&c.join("logits.npy")).unwrap();
    assert_close("fortran npz", &ck.model.logits(&x).unwrap(), &want, 1e-4);

    let xf = read_npy(&f.join("input_f.npy")).unwrap();
    let hf = fixtures().join("hf_cls");
    assert_eq!(xf, read_npy(&hf.join("ref/input.npy")).unwrap());
    let model = vitrs::load(&hf).unwrap().model;
    let want = read_npy(&hf.join("ref/logits.npy")).unwrap();
    assert_close(
        "fortran npy input",
        &model.logits(&xf).unwrap(),
        &want,
        1e-4,
    );
}
