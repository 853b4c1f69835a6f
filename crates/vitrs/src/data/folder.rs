//! A folder of images, one sub-folder per class (`root/cat/001.jpg`, ...), as torchvision's
//! `ImageFolder`. Images are decoded when the loader asks for them (in its worker threads),
//! resized and centre-cropped to the model size.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::Dataset;
use crate::error::{Error, Result};
use crate::infer::INPUT_EXTENSIONS;
use crate::preprocess::load_image;

#[derive(Debug)]
pub struct ImageFolder {
    files: Vec<(PathBuf, usize)>,
    classes: Vec<String>,
    size: (usize, usize, usize),
    /// Files that were not images and were left out.
    pub skipped: usize,
}

/// Whether `f`'s header names a format we decode and dimensions we accept.
fn readable(f: &Path) -> std::result::Result<(), String> {
    let reader = image::ImageReader::open(f)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a recognised image format".into());
    }
    reader
        .into_dimensions()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl ImageFolder {
    /// Lists `root`; `size` is `(C, H, W)` of the items produced. Every image's header is read
    /// (in parallel) so that an unreadable file is found now, not mid-epoch. With `strict`, a
    /// non-image or unreadable file is an error naming it; otherwise it is skipped and counted.
    pub fn open(root: &Path, size: (usize, usize, usize), strict: bool) -> Result<Self> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| Error::io(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            return Err(Error::BadInput(format!(
                "{}: no class sub-folders; an image folder needs one folder of images per class",
                root.display()
            )));
        }
        let (mut files, mut classes, mut skipped) = (vec![], vec![], 0);
        for (ci, d) in dirs.iter().enumerate() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(d)
                .map_err(|e| Error::io(d, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            let before = files.len();
            for f in entries {
                let ext = f
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase)
                    .unwrap_or_default();
                if INPUT_EXTENSIONS.contains(&ext.as_str()) && ext != "npy" {
                    files.push((f, ci));
                } else if strict {
                    return Err(Error::BadInput(format!(
                        "{}: not an image (strict mode)",
                        f.display()
                    )));
                } else {
                    skipped += 1;
                }
            }
            // Headers: a file with an image name that no decoder can read.
            let unreadable: Vec<(usize, String)> = files[before..]
                .par_iter()
                .enumerate()
                .filter_map(|(i, (f, _))| readable(f).err().map(|e| (before + i, e)))
                .collect();
            if let Some((i, why)) = unreadable.first().filter(|_| strict) {
                return Err(Error::BadInput(format!(
                    "{}: unreadable image ({why}) (strict mode)",
                    files[*i].0.display()
                )));
            }
            for (i, _) in unreadable.iter().rev() {
                files.remove(*i);
                skipped += 1;
            }
            if files.len() == before {
                return Err(Error::BadInput(format!(
                    "{}: class folder holds no images",
                    d.display()
                )));
            }
            classes.push(
                d.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        Ok(ImageFolder {
            files,
            classes,
            size,
            skipped,
        })
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.size
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn skipped(&self) -> usize {
        self.skipped
    }

    fn label(&self, i: usize) -> usize {
        self.files[i].1
    }
    fn source_file(&self, i: usize) -> Option<PathBuf> {
        Some(self.files[i].0.clone())
    }
    fn image(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let path = &self.files[i].0;
        super::pixels_into(&load_image(path)?, self.size, path, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_classes_skips_non_images_and_rejects_empty_classes() {
        let root = std::env::temp_dir().join(format!("vitrs-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (cls, n) in [("ant", 2), ("bee", 1)] {
            std::fs::create_dir_all(root.join(cls)).unwrap();
            for i in 0..n {
                image::RgbImage::from_pixel(10, 6, image::Rgb([i * 100, 50, 200]))
                    .save(root.join(cls).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        std::fs::write(root.join("bee/notes.txt"), "x").unwrap();
        let f = ImageFolder::open(&root, (3, 4, 4), false).unwrap();
        assert_eq!(
            (f.len(), f.classes().to_vec(), f.skipped, f.label(2)),
            (3, vec!["ant".to_string(), "bee".into()], 1, 1)
        );
        let mut px = vec![0u8; 48];
        f.image(1, &mut px).unwrap();
        assert_eq!(px[0], 100);
        assert!(ImageFolder::open(&root, (3, 4, 4), true).is_err());
        std::fs::create_dir_all(root.join("cow")).unwrap();
        assert!(ImageFolder::open(&root, (3, 4, 4), false)
            .unwrap_err()
            .to_string()
            .contains("no images"));
        std::fs::remove_dir_all(root).ok();
    }
}
