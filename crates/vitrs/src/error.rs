//! The one error type of the library. Every variant carries enough context (which file,
//! which tensor, expected vs got) for a user to fix the problem without a debugger.

use std::path::PathBuf;

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an [`Error`] is about, for a caller that reacts by kind (the `vit` command's exit
/// codes) rather than by message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Something to classify, train or evaluate on: an image, a dataset file.
    Input,
    /// A model: its checkpoint, its config, or a run config that builds one.
    Model,
    /// Reading or writing a file failed.
    Io,
    /// A value could not be written out.
    Serialize,
}

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
        /// A model file ([`ErrorKind::Model`]) or an input, such as a dataset file
        /// ([`ErrorKind::Input`]).
        kind: ErrorKind,
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

    /// A model named by its Hugging Face hub id that the local cache does not hold.
    #[error("{id}: {reason} (looked in {})", looked.display())]
    NotCached {
        id: String,
        looked: PathBuf,
        reason: String,
        /// The command that fetches it on a machine with a network.
        fetch: String,
    },

    /// A value could not be written out (a config with a non-finite number, say): the save
    /// fails instead of writing a file with empty metadata.
    #[error("cannot serialise {what}: {reason}")]
    Serialize { what: &'static str, reason: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    pub(crate) fn serialize(what: &'static str, err: impl std::fmt::Display) -> Self {
        Error::Serialize {
            what,
            reason: err.to_string(),
        }
    }

    /// A damaged or invalid model file (a checkpoint, its config).
    pub(crate) fn malformed(
        path: impl Into<PathBuf>,
        what: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::Malformed {
            path: path.into(),
            what,
            reason: reason.into(),
            kind: ErrorKind::Model,
        }
    }

    /// A damaged or invalid input file (a dataset's): [`Self::malformed`] of kind
    /// [`ErrorKind::Input`].
    pub(crate) fn malformed_input(
        path: impl Into<PathBuf>,
        what: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        let mut e = Self::malformed(path, what, reason);
        if let Error::Malformed { kind, .. } = &mut e {
            *kind = ErrorKind::Input;
        }
        e
    }

    /// What the error is about.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Image { .. } | Error::BadInput(_) => ErrorKind::Input,
            Error::Malformed { kind, .. } => *kind,
            Error::Serialize { .. } => ErrorKind::Serialize,
            Error::InvalidConfig(_)
            | Error::UnknownFormat { .. }
            | Error::ShapeMismatch { .. }
            | Error::MissingTensor { .. }
            | Error::LoadMismatch(_)
            | Error::NotCached { .. } => ErrorKind::Model,
        }
    }
}
