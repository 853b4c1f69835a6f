//! # vitrs
//!
//! The Vision Transformer of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021),
//! as a Rust library: a purpose-built CPU engine, loaders for the checkpoints people have
//! (Hugging Face, timm, native safetensors), and the preprocessing that travels with them.
//!
//! Data flows image → [`preprocess`] → [`model::ViT::forward`] (patch embedding → blocks →
//! norm → pool → head) → logits; [`checkpoint::load`] builds a model from a file.
//! The shape legend is in the [`model`] module docs.

pub mod alloc;
pub mod attnmap;
pub mod batcher;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod error;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod npy;
pub mod preprocess;
mod resample;
pub mod tensor;
pub mod train;
pub mod viz;

pub use checkpoint::{load, load_weights, Checkpoint, Format, LoadReport, Weights};
pub use config::{Gelu, Head, NormPlacement, Pool, Sizes, ViTConfig};
pub use error::{Error, ErrorKind, Result};
pub use model::{Capture, ForwardOutput, ViT, Workspace};
pub use preprocess::Preprocess;
pub use tensor::Tensor;

/// Sizes the global thread pool used by every kernel (rayon's global pool, and the kernels'
/// spinning team, `kernels::team`, which takes its size from it on first use). Call once,
/// before any model work; `None` means one thread per core. Returns an error if the pool was
/// already built.
pub fn init_threads(threads: Option<usize>) -> Result<()> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        b = b.num_threads(t.max(1));
    }
    b.build_global()
        .map_err(|e| Error::InvalidConfig(format!("cannot set up {threads:?} threads: {e}")))
}
