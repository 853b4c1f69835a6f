//! A small, bounded reader of ZIP archives: the container of NumPy `.npz` files and of
//! PyTorch's `torch.save` format. It reads the central directory (ZIP64 included) and returns
//! stored or deflated members in memory, checked against their CRC-32. Every offset and size
//! comes from the file, so each is checked against the file before anything is allocated.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Members larger than this (uncompressed) are refused: 16 GiB, far above any ViT.
const MAX_MEMBER: u64 = 16 << 30;
/// Archives with more members than this are refused (a lying count cannot make us loop long).
const MAX_ENTRIES: u64 = 1 << 20;

/// One member of the archive.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// 0 stored, 8 deflated.
    method: u16,
    crc: u32,
    compressed: u64,
    pub size: u64,
    local_offset: u64,
}

/// An archive read into memory.
pub struct ZipArchive {
    path: PathBuf,
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

impl ZipArchive {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Parses an archive held in memory (`path` names it in errors).
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let bad = |r: &str| Error::malformed(path, "ZIP archive", r.to_string());
        let n = bytes.len();
        // End of central directory: 22 bytes plus a comment of up to 65,535 bytes.
        let lo = n.saturating_sub(22 + 65_535);
        let eocd = (lo..n.saturating_sub(21))
            .rev()
            .find(|&i| u32_at(&bytes, i) == Some(0x0605_4b50))
            .ok_or_else(|| {
                bad("no end-of-central-directory record (not a ZIP file, or truncated)")
            })?;
        let mut count = u16_at(&bytes, eocd + 10).unwrap_or(0) as u64;
        let mut cd_size = u32_at(&bytes, eocd + 12).unwrap_or(0) as u64;
        let mut cd_off = u32_at(&bytes, eocd + 16).unwrap_or(0) as u64;
        if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
            // ZIP64: a locator just before the record points at the ZIP64 end record.
            let loc = eocd
                .checked_sub(20)
                .filter(|&l| u32_at(&bytes, l) == Some(0x0706_4b50))
                .ok_or_else(|| bad("ZIP64 sizes without a ZIP64 locator"))?;
            let rec =
                u64_at(&bytes, loc + 8).ok_or_else(|| bad("truncated ZIP64 locator"))? as usize;
            if u32_at(&bytes, rec) != Some(0x0606_4b50) {
                return Err(bad("the ZIP64 locator points outside the ZIP64 end record"));
            }
            count = u64_at(&bytes, rec + 32).ok_or_else(|| bad("truncated ZIP64 record"))?;
            cd_size = u64_at(&bytes, rec + 40).ok_or_else(|| bad("truncated ZIP64 record"))?;
            cd_off = u64_at(&bytes, rec + 48).ok_or_else(|| bad("truncated ZIP64 record"))?;
        }
        if count > MAX_ENTRIES {
            return Err(bad(&format!(
                "{count} members claimed; at most {MAX_ENTRIES} are read"
            )));
        }
        let cd_end = cd_off.checked_add(cd_size).filter(|&e| e <= n as u64);
        if cd_end.is_none() {
            return Err(bad("the central directory lies outside the file"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut p = cd_off as usize;
        for _ in 0..count {
            if u32_at(&bytes, p) != Some(0x0201_4b50) {
                return Err(bad("a central-directory entry has a bad signature"));
            }
            let field =
                |o: usize| u32_at(&bytes, p + o).ok_or_else(|| bad("truncated central directory"));
            let short =
                |o: usize| u16_at(&bytes, p + o).ok_or_else(|| bad("truncated central directory"));
            let method = short(10)?;
            let crc = field(16)?;
            let mut compressed = field(20)? as u64;
            let mut size = field(24)? as u64;
            let (name_len, extra_len, comment_len) = (
                short(28)? as usize,
                short(30)? as usize,
                short(32)? as usize,
            );
            let mut local_offset = field(42)? as u64;
            let name_bytes = bytes
                .get(p + 46..p + 46 + name_len)
                .ok_or_else(|| bad("truncated member name"))?;
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            let extra = bytes
                .get(p + 46 + name_len..p + 46 + name_len + extra_len)
                .ok_or_else(|| bad("truncated extra field"))?;
            // The ZIP64 extra field holds, in order, only the sizes that overflowed.
            let mut e = 0;
            while e + 4 <= extra.len() {
                let (id, len) = (
                    u16_at(extra, e).unwrap_or(0),
                    u16_at(extra, e + 2).unwrap_or(0) as usize,
                );
                if id == 1 {
                    let mut q = e + 4;
                    for v in [&mut size, &mut compressed, &mut local_offset] {
                        if *v == 0xFFFF_FFFF {
                            *v = u64_at(extra, q)
                                .ok_or_else(|| bad("truncated ZIP64 extra field"))?;
                            q += 8;
                        }
                    }
                }
                e += 4 + len;
            }
            if size > MAX_MEMBER {
                return Err(bad(&format!("member `{name}` claims {size} bytes")));
            }
            entries.push(Entry {
                name,
                method,
                crc,
                compressed,
                size,
                local_offset,
            });
            p += 46 + name_len + extra_len + comment_len;
        }
        Ok(ZipArchive {
            path: path.to_path_buf(),
            bytes,
            entries,
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The uncompressed bytes of `entry`, CRC-checked.
    pub fn read(&self, entry: &Entry) -> Result<Vec<u8>> {
        let bad = |r: String| Error::malformed(&self.path, "ZIP archive", r);
        let b = &self.bytes;
        let lh = entry.local_offset as usize;
        if u32_at(b, lh) != Some(0x0403_4b50) {
            return Err(bad(format!("member `{}`: bad local header", entry.name)));
        }
        let (nl, el) = (
            u16_at(b, lh + 26).unwrap_or(0) as usize,
            u16_at(b, lh + 28).unwrap_or(0) as usize,
        );
        let start = lh + 30 + nl + el;
        let data = start
            .checked_add(entry.compressed as usize)
            .and_then(|end| b.get(start..end))
            .ok_or_else(|| {
                bad(format!(
                    "member `{}` runs past the end of the file",
                    entry.name
                ))
            })?;
        let out = match entry.method {
            0 => data.to_vec(),
            8 => {
                let mut out = Vec::with_capacity(entry.size.min(64 << 20) as usize);
                flate2::read::DeflateDecoder::new(data)
                    .take(entry.size + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| bad(format!("member `{}`: {e}", entry.name)))?;
                out
            }
            m => {
                return Err(bad(format!(
                "member `{}` uses compression method {m}; only stored (0) and deflate (8) are read",
                entry.name
            )))
            }
        };
        if out.len() as u64 != entry.size {
            return Err(bad(format!(
                "member `{}` holds {} bytes, its header says {}",
                entry.name,
                out.len(),
                entry.size
            )));
        }
        if crc32(&out) != entry.crc {
            return Err(bad(format!(
                "member `{}` fails its CRC-32 check (damaged file)",
                entry.name
            )));
        }
        Ok(out)
    }
}

/// CRC-32 (IEEE), as ZIP uses it.
fn crc32(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    h.finalize()
}

/// A minimal ZIP writer: the members stored (uncompressed) with their CRCs. For tests and
/// tools that build archives (the fuzzer re-zips mutated `.npz` and `torch.save` members).
pub fn stored_zip(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = vec![];
    let mut cd = vec![];
    for (name, data) in members {
        let off = out.len() as u32;
        let crc = crc32(data);
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        cd.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        cd.extend_from_slice(&crc.to_le_bytes());
        cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
        cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
        cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
        cd.extend_from_slice(&[0; 12]);
        cd.extend_from_slice(&off.to_le_bytes());
        cd.extend_from_slice(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn reads_stored_members_and_rejects_damage() {
        let p = Path::new("t.zip");
        let z = stored_zip(&[("a.npy", b"hello"), ("dir/b", b"world!")]);
        let a = ZipArchive::parse(p, z.clone()).unwrap();
        assert_eq!(a.entries().len(), 2);
        assert_eq!(a.read(a.find("dir/b").unwrap()).unwrap(), b"world!");
        // A flipped data byte fails the CRC; truncation loses the directory.
        let mut bad = z.clone();
        bad[30 + 5] ^= 1;
        let a = ZipArchive::parse(p, bad).unwrap();
        let e = a.read(a.find("a.npy").unwrap()).unwrap_err().to_string();
        assert!(e.contains("CRC"), "{e}");
        assert!(ZipArchive::parse(p, z[..z.len() - 30].to_vec()).is_err());
        assert!(ZipArchive::parse(p, vec![]).is_err());
        // Every truncation is an error or a readable archive, never a panic.
        for cut in 0..z.len() {
            if let Ok(a) = ZipArchive::parse(p, z[..cut].to_vec()) {
                for e in a.entries().to_vec() {
                    let _ = a.read(&e);
                }
            }
        }
    }
}
