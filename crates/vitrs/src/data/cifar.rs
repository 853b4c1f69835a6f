//! CIFAR-10/100 binary format (Krizhevsky 2009): fixed records of label byte(s) then a
//! 32×32 RGB image in channel-major order (3072 bytes).

use std::path::Path;

use super::{InMemory, Split};
use crate::error::{Error, Result};

const PIXELS: usize = 3 * 32 * 32;

/// CIFAR-10's class names.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Reads CIFAR-10 (`data_batch_{1..5}.bin` / `test_batch.bin`) or CIFAR-100 (`train.bin` /
/// `test.bin`, fine labels) from `dir`, if present.
pub fn open_dir(dir: &Path, split: Split) -> Result<Option<InMemory>> {
    let ten = dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file();
    let hundred = dir.join("train.bin").is_file() || dir.join("test.bin").is_file();
    let (files, label_bytes, nclasses): (Vec<String>, usize, usize) = if ten {
        match split {
            Split::Train => (
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
                1,
                10,
            ),
            Split::Test => (vec!["test_batch.bin".into()], 1, 10),
        }
    } else if hundred {
        match split {
            Split::Train => (vec!["train.bin".into()], 2, 100),
            Split::Test => (vec!["test.bin".into()], 2, 100),
        }
    } else {
        return Ok(None);
    };
    let rec = label_bytes + PIXELS;
    let (mut pixels, mut labels) = (vec![], vec![]);
    for f in files {
        let p = dir.join(&f);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        if bytes.is_empty() || bytes.len() % rec != 0 {
            return Err(Error::malformed_input(
                &p,
                "CIFAR batch",
                format!(
                    "{} bytes is not a whole number of {rec}-byte records (truncated?)",
                    bytes.len()
                ),
            ));
        }
        for r in bytes.chunks_exact(rec) {
            // CIFAR-100 records are (coarse, fine); we use the fine label.
            let l = r[label_bytes - 1] as usize;
            if l >= nclasses {
                return Err(Error::malformed_input(
                    &p,
                    "CIFAR batch",
                    format!("label {l} >= {nclasses}"),
                ));
            }
            labels.push(l as u32);
            pixels.extend_from_slice(&r[label_bytes..]);
        }
    }
    let classes = (0..nclasses)
        .map(|i| {
            if nclasses == 10 {
                CIFAR10_CLASSES[i].to_string()
            } else {
                i.to_string()
            }
        })
        .collect();
    Ok(Some(InMemory {
        c: 3,
        h: 32,
        w: 32,
        pixels,
        labels,
        classes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_rejects_truncation() {
        let d = std::env::temp_dir().join(format!("vitrs-cifar-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mut rec = vec![7u8];
        rec.extend((0..PIXELS).map(|i| (i % 251) as u8));
        std::fs::write(
            d.join("test_batch.bin"),
            [rec.clone(), rec.clone()].concat(),
        )
        .unwrap();
        let ds = open_dir(&d, Split::Test).unwrap().unwrap();
        assert_eq!(
            (ds.labels.len(), ds.labels[1], ds.classes[7].as_str()),
            (2, 7, "horse")
        );
        std::fs::write(d.join("test_batch.bin"), &rec[..100]).unwrap();
        assert!(open_dir(&d, Split::Test)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        std::fs::remove_dir_all(d).ok();
    }
}
