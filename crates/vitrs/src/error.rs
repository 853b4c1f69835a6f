//! The one error type of the library. Every variant carries enough context (which file,
//! which tensor, expected vs got) for a user to fix the problem without a debugger.

use std::path::PathBuf;

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message (not a `source`), so chains print it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("invalid config: {0}")]
    InvalidConfig(String),

    #[error("{path}: not a format vitrs can read ({hint})")]
    UnknownFormat { path: PathBuf, hint: String },

    #[error("{path}: malformed {what}: {reason}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },

    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("checkpoint is missing tensor `{name}`{}", hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    MissingTensor { name: String, hint: Option<String> },

    #[error("checkpoint does not match the model config: {0}")]
    LoadMismatch(String),

    #[error("{path}: cannot decode image: {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("input: {0}")]
    BadInput(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    pub(crate) fn malformed(
        path: impl Into<PathBuf>,
        what: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::Malformed {
            path: path.into(),
            what,
            reason: reason.into(),
        }
    }
}
