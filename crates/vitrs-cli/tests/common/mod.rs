//! Helpers shared by the CLI integration tests (each test file is its own crate and uses a
//! subset of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `vit` binary built for these tests, in a scratch working directory (so a file a
/// command writes by default, such as `confusion.png`, never lands in the source tree).
pub fn vit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vit"))
        .args(args)
        .current_dir(workdir())
        .output()
        .expect("run vit")
}

/// The scratch working directory of this test process's `vit` runs.
pub fn workdir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tmp("cwd")).clone()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh temporary directory for one test, unique per test file, tag and process.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "vitrs-{}-{tag}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
