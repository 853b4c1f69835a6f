//! The ResNet baseline through the commands a user runs: `[model] arch = "resnet"` in `vit
//! train`, then `vit eval`, `vit predict`, `vit finetune` and `--resume` on what it wrote; the
//! ViT-only commands and settings refused by name.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value;
use vitrs::checkpoint::safetensors::SafeTensors;

/// A synthetic 3-class dataset of 8 × 8 images and a ResNet-8 (width 4) run config using it;
/// `extra` is appended to `[model]`, `train_extra` to `[train]`. Returns the config path.
fn setup(root: &Path, epochs: u64, extra: &str, train_extra: &str) -> PathBuf {
    if !root.join("data").is_dir() {
        vitrs::data::idx::write_synthetic(&root.join("data"), 96, 48, 3, 8, 5).unwrap();
    }
    let cfg = root.join(format!("run-{epochs}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
arch = "resnet"
depth = 8
width = 4
{extra}
[data]
dataset = "{}"
[train]
epochs = {epochs}
batch_size = 16
lr = 0.05
warmup_steps = 2
optimizer = {{ kind = "sgd", momentum = 0.9, weight_decay = 5e-4 }}
log_every = 2
{train_extra}
"#,
            root.join("data").display()
        ),
    )
    .unwrap();
    cfg
}

/// The last evaluation a run logged.
fn last_eval(run: &Path) -> Value {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|v| v["kind"] == "eval")
        .unwrap()
}

#[test]
fn a_resnet_trains_then_evaluates_predicts_and_finetunes() {
    let root = tmp("flow");
    let cfg = setup(&root, 3, "", "");
    let run = root.join("run");
    let o = vit(&["train", "--config", s(&cfg), "--out", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("training ResNet-8 (width 4)"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).contains("done: top-1"), "{}", stdout(&o));

    // The saved model is the one the run evaluated: parameters and running statistics.
    let model = run.join("model.safetensors");
    let st = SafeTensors::read(&model).unwrap();
    assert_eq!(st.metadata()["vitrs.arch"], "resnet");
    let mean = st.tensor("layer3.0.bn2.running_mean").unwrap();
    assert!(
        mean.data().iter().any(|&v| v != 0.0),
        "the running statistics moved in training and were saved"
    );
    let o = vit(&[
        "eval",
        "--model",
        s(&model),
        "--dataset",
        s(&root.join("data")),
        "--json",
        "--confusion",
        s(&root.join("cm.png")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["n"], 48);
    assert_eq!(v["top1"], last_eval(&run)["top1"], "{v}");
    assert!(v["top1"].as_f64().unwrap() > 0.5, "the bars are easy: {v}");

    // One image as a (C, H, W) array.
    let img = root.join("one.npy");
    let t = vitrs::tensor::Tensor::new(vec![1, 8, 8], (0..64).map(|i| i as f32 / 64.0).collect())
        .unwrap();
    vitrs::npy::write_npy(&img, &t).unwrap();
    let o = vit(&["predict", "--model", s(&model), "--json", s(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(p["top"].as_array().unwrap().len(), 3, "{p}");

    // Fine-tuning onto two of the classes: a new zero classifier, the rest kept.
    let ft = root.join("ft");
    let o = vit(&[
        "finetune",
        "--from",
        s(&model),
        "--dataset",
        s(&root.join("data")),
        "--classes",
        "0,1",
        "--epochs",
        "1",
        "--out",
        s(&ft),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("new zero-initialised classifier `fc` for 2 classes (was 3)"),
        "{}",
        stderr(&o)
    );
    let tuned = SafeTensors::read(&ft.join("model.safetensors")).unwrap();
    assert_eq!(tuned.tensor("fc.weight").unwrap().shape(), &[2, 16]);

    // What only a ViT has is refused, naming the architecture.
    let o = vit(&["attention", "--model", s(&model), s(&img)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("resnet"), "{}", stderr(&o));
    std::fs::remove_dir_all(root).ok();
}

/// A ResNet run stopped part-way and resumed ends with the same parameters and running
/// statistics, bit for bit, as the run that was never stopped: the checkpoint holds the
/// running statistics and the optimizer's momentum.
#[test]
fn a_stopped_resnet_run_resumes_to_the_same_model() {
    let root = tmp("resume");
    let cfg = setup(&root, 3, "", "checkpoint_every = 0");
    let (a, b) = (root.join("a"), root.join("b"));
    let o = vit(&["train", "--config", s(&cfg), "--out", s(&a)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vit(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&b),
        "--max-steps",
        "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vit(&["train", "--resume", s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ta, tb) = (
        SafeTensors::read(&a.join("model.safetensors")).unwrap(),
        SafeTensors::read(&b.join("model.safetensors")).unwrap(),
    );
    let names: Vec<&String> = ta.tensors().keys().collect();
    assert!(names.iter().any(|n| n.ends_with("running_var")));
    for n in names {
        assert_eq!(
            ta.tensor(n).unwrap().data(),
            tb.tensor(n).unwrap().data(),
            "{n}"
        );
    }
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn vit_settings_on_a_resnet_are_refused_by_name() {
    let root = tmp("refuse");
    for (model, train, says) in [
        ("heads = 2", "", "`heads` is a ViT setting"),
        ("patch_size = 4", "", "`patch_size` is a ViT setting"),
        ("", "drop_path = 0.1", "[train] drop_path is a ViT setting"),
    ] {
        let cfg = setup(&root, 1, model, train);
        let run = root.join("run");
        let o = vit(&["train", "--config", s(&cfg), "--out", s(&run)]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(says), "{says}: {}", stderr(&o));
        let _ = std::fs::remove_dir_all(&run);
    }
    std::fs::remove_dir_all(root).ok();
}
