//! Datasets of labelled grey-scale images: the [`Dataset`] type, the IDX
//! reader ([`idx`]), the built-in synthetic digits ([`synthetic`]) and
//! partitioning among participants ([`partition`]).

use crate::error::{ParticipantError, Result};

pub mod idx;
pub mod partition;
pub mod synthetic;

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
}
