//! `vit train`, `vit eval` and `--resume` as a user runs them, including a process killed
//! with SIGKILL at random moments: a valid checkpoint always survives and resuming goes on
//! from its step.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A synthetic dataset and a run config using it; returns the config path.
fn setup(root: &Path, epochs: u64, checkpoint_every: u64) -> PathBuf {
    vitrs::data::idx::write_synthetic(&root.join("data"), 96, 48, 3, 8, 5).unwrap();
    let cfg = root.join("run.toml");
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
[data]
dataset = "{}"
[train]
epochs = {epochs}
batch_size = 16
lr = 5e-3
warmup_steps = 2
optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
log_every = 2
checkpoint_every = {checkpoint_every}
"#,
            root.join("data").display()
        ),
    )
    .unwrap();
    cfg
}

/// `vit train --config CFG --out RUN` with `extra` flags.
fn train(cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", s(cfg), "--out", s(run)];
    args.extend(extra);
    vit(&args)
}

fn step_of(ckpt: &Path) -> u64 {
    let st = vitrs::checkpoint::safetensors::SafeTensors::read(ckpt).unwrap();
    let pos: Value = serde_json::from_str(&st.metadata()["vitrs.position"]).unwrap();
    pos["step"].as_u64().unwrap()
}

#[test]
fn train_then_eval_and_predict_with_the_result() {
    let root = tmp("basic");
    let cfg = setup(&root, 3, 0);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += "[augment]\nplain_last_epochs = 1\n";
    std::fs::write(&cfg, text).unwrap();
    let run = root.join("run");
    let o = train(&cfg, &run, &["--threads", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("done: top-1") && out.contains("on the test split"),
        "{out}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the last 1 of 3 epoch(s) train on plain images"),
        "{err}"
    );
    assert!(
        err.contains("epoch 3: top-1")
            && err.contains("on the test split")
            && err.contains("img/s")
            && err.contains("ETA"),
        "{err}"
    );
    let model = run.join("model.safetensors");
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
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["n"], 48);
    assert!(v["top1"].as_f64().unwrap() > 0.6, "the bars are easy: {v}");
    assert_eq!(v["per_class"].as_array().unwrap().len(), 3);
    assert!(root.join("cm.png").is_file());
    // A second train into the same directory is refused, pointing at --resume.
    let o = train(&cfg, &run, &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn eval_takes_the_average_or_with_trained_weights_the_trained_ones() {
    let root = tmp("ema-eval");
    let cfg = setup(&root, 2, 0);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += "ema_decay = 0.9\n"; // [train] is the config's last section
    std::fs::write(&cfg, text).unwrap();
    let run = root.join("run");
    let o = train(&cfg, &run, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = run.join("checkpoint.safetensors");
    let (data, cm) = (root.join("data"), root.join("cm.png"));
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            s(&ckpt),
            "--dataset",
            s(&data),
            "--json",
            "--confusion",
            s(&cm),
        ];
        args.extend(extra);
        let o = vit(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        (v, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (avg, err) = eval(&[]);
    assert!(err.contains("loaded the weights' moving average"), "{err}");
    let (trained, err) = eval(&["--trained-weights"]);
    assert!(err.contains("loaded the trained weights"), "{err}");
    // Each is the model it names: the average as the run's own model.safetensors, the trained
    // weights as the library loads them.
    let direct = |w| {
        let m = vitrs::load_weights(&ckpt, w).unwrap().model;
        m.params().flat().to_vec()
    };
    let from_model = vitrs::load(&run.join("model.safetensors")).unwrap().model;
    assert_eq!(direct(vitrs::Weights::Average), from_model.params().flat());
    assert_ne!(direct(vitrs::Weights::Trained), from_model.params().flat());
    assert_eq!(
        (avg["n"].clone(), trained["n"].clone()),
        (48.into(), 48.into())
    );
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn sigkill_at_random_moments_never_loses_the_checkpoint() {
    let root = tmp("kill");
    let cfg = setup(&root, 100_000, 2); // never finishes within the rounds
    let run = root.join("run");
    let ckpt = run.join("checkpoint.safetensors");
    let mut rng = vitrs::model::Rng::new(42);
    let mut last_step = 0;
    for round in 0..20 {
        let mut args = vec!["train", "--threads", "1"];
        let run_s = s(&run).to_string();
        let cfg_s = s(&cfg).to_string();
        if ckpt.exists() {
            args.extend(["--resume", &run_s]);
        } else {
            args.extend(["--config", &cfg_s, "--out", &run_s]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_vit"))
            .args(&args)
            .current_dir(workdir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + rng.below(400) as u64));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if round == 0 && !ckpt.exists() {
            continue; // killed before the first checkpoint: nothing to lose yet
        }
        // A checkpoint exists, loads (checksum verified), and never goes backwards.
        let step = step_of(&ckpt);
        assert!(
            step >= last_step,
            "round {round}: checkpoint went back from {last_step} to {step}"
        );
        assert!(vitrs::load(&ckpt).is_ok());
        last_step = step;
    }
    assert!(last_step > 0, "no checkpoint was ever written");
    // Resuming continues exactly from the checkpoint's step.
    let target = (last_step + 3).to_string();
    let o = vit(&["train", "--resume", s(&run), "--max-steps", &target]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("resuming at step {last_step}")));
    assert_eq!(step_of(&ckpt), last_step + 3);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn a_damaged_checkpoint_is_caught_and_the_previous_one_resumes() {
    let root = tmp("damaged");
    let cfg = setup(&root, 50, 2);
    let run = root.join("run");
    let o = train(&cfg, &run, &["--max-steps", "6", "--threads", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = run.join("checkpoint.safetensors");
    let prev = run.join("checkpoint.prev.safetensors");
    assert_eq!(step_of(&ckpt), 6);
    assert_eq!(step_of(&prev), 4, "the checkpoint before the last is kept");
    // One flipped bit in the weights: loading refuses it, naming the damage.
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x04;
    std::fs::write(&ckpt, &bytes).unwrap();
    let Err(e) = vitrs::load(&ckpt) else {
        panic!("a damaged file must not load")
    };
    let e = e.to_string();
    assert!(
        e.contains("checksum mismatch") && e.contains("damaged"),
        "{e}"
    );
    let o = vit(&["info", "--model", s(&ckpt)]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Leftover temp files of killed saves (this version's name and the older one) are cleaned
    // up on resume; a file that merely looks similar is not.
    std::fs::write(run.join(".checkpoint.safetensors.tmp999999-7"), b"partial").unwrap();
    std::fs::write(run.join(".checkpoint.safetensors.tmp999999"), b"partial").unwrap();
    std::fs::write(run.join(".checkpoint.safetensors.tmpnotes"), b"user's").unwrap();
    // Resuming falls back to the previous checkpoint, says so, and moves the damaged one aside.
    let o = vit(&[
        "train",
        "--resume",
        s(&run),
        "--max-steps",
        "8",
        "--threads",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("resuming from the previous one") && err.contains("resuming at step 4"),
        "{err}"
    );
    assert!(run.join("checkpoint.damaged.safetensors").is_file());
    assert!(!run.join(".checkpoint.safetensors.tmp999999").exists());
    assert!(!run.join(".checkpoint.safetensors.tmp999999-7").exists());
    assert!(run.join(".checkpoint.safetensors.tmpnotes").exists());
    assert_eq!(step_of(&ckpt), 8);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn runs_that_cannot_fit_in_memory_are_refused_before_allocating() {
    let root = tmp("oom");
    let cfg = setup(&root, 1, 0);
    // ViT-L's blocks on 8x8 images: 4.8 GB of weights and optimizer state, ~9 MB of
    // activations per image, so the largest batch the config accepts (65536) needs ~0.6 TB.
    // (65536 images, so the batch is not lowered to a smaller dataset's size.)
    let many = root.join("many");
    vitrs::data::idx::write_synthetic(&many, 65536, 16, 3, 8, 5).unwrap();
    let large = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &root.join("data").display().to_string(),
            &many.display().to_string(),
        )
        .replace("width = 16", "width = 1024")
        .replace("depth = 2", "depth = 24")
        .replace("heads = 2", "heads = 16")
        .replace("mlp_dim = 32", "mlp_dim = 4096");
    let large_cfg = root.join("large.toml");
    std::fs::write(&large_cfg, large).unwrap();
    let run = root.join("run");
    let o = train(&large_cfg, &run, &["--batch-size", "65536"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("GiB of memory is available") && err.contains("use --batch-size"),
        "{err}"
    );
    // A model too large for any batch (65536 wide, 1024 deep) is refused the same way.
    let toml = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("width = 16", "width = 65536")
        .replace("depth = 2", "depth = 1024")
        .replace("heads = 2", "heads = 64")
        .replace("mlp_dim = 32", "mlp_dim = 65536");
    let big = root.join("big.toml");
    std::fs::write(&big, toml).unwrap();
    let o = train(&big, &root.join("big"), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("choose a smaller model"), "{err}");
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn a_time_budget_picks_the_epochs_and_says_how() {
    let root = tmp("budget");
    let cfg = setup(&root, 1, 0);
    let run = root.join("run");
    let o = train(&cfg, &run, &["--time-budget", "0.03"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("time budget 0.03 min: measured") && err.contains("img/s training"),
        "{err}"
    );
    // The run directory's config holds the fitted epochs, which the progress line counts.
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let epochs: u64 = saved
        .lines()
        .find_map(|l| l.strip_prefix("epochs = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{saved}"));
    assert!(saved.contains("time_budget_min = 0.03"), "{saved}");
    assert!(err.contains(&format!("epoch {epochs}: top-1")), "{err}");
    // The budget is chosen when a run starts: not with --epochs, not on --resume.
    let o = train(
        &cfg,
        &root.join("other"),
        &["--time-budget", "1", "--epochs", "2"],
    );
    assert!(!o.status.success() && stderr(&o).contains("--epochs"));
    let o = vit(&["train", "--resume", s(&run), "--time-budget", "1"]);
    assert!(
        o.status.code() == Some(2) && stderr(&o).contains("--epochs N"),
        "{}",
        stderr(&o)
    );
    let o = train(&cfg, &root.join("neg"), &["--time-budget", "0"]);
    assert!(
        !o.status.success() && stderr(&o).contains("time_budget_min"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(root).ok();
}
