//! The one data pipeline every participant runs: load → shard → augment →
//! encrypt → tensors ([`DataPipeline`]).
//!
//! The participant command, `greyfed simulate`'s participant processes and
//! the in-process federation all prepare their local data through it, so a
//! participant's images are the same whichever way it is started.

use std::path::PathBuf;
use std::sync::Arc;

use greyfed_protocol::cipher::CipherSteps;

use crate::cipher::{ImageCipher, ImageKey};
use crate::data::partition::{Partition, shard};
use crate::data::synthetic::builtin_splits;
use crate::data::{Augmentation, Dataset, DatasetSplits, LoadOptions, load_data};
use crate::driver::LocalData;
use crate::error::{ParticipantError, Result};
use crate::layer_mask::KeyLayerMask;

/// Where a participant's labelled images come from. greyfed reads image
/// folders, CSV manifests, `.npz` files and IDX directories ([`DataPath`])
/// and has built-in digits ([`BuiltinDigits`]); implement this trait to
/// feed it from anywhere else (a database, a DICOM archive, images made on
/// the fly). The pipeline shards, augments and encrypts what it returns.
pub trait DataSource: Send + Sync + std::fmt::Debug {
    /// Both splits (grey-scale 8-bit images of one size) with the class
    /// names in label order.
    ///
    /// # Errors
    /// Why the data cannot be read, naming the file or record at fault.
    fn load(&self) -> Result<DatasetSplits>;

    /// A short description for logs and run records (a path, `builtin:SEED`).
    fn describe(&self) -> String;
}

/// The built-in synthetic digits (28x28, 10 classes), drawn from `seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltinDigits {
    /// Seed of the digits.
    pub seed: u64,
}

impl BuiltinDigits {
    /// How data paths and run records name the built-in digits: `builtin`
    /// (then `default_seed`) or `builtin:SEED`, as [`DataSource::describe`]
    /// writes them. `Ok(None)` for any other text (a dataset path).
    ///
    /// # Errors
    /// `builtin:` followed by something other than a whole number.
    pub fn parse(text: &str, default_seed: u64) -> Result<Option<BuiltinDigits>> {
        let seed = match text.strip_prefix("builtin") {
            Some("") => default_seed,
            Some(rest) => match rest.strip_prefix(':') {
                Some(seed) => seed.parse().map_err(|_| {
                    ParticipantError::Dataset(format!(
                        "{text}: the seed of the built-in digits must be a whole number"
                    ))
                })?,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        Ok(Some(BuiltinDigits { seed }))
    }
}

impl DataSource for BuiltinDigits {
    fn load(&self) -> Result<DatasetSplits> {
        Ok(builtin_splits(self.seed))
    }

    fn describe(&self) -> String {
        format!("builtin:{}", self.seed)
    }
}

/// A dataset on disk in any format [`load_data`] reads (image folder, CSV
/// manifest, `.npz`, IDX directory), with its loading options.
#[derive(Clone, Debug, PartialEq)]
pub struct DataPath {
    /// File or directory.
    pub path: PathBuf,
    /// Resizing, the held-out test fraction and its seed.
    pub options: LoadOptions,
}

impl DataSource for DataPath {
    fn load(&self) -> Result<DatasetSplits> {
        load_data(&self.path, &self.options)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// The image key with the cipher mode and block size to apply it with.
/// The cipher itself depends on the image size, which comes from the data.
#[derive(Clone, Debug)]
pub struct Encryption {
    /// The shared image key.
    pub key: ImageKey,
    /// Cipher steps (mode).
    pub steps: CipherSteps,
    /// Block edge in pixels.
    pub block_size: usize,
}

impl Encryption {
    /// The cipher for `rows x cols` images.
    ///
    /// # Errors
    /// A block size that does not divide the image size, or invalid steps.
    pub fn cipher_for(&self, rows: usize, cols: usize) -> Result<ImageCipher> {
        ImageCipher::new(&self.key, self.steps, self.block_size, rows, cols)
    }
}

/// How a participant's local data is prepared from a data source.
#[derive(Clone, Debug)]
pub struct DataPipeline {
    /// Where the images come from.
    pub source: Arc<dyn DataSource>,
    /// How the training split is divided among participants (the test split
    /// is always divided IID, so that the participants' evaluations cover it
    /// exactly once).
    pub partition: Partition,
    /// Seed of the partition: equal for all participants, so that their
    /// shards are disjoint.
    pub shard_seed: u64,
    /// Keep at most this many training samples per participant (before
    /// augmentation); `None`: all.
    pub max_train_samples: Option<usize>,
    /// Data augmentation of the training shard, on plain images: shifted
    /// copies added once, random affine distortions drawn in every epoch.
    pub augmentation: Augmentation,
    /// Seed of the shifted copies (each participant draws its own copies
    /// from it and its index; the per-epoch distortions are drawn from the
    /// training seed).
    pub augmentation_seed: u64,
}

impl DataPipeline {
    /// A pipeline over `source` with an IID partition seeded by `seed`, no
    /// limit and no augmentation.
    pub fn new(source: Arc<dyn DataSource>, seed: u64) -> Self {
        Self {
            source,
            partition: Partition::Iid,
            shard_seed: seed,
            max_train_samples: None,
            augmentation: Augmentation::default(),
            augmentation_seed: seed,
        }
    }

    /// Participant `index` of `parts`: its training shard (limited, then
    /// augmented) and its test shard, both plain.
    ///
    /// # Errors
    /// An index out of range or a partition that leaves a shard empty.
    pub fn shard(
        &self,
        splits: &DatasetSplits,
        index: usize,
        parts: usize,
    ) -> Result<(Dataset, Dataset)> {
        let mut train = shard(&splits.train, index, parts, self.partition, self.shard_seed)?;
        let test = shard(
            &splits.test,
            index,
            parts,
            Partition::Iid,
            self.shard_seed ^ 0x7e57,
        )?;
        if let Some(max) = self.max_train_samples {
            train = train.subset(&(0..train.len().min(max)).collect::<Vec<_>>());
        }
        let train = self
            .augmentation
            .shifted_copies
            .apply(train, self.augmentation_seed, index);
        Ok((train, test))
    }

    /// Participant `index` of `parts`, ready to train: its shards encrypted
    /// with `encryption` (plain when `None`) and converted to tensors.
    ///
    /// # Errors
    /// Those of [`DataPipeline::shard`], and a cipher that does not fit the
    /// image size.
    pub fn local_data(
        &self,
        splits: &DatasetSplits,
        index: usize,
        parts: usize,
        encryption: Option<&Encryption>,
    ) -> Result<LocalData> {
        let (train, test) = self.shard(splits, index, parts)?;
        let cipher = encryption
            .map(|e| e.cipher_for(train.rows(), train.cols()))
            .transpose()?;
        let data = LocalData::prepare_augmented(
            &train,
            &test,
            &splits.classes,
            cipher,
            self.augmentation.random_affine,
        )?;
        Ok(match encryption {
            Some(e) => data.with_layer_mask(KeyLayerMask::new(&e.key)),
            None => data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_digits_are_named_as_they_describe_themselves() {
        let parse = |t| BuiltinDigits::parse(t, 7).map(|b| b.map(|b| b.seed));
        assert_eq!(parse("builtin").unwrap(), Some(7));
        assert_eq!(parse("builtin:3").unwrap(), Some(3));
        let described = BuiltinDigits { seed: 9 }.describe();
        assert_eq!(parse(&described).unwrap(), Some(9));
        assert_eq!(parse("builtins/data").unwrap(), None);
        assert_eq!(parse("/data/mnist").unwrap(), None);
        assert!(
            parse("builtin:x")
                .unwrap_err()
                .to_string()
                .contains("whole number")
        );
    }

    #[test]
    fn shards_are_disjoint_limited_augmented_and_encrypted_with_the_data_size() {
        let mut pipeline = DataPipeline::new(Arc::new(BuiltinDigits { seed: 3 }), 5);
        let splits = pipeline.source.load().unwrap();
        assert_eq!(splits.classes.len(), 10);
        let (a, test_a) = pipeline.shard(&splits, 0, 2).unwrap();
        let (b, test_b) = pipeline.shard(&splits, 1, 2).unwrap();
        assert_eq!(a.len() + b.len(), splits.train.len());
        assert_eq!(test_a.len() + test_b.len(), splits.test.len());
        pipeline.max_train_samples = Some(7);
        pipeline.augmentation.shifted_copies = crate::data::ShiftedCopies {
            copies: 2,
            max_shift: 1,
            pixel_noise: 0,
        };
        let (small, _) = pipeline.shard(&splits, 0, 2).unwrap();
        assert_eq!(small.len(), 21, "7 originals and 2 copies of each");
        assert_eq!(&small.pixels()[..7 * 784], &a.pixels()[..7 * 784]);

        let encryption = Encryption {
            key: ImageKey::generate(),
            steps: CipherSteps::block(),
            block_size: 4,
        };
        let data = pipeline
            .local_data(&splits, 1, 2, Some(&encryption))
            .unwrap();
        assert_eq!(data.train_len(), 21);
        assert_eq!(data.test_len(), test_b.len());
        assert_eq!(data.classes(), splits.classes.as_slice());
        let bad = Encryption {
            block_size: 5,
            ..encryption
        };
        let err = pipeline
            .local_data(&splits, 1, 2, Some(&bad))
            .err()
            .expect("block 5 does not divide 28")
            .to_string();
        assert!(err.contains('5') && err.contains("28"), "{err}");
    }
}
