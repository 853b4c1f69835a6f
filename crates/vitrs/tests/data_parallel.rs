//! Synchronous data parallelism: two ranks (threads here, sharing memory through
//! `train::dist::threads`; processes over MPI with `vit`'s `mpi` feature) on halves of every
//! global batch take the same optimizer steps as one process on the whole batch, and a run
//! checkpointed by two ranks resumes on one. The two add the same per-image gradients in
//! another order, so they agree to rounding, which AdamW's steps amplify: at the Fashion-MNIST
//! recipe's peak lr (2e-3) the parameters differ by 8e-7 (norm-relative) after 20 steps; at
//! 5e-3 by 5e-6 to 1.1e-5, the trajectories drifting apart faster.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use vitrs::kernels::relative_l2_diff;
use vitrs::train::dist::threads;
use vitrs::train::{Hooks, RunConfig, Trainer};

struct Quiet;
impl Hooks for Quiet {}

fn config(data: &Path) -> RunConfig {
    let text = format!(
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
        epochs = 4
        batch_size = 16
        lr = 2e-3
        warmup_steps = 2
        optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
        grad_clip = 1.0
        seed = 3
        # 4 KB buckets: each block's gradients (9 KB) summed on their own as the backward
        # finishes them, the rest gathered and summed after.
        bucket_mb = 0.004
        "#,
        data.display(),
    );
    RunConfig::from_toml(&text, "test").unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vitrs-dp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The parameters after training `run` in `dir` to `steps` on one process.
fn alone(run: RunConfig, dir: &Path, steps: u64) -> Vec<f32> {
    let mut t = Trainer::new(run, dir).unwrap();
    t.run(&mut Quiet, &AtomicBool::new(false), Some(steps))
        .unwrap();
    t.model.params().flat().to_vec()
}

/// The parameters of each of two ranks after training `run` in `dir` to `steps`.
fn two_ranks(run: RunConfig, dir: &Path, steps: u64) -> Vec<Vec<f32>> {
    std::fs::create_dir_all(dir).unwrap();
    let handles: Vec<_> = threads::group(2)
        .into_iter()
        .map(|rank| {
            let (run, dir) = (run.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                let mut t = Trainer::new(run, &dir).unwrap();
                t.set_collective(Box::new(rank)).unwrap();
                t.run(&mut Quiet, &AtomicBool::new(false), Some(steps))
                    .unwrap();
                t.model.params().flat().to_vec()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn two_ranks_take_the_steps_of_one_process_and_resume_on_one() {
    let root = tmp("equal");
    vitrs::data::idx::write_synthetic(&root.join("data"), 96, 48, 3, 8, 11).unwrap();
    let run = config(&root.join("data"));

    let one = alone(run.clone(), &root.join("one"), 20);
    let ranks = two_ranks(run.clone(), &root.join("two"), 20);
    assert_eq!(ranks[0], ranks[1], "the ranks' parameters differ");
    let d = relative_l2_diff(&one, &ranks[0]);
    eprintln!(
        "2 ranks vs 1 process after 20 steps: {d:e} relative; max |diff| {:e}",
        vitrs::kernels::max_abs_diff(&one, &ranks[0])
    );
    assert!(
        d <= 1e-5,
        "2 ranks vs 1 process after 20 steps: {d:e} relative"
    );
    // The measure resolves a single step: one step fewer is far outside the bound.
    let one_fewer = relative_l2_diff(&one, &alone(run.clone(), &root.join("one-again"), 19));
    assert!(one_fewer.is_finite() && one_fewer > 1e-4, "{one_fewer:e}");

    // Rank 0 alone wrote the run directory; its checkpoint resumes on one process.
    let two = root.join("half");
    two_ranks(run.clone(), &two, 10);
    let mut t = Trainer::resume(&two, None).unwrap();
    assert_eq!(t.pos.step, 10);
    t.run(&mut Quiet, &AtomicBool::new(false), Some(20))
        .unwrap();
    let d = relative_l2_diff(&one, t.model.params().flat());
    assert!(
        d <= 1e-5,
        "2 ranks to step 10, then 1 process to 20: {d:e} relative"
    );

    // A global batch that does not split evenly is refused.
    let mut odd = run.clone();
    odd.train.batch_size = 15;
    let mut t = Trainer::new(odd, &root.join("odd")).unwrap();
    let e = t
        .set_collective(Box::new(threads::group(2).remove(0)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not split evenly"), "{e}");
    std::fs::remove_dir_all(root).ok();
}
