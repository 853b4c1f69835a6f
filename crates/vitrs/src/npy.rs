//! NumPy `.npy` arrays (format 1.0–3.0), little-endian f32, f64, f16 or bf16, in C or Fortran
//! order: how users hand vitrs an already-preprocessed tensor, how `.npz` checkpoints hold
//! their weights, and how the parity fixtures store references. Fortran-ordered arrays (NumPy
//! writes them for any transposed array it saves: `np.save(f, w.T)`) are read into C order.

use std::path::Path;

use crate::checkpoint::safetensors::Dtype;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const MAGIC: &[u8] = b"\x93NUMPY";
/// Arrays above this many elements are refused before allocating (4 GiB of f32).
const MAX_ELEMENTS: usize = 1 << 30;

/// Reads an `.npy` file as an f32 tensor.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(path, &bytes)
}

/// Parses `.npy` bytes (`path` only names the source in errors).
pub fn parse_npy(path: &Path, bytes: &[u8]) -> Result<Tensor> {
    let bad = |r: String| Error::malformed(path, ".npy array", r);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(
            "missing the \\x93NUMPY magic; not a NumPy .npy file".into()
        ));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported format version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart.saturating_add(hlen))
        .ok_or_else(|| bad("truncated header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        Some(
            header[i + key.len() + 2..]
                .trim_start()
                .trim_start_matches(':')
                .trim_start(),
        )
    };
    let descr = field("descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    // f32 and f64 (preprocessed inputs), f16 and bf16 (checkpoint weights in `.npz` files;
    // NumPy writes ml_dtypes' bfloat16 as a 2-byte void, `|V2`).
    let is = |names: &[&str]| names.iter().any(|n| descr.starts_with(n));
    let (size, dtype) = if is(&["'<f4'", "'float32'"]) {
        (4, Dtype::F32)
    } else if is(&["'<f8'", "'float64'"]) {
        (8, Dtype::F64)
    } else if is(&["'<f2'", "'float16'"]) {
        (2, Dtype::F16)
    } else if is(&[
        "'bfloat16'",
        "'<V2'",
        "'|V2'",
        "[('', '|V2')]",
        "[('', '<V2')]",
    ]) {
        (2, Dtype::BF16)
    } else {
        return Err(bad(format!(
            "dtype {} is not supported; save the array as little-endian float32 (`arr.astype(np.float32)`)",
            descr.split(',').next().unwrap_or(descr)
        )));
    };
    let fortran = field("fortran_order").is_some_and(|f| f.starts_with("True"));
    let shape_txt = field("shape").ok_or_else(|| bad("header has no 'shape'".into()))?;
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|t| t.split_once(')'))
        .map(|(inner, _)| inner)
        .ok_or_else(|| bad("shape is not a tuple `(...)`".into()))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("bad shape entry `{s}`")))
        })
        .collect::<Result<_>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let data = &bytes[hstart + hlen..];
    if data.len() != numel * size {
        return Err(bad(format!(
            "shape {shape:?} needs {} data bytes, the file has {}",
            numel * size,
            data.len()
        )));
    }
    let values = dtype.decode(data);
    let values = if fortran {
        fortran_to_c(&values, &shape)
    } else {
        values
    };
    Tensor::new(shape, values)
}

/// The elements of an array of `shape` stored in Fortran (column-major) order, in C
/// (row-major) order: element `(i0, …, in)` is at `i0 + d0·(i1 + d1·(…))` in the input.
fn fortran_to_c(values: &[f32], shape: &[usize]) -> Vec<f32> {
    if shape.len() < 2 {
        return values.to_vec();
    }
    // The input's stride of each axis: 1 for the first, growing to the last.
    let mut strides = vec![1usize; shape.len()];
    for a in 1..shape.len() {
        strides[a] = strides[a - 1] * shape[a - 1];
    }
    let mut out = Vec::with_capacity(values.len());
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..values.len() {
        let src: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(values[src]);
        // Next C-order index: the last axis fastest.
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

/// Writes an f32 tensor as `.npy` (format 1.0).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let dims: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic + version + length + header ends on a 64-byte boundary, newline-terminated.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    t.data()
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let p = std::env::temp_dir().join(format!("vitrs-npy-{}.npy", std::process::id()));
        let t = Tensor::new(vec![2, 1, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        write_npy(&p, &t).unwrap();
        assert_eq!(read_npy(&p).unwrap(), t);
        let bytes = std::fs::read(&p).unwrap();
        let e = parse_npy(&p, &bytes[..bytes.len() - 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 24 data bytes"), "{e}");
        assert!(parse_npy(&p, b"hello world")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let _ = std::fs::remove_file(p);
    }

    /// A Fortran-ordered array (what `np.save(f, a.T)` writes) reads as its C-ordered twin:
    /// `a` of shape (2, 3, 4) stored column-major.
    #[test]
    fn fortran_order_is_read_into_c_order() {
        let shape = [2usize, 3, 4];
        let want: Vec<f32> = (0..24).map(|v| v as f32).collect(); // C order: v = 12i + 4j + k
        let mut fortran = [0.0f32; 24];
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    fortran[i + 2 * (j + 3 * k)] = (12 * i + 4 * j + k) as f32;
                }
            }
        }
        let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3, 4), }";
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        fortran
            .iter()
            .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
        let t = parse_npy(Path::new("f.npy"), &b).unwrap();
        assert_eq!(t.shape(), &shape);
        assert_eq!(t.data(), &want[..]);
    }

    /// Headers found by `vitrs-fuzz` (npz target): a shape field that does not start with `(`
    /// once sliced it backwards; a multi-byte first character would have split a character.
    #[test]
    fn fuzzer_found_shapes_are_errors() {
        let p = Path::new("f.npy");
        for shape in [")4294967296,)", "é1,)", "(2,", "3"] {
            let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&[1, 0]);
            b.extend_from_slice(&(header.len() as u16).to_le_bytes());
            b.extend_from_slice(header.as_bytes());
            let e = parse_npy(p, &b).unwrap_err().to_string();
            assert!(e.contains("shape"), "{shape}: {e}");
        }
    }
}
