//! Encoding of updates into the ring Z_{2^m}, and packing on the wire.
//!
//! A participant's update `x` (d floats) and integer weight `w`:
//! 1. clip each value to `[-c, c]`;
//! 2. map to `[0, 2^b - 1]` by `q = stochastic_round((x + c) / (2c) * (2^b - 1))`
//!    (unbiased: `E[q]` is the exact scaled value);
//! 3. multiply by the weight: `y = w * q`; append `w` as element `d`.
//!
//! The coordinator unmasks `sum(w_i * q_i)` and `sum(w_i)`, so the weighted
//! mean is `x̂ = sum(w_i q_i) / sum(w_i) / (2^b - 1) * 2c - c`.
//!
//! **Bit budget.** The largest possible sum is `n * max_weight * (2^b - 1)`;
//! the ring has `m = bits needed for that sum` bits and must fit in 32. All
//! arithmetic (masks included) is done in `u32` with wrapping and reduced mod
//! `2^m`, which is exact because `2^m` divides `2^32`. Masked elements travel
//! packed in `m` bits each.

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Encoding agreed for a round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncodingParams {
    /// Clipping bound `c > 0`.
    pub clip: f32,
    /// Quantisation bits `b` (1..=24).
    pub bits: u32,
    /// Largest weight a participant may use.
    pub max_weight: u32,
    /// Ring bits `m` (derived; `<= 32`).
    pub ring_bits: u32,
}

impl EncodingParams {
    /// Parameters for `participants` inputs, checking the bit budget.
    ///
    /// # Errors
    /// [`ProtocolError::BitBudget`] when `b + log2(max_weight) + log2(n)`
    /// exceeds 32 bits, with a message saying what to lower; invalid `clip`
    /// or `bits`.
    pub fn new(
        clip: f32,
        bits: u32,
        max_weight: u32,
        participants: usize,
    ) -> Result<Self, ProtocolError> {
        let _ = (clip, bits, max_weight, participants);
        todo!()
    }

    /// `2^m - 1`: AND with this to reduce mod `2^m`.
    pub fn ring_mask(&self) -> u32 {
        todo!()
    }

    /// Bytes per masked element on the wire (`m / 8`).
    pub fn bytes_per_element(&self) -> f64 {
        todo!()
    }

    /// Quantisation step `2c / (2^b - 1)`: the decoded weighted mean is within
    /// one step of the weighted mean of the clipped inputs.
    pub fn step(&self) -> f32 {
        todo!()
    }
}

/// Encodes `update` with weight `weight` (1..=max_weight) into `d + 1` ring
/// elements (each `< 2^m`).
pub fn encode(
    params: &EncodingParams,
    update: &[f32],
    weight: u32,
    rng: &mut impl CryptoRng,
) -> Result<Vec<u32>, ProtocolError> {
    let _ = (params, update, weight, rng);
    todo!()
}

/// Decodes an unmasked ring sum (`d + 1` elements) into the weighted mean
/// update and the total weight.
///
/// # Errors
/// Total weight 0, or a sum inconsistent with the weights (a corrupted sum).
pub fn decode(params: &EncodingParams, sum: &[u32]) -> Result<(Vec<f32>, u64), ProtocolError> {
    let _ = (params, sum);
    todo!()
}

/// Packs `values` (each `< 2^bits`) into `ceil(len * bits / 8)` bytes, little-endian bit order.
pub fn pack(values: &[u32], bits: u32) -> Vec<u8> {
    let _ = (values, bits);
    todo!()
}

/// Unpacks `len` values of `bits` bits; errors if `bytes` has the wrong length.
pub fn unpack(bytes: &[u8], bits: u32, len: usize) -> Result<Vec<u32>, ProtocolError> {
    let _ = (bytes, bits, len);
    todo!()
}
