//! Datasets of labelled grey-scale images: the [`Dataset`] type, the IDX
//! reader ([`idx`]), the built-in synthetic digits ([`synthetic`]) and
//! partitioning among participants ([`partition`]).

use crate::error::{ParticipantError, Result};

pub mod idx;
pub mod partition;
pub mod synthetic;

/// Labelled 8-bit grey-scale images of one size, stored contiguously
/// (image `i` is `pixels[i * rows * cols..(i + 1) * rows * cols]`, row-major).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    rows: usize,
    cols: usize,
    num_classes: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl Dataset {
    /// Builds a dataset, checking that `pixels` holds exactly one image per
    /// label and that every label is below `num_classes`.
    pub fn new(
        rows: usize,
        cols: usize,
        num_classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u8>,
    ) -> Result<Self> {
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
        if pixels.len() != labels.len() * rows * cols {
            return Err(ParticipantError::Dataset(format!(
                "{} labels need {} pixels of {rows}x{cols} images, got {}",
                labels.len(),
                labels.len() * rows * cols,
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

    /// Pixels per image (`rows * cols`).
    pub fn image_len(&self) -> usize {
        self.rows * self.cols
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
            num_classes: self.num_classes,
            pixels,
            labels,
        }
    }

    /// A dataset with the same labels and image size and new pixels (for
    /// example, the encrypted images).
    pub fn with_pixels(&self, pixels: Vec<u8>) -> Result<Dataset> {
        Dataset::new(
            self.rows,
            self.cols,
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
