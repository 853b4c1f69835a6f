//! Checkpoints: format detection, conversion to canonical (timm) parameter names, loading
//! with a report, and the native format.
//!
//! Formats, detected by file layout and sentinel keys:
//! - **native**: one `.safetensors` file with timm names and the [`ViTConfig`], preprocessing
//!   and labels in its metadata (written by [`save_native`] / `vit convert`);
//! - **Hugging Face**: a directory with `config.json` (`model_type: "vit"`), `model.safetensors`
//!   and optionally `preprocessor_config.json` (see [`hf`]);
//! - **timm**: a directory with timm's hub `config.json` (`architecture`, `pretrained_cfg`)
//!   and `model.safetensors` (see [`timm`]).

pub mod hf;
pub mod hub;
pub mod npz;
pub mod onnx;
pub mod posembed;
pub mod safetensors;
pub mod timm;
pub mod torch;
pub mod zip;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::ViTConfig;
use crate::error::{Error, Result};
use crate::model::resnet::{ResNet, ResNetConfig};
use crate::model::{Net, Params, ViT};
use crate::preprocess::Preprocess;
use crate::tensor::Tensor;
use safetensors::{SafeTensors, SaveDtype};

/// Metadata keys of the native format.
const META_FORMAT: &str = "format";
const META_FORMAT_VALUE: &str = "vitrs";
const META_CONFIG: &str = "vitrs.config";
/// A training checkpoint's name prefix for the weights' moving average (`ema.<name>`).
pub const EMA_PREFIX: &str = "ema.";
const META_PREPROCESS: &str = "vitrs.preprocess";
const META_LABELS: &str = "vitrs.labels";
/// The architecture of a native file: `"resnet"`; absent for a ViT (every earlier file).
const META_ARCH: &str = "vitrs.arch";

/// Which producer wrote a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Native,
    HuggingFace,
    Timm,
    /// Google's JAX/Flax `.npz` (vision_transformer or big_vision).
    GoogleNpz,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Native => "native (vitrs safetensors)",
            Format::HuggingFace => "Hugging Face transformers",
            Format::Timm => "timm",
            Format::GoogleNpz => "Google JAX .npz (vision_transformer / big_vision)",
        })
    }
}

/// What loading did: which tensors were applied, what was missing, unexpected or mismatched,
/// and every conversion on the way.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub format: Format,
    /// The weights file read.
    pub weights: PathBuf,
    /// Canonical names filled from the checkpoint.
    pub applied: Vec<String>,
    /// Canonical names the model needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model does not use (after conversion).
    pub unexpected: Vec<String>,
    /// `(name, expected, got)` shape disagreements.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Human-readable notes: key renames, q/k/v fusion, dtype and pos-embed conversions.
    pub conversions: Vec<String>,
    /// Whether the file held a moving average of the weights beside the trained ones (a vitrs
    /// training checkpoint of a run with `ema_decay`; [`Weights`] chooses between them).
    pub moving_average: bool,
}

impl LoadReport {
    fn new(format: Format, weights: &Path) -> Self {
        LoadReport {
            format,
            weights: weights.to_path_buf(),
            applied: vec![],
            missing: vec![],
            unexpected: vec![],
            mismatched: vec![],
            conversions: vec![],
            moving_average: false,
        }
    }
}

/// A loaded checkpoint: the model (a [`ViT`], or a [`Net`] of either architecture from
/// [`load_net`]) plus what travels with it.
#[derive(Clone, Debug)]
pub struct Checkpoint<M = ViT> {
    pub model: M,
    pub preprocess: Preprocess,
    /// Class names by index, when the checkpoint names them.
    pub labels: Option<Vec<String>>,
    pub report: LoadReport,
}

impl<M> Checkpoint<M> {
    /// The same checkpoint with its model mapped by `f` (e.g. a [`Net`] to its ViT).
    pub fn map_model<N>(self, f: impl FnOnce(M) -> Result<N>) -> Result<Checkpoint<N>> {
        Ok(Checkpoint {
            model: f(self.model)?,
            preprocess: self.preprocess,
            labels: self.labels,
            report: self.report,
        })
    }

    /// The name of class `i`: its label, or `class_{i}`.
    pub fn label(&self, i: usize) -> String {
        self.labels
            .as_ref()
            .and_then(|l| l.get(i).cloned())
            .unwrap_or_else(|| format!("class_{i}"))
    }
}

/// Where the pieces of a checkpoint are.
struct Located {
    format: Format,
    weights: PathBuf,
    /// The directory holding `config.json` (HF and timm).
    dir: Option<PathBuf>,
    config: Option<serde_json::Value>,
    /// A native file's header, read once to recognise the format.
    header: Option<safetensors::Header>,
}

/// Which weights to take from a vitrs training checkpoint of a run that keeps their moving
/// average (`[train] ema_decay`): the checkpoint holds both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weights {
    /// The average, as the run evaluated it and saved it as `model.safetensors` (the default).
    #[default]
    Average,
    /// The weights the optimizer was training.
    Trained,
}

/// Loads any supported checkpoint from a file or directory, or from the local Hugging Face
/// cache by hub id (`google/vit-base-patch16-224`, `ORG/NAME@REVISION`: [`hub`]; a local path
/// of that name wins); from a training checkpoint that keeps a moving average of the weights,
/// the average (see [`load_weights`]).
pub fn load(path: &Path) -> Result<Checkpoint> {
    load_weights(path, Weights::Average)
}

/// [`load`], choosing between the trained weights and their moving average where a vitrs
/// training checkpoint holds both. Every other file has one set of weights, which is loaded
/// whatever `which` says (a report note says so when `Trained` was asked for).
pub fn load_weights(path: &Path, which: Weights) -> Result<Checkpoint> {
    // A hub id (`ORG/NAME[@REV]`) that is not a local path: its snapshot in the local cache.
    let resolved = hub::locate(path)?;
    let path = resolved.as_deref().unwrap_or(path);
    let loc = locate(path)?;
    let mut ck = match loc.format {
        Format::GoogleNpz => npz::load(&loc.weights),
        Format::Native => match loc.header {
            Some(h) => load_native_path(&loc.weights, h, which),
            None => load_native_path(&loc.weights, SafeTensors::read_header(&loc.weights)?, which),
        },
        Format::HuggingFace => hf::load(
            &loc.weights,
            loc.dir.as_deref().unwrap_or(Path::new(".")),
            loc.config.unwrap_or_default(),
        ),
        Format::Timm => timm::load(&loc.weights, loc.config.unwrap_or_default()),
    }?;
    if which == Weights::Trained && !ck.report.moving_average {
        ck.report.conversions.push(
            "trained weights asked for: this file keeps no moving average, so its weights are \
             the trained ones"
                .to_string(),
        );
    }
    Ok(ck)
}

/// Reads `config.json` in `dir`.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::malformed(path, "JSON file", e.to_string()))
}

fn locate(path: &Path) -> Result<Located> {
    let unknown = |hint: &str| Error::UnknownFormat {
        path: path.to_path_buf(),
        hint: hint.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let (dir, weights) = if meta.is_dir() {
        // safetensors first; PyTorch pickles are read by the restricted reader, never unpickled.
        let w = ["model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth"]
            .iter()
            .map(|n| path.join(n))
            .find(|w| w.is_file())
            .ok_or_else(|| {
                unknown("a checkpoint directory needs model.safetensors (or pytorch_model.bin) next to config.json")
            })?;
        (path.to_path_buf(), w)
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if name == "config.json" {
            return locate(parent);
        }
        if name.ends_with(".pth")
            || name.ends_with(".pt")
            || name.ends_with(".bin")
            || name.ends_with(".ckpt")
        {
            if !parent.join("config.json").is_file() {
                return Err(unknown(
                    "PyTorch weights without an architecture: put the config.json that came with them \
                     (Hugging Face or timm) in the same directory",
                ));
            }
            return locate_with_config(parent, path);
        }
        if name.ends_with(".npz") {
            return Ok(Located {
                format: Format::GoogleNpz,
                weights: path.to_path_buf(),
                dir: None,
                config: None,
                header: None,
            });
        }
        // A lone safetensors file: native if it carries our config, else look for a config beside it.
        let st_head = SafeTensors::read_header(path);
        match st_head {
            Ok(st) if st.metadata.get(META_FORMAT).map(String::as_str) == Some(META_FORMAT_VALUE) => {
                return Ok(Located {
                    format: Format::Native,
                    weights: path.to_path_buf(),
                    dir: None,
                    config: None,
                    header: Some(st),
                });
            }
            Ok(_) if parent.join("config.json").is_file() => (parent.to_path_buf(), path.to_path_buf()),
            Ok(_) => {
                return Err(unknown(
                    "safetensors weights without an architecture: put the config.json that came with them \
                     (Hugging Face or timm) in the same directory, or pass the directory",
                ))
            }
            Err(e) => return Err(e),
        }
    };
    if !dir.join("config.json").is_file() {
        return Err(unknown(
            "no config.json beside the weights; vitrs never guesses the architecture",
        ));
    }
    locate_with_config(&dir, &weights)
}

/// Hugging Face or timm, from the `config.json` in `dir`.
fn locate_with_config(dir: &Path, weights: &Path) -> Result<Located> {
    let (dir, weights) = (dir.to_path_buf(), weights.to_path_buf());
    let cfg_path = dir.join("config.json");
    let config = read_json(&cfg_path)?;
    let format = if config.get("architecture").is_some() {
        Format::Timm
    } else if config.get("model_type").and_then(|v| v.as_str()) == Some("vit")
        || config.get("hidden_size").is_some()
    {
        Format::HuggingFace
    } else {
        let mt = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("none");
        return Err(Error::UnknownFormat {
            path: cfg_path,
            hint: format!(
                "config.json is neither timm's (no `architecture`) nor a Hugging Face ViT's (model_type `{mt}`, expected `vit`)"
            ),
        });
    };
    Ok(Located {
        format,
        weights,
        dir: Some(dir),
        config: Some(config),
        header: None,
    })
}

/// Fills `model` from canonical-named tensors, recording everything in `report`. A missing or
/// mismatched tensor is an error that lists them all; an unexpected one is only reported.
/// A position table on another (square) grid is resampled.
/// Allocates the model `cfg` describes and fills it from `tensors` — after checking that the
/// weights can fill it, so a config that lies about the size (a hostile or mismatched
/// `config.json`) is refused before gigabytes are allocated.
pub(crate) fn build(
    cfg: ViTConfig,
    tensors: BTreeMap<String, Tensor>,
    report: &mut LoadReport,
) -> Result<ViT> {
    let have: usize = tensors.values().map(Tensor::numel).sum();
    // The position table may legitimately grow (resampled to a larger grid).
    // A little larger is a mismatch that `apply` names tensor by tensor; far larger would
    // allocate before it could say so.
    let need = ViT::param_count(&cfg).saturating_sub(cfg.pos_tokens() * cfg.width);
    if need > 2 * have + (16 << 20) {
        return Err(Error::LoadMismatch(format!(
            "{}: the config describes {need} parameters (position table aside) but the weights \
             hold {have} values; the config does not belong to these weights",
            report.weights.display()
        )));
    }
    let mut model = ViT::zeros(cfg)?;
    apply(&mut model, tensors, report)?;
    Ok(model)
}

pub(crate) fn apply(
    model: &mut ViT,
    mut tensors: BTreeMap<String, Tensor>,
    report: &mut LoadReport,
) -> Result<()> {
    let cfg = model.config().clone();
    let entries = model.params().entries().to_vec();
    for e in &entries {
        let Some(t) = tensors.remove(&e.name) else {
            report.missing.push(e.name.clone());
            continue;
        };
        let mut data = t.data().to_vec();
        if t.shape() != e.shape.as_slice() {
            let got = t.shape().to_vec();
            let regrid =
                if e.name == "pos_embed" && got.len() == 3 && got[0] == 1 && got[2] == cfg.width {
                    posembed::square_grid(got[1], cfg.pos_prefix_tokens())
                } else {
                    None
                };
            match regrid {
                Some(old) => {
                    let prefix = cfg.pos_prefix_tokens();
                    data = posembed::resample_pos_embed(&data, cfg.width, prefix, old, cfg.grid())?;
                    report.conversions.push(format!(
                        "resampled pos_embed from a {}x{} to a {}x{} grid (bicubic, {prefix} prefix-token row(s) kept)",
                        old.0,
                        old.1,
                        cfg.grid().0,
                        cfg.grid().1
                    ));
                }
                None => {
                    report
                        .mismatched
                        .push((e.name.clone(), e.shape.clone(), got));
                    continue;
                }
            }
        }
        if let Some(dst) = model.params_mut().get_mut(&e.name) {
            dst.copy_from_slice(&data);
        }
        report.applied.push(e.name.clone());
    }
    report.unexpected.extend(tensors.into_keys());
    if !report.missing.is_empty() || !report.mismatched.is_empty() {
        let mut msg = String::new();
        if !report.mismatched.is_empty() {
            let (n, want, got) = &report.mismatched[0];
            msg += &format!(
                "{} tensor(s) have the wrong shape, first `{n}`: config expects {want:?}, weights have {got:?}",
                report.mismatched.len()
            );
        }
        if !report.missing.is_empty() {
            if !msg.is_empty() {
                msg += "; ";
            }
            let shown: Vec<&str> = report.missing.iter().take(4).map(String::as_str).collect();
            msg += &format!(
                "{} tensor(s) missing: {}{}",
                report.missing.len(),
                shown.join(", "),
                if report.missing.len() > 4 {
                    ", ..."
                } else {
                    ""
                }
            );
        }
        msg += &format!(
            " (weights {}); does config.json belong to these weights?",
            report.weights.display()
        );
        return Err(Error::LoadMismatch(msg));
    }
    Ok(())
}

/// Converts every tensor of `st` to f32 under its own name, noting dtype conversions.
pub(crate) fn read_all(
    st: &SafeTensors,
    report: &mut LoadReport,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut converted: BTreeMap<String, usize> = BTreeMap::new();
    for (name, info) in st.tensors() {
        if info.dtype == safetensors::Dtype::Other {
            report
                .unexpected
                .push(format!("{name} ({})", info.dtype_name));
            continue;
        }
        if info.dtype != safetensors::Dtype::F32 {
            *converted.entry(info.dtype_name.clone()).or_default() += 1;
        }
        out.insert(name.clone(), st.tensor(name)?);
    }
    for (dt, n) in converted {
        report
            .conversions
            .push(format!("converted {n} {dt} tensor(s) to f32"));
    }
    for (name, t) in &out {
        if !all_finite(t.data()) {
            report
                .conversions
                .push(format!("warning: tensor `{name}` holds NaN or Inf values"));
        }
    }
    Ok(out)
}

/// Every tensor of a weights file as f32 under its own name: safetensors, or a PyTorch
/// `torch.save` file read by the restricted reader ([`torch`]), which builds tensors only.
pub(crate) fn read_weights(
    path: &Path,
    report: &mut LoadReport,
) -> Result<BTreeMap<String, Tensor>> {
    let is_pickle = path.extension().is_some_and(|e| {
        ["bin", "pth", "pt", "ckpt"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    });
    if !is_pickle {
        return read_all(&SafeTensors::read(path)?, report);
    }
    let (tensors, r) = torch::read(path)?;
    report
        .conversions
        .push("PyTorch pickle read without unpickling (tensors and containers only)".into());
    if let Some(k) = r.inner_key {
        report.conversions.push(format!(
            "weights taken from the training checkpoint's `{k}` entry"
        ));
    }
    report.conversions.extend(r.converted);
    for s in r.skipped {
        report.unexpected.push(format!("{s} (integer buffer)"));
    }
    if !r.opaque.is_empty() {
        report
            .conversions
            .push(format!("left unbuilt (never run): {}", r.opaque.join(", ")));
    }
    Ok(tensors)
}

/// A native file: straight from disk into the parameter buffer when its data section is
/// exactly that buffer (what `vit convert` and `vit train` write in f32: one read, no
/// intermediate copies, so loading ViT-B holds its 330 MiB once); otherwise the general path.
fn load_native_path(path: &Path, h: safetensors::Header, which: Weights) -> Result<Checkpoint> {
    // The direct path declines any file with more than the model's tensors, so a checkpoint
    // with a moving average always takes `load_native`.
    if let Some(ck) = load_native_direct(path, &h)? {
        return Ok(ck);
    }
    load_native(SafeTensors::read(path)?, which)
}

/// The direct path of [`load_native_path`]; `None` when the file's layout differs from the
/// model's flat buffer (other dtypes, optimizer state, another order).
fn load_native_direct(path: &Path, h: &safetensors::Header) -> Result<Option<Checkpoint>> {
    if !cfg!(target_endian = "little") {
        return Ok(None);
    }
    let (config, preprocess, labels) = native_meta(path, &h.metadata)?;
    let entries = ViT::param_entries(&config);
    let total: usize = entries.last().map_or(0, |e| e.range.end);
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len() as usize;
    let same_layout = h.tensors.len() == entries.len()
        && file_len == h.data_start + 4 * total
        && entries.iter().all(|e| {
            h.tensors.get(&e.name).is_some_and(|t| {
                t.dtype == safetensors::Dtype::F32
                    && t.shape == e.shape
                    && (t.start, t.end) == (4 * e.range.start, 4 * e.range.end)
            })
        });
    if !same_layout {
        return Ok(None);
    }
    let mut model = ViT::zeros(config)?;
    let all_finite_read = {
        let flat = model.params_mut().flat_mut();
        // SAFETY: the byte view covers exactly `flat`'s allocation, u8 has no alignment
        // requirement, and every bit pattern is a valid f32; on a little-endian target the
        // file's little-endian f32 bytes are the values.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(flat.as_mut_ptr().cast::<u8>(), flat.len() * 4)
        };
        let (data_crc, finite) = read_f32_section(path, h.data_start as u64, bytes)?;
        safetensors::verify_hashed(path, &h.head, data_crc, h)?;
        finite
    };
    let mut report = LoadReport::new(Format::Native, path);
    for e in &entries {
        // Only when some value is not finite: find which tensors hold it.
        if !all_finite_read && !all_finite(&model.params().flat()[e.range.clone()]) {
            report.conversions.push(format!(
                "warning: tensor `{}` holds NaN or Inf values",
                e.name
            ));
        }
        report.applied.push(e.name.clone());
    }
    Ok(Some(Checkpoint {
        model,
        preprocess,
        labels,
        report,
    }))
}

/// Bytes per read of [`read_f32_section`]: small enough for the CRC and the finite test to
/// find each chunk still in cache after the copy (in L2 on a Xeon with 2 MiB a core; in an
/// 8 MiB L3 two threads' 8 MiB chunks did not fit at all). AVX-512 Xeon, `vit info` of a
/// ViT-B/16 file (16 interleaved rounds): the vectorised finite test alone 0.90×, with 1 MiB
/// chunks 0.75× the time.
const READ_CHUNK: usize = 1 << 20;

/// Reads the `dest.len()` bytes at `offset` of `path` (little-endian f32 values) into `dest`;
/// returns their CRC-32 and whether every value is finite.
///
/// On Unix the read is split into [`READ_CHUNK`] chunks that all threads read (`pread`),
/// checksum and check while each is in cache: most of the cost of loading a large model is
/// the kernel copying from the page cache and faulting in the destination pages, which is
/// per-thread work (ViT-B, 330 MB: docs/perf.md). Elsewhere, one sequential read.
fn read_f32_section(
    path: &Path,
    offset: u64,
    dest: &mut [u8],
) -> Result<(crc32fast::Hasher, bool)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let scan = |chunk: &[u8]| {
        let mut crc = crc32fast::Hasher::new();
        crc.update(chunk);
        (crc, finite_bytes(chunk))
    };
    #[cfg(unix)]
    {
        use rayon::prelude::*;
        use std::os::unix::fs::FileExt;
        let parts = dest
            .par_chunks_mut(READ_CHUNK)
            .enumerate()
            .map(|(i, chunk)| {
                file.read_exact_at(chunk, offset + (i * READ_CHUNK) as u64)?;
                Ok(scan(chunk))
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io(path, e))?;
        let mut crc = crc32fast::Hasher::new();
        for (part, _) in &parts {
            crc.combine(part);
        }
        Ok((crc, parts.iter().all(|(_, finite)| *finite)))
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(dest))
            .map_err(|e| Error::io(path, e))?;
        Ok(scan(dest))
    }
}

/// f32's exponent field: all ones in NaN and ±Inf, and only there.
const EXPONENT: u32 = 0x7f80_0000;

crate::kernels::simd_dispatch! {
    /// `*max` = the largest exponent field ([`EXPONENT`]'s bits, in place) of the
    /// little-endian f32 values in `bytes` (its whole 4-byte words), 0 for none: a max
    /// reduction that vectorises on the SIMD rungs. The default x86-64 build compiles a scalar
    /// form only for SSE2, which has no unsigned 32-bit max: that loop took more of loading
    /// ViT-B/16 (a quarter of `vit info`'s samples) than the CRC beside it.
    fn max_exponent_into(bytes: &[u8], max: &mut u32) {
        *max = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & EXPONENT)
            .fold(0, u32::max);
    }
}

/// Whether the little-endian f32 values in `bytes` are all finite (see [`all_finite`]).
fn finite_bytes(bytes: &[u8]) -> bool {
    let mut max = 0;
    max_exponent_into(bytes, &mut max);
    max < EXPONENT
}

/// Whether no value is NaN or ±Inf ([`finite_bytes`] of their bytes), over both cores for
/// large tensors (a scalar early-exit loop was a fifth of loading ViT-B).
pub(crate) fn all_finite(x: &[f32]) -> bool {
    use rayon::prelude::*;
    // The values' bytes are little-endian on a little-endian target; elsewhere test them.
    if cfg!(target_endian = "big") {
        return x.iter().all(|v| v.is_finite());
    }
    // SAFETY: the bytes of `x`'s values, which outlive the view.
    let bytes = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), x.len() * 4) };
    if x.len() < 1 << 20 {
        return finite_bytes(bytes);
    }
    bytes.par_chunks(1 << 20).all(finite_bytes)
}

/// The config, preprocessing and labels a native file's metadata carries.
fn native_meta(
    path: &Path,
    meta: &BTreeMap<String, String>,
) -> Result<(ViTConfig, Preprocess, Option<Vec<String>>)> {
    if let Some(arch) = meta.get(META_ARCH) {
        return Err(Error::BadInput(format!(
            "{} holds a {arch} (native file with `{META_ARCH}` = \"{arch}\"), and this command \
             works on ViTs only; vit train, eval, predict, finetune and bench take it",
            path.display()
        )));
    }
    let (preprocess, labels) = native_extras(path, meta)?;
    let get = |k: &str| {
        meta.get(k).ok_or_else(|| {
            Error::malformed(path, "native checkpoint", format!("metadata lacks `{k}`"))
        })
    };
    let config = ViTConfig::from_json(get(META_CONFIG)?)
        .map_err(|e| Error::malformed(path, "native checkpoint", e.to_string()))?;
    Ok((config, preprocess, labels))
}

/// The preprocessing and labels of a native file, whatever its architecture.
fn native_extras(
    path: &Path,
    meta: &BTreeMap<String, String>,
) -> Result<(Preprocess, Option<Vec<String>>)> {
    let text = meta.get(META_PREPROCESS).ok_or_else(|| {
        Error::malformed(
            path,
            "native checkpoint",
            format!("metadata lacks `{META_PREPROCESS}`"),
        )
    })?;
    let preprocess: Preprocess = serde_json::from_str(text)
        .map_err(|e| Error::malformed(path, "native checkpoint", format!("preprocessing: {e}")))?;
    preprocess.validate()?;
    let labels: Option<Vec<String>> = match meta.get(META_LABELS) {
        Some(l) => Some(
            serde_json::from_str(l)
                .map_err(|e| Error::malformed(path, "native checkpoint", format!("labels: {e}")))?,
        ),
        None => None,
    };
    Ok((preprocess, labels))
}

/// Loads a checkpoint of either architecture: a native ResNet file (what `vit train` writes
/// for `arch = "resnet"`), or anything [`load`] reads, as a ViT.
pub fn load_net(path: &Path) -> Result<Checkpoint<Net>> {
    load_net_weights(path, Weights::Average)
}

/// [`load_net`], choosing between trained and averaged weights as [`load_weights`] does.
pub fn load_net_weights(path: &Path, which: Weights) -> Result<Checkpoint<Net>> {
    let resnet = path.is_file()
        && SafeTensors::read_header(path)
            .is_ok_and(|h| h.metadata.get(META_ARCH).is_some_and(|a| a == "resnet"));
    if resnet {
        load_native_resnet(SafeTensors::read(path)?, which)
    } else {
        load_weights(path, which)?.map_model(|m| Ok(Net::ViT(m)))
    }
}

/// A native ResNet file: parameters and running statistics under PyTorch's names; a training
/// checkpoint's optimizer moments left aside, and its weights' moving average (`ema.<name>`)
/// taken unless the trained weights are asked for.
fn load_native_resnet(st: SafeTensors, which: Weights) -> Result<Checkpoint<Net>> {
    let path = st.path().to_path_buf();
    let meta = st.metadata();
    let (preprocess, labels) = native_extras(&path, meta)?;
    let text = meta.get(META_CONFIG).ok_or_else(|| {
        Error::malformed(
            &path,
            "native ResNet",
            format!("metadata lacks `{META_CONFIG}`"),
        )
    })?;
    let config: ResNetConfig = serde_json::from_str(text)
        .map_err(|e| Error::malformed(&path, "native ResNet", format!("config: {e}")))?;
    let mut model = ResNet::zeros(config)?;
    let mut report = LoadReport::new(Format::Native, &path);
    let averaged = st.tensors().keys().any(|k| k.starts_with(EMA_PREFIX));
    report.moving_average = averaged;
    let take_average = averaged && which == Weights::Average;
    let mut fill = |params: &mut Params, prefix: &str| -> Result<()> {
        let entries = params.entries().to_vec();
        read_prefixed(&st, prefix, &entries, params.flat_mut())?;
        report.applied.extend(entries.into_iter().map(|e| e.name));
        Ok(())
    };
    fill(
        model.params_mut(),
        if take_average { EMA_PREFIX } else { "" },
    )?;
    fill(model.buffers_mut(), "")?;
    if averaged {
        report.conversions.push(if take_average {
            "training checkpoint: loaded the weights' moving average, as the run evaluated and \
             saved it; the trained weights left aside"
                .to_string()
        } else {
            "training checkpoint: loaded the trained weights, as asked".to_string()
        });
    }
    if !all_finite(model.params().flat()) || !all_finite(model.buffers().flat()) {
        report
            .conversions
            .push("warning: the model holds NaN or Inf values".to_string());
    }
    Ok(Checkpoint {
        model: Net::ResNet(model),
        preprocess,
        labels,
        report,
    })
}

fn load_native(st: SafeTensors, which: Weights) -> Result<Checkpoint> {
    let path = st.path().to_path_buf();
    let (config, preprocess, labels) = native_meta(&path, st.metadata())?;
    let mut report = LoadReport::new(Format::Native, &path);
    let mut tensors = read_all(&st, &mut report)?;
    // A training checkpoint also carries optimizer moments; they are not model weights.
    let before = tensors.len();
    tensors.retain(|k, _| !k.starts_with("optimizer."));
    if tensors.len() < before {
        report.conversions.push(format!(
            "training checkpoint: {} optimizer tensors left aside",
            before - tensors.len()
        ));
    }
    // A run with `ema_decay` also keeps the weights' moving average (`ema.<name>`): that is
    // what it evaluates and saves as model.safetensors, so it is what the checkpoint loads as
    // unless the trained weights are asked for.
    let averaged = take_prefixed(&mut tensors, EMA_PREFIX);
    report.moving_average = !averaged.is_empty();
    if report.moving_average {
        let n = averaged.len();
        report.conversions.push(match which {
            Weights::Trained => format!(
                "training checkpoint: loaded the trained weights, as asked; the weights' moving \
                 average ({n} `{EMA_PREFIX}` tensors) left aside"
            ),
            Weights::Average => {
                // Same names as the trained weights: inserting replaces them.
                tensors.extend(averaged);
                format!(
                    "training checkpoint: loaded the weights' moving average ({n} `{EMA_PREFIX}` \
                     tensors), as the run evaluated and saved it; the trained weights left aside"
                )
            }
        });
    }
    let model = build(config, tensors, &mut report)?;
    Ok(Checkpoint {
        model,
        preprocess,
        labels,
        report,
    })
}

/// Removes the tensors named `prefix` + a name from `tensors`; returns them under the name.
fn take_prefixed(tensors: &mut BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    let (taken, rest): (BTreeMap<_, _>, _) = std::mem::take(tensors)
        .into_iter()
        .partition(|(k, _)| k.starts_with(prefix));
    *tensors = rest;
    taken
        .into_iter()
        .map(|(k, t)| (k[prefix.len()..].to_string(), t))
        .collect()
}

/// The metadata of a native file: format marker, config, preprocessing and labels.
pub fn native_metadata(
    model: &ViT,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
) -> Result<BTreeMap<String, String>> {
    metadata_with(model.config().to_json()?, preprocess, labels)
}

/// A native file's metadata around its model's config (JSON).
fn metadata_with(
    config: String,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
) -> Result<BTreeMap<String, String>> {
    let mut meta = BTreeMap::new();
    meta.insert(META_FORMAT.to_string(), META_FORMAT_VALUE.to_string());
    meta.insert(META_CONFIG.to_string(), config);
    meta.insert(
        META_PREPROCESS.to_string(),
        serde_json::to_string(preprocess).map_err(|e| Error::serialize("the preprocessing", e))?,
    );
    if let Some(l) = labels {
        meta.insert(
            META_LABELS.to_string(),
            serde_json::to_string(l).map_err(|e| Error::serialize("the class labels", e))?,
        );
    }
    Ok(meta)
}

/// Reads the tensor `prefix` + name of every entry of a flat buffer into its place in `buf`,
/// checking its shape.
pub(crate) fn read_prefixed(
    st: &SafeTensors,
    prefix: &str,
    entries: &[crate::model::ParamEntry],
    buf: &mut [f32],
) -> Result<()> {
    for e in entries {
        let name = format!("{prefix}{}", e.name);
        let t = st.tensor(&name)?;
        if t.shape() != e.shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name,
                expected: e.shape.clone(),
                got: t.shape().to_vec(),
            });
        }
        buf[e.range.clone()].copy_from_slice(t.data());
    }
    Ok(())
}

/// The metadata of a native file of either architecture.
pub fn net_metadata(
    model: &Net,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
) -> Result<BTreeMap<String, String>> {
    match model {
        Net::ViT(m) => native_metadata(m, preprocess, labels),
        Net::ResNet(m) => {
            let config = serde_json::to_string(m.config())
                .map_err(|e| Error::serialize("the ResNet config", e))?;
            let mut meta = metadata_with(config, preprocess, labels)?;
            meta.insert(META_ARCH.to_string(), "resnet".to_string());
            Ok(meta)
        }
    }
}

/// The named tensors of a model of either architecture: its parameters, then (a ResNet) its
/// running statistics.
pub fn net_tensors(model: &Net) -> Vec<(&str, &[usize], &[f32])> {
    std::iter::once(model.params())
        .chain(model.buffers())
        .flat_map(named_tensors)
        .collect()
}

/// `(name, shape, values)` of every entry of a flat buffer, in its order.
fn named_tensors(p: &Params) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
    p.entries().iter().map(|e| {
        (
            e.name.as_str(),
            e.shape.as_slice(),
            &p.flat()[e.range.clone()],
        )
    })
}

/// [`save_native`] for a model of either architecture (`vit train` writes its
/// model.safetensors this way); [`load_net`] reads it back.
pub fn save_net(
    path: &Path,
    model: &Net,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
    dtype: SaveDtype,
) -> Result<()> {
    let meta = net_metadata(model, preprocess, labels)?;
    safetensors::write(path, &net_tensors(model), &meta, dtype)
}

/// Writes the native format: timm-named tensors with the config, preprocessing and labels in
/// the metadata, atomically.
pub fn save_native(
    path: &Path,
    model: &ViT,
    preprocess: &Preprocess,
    labels: Option<&[String]>,
    dtype: SaveDtype,
) -> Result<()> {
    let meta = native_metadata(model, preprocess, labels)?;
    let tensors: Vec<_> = named_tensors(model.params()).collect();
    safetensors::write(path, &tensors, &meta, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finite test of the running rung (`VITRS_KERNELS` picks it) against `is_finite`:
    /// NaN, ±Inf or none at every position of every length to 70 values (whole vectors and
    /// tails), the bytes at every alignment, beside the extreme finite values.
    #[test]
    fn the_finite_test_finds_a_nan_or_an_infinity_anywhere() {
        let finite = [
            1.0f32,
            -0.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
            -3.5,
        ];
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN];
        for len in 0..70 {
            let values: Vec<f32> = (0..len).map(|i| finite[i % finite.len()]).collect();
            let mut cases = vec![values.clone()];
            for at in 0..len {
                for b in bad {
                    let mut v = values.clone();
                    v[at] = b;
                    cases.push(v);
                }
            }
            for v in cases {
                let want = v.iter().all(|x| x.is_finite());
                assert_eq!(all_finite(&v), want, "{v:?}");
                for shift in 0..4 {
                    let mut bytes = vec![0u8; shift];
                    bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                    assert_eq!(finite_bytes(&bytes[shift..]), want, "{v:?} at +{shift}");
                }
            }
        }
    }

    /// The chunked parallel read returns the bytes at the offset, the CRC of all of them and
    /// whether all are finite f32 values, across several chunks and a ragged last one.
    #[test]
    fn read_f32_section_reads_and_checksums_across_chunks() {
        let offset = 1000usize;
        let n = READ_CHUNK * 2 + 12_344;
        // Finite values (1.0 ± small) with an infinity planted in the second chunk later.
        let mut file = vec![0u8; offset];
        for i in 0..n / 4 {
            file.extend_from_slice(&(1.0 + i as f32 * 1e-7).to_le_bytes());
        }
        let path = std::env::temp_dir().join(format!("vitrs-read-section-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let mut dest = vec![0u8; n];
        let got = read_f32_section(&path, offset as u64, &mut dest);
        let too_long = read_f32_section(&path, offset as u64 + 4, &mut dest.clone());
        assert!(
            dest == file[offset..],
            "the bytes read differ from the file's"
        );
        let (crc, finite) = got.unwrap();
        assert_eq!(crc.finalize(), crc32fast::hash(&file[offset..]));
        assert!(finite);
        let at = offset + READ_CHUNK + 4000;
        file[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        let path_inf = path.with_extension("inf");
        std::fs::write(&path_inf, &file).unwrap();
        let with_inf = read_f32_section(&path_inf, offset as u64, &mut dest.clone());
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&path_inf).unwrap();
        assert!(!with_inf.unwrap().1);
        // One byte past the end of the file: an I/O error naming the file, not a panic.
        let err = too_long.unwrap_err().to_string();
        assert!(err.contains("vitrs-read-section"), "{err}");
    }
}
