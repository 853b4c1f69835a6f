//! Models named by hub id, resolved offline from a Hugging Face cache tree laid out as
//! `huggingface_hub` writes it (blobs, snapshots of symlinks, refs), built here from the
//! fixtures. One test: it sets the process's environment and working directory.

#![cfg(unix)]

use std::path::{Path, PathBuf};

use vitrs::checkpoint::hub::{resolve_in, HubId};
use vitrs::npy::read_npy;
use vitrs::Format;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Adds a snapshot `commit` of `ORG/NAME` to the cache with the files of fixture `src`, each a
/// symlink into `blobs/` (named by a made-up hash), as `huggingface_hub` stores them.
fn snapshot(cache: &Path, repo: &str, commit: &str, src: &Path, files: &[&str]) {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snap) = (
        repo_dir.join("blobs"),
        repo_dir.join("snapshots").join(commit),
    );
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        let blob = format!("{commit}-{}", f.replace('.', "-"));
        std::fs::copy(src.join(f), blobs.join(&blob)).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snap.join(f)).unwrap();
    }
}

fn set_ref(cache: &Path, repo: &str, name: &str, commit: &str) {
    let refs = cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    // huggingface_hub writes the hash without a newline.
    std::fs::write(refs.join(name), commit).unwrap();
}

#[test]
fn hub_ids_resolve_from_the_local_cache() {
    let root = std::env::temp_dir().join(format!("vitrs-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cache = root.join("hub");
    let (hf, timm) = (
        fixtures().join("hf_cls"),
        fixtures().join("timm_tiny_named"),
    );
    let hf_files = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ];
    let timm_files = ["config.json", "model.safetensors"];
    // A transformers repo with two snapshots: main first at the HF model, then moved to the
    // timm one; a tag v1 stays at the first.
    let (c1, c2) = ("1111aaaa", "2222bbbb");
    snapshot(&cache, "acme/tiny-vit", c1, &hf, &hf_files);
    snapshot(&cache, "acme/tiny-vit", c2, &timm, &timm_files);
    set_ref(&cache, "acme/tiny-vit", "main", c1);
    set_ref(&cache, "acme/tiny-vit", "v1", c1);
    // A timm repo (config.json with `architecture`, model.safetensors).
    snapshot(
        &cache,
        "timm/vit_tiny_patch16_224.test",
        "3333cccc",
        &timm,
        &timm_files,
    );
    set_ref(&cache, "timm/vit_tiny_patch16_224.test", "main", "3333cccc");

    let id = |s: &str| HubId::parse(s).unwrap();
    let snap = |c: &str| cache.join("models--acme--tiny-vit/snapshots").join(c);
    assert_eq!(resolve_in(&cache, &id("acme/tiny-vit")).unwrap(), snap(c1));
    assert_eq!(
        resolve_in(&cache, &id("acme/tiny-vit@v1")).unwrap(),
        snap(c1)
    );
    // A commit hash as the revision.
    assert_eq!(
        resolve_in(&cache, &id(&format!("acme/tiny-vit@{c2}"))).unwrap(),
        snap(c2)
    );
    // An unknown revision names the refs and snapshots there are.
    let e = resolve_in(&cache, &id("acme/tiny-vit@v9"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("v9") && e.contains("main") && e.contains(c2),
        "{e}"
    );

    // End to end through vitrs::load, with the cache found from HF_HUB_CACHE.
    std::env::set_var("HF_HUB_CACHE", &cache);
    let ck = vitrs::load(Path::new("acme/tiny-vit")).unwrap();
    assert_eq!(ck.report.format, Format::HuggingFace);
    let x = read_npy(&hf.join("ref/input.npy")).unwrap();
    let want = read_npy(&hf.join("ref/logits.npy")).unwrap();
    let d = vitrs::kernels::max_abs_diff(ck.model.logits(&x).unwrap().data(), want.data());
    assert!(d < 1e-4, "hf via the cache: {d}");
    let ck = vitrs::load(Path::new("timm/vit_tiny_patch16_224.test")).unwrap();
    assert_eq!(ck.report.format, Format::Timm);

    // refs/main moved: the same id now gives the other snapshot.
    set_ref(&cache, "acme/tiny-vit", "main", c2);
    let ck = vitrs::load(Path::new("acme/tiny-vit")).unwrap();
    assert_eq!(ck.report.format, Format::Timm);
    assert_eq!(
        vitrs::load(Path::new("acme/tiny-vit@v1"))
            .unwrap()
            .report
            .format,
        Format::HuggingFace
    );

    // Not cached: where it looked, and how to fetch it.
    let e = vitrs::load(Path::new("acme/other")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("acme/other") && msg.contains("models--acme--other"),
        "{msg}"
    );
    match e {
        vitrs::Error::NotCached { fetch, .. } => {
            assert_eq!(fetch, "huggingface-cli download acme/other")
        }
        other => panic!("{other}"),
    }

    // A local path of the same name wins over the hub id.
    let local = root.join("work");
    std::fs::create_dir_all(local.join("acme")).unwrap();
    std::os::unix::fs::symlink(&hf, local.join("acme/tiny-vit")).unwrap();
    std::env::set_current_dir(&local).unwrap();
    let ck = vitrs::load(Path::new("acme/tiny-vit")).unwrap();
    assert_eq!(ck.report.format, Format::HuggingFace, "the local directory");
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    std::fs::remove_dir_all(&root).ok();
}
