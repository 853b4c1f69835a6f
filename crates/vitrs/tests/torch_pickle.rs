//! The restricted `torch.save` reader against files written by PyTorch
//! (`tools/make_torch_fixtures.py`): every tensor equals its safetensors twin, training
//! checkpoints yield their weights, views and half precision are rebuilt, and an object whose
//! unpickling would run a shell command is never constructed.

use std::path::{Path, PathBuf};

use vitrs::checkpoint::safetensors::SafeTensors;
use vitrs::checkpoint::torch;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/torch-pth")
}

fn same_as_safetensors(pth: &str, st: &str) -> torch::TorchReport {
    let (got, report) = torch::read(&dir().join(pth)).unwrap_or_else(|e| panic!("{pth}: {e}"));
    let want = SafeTensors::read(&dir().join(st)).unwrap();
    let names: Vec<&String> = want.tensors().keys().collect();
    assert_eq!(got.len(), names.len(), "{pth}: {:?}", got.keys());
    for name in names {
        let w = want.tensor(name).unwrap();
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("{pth}: `{name}` missing"));
        assert_eq!(g.shape(), w.shape(), "{pth}: {name}");
        assert_eq!(g.data(), w.data(), "{pth}: {name}");
    }
    report
}

#[test]
fn state_dict_matches_safetensors() {
    let r = same_as_safetensors("state_dict.pth", "weights.safetensors");
    assert!(r.inner_key.is_none() && r.skipped.is_empty(), "{r:?}");
}

#[test]
fn training_checkpoint_yields_its_model_and_builds_nothing_else() {
    let r = same_as_safetensors("train_ckpt.pth", "train_weights.safetensors");
    assert_eq!(r.inner_key.as_deref(), Some("model"));
    assert!(
        r.opaque.iter().any(|o| o == "argparse.Namespace"),
        "{:?}",
        r.opaque
    );
}

#[test]
fn views_and_half_precision_are_rebuilt() {
    let r = same_as_safetensors("views.pth", "views.safetensors");
    assert_eq!(r.skipped, vec!["ids".to_string()]);
    assert_eq!(r.converted.len(), 2, "{:?}", r.converted);
}

#[test]
fn code_in_a_pickle_is_never_run() {
    let _ = std::fs::remove_file("/tmp/vitrs-pwned");
    let (tensors, r) = torch::read(&dir().join("evil.pth")).unwrap();
    // The plain tensor is read; the object is left as an inert placeholder, named.
    assert!(tensors.contains_key("weights"));
    assert!(
        r.opaque.iter().any(|o| o.contains("system")),
        "{:?}",
        r.opaque
    );
    assert!(!Path::new("/tmp/vitrs-pwned").exists());
}

#[test]
fn damaged_files_are_errors_not_panics() {
    let bytes = std::fs::read(dir().join("state_dict.pth")).unwrap();
    let tmp = std::env::temp_dir().join(format!("vitrs-torch-{}.pth", std::process::id()));
    for cut in [0, 10, 100, bytes.len() / 2, bytes.len() - 30] {
        std::fs::write(&tmp, &bytes[..cut]).unwrap();
        assert!(torch::read(&tmp).is_err(), "cut at {cut}");
    }
    // Flip bytes across the file: an error or (if the flip hits padding) a result, never a panic.
    for i in (0..bytes.len()).step_by(97) {
        let mut b = bytes.clone();
        b[i] ^= 0x5A;
        std::fs::write(&tmp, &b).unwrap();
        let _ = torch::read(&tmp);
    }
    std::fs::remove_file(&tmp).ok();
}

/// timm and Hugging Face directories whose weights are `torch.save` files (`model.pth`,
/// `pytorch_model.bin`) load like their safetensors twins: PyTorch's logits for those models.
#[test]
fn directories_with_pickled_weights_give_pytorch_logits() {
    for (sub, twin, format) in [
        ("timm-dir", "timm_tiny_named", vitrs::Format::Timm),
        ("hf-dir", "hf_cls", vitrs::Format::HuggingFace),
    ] {
        let ck = vitrs::load(&dir().join(sub)).unwrap_or_else(|e| panic!("{sub}: {e}"));
        assert_eq!(ck.report.format, format, "{sub}");
        assert!(
            ck.report
                .conversions
                .iter()
                .any(|c| c.contains("without unpickling")),
            "{sub}: {:?}",
            ck.report.conversions
        );
        let r = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(twin)
            .join("ref");
        let x = vitrs::npy::read_npy(&r.join("input.npy")).unwrap();
        let want = vitrs::npy::read_npy(&r.join("logits.npy")).unwrap();
        let got = ck.model.logits(&x).unwrap();
        let d = vitrs::kernels::max_abs_diff(got.data(), want.data());
        assert!(d < 1e-4, "{sub}: max |Δlogit| {d}");
    }
}

/// The pre-1.6 torch.save format (a bare pickle stream) is refused with a hint, not parsed.
#[test]
fn legacy_format_is_refused_with_a_hint() {
    let tmp = std::env::temp_dir().join(format!("vitrs-legacy-{}.pth", std::process::id()));
    std::fs::write(&tmp, [0x80u8, 0x02, 0x8a, 0x0a]).unwrap();
    let e = torch::read(&tmp).unwrap_err().to_string();
    assert!(e.contains("legacy") && e.contains("re-save"), "{e}");
    std::fs::remove_file(&tmp).ok();
}
