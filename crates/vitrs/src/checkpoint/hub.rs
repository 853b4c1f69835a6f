//! Models named by their Hugging Face hub id — `google/vit-base-patch16-224`,
//! `timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`, with an optional `@REVISION` — found
//! offline in the local cache that `huggingface_hub` (and so transformers and timm) fill:
//!
//! ```text
//! $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
//!   models--ORG--NAME/
//!     refs/main                  the commit hash `main` points at (also other branches, tags)
//!     snapshots/HASH/config.json a symlink into ../../blobs/
//!     blobs/SHA256               the files' contents
//! ```
//!
//! A revision is a ref (`main`, a branch, a tag) or a commit hash with a snapshot. Nothing is
//! downloaded: a model that is not cached is an error that says where it looked and the
//! command that fetches it on a machine with a network.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `ORG/NAME[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub org: String,
    pub name: String,
    /// `main` unless given.
    pub revision: String,
}

impl HubId {
    /// Parses a hub id: two names of letters, digits, `-`, `_` and `.` around one `/`, then
    /// optionally `@REVISION`. Anything else (a path with more slashes, `./x`, `/x`) is not one.
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() && !rev.contains(['/', '\\']) => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |t: &str| {
            !t.is_empty()
                && !t.starts_with('.')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (ok(org) && ok(name) && revision != "..").then(|| HubId {
            org: org.into(),
            name: name.into(),
            revision: revision.into(),
        })
    }

    fn repo(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }
}

/// The cache directory `huggingface_hub` uses, from the environment (`get` reads a variable):
/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `HOME/.cache/huggingface/hub`.
pub fn cache_dir_from(get: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| get(k).filter(|v| !v.is_empty());
    if let Some(d) = set("HF_HUB_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = set("HF_HOME") {
        return Some(Path::new(&d).join("hub"));
    }
    set("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub"))
}

/// [`cache_dir_from`] this process's environment.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var(k).ok())
}

/// The snapshot directory of `id` in the cache at `cache`.
pub fn resolve_in(cache: &Path, id: &HubId) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}--{}", id.org, id.name));
    let missing = |reason: String| Error::NotCached {
        id: format!("{}@{}", id.repo(), id.revision),
        looked: repo_dir.clone(),
        reason,
        fetch: format!(
            "huggingface-cli download {}{}",
            id.repo(),
            if id.revision == "main" {
                String::new()
            } else {
                format!(" --revision {}", id.revision)
            }
        ),
    };
    if !repo_dir.is_dir() {
        return Err(missing("not in the Hugging Face cache".into()));
    }
    let by_ref = repo_dir.join("refs").join(&id.revision);
    let commit = match std::fs::read_to_string(&by_ref) {
        Ok(hash) => hash.trim().to_string(),
        // A commit hash given directly.
        Err(_) => id.revision.clone(),
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if commit.is_empty() || commit.contains(['/', '\\']) || commit == ".." || !snap.is_dir() {
        let list = |d: &str| -> Vec<String> {
            std::fs::read_dir(repo_dir.join(d))
                .map(|it| {
                    let mut v: Vec<String> = it
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    v.sort();
                    v
                })
                .unwrap_or_default()
        };
        return Err(missing(format!(
            "revision `{}` has no snapshot (refs: {:?}; snapshots: {:?})",
            id.revision,
            list("refs"),
            list("snapshots")
        )));
    }
    Ok(snap)
}

/// Resolves `path` to a local path: itself when it exists (a local path always wins), else
/// the cached snapshot of the hub id it spells. `None` when it is neither.
pub fn locate(path: &Path) -> Result<Option<PathBuf>> {
    if path.exists() {
        return Ok(Some(path.to_path_buf()));
    }
    let Some(id) = path.to_str().and_then(HubId::parse) else {
        return Ok(None);
    };
    let cache = cache_dir().ok_or_else(|| Error::NotCached {
        id: id.repo(),
        looked: PathBuf::from("$HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub"),
        reason: "no cache directory (none of HF_HUB_CACHE, HF_HOME, HOME is set)".into(),
        fetch: format!("huggingface-cli download {}", id.repo()),
    })?;
    resolve_in(&cache, &id).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        let id = HubId::parse("google/vit-base-patch16-224").unwrap();
        assert_eq!(
            (id.org.as_str(), id.name.as_str(), id.revision.as_str()),
            ("google", "vit-base-patch16-224", "main")
        );
        let id = HubId::parse("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k@v1.0").unwrap();
        assert_eq!(id.revision, "v1.0");
        for not in [
            "model.safetensors",
            "runs/a/b",
            "./x/y",
            "/abs/path",
            "a/",
            "/b",
            "a/b@",
            "a/b@x/y",
            "../b",
            "a b/c",
        ] {
            assert!(HubId::parse(not).is_none(), "{not}");
        }
    }

    #[test]
    fn the_cache_directory_follows_huggingface_hub() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        const ALL: [(&str, &str); 3] = [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")];
        const NO_CACHE: [(&str, &str); 3] =
            [("HF_HUB_CACHE", ""), ("HF_HOME", "/h"), ("HOME", "/u")];
        const HOME: [(&str, &str); 1] = [("HOME", "/u")];
        let (all, no_cache, home) = (&ALL, &NO_CACHE, &HOME);
        assert_eq!(cache_dir_from(env(all)), Some(PathBuf::from("/c")));
        assert_eq!(cache_dir_from(env(no_cache)), Some(PathBuf::from("/h/hub")));
        assert_eq!(
            cache_dir_from(env(home)),
            Some(PathBuf::from("/u/.cache/huggingface/hub"))
        );
        assert_eq!(cache_dir_from(env(&[])), None);
    }
}
