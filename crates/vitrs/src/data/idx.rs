//! The IDX format of MNIST and Fashion-MNIST (LeCun et al.): a big-endian header (magic
//! `0x0000 08 DD` for unsigned bytes with DD dimensions, then each dimension as u32) and the
//! raw data, gzipped or not.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{InMemory, Split};
use crate::error::{Error, Result};

/// Fashion-MNIST's class names (Xiao et al. 2017), in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// At most this many items (the IDX count field is checked against it before allocating).
const MAX_ITEMS: usize = 10_000_000;

/// Reads a whole file, un-gzipping when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        gunzip(path, &raw)
    } else {
        Ok(raw)
    }
}

/// Parses one IDX array of unsigned bytes; returns its dimensions and data.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |r: String| Error::malformed_input(path, "IDX file", r);
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            "wrong magic number (an IDX file starts with two zero bytes)".into(),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x} is not unsigned bytes (0x08)",
            bytes[2]
        )));
    }
    let nd = bytes[3] as usize;
    if nd == 0 || nd > 4 || bytes.len() < 4 + 4 * nd {
        return Err(bad(format!("{nd} dimensions, or a header cut short")));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            u32::from_be_bytes([
                bytes[4 + 4 * i],
                bytes[5 + 4 * i],
                bytes[6 + 4 * i],
                bytes[7 + 4 * i],
            ]) as usize
        })
        .collect();
    if dims[0] > MAX_ITEMS || dims[1..].iter().any(|&d| d > 4096) {
        return Err(bad(format!("implausible dimensions {dims:?}")));
    }
    let numel: usize = dims.iter().product();
    let data = &bytes[4 + 4 * nd..];
    if data.len() != numel {
        return Err(bad(format!(
            "header says {dims:?} = {numel} bytes of data, the file holds {}",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

/// The file in `dir` named `stem` with any of the usual suffixes.
fn find(dir: &Path, stems: &[&str]) -> Option<PathBuf> {
    for stem in stems {
        for suffix in ["", ".gz"] {
            let p = dir.join(format!("{stem}{suffix}"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Loads the images/labels pair of `split` from `dir`, if the IDX files are there.
pub fn open_dir(dir: &Path, split: Split) -> Result<Option<InMemory>> {
    let (img, lab) = match split {
        Split::Train => (
            ["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
            ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
        ),
        Split::Test => (
            ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
            ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
        ),
    };
    let (Some(ip), Some(lp)) = (find(dir, &img), find(dir, &lab)) else {
        return Ok(None);
    };
    let fashion = dir.to_string_lossy().contains("fashion");
    pair(
        &ip,
        &read_maybe_gz(&ip)?,
        &lp,
        &read_maybe_gz(&lp)?,
        fashion,
    )
    .map(Some)
}

/// An images file and a labels file (already un-gzipped) as a dataset; `fashion` names the
/// classes as Fashion-MNIST's.
pub fn pair(ip: &Path, images: &[u8], lp: &Path, labels: &[u8], fashion: bool) -> Result<InMemory> {
    let (idims, pixels) = parse_idx(ip, images)?;
    let (ldims, labels) = parse_idx(lp, labels)?;
    if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
        return Err(Error::malformed_input(
            ip,
            "IDX dataset",
            format!(
                "images {idims:?} and labels {ldims:?} ({}) do not pair up",
                lp.display()
            ),
        ));
    }
    // Classes 0..=max label (MNIST and Fashion-MNIST: 10).
    let max = labels.iter().copied().max().unwrap_or(0) as usize;
    let classes = (0..=max)
        .map(|i| match (fashion, FASHION_MNIST_CLASSES.get(i)) {
            (true, Some(n)) => n.to_string(),
            _ => i.to_string(),
        })
        .collect();
    Ok(InMemory {
        c: 1,
        h: idims[1],
        w: idims[2],
        pixels,
        labels: labels.into_iter().map(u32::from).collect(),
        classes,
    })
}

/// Un-gzips in memory.
pub fn gunzip(what: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| Error::malformed_input(what, "gzip data", e.to_string()))?;
    Ok(out)
}

/// Writes one IDX file of unsigned bytes.
pub fn write_idx(path: &Path, dims: &[u32], data: &[u8]) -> Result<()> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    dims.iter()
        .for_each(|d| b.extend_from_slice(&d.to_be_bytes()));
    b.extend_from_slice(data);
    std::fs::write(path, b).map_err(|e| Error::io(path, e))
}

/// Writes a small synthetic IDX dataset (train and t10k splits) into `dir`, for tests and
/// smoke runs: `size × size` images in `classes` classes, each class a bright bar at its own
/// row over Gaussian noise.
pub fn write_synthetic(
    dir: &Path,
    n_train: u32,
    n_test: u32,
    classes: usize,
    size: usize,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = crate::model::Rng::new(seed);
    for (stem, n) in [("train", n_train), ("t10k", n_test)] {
        let (mut px, mut labels) = (vec![], vec![]);
        for i in 0..n as usize {
            let c = i % classes;
            let row = (2 * c + 1) * size / (2 * classes);
            for y in 0..size {
                for _ in 0..size {
                    let base = if y == row { 180.0 } else { 30.0 };
                    px.push((base + rng.normal() * 25.0).clamp(0.0, 255.0) as u8);
                }
            }
            labels.push(c as u8);
        }
        write_idx(
            &dir.join(format!("{stem}-images-idx3-ubyte")),
            &[n, size as u32, size as u32],
            &px,
        )?;
        write_idx(
            &dir.join(format!("{stem}-labels-idx1-ubyte")),
            &[n],
            &labels,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        dims.iter()
            .for_each(|d| b.extend_from_slice(&d.to_be_bytes()));
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_and_validates() {
        let p = Path::new("x.idx");
        let (d, v) = parse_idx(p, &idx(&[2, 2], &[1, 2, 3, 4])).unwrap();
        assert_eq!((d, v), (vec![2, 2], vec![1, 2, 3, 4]));
        let e = parse_idx(p, &idx(&[3, 2], &[1, 2, 3, 4]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("6 bytes") && e.contains("holds 4"), "{e}");
        assert!(parse_idx(p, &[1, 2, 8, 1])
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(parse_idx(p, &idx(&[4_000_000_000], &[])).is_err());
    }
}
