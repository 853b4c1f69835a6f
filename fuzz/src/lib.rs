//! Mutation fuzzing of every vitrs parser that reads outside data, on the stable toolchain.
//!
//! cargo-fuzz needs a nightly compiler, which this project cannot fetch, so this is the
//! equivalent we can run: a seeded mutational fuzzer **without coverage guidance**. What it
//! lacks in guidance it makes up for in structure: besides byte-level mutations (bit flips,
//! interesting integers at random offsets, insertions, deletions, duplications, truncation,
//! splices between seeds) it rewrites the numbers inside text (JSON headers and configs),
//! and for the ZIP-based formats (`.npz`, `torch.save`) it mutates a *member* and rebuilds the
//! archive with valid CRCs, so the mutations reach the parsers behind the container.
//!
//! Every input runs under `catch_unwind`; a panic is a finding. A counting allocator records
//! each input's peak heap use, and an input that makes the parser hold more than
//! [`PEAK_LIMIT`] is a finding too (a lying header must be refused before allocating).
//! Findings are written to the output directory, one file per input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Heap in use above the baseline that counts as unbounded memory for one input of a few
/// kilobytes (the largest legitimate case, a 256 MiB image and its float planes, stays below).
pub const PEAK_LIMIT: usize = 1 << 30;

/// A global allocator that counts live bytes and their peak.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

/// The project's seeded generator: campaigns are reproducible from `--seed`.
pub use vitrs::model::Rng;

/// The parsers under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `SafeTensors::parse` and every tensor's decoding, then `vitrs::load` of the file.
    Safetensors,
    /// Google `.npz` (ZIP + `.npy`): `vitrs::load`.
    Npz,
    /// `torch.save` files (ZIP + restricted pickle): `checkpoint::torch::read`.
    Torch,
    /// timm `config.json` beside valid weights: `vitrs::load` of the directory.
    TimmConfig,
    /// Hugging Face `config.json` + `preprocessor_config.json` beside valid weights.
    HfConfig,
    /// IDX files, raw and gzipped, and the images/labels pairing.
    Idx,
    /// A CIFAR-10 batch: `data::cifar::open_dir`.
    Cifar,
    /// Image decoding (PNG, JPEG, GIF, BMP) with limits, then preprocessing.
    Image,
}

pub const ALL: [Target; 8] = [
    Target::Safetensors,
    Target::Npz,
    Target::Torch,
    Target::TimmConfig,
    Target::HfConfig,
    Target::Idx,
    Target::Cifar,
    Target::Image,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::Npz => "npz",
            Target::Torch => "torch",
            Target::TimmConfig => "timm-config",
            Target::HfConfig => "hf-config",
            Target::Idx => "idx",
            Target::Cifar => "cifar",
            Target::Image => "image",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL.iter().copied().find(|t| t.name() == s)
    }

    /// ZIP containers whose members are mutated and re-zipped with valid CRCs.
    fn zipped(self) -> bool {
        matches!(self, Target::Npz | Target::Torch)
    }
}

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("seed {}: {e}", p.display()))
}

/// Valid inputs to start from.
pub fn seeds(t: Target) -> Vec<Vec<u8>> {
    let f = fixtures();
    match t {
        Target::Safetensors => vec![
            read(&f.join("timm_deit3/model.safetensors")),
            read(&f.join("torch-pth/views.safetensors")),
            native_seed(),
        ],
        Target::Npz => vec![
            read(&f.join("npz-bigvision-map/model.npz")),
            read(&f.join("npz-vit/model.npz")),
        ],
        Target::Torch => vec![
            read(&f.join("torch-pth/views.pth")),
            read(&f.join("torch-pth/state_dict.pth")),
            read(&f.join("torch-pth/evil.pth")),
        ],
        // The config of the weights beside it (other configs would only be refused).
        Target::TimmConfig => vec![read(&f.join("timm_siglip_map/config.json"))],
        Target::HfConfig => vec![
            read(&f.join("hf_cls/config.json")),
            read(&f.join("hf_cls/preprocessor_config.json")),
        ],
        Target::Idx => {
            let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 4];
            images.extend((0..48).map(|i| (i * 5) as u8));
            let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 3];
            labels.extend([0, 1, 2]);
            vec![images, labels]
        }
        Target::Cifar => {
            let mut b = vec![];
            for label in [3u8, 7] {
                b.push(label);
                b.extend((0..3072).map(|i| (i % 251) as u8));
            }
            vec![b]
        }
        Target::Image => {
            let mut out = vec![read(&f.join("hf_cls/ref/image.png"))];
            let img =
                image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 99]));
            for fmt in [
                image::ImageFormat::Jpeg,
                image::ImageFormat::Gif,
                image::ImageFormat::Bmp,
            ] {
                let mut buf = std::io::Cursor::new(vec![]);
                image::DynamicImage::ImageRgb8(img.clone())
                    .write_to(&mut buf, fmt)
                    .expect("encode seed image");
                out.push(buf.into_inner());
            }
            out
        }
    }
}

/// A native vitrs file (config, preprocessing and checksum in the metadata; loaded by the
/// direct path), written from the smallest timm fixture.
fn native_seed() -> Vec<u8> {
    let ck = vitrs::load(&fixtures().join("timm_siglip_map")).expect("load seed model");
    // One file per call: tests call this from parallel threads of one process.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "vitrs-fuzz-native-{}-{}.safetensors",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    vitrs::checkpoint::save_native(
        &p,
        &ck.model,
        &ck.preprocess,
        ck.labels.as_deref(),
        vitrs::checkpoint::safetensors::SaveDtype::F32,
    )
    .expect("write native seed");
    let b = read(&p);
    let _ = std::fs::remove_file(&p);
    b
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

const NUMBERS: [&str; 10] = [
    "0",
    "-1",
    "1",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999",
    "1e309",
    "-0",
    "3.5",
    "null",
];

/// One random mutation of `data` (other seeds are available for splicing).
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, others: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'.'][rng.below(8)];
        }
        2 if len > 0 => {
            // An interesting integer, LE or BE, 1/2/4/8 bytes wide.
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let w = [1usize, 2, 4, 8][rng.below(4)];
            let bytes = if rng.below(2) == 0 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let src = if rng.below(2) == 0 {
                &bytes[..w]
            } else {
                &bytes[8 - w..]
            };
            let i = rng.below(len);
            for (k, b) in src.iter().enumerate() {
                if i + k < len {
                    data[i + k] = *b;
                }
            }
        }
        3 if len > 0 => {
            // Delete a range.
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            data.drain(i..i + n);
        }
        4 => {
            // Insert random bytes.
            let i = rng.below(len + 1);
            let n = 1 + rng.below(32);
            let ins: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, ins);
        }
        5 if len > 0 => {
            // Duplicate a range.
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let chunk = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        6 if len > 0 => data.truncate(rng.below(len)),
        7 if !others.is_empty() => {
            // Splice: our head, another seed's tail.
            let o = &others[rng.below(others.len())];
            if !o.is_empty() {
                let cut = rng.below(len + 1);
                let from = rng.below(o.len());
                data.truncate(cut);
                data.extend_from_slice(&o[from..]);
            }
        }
        _ => replace_number(rng, data),
    }
}

/// Replaces one ASCII number (a run of digits) with an edge value: text formats (JSON
/// headers, configs, pickled ints written as text) are mostly numbers worth lying about.
fn replace_number(rng: &mut Rng, data: &mut Vec<u8>) {
    let runs: Vec<(usize, usize)> = {
        let mut v = vec![];
        let mut i = 0;
        while i < data.len() {
            if data[i].is_ascii_digit() {
                let s = i;
                while i < data.len() && data[i].is_ascii_digit() {
                    i += 1;
                }
                v.push((s, i));
            } else {
                i += 1;
            }
        }
        v
    };
    if runs.is_empty() {
        return;
    }
    let (s, e) = runs[rng.below(runs.len())];
    let n = NUMBERS[rng.below(NUMBERS.len())].as_bytes().to_vec();
    data.splice(s..e, n);
}

/// Reads the members of a ZIP (stored or deflated) through vitrs' own reader.
fn zip_members(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let z =
        vitrs::checkpoint::zip::ZipArchive::parse(Path::new("seed.zip"), bytes.to_vec()).ok()?;
    z.entries()
        .iter()
        .map(|e| z.read(e).ok().map(|b| (e.name.clone(), b)))
        .collect()
}

/// A ZIP of stored members with correct CRCs (vitrs' own writer).
pub fn stored_zip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = members
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    vitrs::checkpoint::zip::stored_zip(&refs)
}

/// A fresh input for `t`: a seed with 1–4 mutations (for ZIP formats, half the time applied
/// to one member, re-zipped with valid CRCs).
pub fn next_input(t: Target, rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = &seeds[rng.below(seeds.len())];
    let rounds = 1 + rng.below(4);
    if t.zipped() && rng.below(2) == 0 {
        if let Some(mut members) = zip_members(seed) {
            if !members.is_empty() {
                let k = rng.below(members.len());
                let others: Vec<Vec<u8>> = members.iter().map(|m| m.1.clone()).collect();
                for _ in 0..rounds {
                    if rng.below(8) == 0 {
                        let mut name = members[k].0.clone().into_bytes();
                        mutate(rng, &mut name, &[]);
                        members[k].0 = String::from_utf8_lossy(&name).into_owned();
                    } else {
                        mutate(rng, &mut members[k].1, &others);
                    }
                }
                return stored_zip(&members);
            }
        }
    }
    let mut data = seed.clone();
    for _ in 0..rounds {
        mutate(rng, &mut data, seeds);
    }
    data
}

/// A scratch directory for path-based parsers, with the valid companions each target needs.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(t: Target, tag: &str) -> Self {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "vitrs-fuzz-{}-{tag}-{}",
            t.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let f = fixtures();
        let copy = |from: &str, to: &str| {
            std::fs::copy(f.join(from), dir.join(to)).expect("copy companion");
        };
        match t {
            Target::TimmConfig => copy("timm_siglip_map/model.safetensors", "model.safetensors"),
            Target::HfConfig => {
                copy("hf_cls/model.safetensors", "model.safetensors");
                copy("hf_cls/config.json", "config.json");
                copy(
                    "hf_cls/preprocessor_config.json",
                    "preprocessor_config.json",
                );
            }
            _ => {}
        }
        Scratch { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the input being run is kept: if the process dies (out of memory, a stack
    /// overflow), this file holds the input that killed it.
    pub fn current(&self) -> PathBuf {
        self.dir.join("current.bin")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one input through the target. `Ok(true)`: parsed; `Ok(false)`: refused with an error
/// (the expected outcome for most mutants). Panics propagate to the caller.
pub fn run_one(t: Target, input: &[u8], scratch: &Scratch, rng_bit: bool) -> bool {
    let dir = scratch.dir();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("scratch write");
        p
    };
    match t {
        Target::Safetensors => {
            let p = dir.join("x.safetensors");
            let parsed = vitrs::checkpoint::safetensors::SafeTensors::parse(&p, input.to_vec());
            let Ok(st) = parsed else {
                return false;
            };
            for name in st.tensors().keys() {
                let _ = st.tensor(name);
            }
            // As a model too (most mutants lack a config and are refused; native files load).
            let _ = vitrs::load(&write("x.safetensors", input));
            true
        }
        Target::Npz => vitrs::load(&write("x.npz", input)).is_ok(),
        Target::Torch => vitrs::checkpoint::torch::read(&write("x.pth", input)).is_ok(),
        Target::TimmConfig => {
            write("config.json", input);
            vitrs::load(dir).is_ok()
        }
        Target::HfConfig => {
            // Alternate between the model config and the preprocessor config.
            let (name, other) = if rng_bit {
                ("config.json", "preprocessor_config.json")
            } else {
                ("preprocessor_config.json", "config.json")
            };
            write(name, input);
            let f = fixtures().join("hf_cls");
            std::fs::copy(f.join(other), dir.join(other)).expect("restore companion");
            let ok = vitrs::load(dir).is_ok();
            std::fs::copy(f.join(name), dir.join(name)).expect("restore config");
            ok
        }
        Target::Idx => {
            use vitrs::data::idx;
            let p = Path::new("x-idx3-ubyte");
            let raw = idx::parse_idx(p, input).is_ok();
            let gz = idx::gunzip(p, input)
                .and_then(|b| idx::parse_idx(p, &b))
                .is_ok();
            let labels = [0u8, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2];
            let paired = idx::pair(p, input, Path::new("l"), &labels, rng_bit).is_ok();
            raw || gz || paired
        }
        Target::Cifar => {
            write("test_batch.bin", input);
            vitrs::data::cifar::open_dir(dir, vitrs::data::Split::Test).is_ok()
        }
        Target::Image => {
            let p = write("x.img", input);
            match vitrs::preprocess::load_image(&p) {
                Ok(img) => {
                    let pre = vitrs::preprocess::Preprocess::timm_default(16, 16, 3);
                    pre.apply(&img).is_ok()
                }
                Err(_) => false,
            }
        }
    }
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Report {
    pub target: &'static str,
    pub seconds: f64,
    pub inputs: u64,
    pub parsed: u64,
    pub refused: u64,
    /// Panicking inputs and inputs over [`PEAK_LIMIT`], saved under the output directory.
    pub findings: Vec<PathBuf>,
    /// The largest heap peak any one input caused, in bytes above the baseline.
    pub max_peak: usize,
}

/// Fuzzes `t` for `budget`, writing findings to `out`.
pub fn campaign(t: Target, budget: Duration, seed: u64, out: &Path) -> Report {
    let seeds = seeds(t);
    let scratch = Scratch::new(t, &seed.to_string());
    let mut rng = Rng::new(seed);
    let mut rep = Report {
        target: t.name(),
        ..Report::default()
    };
    // Panics are findings, reported once each below; keep the default hook quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    while start.elapsed() < budget {
        let input = next_input(t, &mut rng, &seeds);
        std::fs::write(scratch.current(), &input).ok();
        let bit = rng.below(2) == 0;
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let res = std::panic::catch_unwind(|| run_one(t, &input, &scratch, bit));
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        rep.max_peak = rep.max_peak.max(peak);
        rep.inputs += 1;
        let finding = match res {
            Ok(true) => {
                rep.parsed += 1;
                None
            }
            Ok(false) => {
                rep.refused += 1;
                None
            }
            Err(p) => Some(format!(
                "panic: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
        .or_else(|| (peak > PEAK_LIMIT).then(|| format!("peak heap {peak} bytes")));
        if let Some(why) = finding {
            std::fs::create_dir_all(out).ok();
            let p = out.join(format!("{}-{}.bin", t.name(), rep.inputs));
            std::fs::write(&p, &input).ok();
            std::fs::write(p.with_extension("txt"), &why).ok();
            rep.findings.push(p);
        }
    }
    std::panic::set_hook(hook);
    rep.seconds = start.elapsed().as_secs_f64();
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_parses() {
        for t in ALL {
            let scratch = Scratch::new(t, "seeds");
            for (i, s) in seeds(t).iter().enumerate() {
                let ok = run_one(t, s, &scratch, i % 2 == 0) || run_one(t, s, &scratch, i % 2 != 0);
                // evil.pth parses too: its code-running object is left unbuilt, by design.
                assert!(ok, "{} seed {i}", t.name());
            }
        }
    }

    /// Every input that once found a bug runs through its target without a panic (the file
    /// name starts with the target's name).
    #[test]
    fn regressions_stay_fixed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let t = ALL
                .iter()
                .copied()
                .filter(|t| name.starts_with(&format!("{}-", t.name())))
                .max_by_key(|t| t.name().len())
                .unwrap_or_else(|| panic!("{name}: no target prefix"));
            let scratch = Scratch::new(t, "regress");
            let input = std::fs::read(&p).unwrap();
            for bit in [false, true] {
                let r = std::panic::catch_unwind(|| run_one(t, &input, &scratch, bit));
                assert!(r.is_ok(), "{name} panics again");
            }
            n += 1;
        }
        assert!(n >= 3, "only {n} regression inputs");
    }

    #[test]
    fn rezipped_members_keep_valid_crcs() {
        let seed = &seeds(Target::Npz)[0];
        let members = zip_members(seed).unwrap();
        let again = zip_members(&stored_zip(&members)).unwrap();
        assert_eq!(members, again);
    }

    #[test]
    fn mutations_are_reproducible_and_change_inputs() {
        let seeds = seeds(Target::Safetensors);
        let a: Vec<Vec<u8>> = {
            let mut r = Rng::new(5);
            (0..50)
                .map(|_| next_input(Target::Safetensors, &mut r, &seeds))
                .collect()
        };
        let mut r = Rng::new(5);
        let b: Vec<Vec<u8>> = (0..50)
            .map(|_| next_input(Target::Safetensors, &mut r, &seeds))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().filter(|x| !seeds.contains(x)).count() > 40);
    }
}
