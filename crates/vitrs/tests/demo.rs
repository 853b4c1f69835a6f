//! The README's demo: the shipped Fashion-MNIST model on the shipped test images gives
//! PyTorch's logits (from `assets/demo/expected.json`, made by `tools/make_demo.py` from the
//! same PNG files), so the whole path — PNG decoding, grayscale preprocessing, timm loading,
//! forward — matches on real data.

use std::path::Path;

use serde_json::Value;

#[test]
fn demo_model_matches_pytorch_on_real_images() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo");
    let ck = vitrs::load(&demo.join("model")).unwrap();
    assert_eq!(ck.label(9), "Ankle boot");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("expected.json")).unwrap())
            .unwrap();
    let images = expected["images"].as_object().unwrap();
    assert_eq!(images.len(), 8);
    for (file, want) in images {
        let x = ck.preprocess.load(&demo.join("images").join(file)).unwrap();
        let got = ck.model.logits(&x).unwrap();
        let want: Vec<f32> = want["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let diff = vitrs::kernels::max_abs_diff(got.data(), &want);
        assert!(diff < 1e-4, "{file}: max |Δlogit| {diff}");
        let argmax = vitrs::infer::top_k(got.data(), 1)[0].0;
        assert_eq!(
            argmax as u64,
            expected["images"][file]["argmax"].as_u64().unwrap(),
            "{file}"
        );
    }
}
