//! Sealed layers: the key-bearing tensors' values, summed under one-time
//! pads that only holders of the image key can remove.
//!
//! A model trained on encrypted images carries the image key in a few
//! tensors (the grid CNN's patch embedding and token map). The coordinator
//! sees every global model, so it sees those tensors move round after round
//! and can read the key's structure from them (docs/threat-model.md). With
//! sealed layers the coordinator never holds those tensors' values at all:
//!
//! - in a round's update sum, each participant `i` puts its *trained values*
//!   `v_i` of the sealed range (not an update) into its encoded input, with
//!   their own clipping bound ([`SealedLayers::clip`]), and adds a pad
//!   `P_i`: uniform ring words from the keystream of a seed derived (HKDF-
//!   SHA256) from the image key's [`SealKey`], the session, the round, the
//!   round's model digest and `i`. Secure aggregation then masks the input
//!   as usual;
//! - the coordinator unmasks the sum, decodes the other coordinates and
//!   keeps the sealed coordinates' raw ring sum `Σ w_i q_i + Σ P_i` as a
//!   [`SealedSum`]. The sum of independent uniform pads is uniform whatever
//!   the number of contributors, so that sum is a one-time pad of the
//!   values' weighted sum: the coordinator learns nothing about them;
//! - the coordinator forwards the sealed sum with the next global model;
//!   every key holder subtracts the contributors' pads and decodes the
//!   weighted mean `Σ w_i v_i / Σ w_i` ([`SealedSum::open`]): FedAvg of the
//!   values, whatever server strategy moves the other layers.
//!
//! The coordinator's own model keeps the start's (masked) values in the
//! sealed range; its mean update there is 0.

use std::ops::Range;

use hkdf::Hkdf;
use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::encode::{EncodingParams, decode, encode};
use super::prg::{PrgKind, add_mask, sub_mask};
use crate::error::ProtocolError;
use crate::message::ParticipantId;

/// HKDF salt of the pads (domain separation from every other key use).
const SEAL_SALT: &[u8] = b"greyfed/sealed-layers/v1";

/// The range of an update's coordinates that are sealed, and their
/// clipping bound. Announced by the coordinator in the training
/// configuration; participants check it against their own model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SealedLayers {
    /// First sealed coordinate of the flattened update.
    pub start: u64,
    /// Number of sealed coordinates.
    pub len: u64,
    /// Clipping bound of the sealed *values* (they are weights, not
    /// updates, so they get their own bound).
    pub clip: f32,
}

impl SealedLayers {
    /// Default clipping bound of sealed values: the grid CNN's key-bearing
    /// weights stay well below 1 in magnitude (the token map's are 0 or 1
    /// at a key holder's start).
    pub const DEFAULT_CLIP: f32 = 4.0;

    /// The sealed coordinates as indices into an update of `num_params`
    /// values.
    ///
    /// # Errors
    /// An empty range, one past `num_params`, or a clipping bound that is
    /// not finite and positive.
    pub fn range(&self, num_params: usize) -> Result<Range<usize>, ProtocolError> {
        let start = usize::try_from(self.start).unwrap_or(usize::MAX);
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        let end = start.saturating_add(len);
        if len == 0 || end > num_params {
            return Err(ProtocolError::InvalidConfig(format!(
                "sealed layers {start}..{end} do not fit an update of {num_params} values"
            )));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "the sealed layers' clipping bound must be finite and > 0, got {}",
                self.clip
            )));
        }
        Ok(start..end)
    }

    /// The round's encoding with the sealed values' clipping bound, no norm
    /// bound and no noise.
    fn encoding(&self, round: &EncodingParams) -> EncodingParams {
        EncodingParams {
            clip: self.clip,
            max_norm: None,
            noise_variance: 0,
            noise_headroom: 0,
            ..*round
        }
    }
}

/// The secret that seeds the pads: derived from the image key, so every
/// participant of a session holds it and the coordinator does not. Wiped on
/// drop; `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SealKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// The seal key of an image key's secret bytes (HKDF-SHA256, salt
    /// `greyfed/sealed-layers/v1`, info `seal-key`).
    pub fn derive(image_key: &[u8]) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(SEAL_SALT), image_key)
            .expand(b"seal-key", &mut key[..])
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Self(key)
    }

    /// The pad seed of participant `who` in the round `pad` describes.
    fn seed(&self, pad: &PadContext, who: ParticipantId) -> Zeroizing<[u8; 32]> {
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(b"pad");
        info.extend_from_slice(&pad.session_id.to_be_bytes());
        info.extend_from_slice(&pad.round.to_be_bytes());
        info.extend_from_slice(&pad.model_digest);
        info.extend_from_slice(&who.to_be_bytes());
        let mut seed = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(SEAL_SALT), &self.0[..])
            .expand(&info, &mut seed[..])
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        seed
    }
}

/// What a round's pads depend on besides the key and the participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PadContext {
    /// Coordinator session id.
    pub session_id: u64,
    /// Round number.
    pub round: u32,
    /// Digest of the round's global model.
    pub model_digest: [u8; 32],
}

/// Whose pad, for which round, over which coordinates.
pub(crate) struct Sealing<'a> {
    /// The sealed coordinates.
    pub layers: &'a SealedLayers,
    /// The key of the pads.
    pub key: &'a SealKey,
    /// The round.
    pub pad: PadContext,
    /// The participant whose pad it is.
    pub who: ParticipantId,
}

/// A participant's sealed input: `encoded` (the round's encoding of
/// `update`, `d + 1` ring words) with the sealed range replaced by the
/// values encoded under `layers.clip` plus the participant's pad.
///
/// # Errors
/// A range that does not fit `update`, distributed-DP noise in the round
/// (the sealed values are not norm-bounded, so noise calibrated to the
/// updates would not cover them), or anything [`encode`] refuses.
pub(crate) fn encode_sealed(
    params: &EncodingParams,
    sealing: &Sealing<'_>,
    update: &[f32],
    weight: u32,
    rng: &mut impl CryptoRng,
) -> Result<Vec<u32>, ProtocolError> {
    let Sealing {
        layers,
        key,
        pad,
        who,
    } = sealing;
    let range = layers.range(update.len())?;
    if params.noise_variance > 0 {
        return Err(ProtocolError::InvalidConfig(
            "sealed layers cannot be combined with distributed DP noise".into(),
        ));
    }
    // The rest is encoded as usual, with the sealed values out of the norm.
    let mut rest = update.to_vec();
    rest[range.clone()].fill(0.0);
    let mut encoded = encode(params, &rest, weight, rng)?;
    let sealed = encode(
        &layers.encoding(params),
        &update[range.clone()],
        weight,
        rng,
    )?;
    let words = &mut encoded[range];
    words.copy_from_slice(&sealed[..words.len()]);
    add_mask(PrgKind::ChaCha12, &key.seed(pad, *who), words);
    let mask = params.ring_mask();
    words.iter_mut().for_each(|w| *w &= mask);
    Ok(encoded)
}

/// The sealed coordinates of an unmasked round sum, as the coordinator keeps
/// and forwards them: a one-time pad of the contributors' weighted sum of
/// values, which only key holders can [`open`](Self::open).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedSum {
    /// The round whose pads are in the sum.
    pub pad: PadContext,
    /// Which coordinates these are, and their clipping bound.
    pub layers: SealedLayers,
    /// Quantisation bits `b` of the round.
    pub bits: u32,
    /// Ring bits `m` of the round.
    pub ring_bits: u32,
    /// `Σ w_i` over the contributors.
    pub total_weight: u64,
    /// Whose pads are in the sum, ascending.
    pub contributors: Vec<ParticipantId>,
    /// The raw ring sums, `layers.len` of them.
    pub values: Vec<u32>,
}

impl std::fmt::Debug for SealedSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSum")
            .field("round", &self.pad.round)
            .field("layers", &self.layers)
            .field("contributors", &self.contributors.len())
            .field("values", &self.values.len())
            .finish()
    }
}

impl SealedSum {
    /// Cuts the sealed range out of an unmasked round `sum` (`d + 1` words,
    /// the last one the total weight): the returned sealed sum holds it, and
    /// `sum` gets zeros there (which decode to `-clip`; the caller sets the
    /// mean update there to 0).
    ///
    /// # Errors
    /// A range that does not fit `sum`.
    pub(crate) fn split_from(
        params: &EncodingParams,
        layers: SealedLayers,
        pad: PadContext,
        contributors: Vec<ParticipantId>,
        sum: &mut [u32],
    ) -> Result<Self, ProtocolError> {
        let d = sum.len().saturating_sub(1);
        let range = layers.range(d)?;
        let values = sum[range.clone()].to_vec();
        sum[range].fill(0);
        Ok(Self {
            pad,
            layers,
            bits: params.bits,
            ring_bits: params.ring_bits,
            total_weight: u64::from(sum[d] & params.ring_mask()),
            contributors,
            values,
        })
    }

    /// The contributors' weighted mean of the sealed values, opened with
    /// `key`: the pads of every contributor are subtracted and the rest
    /// decoded.
    ///
    /// # Errors
    /// [`ProtocolError::Crypto`] when the sum does not open: a different
    /// image key, or a sum the coordinator altered (the opened words must
    /// lie in the range the contributors' weights allow, which a wrong pad
    /// misses for all but a vanishing fraction of sums);
    /// [`ProtocolError::Malformed`] for inconsistent fields.
    pub fn open(&self, key: &SealKey) -> Result<Vec<f32>, ProtocolError> {
        if self.values.len() as u64 != self.layers.len || self.layers.len == 0 {
            return Err(ProtocolError::Malformed(format!(
                "sealed sum has {} values for {} sealed coordinates",
                self.values.len(),
                self.layers.len
            )));
        }
        let total = u32::try_from(self.total_weight)
            .ok()
            .filter(|&w| w > 0)
            .ok_or_else(|| {
                ProtocolError::Malformed(format!(
                    "sealed sum with total weight {}",
                    self.total_weight
                ))
            })?;
        // The weighted sum of values is at most `total * (2^b - 1)`.
        let round = EncodingParams {
            clip: self.layers.clip,
            max_norm: None,
            bits: self.bits,
            max_weight: total,
            ring_bits: self.ring_bits,
            noise_variance: 0,
            noise_headroom: 0,
        };
        let mut words = Zeroizing::new(Vec::with_capacity(self.values.len() + 1));
        words.extend_from_slice(&self.values);
        for &who in &self.contributors {
            sub_mask(PrgKind::ChaCha12, &key.seed(&self.pad, who), &mut words);
        }
        words.push(total);
        match decode(&round, &words) {
            Ok((mean, _)) => Ok(mean),
            Err(ProtocolError::InvalidConfig(e)) => {
                Err(ProtocolError::Malformed(format!("sealed sum: {e}")))
            }
            Err(_) => Err(ProtocolError::Crypto(format!(
                "the sealed layers of round {} do not open with this image key \
                 (a different key, or a sealed sum altered on the way)",
                self.pad.round
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn pad_context(round: u32) -> PadContext {
        PadContext {
            session_id: 5,
            round,
            model_digest: [1; 32],
        }
    }

    #[test]
    fn sealed_words_are_uniform_whatever_the_values_and_pads_are_fresh_per_round_and_participant() {
        let params = EncodingParams::new(1.0, 16, 100, 10).unwrap();
        let layers = SealedLayers {
            start: 2,
            len: 4096,
            clip: 4.0,
        };
        let key = SealKey::derive(&[9; 32]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let update = vec![0.0f32; 4100];
        let words = |round, who, rng: &mut rand::rngs::StdRng| {
            let sealing = Sealing {
                layers: &layers,
                key: &key,
                pad: pad_context(round),
                who,
            };
            encode_sealed(&params, &sealing, &update, 7, rng).unwrap()
        };
        let a = words(1, 0, &mut rng);
        // Unsealed coordinates encode as usual: 0 is the middle level
        // (32767.5, rounded either way), times the weight.
        let mid = [7 * 32767, 7 * 32768];
        assert!(a[..2].iter().chain(&a[4098..4100]).all(|w| mid.contains(w)));
        assert_eq!(a[4100], 7, "the weight");
        // Sealed ones are uniform over the ring, not the constant 7 * mid.
        let sealed = &a[2..4098];
        let ring = f64::from(1u32 << params.ring_bits);
        let mean = sealed.iter().map(|&w| f64::from(w)).sum::<f64>() / 4096.0 / ring;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        let mut bins = [0u32; 16];
        for &w in sealed {
            bins[(f64::from(w) / ring * 16.0) as usize] += 1;
        }
        assert!(bins.iter().all(|&b| (180..=330).contains(&b)), "{bins:?}");
        assert!(sealed.iter().filter(|w| mid.contains(w)).count() < 10);
        // Another round or participant: other pads.
        for other in [words(2, 0, &mut rng), words(1, 1, &mut rng)] {
            let same = other[2..4098]
                .iter()
                .zip(sealed)
                .filter(|(x, y)| x == y)
                .count();
            assert!(same < 10, "{same} equal words");
        }
    }

    #[test]
    fn open_needs_every_field_right() {
        let params = EncodingParams::new(1.0, 16, 10, 3).unwrap();
        let layers = SealedLayers {
            start: 0,
            len: 64,
            clip: 2.0,
        };
        let key = SealKey::derive(&[3; 32]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let values: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                (0..65)
                    .map(|k| (k as f32 - 32.0) / 20.0 + i as f32 * 0.1)
                    .collect()
            })
            .collect();
        let mut sum = vec![0u32; 66];
        for (who, v) in values.iter().enumerate() {
            let sealing = Sealing {
                layers: &layers,
                key: &key,
                pad: pad_context(3),
                who: who as u32,
            };
            let w = encode_sealed(&params, &sealing, v, who as u32 + 1, &mut rng).unwrap();
            for (s, x) in sum.iter_mut().zip(&w) {
                *s = s.wrapping_add(*x) & params.ring_mask();
            }
        }
        let sealed =
            SealedSum::split_from(&params, layers, pad_context(3), vec![0, 1, 2], &mut sum)
                .unwrap();
        assert_eq!(sealed.total_weight, 6);
        let opened = sealed.open(&key).unwrap();
        let step = 4.0 / 65535.0;
        for (k, o) in opened.iter().enumerate() {
            let expected = values
                .iter()
                .enumerate()
                .map(|(i, v)| (i + 1) as f32 * v[k].clamp(-2.0, 2.0))
                .sum::<f32>()
                / 6.0;
            assert!((o - expected).abs() <= step, "{k}: {o} vs {expected}");
        }
        assert!(format!("{sealed:?}").len() < 200, "Debug shows no words");
        assert_eq!(format!("{key:?}"), "SealKey(..)");
        let mut wrong_round = sealed.clone();
        wrong_round.pad.round = 4;
        let mut wrong_len = sealed.clone();
        wrong_len.values.pop();
        let mut no_weight = sealed.clone();
        no_weight.total_weight = 0;
        assert!(matches!(
            wrong_round.open(&key),
            Err(ProtocolError::Crypto(_))
        ));
        assert!(matches!(
            wrong_len.open(&key),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            no_weight.open(&key),
            Err(ProtocolError::Malformed(_))
        ));
        // Distributed DP noise is refused.
        let noisy = params.with_noise(4, 3).unwrap();
        let sealing = Sealing {
            layers: &layers,
            key: &key,
            pad: pad_context(1),
            who: 0,
        };
        assert!(encode_sealed(&noisy, &sealing, &values[0], 1, &mut rng).is_err());
    }
}
