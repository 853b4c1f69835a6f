//! `vit finetune` and `vit attention` as a user runs them: pre-train on some classes, transfer
//! to the others at a new resolution, resume the fine-tuning, and draw attention maps.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Pre-trains a tiny model with a tanh pre-logits head on classes 0-1 of a synthetic
/// 4-class set; returns (data dir, model path).
fn pretrain(root: &Path) -> (PathBuf, PathBuf) {
    let data = root.join("data");
    vitrs::data::idx::write_synthetic(&data, 160, 80, 4, 8, 5).unwrap();
    let cfg = root.join("pre.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
patch_size = 4
width = 16
depth = 2
heads = 2
mlp_dim = 32
pre_logits = 16
[data]
dataset = "{}"
[train]
epochs = 3
batch_size = 16
lr = 5e-3
warmup_steps = 2
optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
"#,
            data.display()
        ),
    )
    .unwrap();
    let run = root.join("pre");
    ok(&vit(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--classes",
        "0-1",
        "--threads",
        "2",
    ]));
    (data, run.join("model.safetensors"))
}

#[test]
fn finetune_to_new_classes_at_a_new_resolution_then_resume() {
    let root = tmp("ft");
    let (data, pre) = pretrain(&root);
    let info: Value =
        serde_json::from_str(ok(&vit(&["info", "--model", s(&pre), "--json"])).trim()).unwrap();
    assert_eq!(info["config"]["num_classes"], 2);
    let run = root.join("ft");
    let o = vit(&[
        "finetune",
        "--from",
        s(&pre),
        "--dataset",
        s(&data),
        "--classes",
        "2,3",
        "--per-class",
        "10",
        "--image-size",
        "12",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--warmup-steps",
        "2",
        "--max-steps",
        "6",
        "--out",
        s(&run),
        "--threads",
        "2",
    ]);
    let out = ok(&o);
    assert!(out.contains("continue with: vit train --resume"), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "pre-training head dropped",
        "new head: 2 -> 2 classes, zero-initialised",
        "resampled from a 2x2 to a 3x3 grid",
        "on 20 images",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
    }
    // The fine-tuning run resumes like any run and ends with a 12-px, linear-head model.
    let out = ok(&vit(&["train", "--resume", s(&run), "--threads", "2"]));
    assert!(
        out.contains("done: top-1") && out.contains("on the test split"),
        "{out}"
    );
    let model = run.join("model.safetensors");
    let info: Value =
        serde_json::from_str(ok(&vit(&["info", "--model", s(&model), "--json"])).trim()).unwrap();
    assert_eq!(info["config"]["image_height"], 12);
    assert_eq!(info["config"]["head"], "linear");
    // Evaluated on its own classes (2 and 3 of the test split, renumbered) by the run itself.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: Value =
        serde_json::from_str(metrics.lines().rev().find(|l| l.contains("top1")).unwrap()).unwrap();
    assert_eq!(last["n"], 40, "{last}");
    // Keeping the head: same classes (0-1) at 12 px, no new head.
    let o = vit(&[
        "finetune",
        "--from",
        s(&pre),
        "--dataset",
        s(&data),
        "--classes",
        "0-1",
        "--image-size",
        "12",
        "--keep-head",
        "--epochs",
        "1",
        "--out",
        s(&root.join("keep")),
        "--threads",
        "2",
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("pre-trained head kept") && !err.contains("new head"),
        "{err}"
    );
    let o = vit(&[
        "finetune",
        "--from",
        s(&pre),
        "--dataset",
        s(&data),
        "--keep-head",
        "--out",
        s(&root.join("keep-bad")),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("drop --keep-head"));
    // Bad requests are clear errors.
    let o = vit(&[
        "finetune",
        "--from",
        s(&pre),
        "--dataset",
        s(&data),
        "--classes",
        "7",
        "--out",
        s(&root.join("bad")),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("has 4 classes"));
    let o = vit(&[
        "finetune",
        "--from",
        s(&pre),
        "--dataset",
        s(&data),
        "--image-size",
        "10",
        "--out",
        s(&root.join("bad2")),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--image-size 12"));
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn attention_maps_png_and_json() {
    let root = tmp("attn");
    let (data, model) = pretrain(&root);
    // One test image as PNG.
    let ds = vitrs::data::open(s(&data), vitrs::data::Split::Test, (1, 8, 8)).unwrap();
    let mut px = vec![0u8; 64];
    ds.image(0, &mut px).unwrap();
    let img = root.join("x.png");
    vitrs::preprocess::save_gray_png(&img, &px, 8, 8).unwrap();
    for (method, n_maps) in [("rollout", 1), ("mean", 1), ("head", 2)] {
        let png = root.join(format!("{method}.png"));
        let out = ok(&vit(&[
            "attention",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--image",
            s(&img),
            "--method",
            method,
            "--json",
            "--out",
            s(&png),
        ]));
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["grid"], serde_json::json!([2, 2]));
        assert_eq!(lines[0]["query"], "class_token");
        let maps = lines[0]["maps"].as_array().unwrap();
        assert_eq!(maps.len(), n_maps, "{method}");
        let v: Vec<f64> = maps[0]["values"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        assert_eq!(v.len(), 4);
        assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0 && *x <= 1.0));
        let im = image::open(&png).unwrap();
        assert!(
            im.width() >= 224 * (1 + n_maps as u32),
            "{method}: {}",
            im.width()
        );
    }
    // Mean attention distance over the test split.
    let png = root.join("dist.png");
    let out = ok(&vit(&[
        "attention",
        "--model",
        s(&model),
        "--distance",
        "--dataset",
        s(&data),
        "--json",
        "--out",
        s(&png),
    ]));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["images"], 80);
    let d = v["distance_px"].as_array().unwrap();
    assert_eq!(d.len(), 2);
    // On a 2 x 2 grid of 4-px patches no key is farther than 4·√2 px.
    for x in d.iter().flat_map(|r| r.as_array().unwrap()) {
        let x = x.as_f64().unwrap();
        assert!((0.0..=4.0 * 2f64.sqrt() + 1e-9).contains(&x), "{x}");
    }
    assert!(png.is_file());
    // A head that does not exist is an input error, not a panic.
    let o = vit(&[
        "attention",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--method",
        "head",
        "--head",
        "5",
        "--out",
        s(&root.join("h.png")),
    ]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(root).ok();
}

/// A model without a class token, with registers, LayerScale and attention pooling: trained
/// from a TOML config, fine-tuned to a new resolution (the position table has no prefix rows),
/// and drawn (the maps say they are the patch tokens' mean attention).
#[test]
fn register_map_model_trains_finetunes_and_draws() {
    let root = tmp("regmap");
    let data = root.join("data");
    vitrs::data::idx::write_synthetic(&data, 64, 32, 3, 8, 7).unwrap();
    let cfg = root.join("regmap.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
patch_size = 4
width = 16
depth = 2
heads = 2
mlp_dim = 32
pool = "map"
class_token = false
reg_tokens = 2
no_embed_class = true
layer_scale = 0.1
[data]
dataset = "{}"
[train]
epochs = 1
batch_size = 16
lr = 5e-3
warmup_steps = 1
optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
"#,
            data.display()
        ),
    )
    .unwrap();
    let run = root.join("pre");
    let out = ok(&vit(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--threads",
        "2",
    ]));
    assert!(
        out.contains("done: top-1") && out.contains("on the test split"),
        "{out}"
    );
    let model = run.join("model.safetensors");
    let info = ok(&vit(&["info", "--model", s(&model)]));
    assert!(
        info.contains("2 register(s) + 4 patches; positions on patches only; LayerScale"),
        "{info}"
    );
    let ft = root.join("ft");
    let o = vit(&[
        "finetune",
        "--from",
        s(&model),
        "--dataset",
        s(&data),
        "--image-size",
        "12",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        s(&ft),
        "--threads",
        "2",
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("resampled from a 2x2 to a 3x3 grid"), "{err}");
    let ft_model = ft.join("model.safetensors");
    let v: Value =
        serde_json::from_str(ok(&vit(&["info", "--model", s(&ft_model), "--json"])).trim())
            .unwrap();
    assert_eq!(v["config"]["pool"], "map");
    assert_eq!(v["config"]["reg_tokens"], 2);
    // Attention maps of the fine-tuned model: a 3x3 grid, the patch tokens' mean attention.
    let ds = vitrs::data::open(s(&data), vitrs::data::Split::Test, (1, 8, 8)).unwrap();
    let mut px = vec![0u8; 64];
    ds.image(0, &mut px).unwrap();
    let img = root.join("x.png");
    vitrs::preprocess::save_gray_png(&img, &px, 8, 8).unwrap();
    let out = ok(&vit(&[
        "attention",
        "--model",
        s(&ft_model),
        "--image",
        s(&img),
        "--json",
        "--out",
        s(&root.join("a.png")),
    ]));
    let line: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["grid"], serde_json::json!([3, 3]));
    assert_eq!(line["query"], "patch_mean");
}

/// `vit finetune` on a flat folder of 10 images with the default recipe (batch 64): it trains
/// with the batches it has, holds out a stratified validation split, and names it.
#[test]
fn finetuning_on_a_ten_image_folder_with_the_default_recipe() {
    let root = tmp("tenimages");
    let (_, model) = pretrain(&root);
    let folder = root.join("photos");
    for (c, name) in ["cats", "dogs"].iter().enumerate() {
        let dir = folder.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..5 {
            let px: Vec<u8> = (0..64).map(|p| (90 * c + 7 * i + p % 5) as u8).collect();
            vitrs::preprocess::save_gray_png(&dir.join(format!("{i}.png")), &px, 8, 8).unwrap();
        }
    }
    let o = vit(&[
        "finetune",
        "--from",
        s(&model),
        "--dataset",
        s(&folder),
        "--epochs",
        "2",
        "--out",
        s(&root.join("ft")),
    ]);
    let out = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("make no full batch of 64"), "{err}");
    assert!(err.contains("on 8 images (2 held for evaluation"), "{err}");
    assert!(
        out.contains("done: top-1") && out.contains("on the validation split"),
        "{out}"
    );
    std::fs::remove_dir_all(root).ok();
}
