//! Sharded datasets in the WebDataset layout: tar files of samples, each sample a `KEY.png`
//! (or `.jpg`, `.jpeg`, `.gif`, `.bmp`) and a `KEY.cls` holding its class index as text — the
//! layout timm and big_vision users keep ImageNet-scale data in.
//!
//! A [`ShardSet`] holds no pixels: opening it reads the tar headers (and the tiny `.cls`
//! members) into an index of 24 bytes per sample, and each image is read from its shard with
//! one positioned read and decoded when the loader's workers ask for it. The loader draws a
//! sharded dataset shard by shard (the shards in a seeded order, then a seeded shuffle buffer:
//! see [`super::loader`]), so reads stay sequential within a shard and memory is the index plus
//! the prefetched batches, whatever the dataset's size.
//!
//! `vit data pack` writes such shards ([`pack`]): `DIR/train/shard-000000.tar`, ...,
//! `DIR/test/...`, and `DIR/info.json` with the classes, the image shape when fixed, and the
//! sample counts.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Dataset, Split};
use crate::error::{Error, Result};
use crate::preprocess::decode_image_bytes;

/// The tar block size.
const BLOCK: u64 = 512;

/// Extensions of the image member of a sample, in the order preferred when a sample has two.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "gif", "bmp"];

/// `DIR/info.json`, written by [`pack`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Info {
    /// Always `"webdataset"`.
    pub format: String,
    /// Class names by index.
    pub classes: Vec<String>,
    /// `(C, H, W)` when every image has it (datasets such as IDX or CIFAR); none for folders of
    /// photos, which are resized to the model's size when read.
    pub shape: Option<[usize; 3]>,
    /// Samples per split (`train`, `test`), and per shard.
    pub splits: std::collections::BTreeMap<String, SplitInfo>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub samples: usize,
    pub shards: Vec<ShardInfo>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub name: String,
    pub samples: usize,
}

/// One sample: where its image bytes are.
#[derive(Clone, Copy, Debug)]
struct Item {
    shard: u32,
    label: u32,
    offset: u64,
    len: u32,
}

/// A dataset read from tar shards; see the module docs.
pub struct ShardSet {
    shards: Vec<PathBuf>,
    items: Vec<Item>,
    /// Items of each shard (contiguous, in shard order).
    ranges: Vec<Range<usize>>,
    classes: Vec<String>,
    size: (usize, usize, usize),
    /// Samples left out when the shards were indexed (no image or no class member, an image
    /// format that cannot be decoded, a class index out of range, a truncated shard).
    pub skipped: usize,
    /// Why, for the first few.
    pub skip_reasons: Vec<String>,
}

/// Whether `dir` holds sharded data: an `info.json` of format `webdataset`, or `.tar` files
/// (directly or in `train/`).
pub fn is_shard_dir(dir: &Path) -> bool {
    if let Ok(text) = std::fs::read_to_string(dir.join("info.json")) {
        if serde_json::from_str::<Info>(&text).is_ok_and(|i| i.format == "webdataset") {
            return true;
        }
    }
    !tar_files(dir).is_empty() || !tar_files(&dir.join("train")).is_empty()
}

/// The `.tar` files of `dir`, sorted.
fn tar_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tar"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether `spec` names shards by a pattern (`data/train-*.tar`, or several separated by
/// commas) rather than a directory.
pub fn is_shard_pattern(spec: &str) -> bool {
    spec.split(',')
        .all(|p| p.trim().ends_with(".tar") && !Path::new(p.trim()).is_dir())
}

/// The shard files a pattern names: each comma-separated part a path, with `*` and `?`
/// matching within its file name.
pub fn expand_pattern(spec: &str) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let path = Path::new(part);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains(['*', '?']) {
            if !path.is_file() {
                return Err(Error::BadInput(format!("shard {part}: no such file")));
            }
            out.push(path.to_path_buf());
            continue;
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut found: Vec<PathBuf> = tar_files(&dir)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| wildcard(&name, &n.to_string_lossy()))
            })
            .collect();
        if found.is_empty() {
            return Err(Error::BadInput(format!("{part}: no shard matches")));
        }
        found.sort();
        out.append(&mut found);
    }
    if out.is_empty() {
        return Err(Error::BadInput(format!("`{spec}` names no shards")));
    }
    Ok(out)
}

/// `*` (any run) and `?` (one character) matching.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

impl ShardSet {
    /// Opens the `split` of a shard directory written by [`pack`] (`DIR/train/*.tar`,
    /// `DIR/test/*.tar`, `DIR/info.json`), or a directory of `.tar` files (the training split;
    /// it has no test split), or a pattern ([`expand_pattern`]). Images without a fixed shape
    /// in `info.json` are resized to `size` `(C, H, W)` when read. With `strict`, a sample
    /// that cannot be indexed is an error naming it instead of a skipped, counted one.
    pub fn open(
        spec: &str,
        split: Split,
        size: (usize, usize, usize),
        strict: bool,
    ) -> Result<Self> {
        let path = Path::new(spec);
        let (shards, info) = if path.is_dir() {
            let info = read_info(path)?;
            let sub = match split {
                Split::Train => "train",
                Split::Test => "test",
            };
            let in_split = tar_files(&path.join(sub));
            let shards = if !in_split.is_empty() {
                in_split
            } else if split == Split::Test && !tar_files(&path.join("val")).is_empty() {
                tar_files(&path.join("val"))
            } else if split == Split::Train && !tar_files(path).is_empty() {
                tar_files(path)
            } else {
                return Err(Error::BadInput(format!(
                    "{}: no {sub}/*.tar shards (vit data pack writes train/ and test/)",
                    path.display()
                )));
            };
            (shards, info)
        } else {
            if split == Split::Test {
                return Err(Error::BadInput(format!(
                    "`{spec}` names training shards only; hold out a validation split \
                     (`val_fraction` in [data]) or give a directory with test/ shards"
                )));
            }
            let shards = expand_pattern(spec)?;
            let info = shards[0].parent().map(read_info).transpose()?.flatten();
            (shards, info)
        };
        let mut set = ShardSet {
            shards: vec![],
            items: vec![],
            ranges: vec![],
            classes: vec![],
            size,
            skipped: 0,
            skip_reasons: vec![],
        };
        for (k, shard) in shards.iter().enumerate() {
            let start = set.items.len();
            index_shard(shard, k as u32, &mut set, strict)?;
            set.ranges.push(start..set.items.len());
        }
        set.shards = shards;
        let top = set
            .items
            .iter()
            .map(|i| i.label as usize + 1)
            .max()
            .unwrap_or(0);
        set.classes = match info {
            Some(info) => {
                if let Some([c, h, w]) = info.shape {
                    set.size = (c, h, w);
                }
                info.classes
            }
            None => (0..top).map(|k| format!("class_{k}")).collect(),
        };
        if top > set.classes.len() {
            return Err(Error::BadInput(format!(
                "{spec}: a sample has class {} but info.json lists {} classes",
                top - 1,
                set.classes.len()
            )));
        }
        if set.items.is_empty() {
            return Err(Error::BadInput(format!(
                "{spec}: the shards hold no complete sample (KEY.png|jpg + KEY.cls){}",
                set.skip_reasons
                    .first()
                    .map(|r| format!("; e.g. {r}"))
                    .unwrap_or_default()
            )));
        }
        Ok(set)
    }

    /// The shard files, in order.
    pub fn shard_paths(&self) -> &[PathBuf] {
        &self.shards
    }

    /// The encoded image bytes of item `i` and the shard they are in.
    fn bytes(&self, i: usize) -> Result<(Vec<u8>, &Path)> {
        let it = self.items[i];
        let path = &self.shards[it.shard as usize];
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        f.seek(SeekFrom::Start(it.offset))
            .map_err(|e| Error::io(path, e))?;
        let mut buf = vec![0u8; it.len as usize];
        f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        Ok((buf, path))
    }
}

fn read_info(dir: &Path) -> Result<Option<Info>> {
    let p = dir.join("info.json");
    match std::fs::read_to_string(&p) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::BadInput(format!("{}: {e}", p.display()))),
        Err(_) => Ok(None),
    }
}

/// One tar member's header: its name, the offset of its contents, and their size.
struct Member {
    name: String,
    data: u64,
    size: u64,
}

/// A header's numeric field: octal text, or GNU base-256 (high bit of the first byte set).
fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let t = text.trim();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Reads the members of a tar file (regular files only; GNU long names and pax headers
/// understood). Stops at the end marker, or with an error at a damaged header.
fn members(
    path: &Path,
    len: u64,
    mut visit: impl FnMut(Member, &mut File) -> Result<()>,
) -> Result<()> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut header = [0u8; BLOCK as usize];
    loop {
        if pos + BLOCK > len {
            return Err(Error::BadInput(format!(
                "{}: truncated at byte {pos} (no tar end marker)",
                path.display()
            )));
        }
        f.seek(SeekFrom::Start(pos))
            .map_err(|e| Error::io(path, e))?;
        f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        if header.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let stored = tar_number(&header[148..156]);
        let sum: u64 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        if stored != Some(sum) {
            return Err(Error::BadInput(format!(
                "{}: damaged tar header at byte {pos} (checksum)",
                path.display()
            )));
        }
        let size = tar_number(&header[124..136]).ok_or_else(|| {
            Error::BadInput(format!("{}: bad member size at byte {pos}", path.display()))
        })?;
        let data = pos + BLOCK;
        let next = data + size.div_ceil(BLOCK) * BLOCK;
        if data + size > len {
            return Err(Error::BadInput(format!(
                "{}: truncated: the member at byte {pos} needs {size} bytes, the file ends at {len}",
                path.display()
            )));
        }
        let kind = header[156];
        match kind {
            b'L' => {
                let mut name = vec![0u8; size as usize];
                f.read_exact(&mut name).map_err(|e| Error::io(path, e))?;
                long_name = Some(cstr(&name));
            }
            b'0' | 0 => {
                let name = long_name.take().unwrap_or_else(|| {
                    let (name, prefix) = (cstr(&header[0..100]), cstr(&header[345..500]));
                    if &header[257..262] == b"ustar" && !prefix.is_empty() {
                        format!("{prefix}/{name}")
                    } else {
                        name
                    }
                });
                visit(Member { name, data, size }, &mut f)?;
            }
            // Directories, pax headers, links: nothing to index.
            _ => long_name = None,
        }
        pos = next;
    }
}

/// The sample key and member extension of a member name (WebDataset: the key is the path
/// up to the first dot of the file name).
fn key_and_ext(name: &str) -> (&str, &str) {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    match name[base..].find('.') {
        Some(dot) => (&name[..base + dot], &name[base + dot + 1..]),
        None => (name, ""),
    }
}

/// A sample's members as gathered: its key, its image (offset, size, rank of the extension
/// among [`IMAGE_EXTENSIONS`]), its class (or why it is not one).
type Gathered = (
    String,
    Option<(u64, u64, usize)>,
    Option<std::result::Result<u32, String>>,
);

/// Adds the complete samples of `path` to `set`.
fn index_shard(path: &Path, shard: u32, set: &mut ShardSet, strict: bool) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    // Members of one sample are adjacent; gather them by key.
    let mut key = String::new();
    let mut image: Option<(u64, u64, usize)> = None; // offset, size, rank of its extension
    let mut label: Option<std::result::Result<u32, String>> = None;
    let mut done: Vec<Gathered> = vec![];
    let walked = members(path, len, |m, f| {
        let (k, ext) = key_and_ext(&m.name);
        if k != key {
            if !key.is_empty() {
                done.push((std::mem::take(&mut key), image.take(), label.take()));
            }
            key = k.to_string();
        }
        let ext = ext.to_ascii_lowercase();
        if let Some(rank) = IMAGE_EXTENSIONS.iter().position(|e| *e == ext) {
            if image.is_none_or(|(_, _, r)| rank < r) {
                image = Some((m.data, m.size, rank));
            }
        } else if ext == "cls" {
            let mut text = vec![0u8; m.size.min(64) as usize];
            f.seek(SeekFrom::Start(m.data))
                .and_then(|_| f.read_exact(&mut text))
                .map_err(|e| Error::io(path, e))?;
            let t = String::from_utf8_lossy(&text).trim().to_string();
            label = Some(
                t.parse::<u32>()
                    .map_err(|_| format!("class `{t}` is not a number")),
            );
        }
        Ok(())
    });
    if !key.is_empty() {
        done.push((key, image, label));
    }
    let skip = |set: &mut ShardSet, why: String| -> Result<()> {
        if strict {
            return Err(Error::BadInput(format!("{why} (strict mode)")));
        }
        set.skipped += 1;
        if set.skip_reasons.len() < 5 {
            set.skip_reasons.push(why);
        }
        Ok(())
    };
    for (k, img, cls) in done {
        let at = format!("{}: sample `{k}`", path.display());
        match (img, cls) {
            (Some((offset, size, _)), Some(Ok(l))) if size <= u32::MAX as u64 => {
                set.items.push(Item {
                    shard,
                    label: l,
                    offset,
                    len: size as u32,
                })
            }
            (None, _) => skip(
                set,
                format!("{at} has no image ({})", IMAGE_EXTENSIONS.join(", ")),
            )?,
            (_, None) => skip(set, format!("{at} has no .cls member"))?,
            (_, Some(Err(e))) => skip(set, format!("{at}: {e}"))?,
            (Some(_), _) => skip(set, format!("{at}: the image is over 4 GiB"))?,
        }
    }
    // A damaged or truncated shard keeps the samples before the damage.
    if let Err(e) = walked {
        skip(set, e.to_string())?;
    }
    Ok(())
}

impl Dataset for ShardSet {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.size
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, i: usize) -> usize {
        self.items[i].label as usize
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
    fn image(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let (bytes, path) = self.bytes(i)?;
        let what = PathBuf::from(format!("{} (sample {i})", path.display()));
        super::pixels_into(&decode_image_bytes(&what, &bytes)?, self.size, &what, out)
    }
    fn shards(&self) -> Option<Vec<Range<usize>>> {
        Some(self.ranges.clone())
    }
}

// ---- writing ----------------------------------------------------------------------------

/// Writes tar members; [`TarWriter::finish`] adds the end marker.
pub struct TarWriter<W: Write> {
    out: W,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out }
    }

    /// One regular file (`name` up to 100 bytes).
    pub fn append(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let mut h = [0u8; BLOCK as usize];
        if name.len() > 100 {
            return Err(std::io::Error::other(format!(
                "tar member name over 100 bytes: {name}"
            )));
        }
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(data)?;
        let pad = (BLOCK as usize - data.len() % BLOCK as usize) % BLOCK as usize;
        self.out.write_all(&vec![0u8; pad])
    }

    /// The two zero blocks that end an archive.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The encoded bytes of item `i` of `ds` for a shard, and their extension: the image file
/// itself when the dataset reads files (an image folder), otherwise its pixels as a PNG.
fn encoded(ds: &dyn Dataset, i: usize, px: &mut Vec<u8>) -> Result<(Vec<u8>, String)> {
    if let Some(file) = ds.source_file(i) {
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            return Ok((std::fs::read(&file).map_err(|e| Error::io(&file, e))?, ext));
        }
    }
    let (c, h, w) = ds.shape();
    px.resize(c * h * w, 0);
    ds.image(i, px)?;
    Ok((png_of_planes(px, (c, h, w))?, "png".into()))
}

/// A `(C, H, W)` u8 image (C = 1 or 3) as PNG bytes.
pub fn png_of_planes(px: &[u8], (c, h, w): (usize, usize, usize)) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let (wi, hi) = (w as u32, h as u32);
    let res = match c {
        1 => image::GrayImage::from_raw(wi, hi, px.to_vec())
            .map(|img| img.write_to(&mut buf, image::ImageFormat::Png)),
        3 => {
            let mut inter = vec![0u8; h * w * 3];
            for (p, o) in inter.chunks_exact_mut(3).enumerate() {
                for ch in 0..3 {
                    o[ch] = px[ch * h * w + p];
                }
            }
            image::RgbImage::from_raw(wi, hi, inter)
                .map(|img| img.write_to(&mut buf, image::ImageFormat::Png))
        }
        _ => {
            return Err(Error::BadInput(format!(
                "cannot store {c}-channel images as PNG (1 or 3 channels)"
            )))
        }
    };
    match res {
        Some(Ok(())) => Ok(buf.into_inner()),
        Some(Err(e)) => Err(Error::BadInput(format!("PNG encoding: {e}"))),
        None => Err(Error::BadInput(
            "PNG encoding: the buffer does not match the shape".into(),
        )),
    }
}

/// Writes `ds` as shards of `shard_size` samples into `dir` (`shard-000000.tar`, ...), keys
/// `{split}-{index:08}` (the index in `ds`), in the order `order` gives (all of `ds` when
/// `None`); `progress(done, total)` after every sample. Returns the shards written.
pub fn write_shards(
    ds: &dyn Dataset,
    order: Option<&[usize]>,
    dir: &Path,
    split: &str,
    shard_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SplitInfo> {
    let all: Vec<usize>;
    let order = match order {
        Some(o) => o,
        None => {
            all = (0..ds.len()).collect();
            &all
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let shard_size = shard_size.max(1);
    let mut info = SplitInfo::default();
    let mut px = vec![];
    for (k, start) in (0..order.len()).step_by(shard_size).enumerate() {
        let name = format!("shard-{k:06}.tar");
        let path = dir.join(&name);
        // Written beside its final name and renamed: a killed pack never leaves a half shard
        // that looks whole.
        let part = dir.join(format!("{name}.partial"));
        let file = File::create(&part).map_err(|e| Error::io(&part, e))?;
        let mut tar = TarWriter::new(std::io::BufWriter::new(file));
        let end = (start + shard_size).min(order.len());
        for (done, &i) in order.iter().enumerate().take(end).skip(start) {
            let (bytes, ext) = encoded(ds, i, &mut px)?;
            let key = format!("{split}-{i:08}");
            tar.append(&format!("{key}.{ext}"), &bytes)
                .and_then(|_| tar.append(&format!("{key}.cls"), ds.label(i).to_string().as_bytes()))
                .map_err(|e| Error::io(&part, e))?;
            progress(done + 1, order.len());
        }
        tar.finish().map_err(|e| Error::io(&part, e))?;
        std::fs::rename(&part, &path).map_err(|e| Error::io(&path, e))?;
        info.shards.push(ShardInfo {
            name,
            samples: end - start,
        });
        info.samples += end - start;
    }
    Ok(info)
}

/// Packs a dataset (a name, an IDX or CIFAR directory, or an image folder) into `out`: its
/// train split into `out/train/`, its test split (when it has one) into `out/test/`, and
/// `out/info.json`. Fixed-size datasets are stored as PNG at their size; image folders keep
/// their files' bytes (JPEGs stay JPEGs) and are resized when read. The training samples are
/// written in an order shuffled with `seed` (an image folder lists its classes one after the
/// other, and a streaming reader only mixes within its buffer); the test samples in order.
pub fn pack(
    spec: &str,
    out: &Path,
    shard_size: usize,
    seed: u64,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Info> {
    // The size only matters to images that are decoded to be written (IDX, CIFAR keep their
    // own); folders are copied as files.
    let size = super::known_shape(spec).map_or((3, 224, 224), |(s, _)| s);
    let train = super::open(spec, Split::Train, size)?;
    let fixed = train.source_file(0).is_none();
    let test = if super::is_flat_image_folder(spec) {
        None
    } else {
        super::open(spec, Split::Test, size).ok()
    };
    let mut info = Info {
        format: "webdataset".into(),
        classes: train.classes().to_vec(),
        shape: fixed.then(|| {
            let (c, h, w) = train.shape();
            [c, h, w]
        }),
        splits: Default::default(),
    };
    for (name, ds) in [("train", Some(train)), ("test", test)] {
        let Some(ds) = ds else { continue };
        let mut order: Vec<usize> = (0..ds.len()).collect();
        if name == "train" {
            crate::model::Rng::new(super::loader::derive_seed(&[seed, 5])).shuffle(&mut order);
        }
        let split = write_shards(
            &*ds,
            Some(&order),
            &out.join(name),
            name,
            shard_size,
            &mut |d, t| progress(name, d, t),
        )?;
        info.splits.insert(name.into(), split);
    }
    let path = out.join("info.json");
    let text = serde_json::to_string_pretty(&info).map_err(|e| Error::BadInput(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemory;
    use std::sync::Arc;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vitrs-shards-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn data(n: usize) -> InMemory {
        InMemory {
            c: 1,
            h: 4,
            w: 3,
            pixels: (0..n * 12).map(|i| (i * 7 % 251) as u8).collect(),
            labels: (0..n as u32).map(|i| i % 3).collect(),
            classes: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn written_shards_read_back_the_same_samples_in_shards() {
        let d = tmp("roundtrip");
        let ds = data(11);
        let info = write_shards(&ds, None, &d.join("train"), "train", 4, &mut |_, _| {}).unwrap();
        assert_eq!(info.samples, 11);
        assert_eq!(
            info.shards.iter().map(|s| s.samples).collect::<Vec<_>>(),
            [4, 4, 3]
        );
        let set = ShardSet::open(d.to_str().unwrap(), Split::Train, (1, 4, 3), true).unwrap();
        assert_eq!(set.len(), 11);
        assert_eq!(set.shards().unwrap(), vec![0..4, 4..8, 8..11]);
        let (mut a, mut b) = (vec![0u8; 12], vec![0u8; 12]);
        for i in 0..11 {
            ds.image(i, &mut a).unwrap();
            set.image(i, &mut b).unwrap();
            assert_eq!(a, b, "item {i}");
            assert_eq!(ds.label(i), set.label(i));
        }
        // The system tar agrees that they are tar files, when it is there.
        if let Ok(o) = std::process::Command::new("tar")
            .arg("-tf")
            .arg(d.join("train/shard-000000.tar"))
            .output()
        {
            let list = String::from_utf8_lossy(&o.stdout).into_owned();
            assert_eq!(list.lines().count(), 8, "{list}");
            assert!(
                list.starts_with("train-00000000.png\ntrain-00000000.cls\n"),
                "{list}"
            );
        }
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn damaged_shards_skip_what_they_must_and_strict_stops() {
        let d = tmp("damaged");
        let ds = data(6);
        write_shards(&ds, None, &d, "train", 3, &mut |_, _| {}).unwrap();
        // Cut the second shard inside its third sample; add a sample without .cls and one
        // whose class is not a number.
        let second = d.join("shard-000001.tar");
        let bytes = std::fs::read(&second).unwrap();
        // 4 blocks a sample (image header and data, class header and data): cut into the third.
        std::fs::write(&second, &bytes[..8 * 512 + 100]).unwrap();
        let mut extra = TarWriter::new(Vec::new());
        extra
            .append("lonely.png", &png_of_planes(&[0; 12], (1, 4, 3)).unwrap())
            .unwrap();
        extra
            .append("bad.png", &png_of_planes(&[0; 12], (1, 4, 3)).unwrap())
            .unwrap();
        extra.append("bad.cls", b"seven").unwrap();
        std::fs::write(d.join("shard-000002.tar"), extra.finish().unwrap()).unwrap();
        let set = ShardSet::open(d.to_str().unwrap(), Split::Train, (1, 4, 3), false).unwrap();
        // Shard 0 whole (3), shard 1's first two samples, nothing from shard 2.
        assert_eq!(set.len(), 5, "{:?}", set.skip_reasons);
        assert!(set.skipped >= 3, "{:?}", set.skip_reasons);
        let reasons = set.skip_reasons.join("\n");
        assert!(reasons.contains("truncated"), "{reasons}");
        assert!(reasons.contains("no .cls"), "{reasons}");
        assert!(reasons.contains("not a number"), "{reasons}");
        let e = ShardSet::open(d.to_str().unwrap(), Split::Train, (1, 4, 3), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("strict"), "{e}");
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn patterns_name_shards() {
        assert!(wildcard("train-*.tar", "train-000.tar"));
        assert!(wildcard("t?ain-*", "train-1.tar"));
        assert!(!wildcard("train-*.tar", "test-000.tar"));
        let d = tmp("pattern");
        let ds: Arc<dyn Dataset> = Arc::new(data(5));
        write_shards(&*ds, None, &d, "train", 2, &mut |_, _| {}).unwrap();
        // Three shards (2 + 2 + 1); a wildcard names them all, a list the ones listed.
        let spec = format!("{}/shard-00000?.tar", d.display());
        assert!(is_shard_pattern(&spec));
        assert_eq!(expand_pattern(&spec).unwrap().len(), 3);
        assert_eq!(
            ShardSet::open(&spec, Split::Train, (1, 4, 3), true)
                .unwrap()
                .len(),
            5
        );
        let spec = format!("{0}/shard-000000.tar, {0}/shard-000002.tar", d.display());
        assert!(is_shard_pattern(&spec));
        let set = ShardSet::open(&spec, Split::Train, (1, 4, 3), true).unwrap();
        assert_eq!(set.len(), 3);
        assert!(expand_pattern(&format!("{}/nothing-*.tar", d.display())).is_err());
        assert!(ShardSet::open(&spec, Split::Test, (1, 4, 3), true).is_err());
        std::fs::remove_dir_all(d).ok();
    }
}
