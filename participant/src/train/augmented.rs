//! Training images distorted afresh in every epoch, then encrypted.

use std::borrow::Cow;

use candle_core::Device;

use super::{EpochImages, TensorData, epoch_seed};
use crate::cipher::ImageCipher;
use crate::data::{Dataset, RandomAffine};
use crate::error::Result;

/// Separates the augmentation draws from the shuffling drawn from the same
/// epoch seed.
const AUGMENT_STREAM: u64 = 0x6166_6669_6e65;

/// A participant's plain training images, distorted by a [`RandomAffine`]
/// drawn afresh for every image in every epoch, then encrypted with the
/// image cipher (when there is one) and converted to tensors.
///
/// The distortion happens on plain images, which the participant holds
/// anyway; the model only ever sees the encrypted result. Preparing an epoch
/// costs one warp and one encryption per image, small beside a training
/// pass.
pub struct AugmentedImages {
    plain: Dataset,
    affine: RandomAffine,
    cipher: Option<ImageCipher>,
    device: Device,
}

impl AugmentedImages {
    /// `plain` distorted by `affine` and encrypted with `cipher` (`None`:
    /// trained on plain images), on `device`.
    ///
    /// # Errors
    /// Parameters out of range ([`RandomAffine::validate`]) or a cipher that
    /// does not fit the images.
    pub fn new(
        plain: Dataset,
        affine: RandomAffine,
        cipher: Option<ImageCipher>,
        device: Device,
    ) -> Result<Self> {
        affine.validate()?;
        if let Some(c) = &cipher {
            // Fails now, with the cipher's message, rather than in a round.
            c.encrypt_dataset(&plain.subset(&[]))?;
        }
        Ok(Self {
            plain,
            affine,
            cipher,
            device,
        })
    }
}

/// The training images of `plain`, distorted by `affine` in every epoch and
/// encrypted with `cipher`: [`AugmentedImages`], or, for the identity
/// `affine`, the encrypted tensors prepared once.
///
/// # Errors
/// Those of [`AugmentedImages::new`] and of encryption.
pub fn epoch_images(
    plain: Dataset,
    affine: RandomAffine,
    cipher: Option<ImageCipher>,
    device: Device,
) -> Result<Box<dyn EpochImages>> {
    if !affine.is_identity() {
        return Ok(Box::new(AugmentedImages::new(
            plain, affine, cipher, device,
        )?));
    }
    let images = match &cipher {
        Some(c) => c.encrypt_dataset(&plain)?,
        None => plain,
    };
    Ok(Box::new(TensorData::from_dataset(&images, &device)?))
}

impl EpochImages for AugmentedImages {
    fn len(&self) -> usize {
        self.plain.len()
    }

    fn epoch(&self, seed: u64, epoch: u32) -> Result<Cow<'_, TensorData>> {
        let distorted = self
            .affine
            .apply(&self.plain, epoch_seed(seed, epoch) ^ AUGMENT_STREAM);
        let images = match &self.cipher {
            Some(c) => c.encrypt_dataset(&distorted)?,
            None => distorted,
        };
        Ok(Cow::Owned(TensorData::from_dataset(&images, &self.device)?))
    }
}

impl std::fmt::Debug for AugmentedImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AugmentedImages")
            .field("samples", &self.plain.len())
            .field("affine", &self.affine)
            .field("encrypted", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::ImageKey;
    use crate::data::synthetic::synthetic_digits;
    use greyfed_protocol::cipher::CipherSteps;

    #[test]
    fn every_epoch_draws_new_distortions_of_the_same_encrypted_samples() {
        let plain = synthetic_digits(40, 3);
        let key = ImageKey::generate();
        let cipher = || ImageCipher::new(&key, CipherSteps::block(), 4, 28, 28).unwrap();
        let affine = RandomAffine {
            max_rotation: 10.0,
            max_shift: 2.0,
            ..RandomAffine::default()
        };
        let images =
            AugmentedImages::new(plain.clone(), affine, Some(cipher()), Device::Cpu).unwrap();
        assert_eq!(EpochImages::len(&images), 40);
        let e0 = images.epoch(7, 0).unwrap().into_owned();
        let e1 = images.epoch(7, 1).unwrap().into_owned();
        let again = images.epoch(7, 0).unwrap().into_owned();
        let values = |t: &TensorData| t.images().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&e0), values(&again), "reproducible from the seed");
        assert_ne!(values(&e0), values(&e1), "a new draw per epoch");
        assert_eq!(
            e0.labels().to_vec1::<u32>().unwrap(),
            plain
                .labels()
                .iter()
                .map(|&l| u32::from(l))
                .collect::<Vec<_>>()
        );
        // The epoch's images are the cipher of the distorted plain images.
        let distorted = affine.apply(&plain, epoch_seed(7, 0) ^ AUGMENT_STREAM);
        let expected =
            TensorData::from_dataset(&cipher().encrypt_dataset(&distorted).unwrap(), &Device::Cpu)
                .unwrap();
        assert_eq!(values(&e0), values(&expected));
    }

    #[test]
    fn a_cipher_that_does_not_fit_is_refused_at_once() {
        let plain = synthetic_digits(4, 3);
        let cipher =
            ImageCipher::new(&ImageKey::generate(), CipherSteps::block(), 4, 32, 32).unwrap();
        let err = AugmentedImages::new(plain, RandomAffine::default(), Some(cipher), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("32") || err.contains("28"), "{err}");
    }
}
