//! A participant's local data, prepared once for a session: encrypted,
//! converted to tensors, and the global model as this participant trains
//! and evaluates it.

use candle_core::Device;
use greyfed_protocol::{ModelSpec, ModelWeights, cipher::CipherSpec};

use crate::{
    cipher::ImageCipher,
    data::{Dataset, RandomAffine},
    error::{ParticipantError, Result},
    layer_mask::KeyLayerMask,
    train::{EpochImages, TensorData, epoch_images},
};

/// A participant's local data, encrypted (unless plain) and converted to
/// tensors: once, or for the training images afresh in every epoch when
/// they are augmented online ([`LocalData::prepare_augmented`]).
pub struct LocalData {
    pub(super) train: Box<dyn EpochImages>,
    pub(super) test: TensorData,
    pub(super) image_size: (u32, u32),
    pub(super) classes: Vec<String>,
    pub(super) cipher: Option<CipherSpec>,
    pub(super) layer_mask: Option<KeyLayerMask>,
}

impl LocalData {
    /// Encrypts `train` and `test` with `cipher` (or keeps them plain when
    /// `None`) and converts them to tensors. `classes` names the labels in
    /// order; there must be one name per class of the datasets.
    pub fn prepare(
        train: &Dataset,
        test: &Dataset,
        classes: &[String],
        cipher: Option<ImageCipher>,
    ) -> Result<Self> {
        Self::prepare_augmented(train, test, classes, cipher, RandomAffine::default())
    }

    /// Like [`LocalData::prepare`], but every training image is distorted
    /// by `affine` afresh in every epoch (on the plain image, before
    /// encryption; see [`AugmentedImages`](crate::train::AugmentedImages)). The test images are not
    /// distorted. With the identity `affine` (what [`LocalData::prepare`]
    /// passes) the training images are encrypted and converted once.
    pub fn prepare_augmented(
        train: &Dataset,
        test: &Dataset,
        classes: &[String],
        cipher: Option<ImageCipher>,
        affine: RandomAffine,
    ) -> Result<Self> {
        check_splits(train, test, classes)?;
        let device = Device::Cpu;
        let test = match &cipher {
            Some(c) => c.encrypt_dataset(test)?,
            None => test.clone(),
        };
        let spec = cipher.as_ref().map(ImageCipher::spec);
        Ok(Self {
            image_size: (train.rows() as u32, train.cols() as u32),
            train: epoch_images(train.clone(), affine, cipher, device.clone())?,
            test: TensorData::from_dataset(&test, &device)?,
            classes: classes.to_vec(),
            cipher: spec,
            layer_mask: None,
        })
    }

    /// The image key's layer mask, for sessions whose global model is
    /// masked (a masked start; see [`crate::layer_mask`]). Without it such
    /// a session is refused.
    pub fn with_layer_mask(mut self, mask: KeyLayerMask) -> Self {
        self.layer_mask = Some(mask);
        self
    }

    /// `global` as this participant trains and evaluates it: with the layer
    /// mask removed when the session's model is masked.
    fn unmasked(
        &self,
        spec: &ModelSpec,
        masked: bool,
        mut global: ModelWeights,
    ) -> Result<ModelWeights> {
        if !masked {
            return Ok(global);
        }
        let mask = self.layer_mask.as_ref().ok_or_else(|| {
            ParticipantError::Model(
                "the coordinator's model is masked with an image key's layer mask, but this \
                 participant has no image key (plain images)"
                    .into(),
            )
        })?;
        mask.reveal(spec, &mut global)?;
        Ok(global)
    }

    /// `global` as this participant trains and evaluates it in a session
    /// that may seal layers: [`Self::unmasked`], then the sealed layers'
    /// opened values written over them. Also checks that the layers the
    /// coordinator seals are exactly this model's key-bearing tensors.
    pub(super) fn session_model(
        &self,
        spec: &ModelSpec,
        training: &greyfed_protocol::TrainingConfig,
        global: ModelWeights,
        sealed: Option<Vec<f32>>,
    ) -> Result<ModelWeights> {
        let mut global = self.unmasked(spec, training.key_layer_mask, global)?;
        if let Some(layers) = &training.sealed_layers {
            let range = crate::layer_mask::sealed_range(spec, &global, layers)?;
            if let Some(values) = sealed {
                global.set_flat_range(range.start, &values)?;
            }
        } else if sealed.is_some() {
            return Err(ParticipantError::Model(
                "sealed values came in a session that does not seal layers".into(),
            ));
        }
        Ok(global)
    }

    /// Number of training samples (the aggregation weight).
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Number of test samples.
    pub fn test_len(&self) -> usize {
        self.test.len()
    }

    /// Class names in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

/// Checks that two splits name their classes and share an image size.
fn check_splits(train: &Dataset, test: &Dataset, classes: &[String]) -> Result<()> {
    if classes.len() != train.num_classes() || classes.len() != test.num_classes() {
        return Err(ParticipantError::Dataset(format!(
            "{} class names for {} training and {} test classes",
            classes.len(),
            train.num_classes(),
            test.num_classes()
        )));
    }
    if (train.rows(), train.cols()) != (test.rows(), test.cols()) {
        return Err(ParticipantError::Dataset(format!(
            "train images are {}x{} but test images are {}x{}",
            train.rows(),
            train.cols(),
            test.rows(),
            test.cols()
        )));
    }
    Ok(())
}
