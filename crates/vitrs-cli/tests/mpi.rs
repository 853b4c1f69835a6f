//! `mpirun -np 2 vit train` (the `mpi` feature): two processes of one thread take the steps
//! one process takes on the same global batches, rank 0 alone writes the run, and a run
//! checkpointed by two ranks resumes on one; a rank killed mid-run ends the job with MPI's
//! message naming it, and the checkpoint left behind resumes. Skipped without `mpirun`
//! (Debian: openmpi-bin) unless `VITRS_REQUIRE_MPI` is set.

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

/// The command `mpirun -np N vit --threads 1 ARGS`.
fn mpirun_vit(mpirun: &Path, n: usize, args: &[&str]) -> Command {
    let mut c = Command::new(mpirun);
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_vit"))
        .args(["--threads", "1"])
        .args(args)
        .current_dir(workdir())
        // Containers and CI machines run as root, which Open MPI refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

/// Runs `mpirun -np N vit --threads 1 ARGS` to the end.
fn ranks(mpirun: &Path, n: usize, args: &[&str]) -> Output {
    mpirun_vit(mpirun, n, args).output().expect("run mpirun")
}

fn params(run: &Path) -> Vec<f32> {
    vitrs::load(&run.join("model.safetensors"))
        .unwrap()
        .model
        .params()
        .flat()
        .to_vec()
}

/// `mpirun`, or `None` (the test is skipped) when it is not installed and not required.
fn mpirun_or_skip() -> Option<std::path::PathBuf> {
    let m = mpirun();
    if m.is_none() {
        assert!(
            std::env::var_os("VITRS_REQUIRE_MPI").is_none(),
            "VITRS_REQUIRE_MPI is set but mpirun is not installed (apt-get install -y openmpi-bin)"
        );
        eprintln!("skipped: no mpirun (apt-get install -y openmpi-bin libopenmpi-dev)");
    }
    m
}

/// A synthetic dataset and a small model's run config in `root`; `train` is appended to the
/// `[train]` section. The all-reduce buckets are 4 KB, so each block's gradients (9 KB) are
/// summed on their own, overlapping the backward of the blocks before it.
fn config(root: &Path, epochs: u64, train: &str) -> std::path::PathBuf {
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
epochs = {epochs}
batch_size = 16
lr = 2e-3
warmup_steps = 2
optimizer = {{ kind = "adamw", weight_decay = 0.05 }}
grad_clip = 1.0
seed = 3
bucket_mb = 0.004
{train}
"#,
            root.join("data").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn two_mpi_ranks_train_as_one_process_and_resume_on_one() {
    let Some(mpirun) = mpirun_or_skip() else {
        return;
    };
    let root = tmp("mpi");
    let cfg = config(&root, 4, "");
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

/// The pid of the `vit` process of MPI rank `rank` whose command line mentions `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let mentions = String::from_utf8_lossy(&cmd).contains(marker);
        let ours = env.split(|&b| b == 0).any(|v| v == want.as_bytes());
        (mentions && ours).then_some(pid)
    })
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes() {
    let Some(mpirun) = mpirun_or_skip() else {
        return;
    };
    let root = tmp("mpi-kill");
    // Long enough that it is still running when rank 1 is killed.
    let cfg = config(&root, 100_000, "checkpoint_every = 5");
    let out = root.join("run");
    let args = ["train", "--config", s(&cfg), "--out", s(&out)];
    let mut job = mpirun_vit(&mpirun, 2, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mpirun");
    let ckpt = out.join("checkpoint.safetensors");
    let started = std::time::Instant::now();
    while !ckpt.is_file() {
        assert!(
            started.elapsed().as_secs() < 120 && job.try_wait().unwrap().is_none(),
            "no checkpoint after {:?}",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A few more steps (and checkpoints), then rank 1 dies without a word.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = rank_pid(s(&out), 1).expect("find rank 1's process");
    let killed = Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(killed.unwrap().success());
    // The job ends (not hangs), failing, with MPI naming the rank.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(st) = job.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            job.kill().ok();
            panic!("the job still runs 60 s after rank 1 was killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "MPI's message should name the killed rank:\n{err}"
    );
    // The checkpoint left behind (every 5 steps and at each 6-step epoch's end) resumes, on one
    // process.
    let o = vit(&[
        "--threads",
        "1",
        "train",
        "--resume",
        s(&out),
        "--max-steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    let step: u64 = e
        .split("resuming at step ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line:\n{e}"));
    assert!(
        step >= 5 && (step.is_multiple_of(5) || step.is_multiple_of(6)),
        "resumed at step {step}"
    );
    assert!(
        stdout(&o).contains(&format!("stopped at step {}", step + 1)),
        "{}",
        stdout(&o)
    );
    std::fs::remove_dir_all(root).ok();
}
