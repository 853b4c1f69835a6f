//! The safetensors format: an 8-byte little-endian header length, a JSON header mapping tensor
//! names to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` string map), then
//! the raw little-endian data. Read and written here with every field checked, since these
//! files come from strangers.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Largest JSON header accepted (the format's own reference reader uses 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Element types we can turn into f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    /// Any other (integer, bool, fp8) tensor: listed, never converted.
    Other,
}

impl Dtype {
    /// Little-endian elements of this type as f32 (empty for [`Dtype::Other`], which callers
    /// refuse or skip before decoding). Shared by the safetensors, `.npy` and PyTorch readers.
    pub fn decode(self, raw: &[u8]) -> Vec<f32> {
        match self {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
            Dtype::Other => vec![],
        }
    }

    fn parse(s: &str) -> (Dtype, usize) {
        match s {
            "F32" => (Dtype::F32, 4),
            "F16" => (Dtype::F16, 2),
            "BF16" => (Dtype::BF16, 2),
            "F64" => (Dtype::F64, 8),
            "I64" | "U64" => (Dtype::Other, 8),
            "I32" | "U32" => (Dtype::Other, 4),
            "I16" | "U16" => (Dtype::Other, 2),
            _ => (Dtype::Other, 1),
        }
    }

    /// The element types of the safetensors format.
    const KNOWN: [&'static str; 15] = [
        "F64", "F32", "F16", "BF16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL",
        "F8_E4M3", "F8_E5M2",
    ];
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub dtype_name: String,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub start: usize,
    pub end: usize,
}

/// A validated safetensors header: where the data starts, the tensors, the metadata.
#[derive(Debug, Default)]
pub struct Header {
    pub data_start: usize,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// The file's first `data_start` bytes, when read by [`SafeTensors::read_header`].
    pub head: Vec<u8>,
}

/// A parsed safetensors file, its data held in memory and converted on demand.
#[derive(Debug)]
pub struct SafeTensors {
    path: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafeTensors {
    /// Reads and validates `path` (header, offsets, sizes); tensor data is converted later.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Validates the header of a file of `file_len` bytes whose first bytes are `head` (at
    /// least the length prefix and the header): offsets, sizes, dtypes. No data is needed.
    pub fn parse_header(path: &Path, head: &[u8], file_len: usize) -> Result<Header> {
        let bad = |reason: String| Error::malformed(path, "safetensors file", reason);
        if file_len < 8 || head.len() < 8 {
            return Err(bad(format!(
                "only {file_len} bytes; a safetensors file starts with an 8-byte header length"
            )));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&head[..8]);
        let hlen = u64::from_le_bytes(len8);
        if hlen > MAX_HEADER || hlen > (file_len - 8) as u64 || 8 + hlen as usize > head.len() {
            return Err(bad(format!(
                "header length {hlen} is larger than the file ({file_len} bytes) allows; the file is truncated or not safetensors"
            )));
        }
        let data_start = 8 + hlen as usize;
        let header: Value = serde_json::from_slice(&head[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_len = file_len - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in obj {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        if let Some(s) = v.as_str() {
                            metadata.insert(k.clone(), s.to_string());
                        }
                    }
                }
                continue;
            }
            let info = parse_entry(v).map_err(|r| bad(format!("tensor `{name}`: {r}")))?;
            if !Dtype::KNOWN.contains(&info.0.as_str()) {
                return Err(bad(format!(
                    "tensor `{name}`: unknown dtype `{}` (safetensors defines {})",
                    info.0,
                    Dtype::KNOWN.join(", ")
                )));
            }
            let (dtype, size) = Dtype::parse(&info.0);
            let numel = info
                .1
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor `{name}`: shape {:?} overflows", info.1)))?;
            let (start, end) = info.2;
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor `{name}`: data offsets [{start}, {end}) fall outside the {data_len}-byte data section"
                )));
            }
            if numel.checked_mul(size) != Some(end - start) {
                return Err(bad(format!(
                    "tensor `{name}`: shape {:?} of {} needs {} bytes but its offsets span {}",
                    info.1,
                    info.0,
                    numel.saturating_mul(size),
                    end - start
                )));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    dtype,
                    dtype_name: info.0,
                    shape: info.1,
                    start,
                    end,
                },
            );
        }
        // No two tensors may share bytes.
        let mut spans: Vec<(usize, usize, &str)> = tensors
            .iter()
            .map(|(n, t)| (t.start, t.end, n.as_str()))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(format!(
                    "tensors `{}` and `{}` overlap",
                    w[0].2, w[1].2
                )));
            }
        }
        // Files that announce a checksum must carry one (a damaged key name is damage too).
        if !metadata.contains_key(META_CRC32) && metadata.contains_key(META_CHECKSUMMED) {
            return Err(bad(format!(
                "`{META_CHECKSUMMED}` is set but the `{META_CRC32}` checksum is missing: the file is damaged"
            )));
        }
        Ok(Header {
            data_start,
            tensors,
            metadata,
            head: vec![],
        })
    }

    /// Validates an in-memory file (`path` is only used in error messages), checksum included.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let h = Self::parse_header(path, &bytes, bytes.len())?;
        verify_parts(path, &bytes[..h.data_start], &bytes[h.data_start..], &h)?;
        Ok(SafeTensors {
            path: path.to_path_buf(),
            bytes,
            data_start: h.data_start,
            tensors: h.tensors,
            metadata: h.metadata,
        })
    }

    /// Reads only the header of `path` (two small reads, whatever the file's size).
    pub fn read_header(path: &Path) -> Result<Header> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        let mut head = vec![0u8; 8.min(file_len)];
        f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
        if head.len() == 8 {
            let hlen = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
            if hlen <= MAX_HEADER && hlen <= (file_len - 8) as u64 {
                head.resize(8 + hlen as usize, 0);
                f.read_exact(&mut head[8..])
                    .map_err(|e| Error::io(path, e))?;
            }
        }
        let mut h = Self::parse_header(path, &head, file_len)?;
        h.head = head;
        Ok(h)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names and header entries, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor `name` converted to f32 (f16, bf16 and f64 are converted; other types refused).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            hint: Some(format!("not in {}", self.path.display())),
        })?;
        let raw = &self.bytes[self.data_start + info.start..self.data_start + info.end];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => info.dtype.decode(raw),
            Dtype::Other => {
                return Err(Error::malformed(
                    &self.path,
                    "safetensors file",
                    format!(
                        "tensor `{name}` has dtype {}, which cannot hold weights",
                        info.dtype_name
                    ),
                ))
            }
        };
        Tensor::new(info.shape.clone(), data)
    }
}

type Entry = (String, Vec<usize>, (usize, usize));

fn parse_entry(v: &Value) -> std::result::Result<Entry, String> {
    let dtype = v
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing `dtype`")?
        .to_string();
    let shape = v
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing `shape`")?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or("shape entries must be non-negative integers")
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let offs = v
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("missing `data_offsets`")?;
    if offs.len() != 2 {
        return Err("`data_offsets` must hold two integers".into());
    }
    let off = |i: usize| {
        offs[i]
            .as_u64()
            .map(|o| o as usize)
            .ok_or("offsets must be non-negative integers")
    };
    Ok((dtype, shape, (off(0)?, off(1)?)))
}

/// How [`write()`] stores the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
    BF16,
}

/// Writes tensors and string metadata to `path` atomically: a temporary file in the same
/// directory, fsynced, then renamed over the target, so a crash leaves the old file intact.
pub fn write(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: &BTreeMap<String, String>,
    dtype: SaveDtype,
) -> Result<()> {
    let (name, size) = match dtype {
        SaveDtype::F32 => ("F32", 4),
        SaveDtype::F16 => ("F16", 2),
        SaveDtype::BF16 => ("BF16", 2),
    };
    // A CRC-32 of the whole file, computed with its own 8 hex digits set to zeros, so a damaged
    // header or data section is caught on load (`verify_crc32`).
    let mut metadata = metadata.clone();
    metadata.insert(META_CRC32.into(), CRC_PLACEHOLDER.into());
    metadata.insert(META_CHECKSUMMED.into(), "crc32".into());
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&metadata).map_err(|e| Error::serialize("safetensors metadata", e))?,
    );
    let mut offset = 0usize;
    for (n, shape, data) in tensors {
        let bytes = data.len() * size;
        header.insert(
            (*n).to_string(),
            serde_json::json!({"dtype": name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut hjson = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::serialize("the safetensors header", e))?;
    // Pad the header with spaces to a multiple of 8 so the data is aligned (as the spec suggests).
    while hjson.len() % 8 != 0 {
        hjson.push(b' ');
    }
    let mut buf = Vec::with_capacity(8 + hjson.len() + offset);
    buf.extend_from_slice(&(hjson.len() as u64).to_le_bytes());
    buf.extend_from_slice(&hjson);
    for (_, _, data) in tensors {
        match dtype {
            SaveDtype::F32 => data
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
            SaveDtype::F16 => data
                .iter()
                .for_each(|v| buf.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            SaveDtype::BF16 => data
                .iter()
                .for_each(|v| buf.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
    }
    let (hex_at, _) = crc_field(&buf[8..8 + hjson.len()], CRC_PLACEHOLDER)
        .map(|(a, b)| (a + 8, b + 8))
        .unwrap_or((0, 0));
    if hex_at > 0 {
        let crc = crc32fast::hash(&buf);
        buf[hex_at..hex_at + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    }
    write_atomic(path, &buf)
}

/// Metadata key of the whole-file checksum vitrs writes.
pub const META_CRC32: &str = "vitrs.crc32";
/// Metadata key announcing that the file carries [`META_CRC32`]: with two keys, damage to
/// either name is still detected.
const META_CHECKSUMMED: &str = "vitrs.checksum";
const CRC_PLACEHOLDER: &str = "00000000";

/// Where the checksum's 8 hex digits sit in a header: `"vitrs.crc32":"<hex>"` (serde_json's
/// compact form, as written). Returns (start, end) of the digits.
fn crc_field(header: &[u8], hex: &str) -> Option<(usize, usize)> {
    let needle = format!("\"{META_CRC32}\":\"{hex}\"");
    let pos = header
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let start = pos + needle.len() - 1 - hex.len();
    Some((start, start + hex.len()))
}

/// Verifies [`META_CRC32`] of a file read in two parts: `head` (its first `data_start` bytes)
/// and the data section `data`. Files without a checksum pass.
pub fn verify_parts(path: &Path, head: &[u8], data: &[u8], h: &Header) -> Result<()> {
    let mut data_crc = crc32fast::Hasher::new();
    data_crc.update(data);
    verify_hashed(path, head, data_crc, h)
}

/// [`verify_parts`] with the data section's CRC already computed (`data_crc`, e.g. combined
/// from chunks read in parallel).
pub fn verify_hashed(
    path: &Path,
    head: &[u8],
    data_crc: crc32fast::Hasher,
    h: &Header,
) -> Result<()> {
    let Some(stored) = h.metadata.get(META_CRC32) else {
        return Ok(());
    };
    let damaged = |why: String| {
        Error::malformed(
            path,
            "safetensors file",
            format!(
                "{why}: the file is damaged (a torn write, a disk error or a bad copy) and was \
                 not loaded; restore it from a copy (a run directory keeps the previous \
                 checkpoint as checkpoint.prev.safetensors)"
            ),
        )
    };
    let (a, b) = crc_field(&head[8..], stored)
        .map(|(a, b)| (a + 8, b + 8))
        .ok_or_else(|| damaged(format!("checksum field `{stored}` is not 8 hex digits")))?;
    let want = u32::from_str_radix(stored, 16)
        .map_err(|_| damaged(format!("checksum `{stored}` is not hexadecimal")))?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[..a]);
    hasher.update(CRC_PLACEHOLDER.as_bytes());
    hasher.update(&head[b..]);
    hasher.combine(&data_crc);
    let got = hasher.finalize();
    if got != want || b - a != 8 {
        return Err(damaged(format!(
            "checksum mismatch (stored crc32 {stored}, computed {got:08x})"
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` via a temporary file, fsync and rename: a crash or a full disk at
/// any moment leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_via(path, bytes, |f, b| f.write_all(b))
}

/// A fresh temporary name beside `path` for [`write_atomic`] to write before renaming it:
/// `.NAME.tmpPID-SEQ`, unique per call, so two threads of one process saving the same path at
/// once never write the same temporary file.
pub fn temp_path(path: &Path) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{fname}.tmp{}-{seq}", std::process::id()))
}

/// [`write_atomic`] with the write itself injectable (tests simulate a full disk with it).
fn write_atomic_via(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut std::fs::File, &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let dir = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    res.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        let kept = if path.exists() {
            "the previous file is intact"
        } else {
            "no file was written"
        };
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("could not write ({e}); nothing was replaced: {kept}"),
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vitrs-st-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_in_every_dtype() {
        let dir = tmpdir("rt");
        let a = [1.5f32, -2.25, 3.0, 0.125, 7.0, -0.5];
        let meta: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        for dt in [SaveDtype::F32, SaveDtype::F16, SaveDtype::BF16] {
            let p = dir.join("t.safetensors");
            write(&p, &[("a", &[2, 3], &a), ("b", &[1], &[9.0])], &meta, dt).unwrap();
            let st = SafeTensors::read(&p).unwrap();
            assert_eq!(st.metadata()["k"], "v");
            let t = st.tensor("a").unwrap();
            assert_eq!(t.shape(), &[2, 3]);
            assert_eq!(t.data(), &a); // all values exact in f16 and bf16
            assert!(st.tensor("zz").is_err());
        }
    }

    #[test]
    fn a_checksum_catches_any_damaged_byte() {
        let dir = tmpdir("crc");
        let p = dir.join("c.safetensors");
        let meta: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        write(
            &p,
            &[("a", &[4], &[1.0, 2.0, 3.0, 4.0])],
            &meta,
            SaveDtype::F32,
        )
        .unwrap();
        let good = std::fs::read(&p).unwrap();
        let st = SafeTensors::parse(&p, good.clone()).unwrap();
        assert_eq!(st.metadata()[META_CRC32].len(), 8);
        // Flip one bit anywhere, header or data: the file never loads. In the data section
        // (and in header values) only the checksum can tell, and it does.
        let data_start = good.len() - 16;
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            match SafeTensors::parse(&p, bad) {
                Ok(_) => panic!("byte {i} flipped and the file still loaded"),
                Err(e) if i >= data_start => {
                    assert!(e.to_string().contains("checksum mismatch"), "byte {i}: {e}")
                }
                Err(_) => {}
            }
        }
    }

    #[test]
    fn a_full_disk_leaves_the_old_file_and_no_temp() {
        let dir = tmpdir("full");
        let p = dir.join("ck.safetensors");
        write_atomic(&p, b"old contents").unwrap();
        let e = write_atomic_via(&p, b"new contents, much longer", |f, b| {
            f.write_all(&b[..5])?;
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nothing was replaced: the previous file is intact"),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"old contents");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["ck.safetensors"], "a temporary file was left behind");
    }

    #[test]
    fn rejects_lying_headers() {
        let p = Path::new("x.safetensors");
        let with_header = |h: &str, data: usize| {
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h.as_bytes());
            b.extend(std::iter::repeat_n(0u8, data));
            b
        };
        let cases = [
            (vec![], "only 0 bytes"),
            (vec![255u8; 8], "larger than the file"),
            (with_header("{nope", 0), "not valid JSON"),
            (
                with_header(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#,
                    8,
                ),
                "outside",
            ),
            (
                with_header(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
                "needs 12 bytes",
            ),
            (
                with_header(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    8,
                ),
                "overlap",
            ),
        ];
        for (bytes, want) in cases {
            let e = SafeTensors::parse(p, bytes).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("x.safetensors"), "{e}");
        }
    }
}
