//! Datasets of labelled grey-scale images: the [`Dataset`] type, the readers
//! of users' own images, the built-in synthetic digits ([`synthetic`]) and
//! partitioning among participants ([`partition`]).
//!
//! [`load_data`] reads a path in any supported format, picked by
//! [`DataFormat::detect`]:
//!
//! - **IDX** ([`idx`]): a directory of MNIST-style files
//!   (`train-images-idx3-ubyte[.gz]` and friends).
//! - **Image folders** ([`folder`]): `DIR/train/<class>/*` and
//!   `DIR/test/<class>/*` (torchvision's `ImageFolder` layout), or
//!   `DIR/<class>/*` split by a test fraction. PNG, JPEG, BMP, TIFF and PNM
//!   files are decoded under memory limits and turned grey (ITU-R BT.601),
//!   see [`decode`].
//! - **CSV manifests** ([`manifest`]): a `.csv` file with `path` and `label`
//!   columns (and optionally `split`).
//! - **MedMNIST-style `.npz` files** ([`npz`]): `train_images`,
//!   `train_labels`, `test_images` and `test_labels` arrays.
//!
//! Every loader returns [`DatasetSplits`] with the class names in label
//! order; [`LoadOptions`] sets the image size, the test fraction and the seed.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::{ParticipantError, Result};

pub mod augment;
pub mod decode;
pub mod folder;
pub mod idx;
pub mod manifest;
pub mod npz;
pub mod partition;
pub mod source;
pub mod synthetic;

pub use augment::{Augmentation, RandomAffine, ShiftedCopies};
pub use source::{DataFormat, LoadOptions, load_data, parse_image_size};

/// Labelled 8-bit images of one size, stored contiguously: image `i` is
/// `pixels[i * n..(i + 1) * n]` with `n = channels * rows * cols`, plane
/// after plane, each row-major. Plain grey-scale images have one plane;
/// split-mode cipher images have two (see `cipher::split_pixels`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    rows: usize,
    cols: usize,
    channels: usize,
    num_classes: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl Dataset {
    /// Builds a grey-scale dataset (one plane), checking that `pixels` holds
    /// exactly one image per label and that every label is below
    /// `num_classes`.
    pub fn new(
        rows: usize,
        cols: usize,
        num_classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u8>,
    ) -> Result<Self> {
        Dataset::with_layout(rows, cols, 1, num_classes, pixels, labels)
    }

    /// Builds a dataset of `channels`-plane images (checked like [`Dataset::new`]).
    pub fn with_layout(
        rows: usize,
        cols: usize,
        channels: usize,
        num_classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u8>,
    ) -> Result<Self> {
        if channels == 0 {
            return Err(ParticipantError::Dataset("images have no planes".into()));
        }
        if rows == 0 || cols == 0 {
            return Err(ParticipantError::Dataset(format!(
                "image size {rows}x{cols} is empty"
            )));
        }
        if num_classes == 0 || num_classes > 256 {
            return Err(ParticipantError::Dataset(format!(
                "number of classes {num_classes} must be in 1..=256"
            )));
        }
        let image_len = channels * rows * cols;
        if labels.len().checked_mul(image_len) != Some(pixels.len()) {
            return Err(ParticipantError::Dataset(format!(
                "{} labels need {} values of {channels} x {rows}x{cols} images, got {}",
                labels.len(),
                labels.len().saturating_mul(image_len),
                pixels.len()
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l as usize >= num_classes)
        {
            return Err(ParticipantError::Dataset(format!(
                "label {l} of sample {i} is not below the number of classes {num_classes}"
            )));
        }
        Ok(Self {
            rows,
            cols,
            channels,
            num_classes,
            pixels,
            labels,
        })
    }

    /// Image height.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Image width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Image planes (1 for grey-scale pixels, 2 for split cipher images).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Values per image (`channels * rows * cols`).
    pub fn image_len(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// Number of classes labels are drawn from.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All pixels, image after image.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Pixels of image `i`. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Label of sample `i`. Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// The samples at `indices`, in that order. Panics on an index out of range.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.image_len();
        let mut pixels = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        self.with_samples(pixels, labels)
    }

    /// Other samples of this dataset's layout (image size, planes, classes);
    /// the caller keeps `pixels` and `labels` consistent with it.
    fn with_samples(&self, pixels: Vec<u8>, labels: Vec<u8>) -> Dataset {
        Dataset {
            rows: self.rows,
            cols: self.cols,
            channels: self.channels,
            num_classes: self.num_classes,
            pixels,
            labels,
        }
    }

    /// A dataset with the same labels and image size and new pixels (for
    /// example, the encrypted images).
    pub fn with_pixels(&self, pixels: Vec<u8>) -> Result<Dataset> {
        self.with_planes(self.channels, pixels)
    }

    /// A dataset with the same labels and image size and new images of
    /// `channels` planes (for example, split cipher images).
    pub fn with_planes(&self, channels: usize, pixels: Vec<u8>) -> Result<Dataset> {
        Dataset::with_layout(
            self.rows,
            self.cols,
            channels,
            self.num_classes,
            pixels,
            self.labels.clone(),
        )
    }

    /// The samples followed by `copies` translated copies of each (data
    /// augmentation, applied to plain images before encryption).
    ///
    /// Copy `k` of image `i` is image `i` moved by `(dy, dx)`, each drawn
    /// uniformly from `-max_shift..=max_shift`, the same in every plane;
    /// pixels moved in from outside the image are 0. Copies are ordered
    /// copy after copy (all first copies, then all second copies) and are
    /// reproducible from `seed`.
    pub fn with_shifted_copies(&self, copies: usize, max_shift: usize, seed: u64) -> Dataset {
        let (rows, cols) = (self.rows as i64, self.cols as i64);
        let n = self.image_len();
        let mut pixels = Vec::with_capacity(n * self.len() * (copies + 1));
        pixels.extend_from_slice(&self.pixels);
        let mut labels = Vec::with_capacity(self.len() * (copies + 1));
        labels.extend_from_slice(&self.labels);
        let mut rng = StdRng::seed_from_u64(seed);
        let max = max_shift.min(self.rows.max(self.cols)) as i64;
        for _ in 0..copies {
            for i in 0..self.len() {
                let dy = rng.random_range(-max..=max);
                let dx = rng.random_range(-max..=max);
                // Destination rows and columns whose source is in the image.
                let (r0, r1) = (dy.max(0), rows.min(rows + dy));
                let (c0, c1) = (dx.max(0), cols.min(cols + dx));
                let start = pixels.len();
                pixels.resize(start + n, 0);
                let out = &mut pixels[start..];
                let plane = self.rows * self.cols;
                for (src, dst) in self.image(i).chunks(plane).zip(out.chunks_mut(plane)) {
                    // An image moved entirely out of view stays all zero.
                    for r in (r0..r1).filter(|_| c0 < c1) {
                        let to = (r * cols) as usize;
                        let from = ((r - dy) * cols) as usize;
                        dst[to + c0 as usize..to + c1 as usize].copy_from_slice(
                            &src[from + (c0 - dx) as usize..from + (c1 - dx) as usize],
                        );
                    }
                }
                labels.push(self.labels[i]);
            }
        }
        self.with_samples(pixels, labels)
    }

    /// The samples, with uniform integer noise in `-noise..=noise` added to
    /// every pixel of samples `from..` and clamped to `0..=255` (data
    /// augmentation for the shifted copies, see [`ShiftedCopies`]); earlier
    /// samples are unchanged. Reproducible from `seed`.
    pub fn with_pixel_noise(mut self, from: usize, noise: u8, seed: u64) -> Dataset {
        if noise > 0 {
            let noise = i16::from(noise);
            let mut rng = StdRng::seed_from_u64(seed);
            let start = (from * self.image_len()).min(self.pixels.len());
            for p in &mut self.pixels[start..] {
                *p = (i16::from(*p) + rng.random_range(-noise..=noise)).clamp(0, 255) as u8;
            }
        }
        self
    }

    /// Number of samples of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// A training split and a test split of the same kind of images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetSplits {
    /// Training samples.
    pub train: Dataset,
    /// Held-out test samples.
    pub test: Dataset,
    /// Class names in label order: label `i` is `classes[i]`. There are as
    /// many names as classes in both splits (`"0"`, `"1"`, ... for data
    /// labelled by numbers, such as IDX files and the built-in digits).
    pub classes: Vec<String>,
}

impl DatasetSplits {
    /// Pairs two splits, checking that both have `classes.len()` classes and
    /// the same image layout (size and planes).
    pub fn new(train: Dataset, test: Dataset, classes: Vec<String>) -> Result<Self> {
        let layout = |d: &Dataset| (d.rows(), d.cols(), d.channels());
        if layout(&train) != layout(&test) {
            return Err(ParticipantError::Dataset(format!(
                "train images are {}x{} ({} planes) but test images are {}x{} ({} planes)",
                train.rows(),
                train.cols(),
                train.channels(),
                test.rows(),
                test.cols(),
                test.channels()
            )));
        }
        if train.num_classes() != classes.len() || test.num_classes() != classes.len() {
            return Err(ParticipantError::Dataset(format!(
                "{} class names for {} train and {} test classes",
                classes.len(),
                train.num_classes(),
                test.num_classes()
            )));
        }
        Ok(Self {
            train,
            test,
            classes,
        })
    }
}

/// Class names for classes labelled by number: `"0"`, `"1"`, ...,
/// `num_classes - 1` as decimal strings.
pub fn numbered_classes(num_classes: usize) -> Vec<String> {
    (0..num_classes).map(|c| c.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two-plane 5x6 images with distinct, non-zero pixels.
    fn images() -> Dataset {
        let (rows, cols, planes, n) = (5, 6, 2, 7);
        let pixels = (0..n * planes * rows * cols)
            .map(|v| (v % 251 + 1) as u8)
            .collect();
        let labels = (0..n).map(|i| (i % 3) as u8).collect();
        Dataset::with_layout(rows, cols, planes, 3, pixels, labels).unwrap()
    }

    /// `image` moved by `(dy, dx)`, zero-filled (an independent reference).
    fn shifted(d: &Dataset, image: &[u8], dy: i64, dx: i64) -> Vec<u8> {
        let (rows, cols) = (d.rows() as i64, d.cols() as i64);
        let mut out = vec![0; image.len()];
        for ch in 0..d.channels() as i64 {
            for r in 0..rows {
                for c in 0..cols {
                    let (sr, sc) = (r - dy, c - dx);
                    if (0..rows).contains(&sr) && (0..cols).contains(&sc) {
                        out[(ch * rows * cols + r * cols + c) as usize] =
                            image[(ch * rows * cols + sr * cols + sc) as usize];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn shifted_copies_are_translations_within_the_bound() {
        let d = images();
        let max = 2;
        let aug = d.with_shifted_copies(3, max, 11);
        assert_eq!(aug.len(), 4 * d.len());
        assert_eq!(&aug.pixels()[..d.pixels().len()], d.pixels());
        let mut moved = 0;
        for k in 1..4 {
            for i in 0..d.len() {
                let j = k * d.len() + i;
                assert_eq!(aug.label(j), d.label(i));
                let copy = aug.image(j);
                let shifts: Vec<(i64, i64)> = (-(max as i64)..=max as i64)
                    .flat_map(|dy| (-(max as i64)..=max as i64).map(move |dx| (dy, dx)))
                    .filter(|&(dy, dx)| shifted(&d, d.image(i), dy, dx) == copy)
                    .collect();
                assert_eq!(shifts.len(), 1, "copy {k} of image {i} is no single shift");
                moved += usize::from(shifts[0] != (0, 0));
            }
        }
        assert!(moved > 3 * d.len() / 2, "only {moved} copies moved");
    }

    #[test]
    fn shifted_copies_are_reproducible_and_seeded() {
        let d = images();
        assert_eq!(
            d.with_shifted_copies(2, 2, 5),
            d.with_shifted_copies(2, 2, 5)
        );
        assert_ne!(
            d.with_shifted_copies(2, 2, 5),
            d.with_shifted_copies(2, 2, 6)
        );
        assert_eq!(d.with_shifted_copies(0, 2, 5), d);
        let still = d.with_shifted_copies(2, 0, 5);
        assert_eq!(
            still.pixels(),
            [d.pixels(), d.pixels(), d.pixels()].concat()
        );
    }

    #[test]
    fn participants_draw_different_copies() {
        let d = images();
        let aug = ShiftedCopies {
            copies: 2,
            max_shift: 2,
            pixel_noise: 0,
        };
        assert_eq!(aug.apply(d.clone(), 0, 1), aug.apply(d.clone(), 0, 1));
        assert_ne!(aug.apply(d.clone(), 0, 1), aug.apply(d.clone(), 0, 2));
        assert_eq!(ShiftedCopies::default().apply(d.clone(), 0, 1), d);
    }

    #[test]
    fn pixel_noise_is_bounded_clamped_and_only_on_the_copies() {
        let d = images();
        let plain = ShiftedCopies {
            copies: 3,
            max_shift: 1,
            pixel_noise: 0,
        };
        let noisy = ShiftedCopies {
            pixel_noise: 8,
            ..plain
        };
        let (a, b) = (plain.apply(d.clone(), 4, 2), noisy.apply(d.clone(), 4, 2));
        assert_eq!(a.labels(), b.labels());
        let originals = d.len() * d.image_len();
        // The originals are untouched; the copies keep their translations.
        assert_eq!(a.pixels()[..originals], b.pixels()[..originals]);
        let mut changed = 0;
        for (&x, &y) in a.pixels()[originals..].iter().zip(&b.pixels()[originals..]) {
            let (x, y) = (i16::from(x), i16::from(y));
            assert!((x - y).abs() <= 8, "{x} -> {y}");
            changed += usize::from(x != y);
        }
        // 16 of 17 draws are non-zero; clamping at 0 keeps some zeros.
        let copies = a.pixels().len() - originals;
        assert!(changed * 10 > copies * 7, "{changed} of {copies} changed");
        assert_eq!(noisy.apply(d.clone(), 4, 2), b, "reproducible");
        assert_ne!(noisy.apply(d.clone(), 4, 3), b, "per participant");
        // Clamped at both ends: no wrap-around, and the bounds are reached.
        let pixels: Vec<u8> = (0..1000)
            .map(|i| if i % 2 == 0 { 255 } else { 0 })
            .collect();
        let bright = Dataset::with_layout(1, 1000, 1, 1, pixels, vec![0]).unwrap();
        let out = bright.clone().with_pixel_noise(0, 200, 1);
        for (&before, &after) in bright.pixels().iter().zip(out.pixels()) {
            let ok = if before == 255 {
                after >= 55
            } else {
                after <= 200
            };
            assert!(ok, "{before} -> {after}");
        }
        assert!(
            out.pixels()
                .iter()
                .step_by(2)
                .filter(|&&p| p == 255)
                .count()
                > 100
        );
        assert!(
            out.pixels()
                .iter()
                .skip(1)
                .step_by(2)
                .filter(|&&p| p == 0)
                .count()
                > 100
        );
        assert_eq!(
            bright.clone().with_pixel_noise(1, 200, 1),
            bright,
            "from past the end"
        );
        assert_eq!(bright.clone().with_pixel_noise(0, 0, 1), bright, "no noise");
    }
}
