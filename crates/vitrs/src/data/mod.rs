//! Datasets: Fashion-MNIST/MNIST (IDX), CIFAR-10/100 (binary), and folders of images, behind
//! one [`Dataset`] trait; augmentation; and a threaded loader with bounded prefetch.
//!
//! Items are 8-bit images `(C, H, W)` at the dataset's size plus a class index; the loader
//! turns them into normalised float batches `(B, C, H, W)`.

pub mod augment;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod shards;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A labelled image collection.
pub trait Dataset: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(C, H, W)` of every item.
    fn shape(&self) -> (usize, usize, usize);
    /// Class names by index.
    fn classes(&self) -> &[String];
    /// Class of item `i`.
    fn label(&self, i: usize) -> usize;
    /// Writes item `i`'s pixels `(C, H, W)` into `out`.
    fn image(&self, i: usize, out: &mut [u8]) -> Result<()>;
    /// Files left out when the dataset was opened (not images, or unreadable).
    fn skipped(&self) -> usize {
        0
    }
    /// The items of each shard, when the items are stored in shards that are best read one
    /// after the other ([`shards::ShardSet`]): the loader then shuffles by shard order and a
    /// buffer instead of drawing items from anywhere.
    fn shards(&self) -> Option<Vec<Range<usize>>> {
        None
    }
    /// The file item `i` is read from, when it is one file of its own (an image folder).
    fn source_file(&self, _i: usize) -> Option<PathBuf> {
        None
    }
}

/// Images held in memory (IDX, CIFAR).
#[derive(Clone, Debug)]
pub struct InMemory {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// `(N, C, H, W)` pixels.
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.c, self.h, self.w)
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }
    fn image(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let n = self.c * self.h * self.w;
        out.copy_from_slice(&self.pixels[i * n..(i + 1) * n]);
        Ok(())
    }
}

/// A view of some items of another dataset (a validation split, a subset of classes).
pub struct Subset {
    base: Arc<dyn Dataset>,
    indices: Vec<usize>,
    /// Remapped labels (e.g. classes 5..9 -> 0..4), when the subset relabels.
    relabel: Option<(Vec<usize>, Vec<String>)>,
}

impl Subset {
    pub fn new(base: Arc<dyn Dataset>, indices: Vec<usize>) -> Self {
        Subset {
            base,
            indices,
            relabel: None,
        }
    }

    /// Keeps only items of `classes` (base indices), renumbered 0.. in that order.
    pub fn of_classes(base: Arc<dyn Dataset>, classes: &[usize]) -> Self {
        let indices = (0..base.len())
            .filter(|&i| classes.contains(&base.label(i)))
            .collect();
        let mut map = vec![usize::MAX; base.classes().len()];
        for (new, &old) in classes.iter().enumerate() {
            if old < map.len() {
                map[old] = new;
            }
        }
        let names = classes
            .iter()
            .map(|&c| {
                base.classes()
                    .get(c)
                    .cloned()
                    .unwrap_or_else(|| format!("class_{c}"))
            })
            .collect();
        Subset {
            base,
            indices,
            relabel: Some((map, names)),
        }
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.base.shape()
    }
    fn classes(&self) -> &[String] {
        match &self.relabel {
            Some((_, names)) => names,
            None => self.base.classes(),
        }
    }
    fn label(&self, i: usize) -> usize {
        let l = self.base.label(self.indices[i]);
        match &self.relabel {
            Some((map, _)) => map[l],
            None => l,
        }
    }
    fn image(&self, i: usize, out: &mut [u8]) -> Result<()> {
        self.base.image(self.indices[i], out)
    }
    /// The base's shards, restricted to this subset: a new group wherever the base shard of
    /// consecutive items changes.
    fn shards(&self) -> Option<Vec<Range<usize>>> {
        let base = self.base.shards()?;
        let shard_of = |b: usize| base.partition_point(|r| r.end <= b);
        let mut out: Vec<Range<usize>> = vec![];
        let mut last = usize::MAX;
        for (i, &b) in self.indices.iter().enumerate() {
            let s = shard_of(b);
            match out.last_mut() {
                Some(r) if s == last => r.end = i + 1,
                _ => out.push(i..i + 1),
            }
            last = s;
        }
        Some(out)
    }
    fn source_file(&self, i: usize) -> Option<PathBuf> {
        self.base.source_file(self.indices[i])
    }
}

/// Whether `spec` is a flat image folder: a directory of class sub-folders without `train/`,
/// `val/` or `test/` (and no IDX or CIFAR files), which has no test split of its own.
pub fn is_flat_image_folder(spec: &str) -> bool {
    // Shards named by a pattern have no test split either.
    if shards::is_shard_pattern(spec) {
        return true;
    }
    let dir = Path::new(spec);
    if !dir.is_dir()
        || ["train", "val", "test"]
            .iter()
            .any(|s| dir.join(s).is_dir())
    {
        return false;
    }
    let dataset_file =
        |name: &str| name.contains("-ubyte") || name.ends_with(".bin") || name.ends_with(".bin.gz");
    std::fs::read_dir(dir).is_ok_and(|it| {
        !it.filter_map(|e| e.ok())
            .any(|e| dataset_file(&e.file_name().to_string_lossy()))
    })
}

/// Splits `ds` into (train, validation) indices with `fraction` of every class held out
/// (rounded, at least one image of each class that has two or more), seeded by `seed`.
pub fn stratified_split(ds: &dyn Dataset, fraction: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut by_class: Vec<Vec<usize>> = vec![vec![]; ds.classes().len()];
    for i in 0..ds.len() {
        if let Some(c) = by_class.get_mut(ds.label(i)) {
            c.push(i);
        }
    }
    let mut rng = crate::model::Rng::new(seed ^ 0x5EED_51A1);
    let (mut train, mut val) = (vec![], vec![]);
    for mut items in by_class {
        rng.shuffle(&mut items);
        let n = items.len();
        let held = if n >= 2 {
            ((n as f64 * fraction.clamp(0.0, 1.0) as f64).round() as usize).clamp(1, n - 1)
        } else {
            0
        };
        val.extend_from_slice(&items[..held]);
        train.extend_from_slice(&items[held..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Parses a class list as written on a command line: `5-9`, `0,2,4` or a mix (`0-2,7`), in
/// the order given. Only the syntax is checked here; [`check_classes`] checks the list.
pub fn parse_classes(s: &str) -> Result<Vec<usize>> {
    let bad =
        |why: String| Error::BadInput(format!("classes `{s}`: {why} (e.g. `5-9` or `0,2,4`)"));
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("`{t}` is not a class index")))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 100_000 {
                    return Err(bad(format!("`{part}` is not an increasing range")));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// A class list must name at least one class, each once; `what` says where the list came from.
pub fn check_classes(classes: &[usize], what: &str) -> Result<()> {
    if classes.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "{what} must name at least one class"
        )));
    }
    let mut seen = classes.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != classes.len() {
        return Err(Error::InvalidConfig(format!(
            "{what} names a class twice: {classes:?}"
        )));
    }
    Ok(())
}

/// Only the items of `classes` (indices into `ds`'s classes, each once), renumbered 0.. in
/// that order; `what` names the dataset in errors.
pub fn select_classes(
    ds: Arc<dyn Dataset>,
    classes: &[usize],
    what: &str,
) -> Result<Arc<dyn Dataset>> {
    check_classes(classes, "the class list")?;
    let k = ds.classes().len();
    if let Some(bad) = classes.iter().find(|&&c| c >= k) {
        return Err(Error::BadInput(format!(
            "classes name class {bad}, but `{what}` has {k} classes (0..{})",
            k.saturating_sub(1)
        )));
    }
    Ok(Arc::new(Subset::of_classes(ds, classes)))
}

/// The first `per_class` items of each class after a seeded shuffle (fewer where a class has
/// fewer): the few-labels training sets of transfer experiments.
pub fn per_class_indices(ds: &dyn Dataset, per_class: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    crate::model::Rng::new(seed ^ 0xFE_1AB5).shuffle(&mut idx);
    let mut taken = vec![0usize; ds.classes().len()];
    let mut keep: Vec<usize> = idx
        .into_iter()
        .filter(|&i| {
            let c = ds.label(i);
            let ok = taken.get(c).is_some_and(|&t| t < per_class);
            if ok {
                taken[c] += 1;
            }
            ok
        })
        .collect();
    keep.sort_unstable();
    keep
}

/// Another dataset's images resized to `(h, w)` (bilinear, as Pillow resizes 8-bit images):
/// fine-tuning at a higher resolution than the data was made at.
pub struct Resized {
    base: Arc<dyn Dataset>,
    h: usize,
    w: usize,
}

impl Resized {
    pub fn new(base: Arc<dyn Dataset>, (h, w): (usize, usize)) -> Result<Self> {
        if h == 0 || w == 0 || h > 4096 || w > 4096 {
            return Err(Error::BadInput(format!(
                "resize to {h}x{w}: each side must be between 1 and 4096 pixels"
            )));
        }
        Ok(Resized { base, h, w })
    }
}

impl Dataset for Resized {
    fn len(&self) -> usize {
        self.base.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.base.shape().0, self.h, self.w)
    }
    fn classes(&self) -> &[String] {
        self.base.classes()
    }
    fn label(&self, i: usize) -> usize {
        self.base.label(i)
    }
    fn shards(&self) -> Option<Vec<Range<usize>>> {
        self.base.shards()
    }
    fn image(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let (c, h0, w0) = self.base.shape();
        let mut src = vec![0u8; c * h0 * w0];
        self.base.image(i, &mut src)?;
        let planes = crate::resample::Planes {
            c,
            h: h0,
            w: w0,
            data: src.iter().map(|&v| v as f32).collect(),
        };
        let r = crate::resample::resize_planes(
            &planes,
            self.h,
            self.w,
            crate::preprocess::Interpolation::Bilinear,
            true,
        );
        for (o, v) in out.iter_mut().zip(&r.data) {
            *o = v.round().clamp(0.0, 255.0) as u8;
        }
        Ok(())
    }
}

/// Writes a decoded image into `out` as `(C, H, W)` u8 at `size` (resized and centre-cropped
/// as the loaders do); `what` names it in errors (a file, a shard sample).
pub(crate) fn pixels_into(
    img: &image::DynamicImage,
    (c, h, w): (usize, usize, usize),
    what: &Path,
    out: &mut [u8],
) -> Result<()> {
    let px = crate::preprocess::image_to_u8(img, c, h, w)
        .map_err(|e| Error::BadInput(format!("{}: {e}", what.display())))?;
    if out.len() != px.len() {
        return Err(Error::BadInput(format!(
            "{}: the image is {c}x{h}x{w} ({} values) but the caller's buffer holds {}",
            what.display(),
            px.len(),
            out.len()
        )));
    }
    out.copy_from_slice(&px);
    Ok(())
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Image shape `(C, H, W)` and class count of the datasets known by name.
pub fn known_shape(name: &str) -> Option<((usize, usize, usize), usize)> {
    match name.to_ascii_lowercase().as_str() {
        "fashion-mnist" | "mnist" => Some(((1, 28, 28), 10)),
        "cifar10" | "cifar-10" => Some(((3, 32, 32), 10)),
        "cifar100" | "cifar-100" => Some(((3, 32, 32), 100)),
        _ => None,
    }
}

/// Directories searched for a dataset given by name: `$VITRS_DATA/<name>`, then
/// `/usr/share/datasets/<name>` (where Debian's `dataset-fashion-mnist` installs).
pub fn search_dirs(name: &str) -> Vec<PathBuf> {
    let mut v = vec![];
    if let Some(d) = std::env::var_os("VITRS_DATA") {
        v.push(Path::new(&d).join(name));
        v.push(PathBuf::from(d));
    }
    v.push(Path::new("/usr/share/datasets").join(name));
    v
}

/// Opens a dataset: a name (`fashion-mnist`, `mnist`, `cifar10`, `cifar100`) searched in
/// [`search_dirs`], or a path to a directory of IDX files, CIFAR `.bin` batches, or one
/// sub-folder of images per class (then `size` `(C, H, W)` is the size images are resized to).
pub fn open(spec: &str, split: Split, size: (usize, usize, usize)) -> Result<Arc<dyn Dataset>> {
    open_with(spec, split, size, false)
}

/// [`open`], where `strict` makes an image folder's non-image or unreadable file an error
/// (naming it) instead of a skipped, counted file.
pub fn open_with(
    spec: &str,
    split: Split,
    size: (usize, usize, usize),
    strict: bool,
) -> Result<Arc<dyn Dataset>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return open_dir(path, split, size, strict);
    }
    if shards::is_shard_pattern(spec) {
        return Ok(Arc::new(shards::ShardSet::open(spec, split, size, strict)?));
    }
    let name = spec.to_ascii_lowercase();
    let known = [
        "fashion-mnist",
        "mnist",
        "cifar10",
        "cifar100",
        "cifar-10",
        "cifar-100",
    ];
    if !known.contains(&name.as_str()) {
        return Err(Error::BadInput(format!(
            "dataset `{spec}` is neither a directory nor a known name ({})",
            known.join(", ")
        )));
    }
    let dirs = search_dirs(&name);
    for d in &dirs {
        if d.is_dir() {
            if let Ok(ds) = open_dir(d, split, size, strict) {
                return Ok(ds);
            }
        }
    }
    let hint = if name == "fashion-mnist" {
        "install it with `apt-get install -y dataset-fashion-mnist`, or download the four IDX files into $VITRS_DATA/fashion-mnist"
    } else {
        "put its files in $VITRS_DATA/<name> or pass the directory"
    };
    Err(Error::BadInput(format!(
        "dataset `{spec}` not found in {}; {hint}",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// How [`open_for_model`] fits a dataset to a model.
#[derive(Clone, Debug, Default)]
pub struct ForModel {
    /// Stop on an image folder's unreadable file instead of skipping it ([`open_with`]).
    pub strict: bool,
    /// Only these classes of the dataset, renumbered from 0 (as the model was trained).
    pub classes: Option<Vec<usize>>,
    /// Resize the images to the model's size; otherwise a different size is an error.
    pub resize: bool,
    /// Require the dataset to have as many classes as the model has outputs.
    pub same_classes: bool,
}

/// Opens `spec`'s `split` for a model taking `size` `(C, H, W)` images into `classes`
/// classes — to evaluate it, or to look at its attention — and checks the two fit: image
/// shape (or resizes, with `opts.resize`), and class count when `opts.same_classes`. Errors
/// say which side disagrees and what to do.
pub fn open_for_model(
    spec: &str,
    split: Split,
    (size, classes): ((usize, usize, usize), usize),
    opts: &ForModel,
) -> Result<Arc<dyn Dataset>> {
    let mut data = open_with(spec, split, size, opts.strict)?;
    if let Some(c) = &opts.classes {
        data = select_classes(data, c, spec)?;
    }
    if opts.resize && data.shape() != size {
        data = Arc::new(Resized::new(data, (size.1, size.2))?);
    }
    if data.shape() != size {
        return Err(Error::BadInput(format!(
            "`{spec}` images are {:?} (C, H, W) but the model takes {size:?}; use a model \
             trained at the dataset's size, or evaluate at another resolution (--image-size)",
            data.shape()
        )));
    }
    if opts.same_classes && data.classes().len() != classes {
        return Err(Error::BadInput(format!(
            "`{spec}` has {} classes, the model {}; pick the model's classes with --classes",
            data.classes().len(),
            classes
        )));
    }
    Ok(data)
}

fn open_dir(
    dir: &Path,
    split: Split,
    size: (usize, usize, usize),
    strict: bool,
) -> Result<Arc<dyn Dataset>> {
    if let Some(ds) = idx::open_dir(dir, split)? {
        return Ok(Arc::new(ds));
    }
    if let Some(ds) = cifar::open_dir(dir, split)? {
        return Ok(Arc::new(ds));
    }
    if shards::is_shard_dir(dir) {
        let spec = dir.to_string_lossy();
        return Ok(Arc::new(shards::ShardSet::open(
            &spec, split, size, strict,
        )?));
    }
    let folder = match split {
        Split::Train if dir.join("train").is_dir() => dir.join("train"),
        Split::Test if dir.join("test").is_dir() => dir.join("test"),
        Split::Test if dir.join("val").is_dir() => dir.join("val"),
        _ => dir.to_path_buf(),
    };
    Ok(Arc::new(folder::ImageFolder::open(&folder, size, strict)?))
}
