//! `vit export --format onnx`, checked without Python: the exported graph of every fixture
//! family decodes, and its inputs, outputs, node list and initializers (names and shapes)
//! are the ones `tools/check_onnx.py` ran in ONNX Runtime and found equal to vitrs' logits
//! within 1e-4 (committed in tests/fixtures/onnx/); the initializers hold the model's weights.

use std::path::{Path, PathBuf};

use vitrs::checkpoint::onnx::{export, initializers, summarize, OnnxOptions, Summary};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The model path of a fixture named by its expectation file.
fn model_of(name: &str) -> PathBuf {
    let d = fixtures().join(name);
    if d.join("config.json").is_file() {
        d
    } else if d.join("model.npz").is_file() {
        d.join("model.npz")
    } else {
        d.join("model.safetensors")
    }
}

#[test]
fn exported_graphs_match_the_ones_onnx_runtime_checked() {
    let mut expectations: Vec<PathBuf> = std::fs::read_dir(fixtures().join("onnx"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    expectations.sort();
    assert!(expectations.len() >= 7, "{expectations:?}");
    for exp in expectations {
        let name = exp.file_stem().unwrap().to_string_lossy().into_owned();
        let ck = vitrs::load(&model_of(&name)).unwrap();
        let bytes = export(
            &ck.model,
            &ck.preprocess,
            ck.labels.as_deref(),
            OnnxOptions::default(),
        )
        .unwrap();
        let got = summarize(Path::new(&name), &bytes).unwrap();
        let want: Summary = serde_json::from_str(&std::fs::read_to_string(&exp).unwrap()).unwrap();
        assert_eq!(got.inputs, want.inputs, "{name}: inputs");
        assert_eq!(got.outputs, want.outputs, "{name}: outputs");
        assert_eq!(got.nodes, want.nodes, "{name}: node list");
        assert_eq!(got.initializers, want.initializers, "{name}: initializers");
        assert_eq!(got.metadata, want.metadata, "{name}: metadata keys");

        // The weights are the model's: as stored, or transposed for the MatMul layout.
        let params = ck.model.params();
        for (init, values) in initializers(Path::new(&name), &bytes).unwrap() {
            if let Some(p) = params.get(&init) {
                assert_eq!(values, p, "{name}: {init}");
            } else if let Some(base) = init.strip_suffix("_t") {
                let e = params.entry(base).unwrap();
                let (out, inp) = (e.shape[0], e.shape[1]);
                let w = params.get(base).unwrap();
                for o in 0..out {
                    for i in 0..inp {
                        assert_eq!(values[i * out + o], w[o * inp + i], "{name}: {init}");
                    }
                }
            }
        }
    }
}

/// A dynamic batch and later opsets change what they must and nothing else: the batch
/// dimension becomes symbolic; from opset 18 ReduceMean takes its axes as an input (the
/// `axes.1` constant the mean pooling's Slice already has).
#[test]
fn opsets_and_dynamic_batch() {
    let ck = vitrs::load(&fixtures().join("timm_mean_nonsquare")).unwrap();
    let go = |opset, dynamic_batch| {
        let opts = OnnxOptions {
            opset,
            dynamic_batch,
        };
        let b = export(&ck.model, &ck.preprocess, None, opts).unwrap();
        summarize(Path::new("x"), &b).unwrap()
    };
    let base = go(17, false);
    let dynamic = go(17, true);
    assert_eq!(base.inputs[0].1[0], 1);
    assert_eq!(dynamic.inputs[0].1[0], -1);
    assert_eq!(dynamic.outputs[0].1[0], -1);
    assert_eq!(base.nodes, dynamic.nodes);
    let later = go(18, false);
    assert_eq!(later.opset, 18);
    assert_eq!(later.nodes, base.nodes);
    assert_eq!(later.initializers, base.initializers);
    let e = export(
        &ck.model,
        &ck.preprocess,
        None,
        OnnxOptions {
            opset: 16,
            dynamic_batch: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("opset 16") && e.contains("17..=21"), "{e}");
}
