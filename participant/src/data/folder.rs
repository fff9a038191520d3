//! Image folders in torchvision's `ImageFolder` layout: one sub-folder per
//! class, named after it.
//!
//! Three layouts are read:
//!
//! - `DIR/train/<class>/*` and `DIR/test/<class>/*`: given splits; both
//!   must have the same class folders. Other entries of `DIR` (such as a
//!   `val/` folder) are ignored.
//! - `DIR/train/<class>/*` without `DIR/test/`, and
//! - `DIR/<class>/*` (no `train/` folder): one set of images, split by
//!   [`LoadOptions::test_fraction`] (seeded, per class).
//!
//! Class names are the sub-folder names sorted by their bytes; label `i` is
//! the `i`-th name. Image files (see [`super::decode::IMAGE_EXTENSIONS`])
//! are found in a class folder and in folders below it, in sorted path
//! order; other files, and entries whose names start with `.`, are skipped.
//! A class folder without image files is an error, as are more than 256
//! classes. (A data set whose only class would be called `train` is read as
//! the `DIR/train/<class>` layout.)

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use super::decode::{Files, LabelledFile, assemble, is_image_file};
use super::{DatasetSplits, LoadOptions};
use crate::error::{ParticipantError, Result};

/// Deepest folder nesting searched below a class folder (a guard against
/// symbolic-link loops).
pub const MAX_FOLDER_DEPTH: usize = 16;

fn err(msg: String) -> ParticipantError {
    ParticipantError::Dataset(msg)
}

/// The entries of `dir` that are not hidden, sorted by name bytes.
fn visible_entries(dir: &Path) -> Result<Vec<(OsString, PathBuf)>> {
    let entries = fs::read_dir(dir).map_err(|e| ParticipantError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ParticipantError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let name = entry.file_name();
        if !name.as_encoded_bytes().starts_with(b".") {
            out.push((name, entry.path()));
        }
    }
    out.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
    Ok(out)
}

/// The class folders of `dir` (its visible sub-folders), sorted by name.
fn class_folders(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let classes: Vec<(String, PathBuf)> = visible_entries(dir)?
        .into_iter()
        .filter(|(_, p)| p.is_dir())
        .map(|(n, p)| (n.to_string_lossy().into_owned(), p))
        .collect();
    if classes.is_empty() {
        return Err(err(format!(
            "{} has no class folders; an image folder holds one sub-folder of images \
             per class (DIR/<class>/*.png, or DIR/train/<class>/* and DIR/test/<class>/*)",
            dir.display()
        )));
    }
    if classes.len() > 256 {
        return Err(err(format!(
            "{} has {} class folders; at most 256 classes are supported",
            dir.display(),
            classes.len()
        )));
    }
    Ok(classes)
}

/// Every image file in `dir` and below, sorted by path, skipping hidden
/// entries, as the loader walks a class folder (for classifying a folder of
/// any layout).
///
/// # Errors
/// An unreadable folder, or nesting deeper than [`MAX_FOLDER_DEPTH`].
pub fn image_files_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect_images(dir, 0, &mut files)?;
    Ok(files)
}

/// Appends the image files in `dir` and below (sorted by path) to `out`.
fn collect_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_FOLDER_DEPTH {
        return Err(err(format!(
            "{} is nested more than {MAX_FOLDER_DEPTH} folders deep below its class folder \
             (a symbolic-link loop?)",
            dir.display()
        )));
    }
    for (_, path) in visible_entries(dir)? {
        if path.is_dir() {
            collect_images(&path, depth + 1, out)?;
        } else if is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The labelled image files of the class folders of `dir`, labelled by
/// position in `classes`.
fn labelled_files(classes: &[(String, PathBuf)]) -> Result<Vec<LabelledFile>> {
    let mut files = Vec::new();
    for (label, (_, folder)) in classes.iter().enumerate() {
        let mut paths = Vec::new();
        collect_images(folder, 0, &mut paths)?;
        if paths.is_empty() {
            return Err(err(format!(
                "class folder {} has no image files (looked for .{})",
                folder.display(),
                super::decode::IMAGE_EXTENSIONS.join(", .")
            )));
        }
        files.extend(paths.into_iter().map(|path| LabelledFile {
            path,
            label: label as u8,
            origin: None,
        }));
    }
    Ok(files)
}

/// Loads the image folder `dir` (see the module documentation for the
/// layouts). `options` sets the image size, and the test fraction and seed
/// used when the folder has no `test/` split; samples are put in a seeded
/// random order within each split.
pub fn load_image_folder(dir: &Path, options: &LoadOptions) -> Result<DatasetSplits> {
    if !dir.is_dir() {
        return Err(err(format!(
            "image folder {} does not exist or is not a directory",
            dir.display()
        )));
    }
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    let (files, names) = if train_dir.is_dir() && test_dir.is_dir() {
        let train = class_folders(&train_dir)?;
        let test = class_folders(&test_dir)?;
        let names = |c: &[(String, PathBuf)]| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (train_names, test_names) = (names(&train), names(&test));
        if train_names != test_names {
            let only = |a: &[String], b: &[String]| {
                let v: Vec<&str> = a
                    .iter()
                    .filter(|n| !b.contains(n))
                    .map(String::as_str)
                    .collect();
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.join(", ")
                }
            };
            return Err(err(format!(
                "{} and {} have different class folders: only in train: {}; only in test: {}",
                train_dir.display(),
                test_dir.display(),
                only(&train_names, &test_names),
                only(&test_names, &train_names)
            )));
        }
        let files = Files::Split {
            train: labelled_files(&train)?,
            test: labelled_files(&test)?,
        };
        (files, train_names)
    } else if test_dir.is_dir() {
        return Err(err(format!(
            "{} has a test/ folder but no train/ folder",
            dir.display()
        )));
    } else {
        let root = if train_dir.is_dir() { &train_dir } else { dir };
        let classes = class_folders(root)?;
        let names = classes.iter().map(|(n, _)| n.clone()).collect();
        (Files::Unsplit(labelled_files(&classes)?), names)
    };
    assemble(files, names, dir, options)
}

#[cfg(test)]
mod tests {
    use image::{GrayImage, ImageBuffer, Luma, Rgb};

    use super::*;
    use crate::data::decode::luma_bt601;
    use crate::data::decode::tests::{message, write_grey_png};

    /// Writes `count` grey `size` PNGs of value `value + i` into `dir`.
    fn fill(dir: &Path, count: usize, size: (u32, u32), value: u8) {
        fs::create_dir_all(dir).unwrap();
        for i in 0..count {
            write_grey_png(
                &dir.join(format!("img{i:03}.png")),
                size.0,
                size.1,
                value + i as u8,
            );
        }
    }

    fn opts(fraction: Option<f64>) -> LoadOptions {
        LoadOptions {
            image_size: None,
            test_fraction: fraction,
            seed: 7,
        }
    }

    /// The pixel values of a split's images (each image is flat), per label.
    fn values_by_label(d: &crate::data::Dataset) -> Vec<Vec<u8>> {
        let mut out = vec![Vec::new(); d.num_classes()];
        for i in 0..d.len() {
            let img = d.image(i);
            assert!(img.iter().all(|&v| v == img[0]), "image {i} is not flat");
            out[d.label(i) as usize].push(img[0]);
        }
        for v in &mut out {
            v.sort();
        }
        out
    }

    #[test]
    fn train_and_test_folders_load_with_sorted_class_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Class names in byte order: "Zebra" < "cat" < "dog".
        fill(&d.join("train/dog"), 3, (4, 5), 10);
        fill(&d.join("train/cat"), 2, (4, 5), 50);
        fill(&d.join("train/Zebra"), 1, (4, 5), 90);
        fill(&d.join("test/dog"), 1, (4, 5), 20);
        fill(&d.join("test/cat"), 1, (4, 5), 60);
        fill(&d.join("test/Zebra"), 2, (4, 5), 100);
        // Skipped: other extensions, hidden files, a hidden folder.
        fs::write(d.join("train/dog/notes.txt"), "x").unwrap();
        fs::write(d.join("train/dog/.hidden.png"), "x").unwrap();
        fill(&d.join("train/.cache"), 1, (4, 5), 0);
        // Nested folders below a class are searched.
        fill(&d.join("train/cat/more"), 1, (4, 5), 70);
        let s = load_image_folder(d, &opts(None)).unwrap();
        assert_eq!(s.classes, ["Zebra", "cat", "dog"]);
        assert_eq!((s.train.rows(), s.train.cols()), (4, 5));
        assert_eq!(
            values_by_label(&s.train),
            [vec![90], vec![50, 51, 70], vec![10, 11, 12]]
        );
        assert_eq!(
            values_by_label(&s.test),
            [vec![100, 101], vec![60], vec![20]]
        );
        // Reproducible, and in a seeded order.
        assert_eq!(load_image_folder(d, &opts(None)).unwrap(), s);
    }

    #[test]
    fn colour_and_mixed_formats_are_converted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("a")).unwrap();
        fs::create_dir_all(d.join("b")).unwrap();
        let rgb = ImageBuffer::from_pixel(3, 2, Rgb([10u8, 200, 30]));
        rgb.save(d.join("a/x.bmp")).unwrap();
        rgb.save(d.join("a/y.tif")).unwrap();
        ImageBuffer::from_pixel(3, 2, Luma([65_535u16]))
            .save(d.join("b/x.png"))
            .unwrap();
        GrayImage::from_pixel(3, 2, Luma([5u8]))
            .save(d.join("b/y.pgm"))
            .unwrap();
        let s = load_image_folder(d, &opts(Some(0.5))).unwrap();
        assert_eq!(s.classes, ["a", "b"]);
        assert_eq!((s.train.len(), s.test.len()), (2, 2));
        let mut all = values_by_label(&s.train);
        for (c, v) in values_by_label(&s.test).into_iter().enumerate() {
            all[c].extend(v);
            all[c].sort();
        }
        let g = luma_bt601(10, 200, 30);
        assert_eq!(all, [vec![g, g], vec![5, 255]]);
    }

    #[test]
    fn folders_without_test_split_need_a_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fill(&d.join("one"), 10, (3, 3), 0);
        fill(&d.join("two"), 10, (3, 3), 100);
        let m = message(load_image_folder(d, &opts(None)));
        assert!(
            m.contains("--test-fraction") && m.contains("no test split"),
            "{m}"
        );
        let m = message(load_image_folder(d, &opts(Some(1.5))));
        assert!(m.contains("between 0 and 1"), "{m}");
        let s = load_image_folder(d, &opts(Some(0.3))).unwrap();
        assert_eq!(s.classes, ["one", "two"]);
        assert_eq!((s.train.len(), s.test.len()), (14, 6));
        assert_eq!(s.test.class_counts(), [3, 3]);
        // The splits are disjoint and cover every image.
        let mut all = values_by_label(&s.train);
        for (c, v) in values_by_label(&s.test).into_iter().enumerate() {
            all[c].extend(v);
            all[c].sort();
        }
        assert_eq!(all[0], (0..10).collect::<Vec<u8>>());
        assert_eq!(all[1], (100..110).collect::<Vec<u8>>());
        // Seeded: another seed draws another test split.
        let other = load_image_folder(
            d,
            &LoadOptions {
                seed: 8,
                ..opts(Some(0.3))
            },
        )
        .unwrap();
        assert_ne!(values_by_label(&other.test), values_by_label(&s.test));
        // train/ without test/ is split the same way.
        let dir2 = tempfile::tempdir().unwrap();
        fill(&dir2.path().join("train/one"), 4, (3, 3), 0);
        fill(&dir2.path().join("train/two"), 4, (3, 3), 9);
        let s = load_image_folder(dir2.path(), &opts(Some(0.25))).unwrap();
        assert_eq!(s.classes, ["one", "two"]);
        assert_eq!((s.train.len(), s.test.len()), (6, 2));
    }

    #[test]
    fn image_size_resizes_mixed_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fill(&d.join("train/a"), 1, (4, 4), 30);
        fill(&d.join("train/b"), 1, (6, 2), 40);
        fill(&d.join("test/a"), 1, (5, 5), 50);
        fill(&d.join("test/b"), 1, (4, 4), 60);
        let m = message(load_image_folder(d, &opts(None)));
        assert!(
            m.contains("train/a/img000.png is 4x4")
                && m.contains("train/b/img000.png is 6x2")
                && m.contains("--image-size"),
            "{m}"
        );
        let sized = LoadOptions {
            image_size: Some((3, 7)),
            ..opts(None)
        };
        let s = load_image_folder(d, &sized).unwrap();
        assert_eq!((s.train.rows(), s.train.cols()), (3, 7));
        assert_eq!(values_by_label(&s.train), [vec![30], vec![40]]);
        assert_eq!(s.test.image_len(), 21);
    }

    #[test]
    fn bad_folders_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Missing folder.
        let m = message(load_image_folder(&d.join("nope"), &opts(None)));
        assert!(m.contains("nope") && m.contains("does not exist"), "{m}");
        // No class folders.
        fs::write(d.join("loose.png"), "x").unwrap();
        let m = message(load_image_folder(d, &opts(Some(0.2))));
        assert!(m.contains("no class folders"), "{m}");
        // Train/test class mismatch.
        fill(&d.join("train/cat"), 1, (2, 2), 1);
        fill(&d.join("train/dog"), 1, (2, 2), 1);
        fill(&d.join("test/cat"), 1, (2, 2), 1);
        fill(&d.join("test/cow"), 1, (2, 2), 1);
        let m = message(load_image_folder(d, &opts(None)));
        assert!(
            m.contains("only in train: dog") && m.contains("only in test: cow"),
            "{m}"
        );
        // Empty class folder.
        fs::rename(d.join("test/cow"), d.join("test/dog")).unwrap();
        fs::create_dir_all(d.join("train/emu")).unwrap();
        fs::create_dir_all(d.join("test/emu")).unwrap();
        fs::write(d.join("train/emu/readme.txt"), "x").unwrap();
        let m = message(load_image_folder(d, &opts(None)));
        assert!(
            m.contains("train/emu") && m.contains("no image files"),
            "{m}"
        );
        // An unreadable image is named (the first in sorted order).
        fill(&d.join("train/emu"), 1, (2, 2), 1);
        fs::write(d.join("test/dog/bad1.png"), "garbage").unwrap();
        fs::write(d.join("test/dog/bad2.png"), "garbage").unwrap();
        fill(&d.join("test/emu"), 1, (2, 2), 1);
        for _ in 0..3 {
            let m = message(load_image_folder(d, &opts(None)));
            assert!(m.contains("test/dog/bad1.png"), "{m}");
        }
        // test/ without train/.
        let dir2 = tempfile::tempdir().unwrap();
        fill(&dir2.path().join("test/a"), 1, (2, 2), 1);
        let m = message(load_image_folder(dir2.path(), &opts(Some(0.5))));
        assert!(m.contains("no train/ folder"), "{m}");
    }

    #[test]
    fn a_tiny_class_can_leave_a_split_empty() {
        let dir = tempfile::tempdir().unwrap();
        fill(&dir.path().join("a"), 1, (2, 2), 1);
        let m = message(load_image_folder(dir.path(), &opts(Some(0.2))));
        assert!(m.contains("test split") && m.contains("empty"), "{m}");
    }
}
