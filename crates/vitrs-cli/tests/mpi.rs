//! `mpirun -np 2 vit train` (the `mpi` feature): two processes of one thread take the steps
//! one process takes on the same global batches, rank 0 alone writes the run, and a run
//! checkpointed by two ranks resumes on one. Skipped without `mpirun` (Debian: openmpi-bin)
//! unless `VITRS_REQUIRE_MPI` is set.

#![cfg(feature = "mpi")]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

use vitrs::kernels::relative_l2_diff;

fn mpirun() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mpirun"))
            .find(|f| f.is_file())
    })
}

/// `mpirun -np N vit --threads 1 ARGS`.
fn ranks(mpirun: &Path, n: usize, args: &[&str]) -> Output {
    Command::new(mpirun)
        .args(["-np", &n.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_vit"))
        .args(["--threads", "1"])
        .args(args)
        .current_dir(workdir())
        // Containers and CI machines run as root, which Open MPI refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("run mpirun")
}

fn params(run: &Path) -> Vec<f32> {
    vitrs::load(&run.join("model.safetensors"))
        .unwrap()
        .model
        .params()
        .flat()
        .to_vec()
}

#[test]
fn two_mpi_ranks_train_as_one_process_and_resume_on_one() {
    let Some(mpirun) = mpirun() else {
        assert!(
            std::env::var_os("VITRS_REQUIRE_MPI").is_none(),
            "VITRS_REQUIRE_MPI is set but mpirun is not installed (apt-get install -y openmpi-bin)"
        );
        eprintln!("skipped: no mpirun (apt-get install -y openmpi-bin libopenmpi-dev)");
        return;
    };
    let root = tmp("mpi");
    vitrs::data::idx::write_synthetic(&root.join("data"), 96, 48, 3, 8, 11).unwrap();
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
epochs = 4
batch_size = 16
lr = 2e-3
warmup_steps = 2
optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
grad_clip = 1.0
seed = 3
"#,
            root.join("data").display()
        ),
    )
    .unwrap();
    let c = s(&cfg);
    let one = root.join("one");
    let o = vit(&[
        "--threads",
        "1",
        "train",
        "--config",
        c,
        "--out",
        s(&one),
        "--max-steps",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let two = root.join("two");
    let o = ranks(
        &mpirun,
        2,
        &[
            "train",
            "--config",
            c,
            "--out",
            s(&two),
            "--max-steps",
            "20",
        ],
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("data parallel over 2 MPI ranks: global batch 16 (8 per rank"),
        "{err}"
    );
    // Rank 0 alone reports.
    assert_eq!(
        stdout(&o).matches("stopped at step 20").count(),
        1,
        "{}",
        stdout(&o)
    );
    let d = relative_l2_diff(&params(&one), &params(&two));
    assert!(
        d <= 1e-5,
        "2 ranks vs 1 process after 20 steps: {d:e} relative"
    );

    // Two ranks to step 10, then one process to step 20.
    let half = root.join("half");
    let o = ranks(
        &mpirun,
        2,
        &[
            "train",
            "--config",
            c,
            "--out",
            s(&half),
            "--max-steps",
            "10",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vit(&[
        "--threads",
        "1",
        "train",
        "--resume",
        s(&half),
        "--max-steps",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming at step 10"), "{}", stderr(&o));
    let d = relative_l2_diff(&params(&one), &params(&half));
    assert!(d <= 1e-5, "2 ranks to 10 then 1 to 20: {d:e} relative");

    // A global batch that does not split over the ranks is refused, on every rank.
    let o = ranks(
        &mpirun,
        3,
        &["train", "--config", c, "--out", s(&root.join("odd"))],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not split evenly over 3 ranks"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(root).ok();
}
