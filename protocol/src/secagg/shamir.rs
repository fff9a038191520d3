//! t-of-n Shamir secret sharing of 32-byte secrets over the prime field
//! GF(p), p = 2^61 - 1 (a Mersenne prime: fast reduction with `u128`
//! products). A secret is split into 5 chunks of 7 bytes (56 bits < 61), each
//! shared with its own random polynomial of degree t - 1; a share is the 5
//! field elements at one x-coordinate. x-coordinates are the holders'
//! participant ids + 1 (never 0).
//!
//! Reconstruction interpolates at 0 with Lagrange coefficients that depend
//! only on the set of x-coordinates, so [`LagrangeCache`] computes them once
//! per holder set and reuses them for every secret shared to that set.

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Field elements per share (32-byte secret in 7-byte chunks).
pub const CHUNKS: usize = 5;

/// One share of a 32-byte secret: the evaluations at `x` of the 5 chunk
/// polynomials. 48 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Evaluation point (holder id + 1, never 0).
    pub x: u64,
    /// One value in [0, p) per chunk.
    pub y: [u64; CHUNKS],
}

/// Splits `secret` into one share per x in `xs` (distinct, non-zero, below p);
/// any `threshold` of them reconstruct it, fewer reveal nothing.
///
/// # Errors
/// `threshold` is 0 or exceeds `xs.len()`, or an x is 0, repeated or >= p.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u64],
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, ProtocolError> {
    let _ = (secret, threshold, xs, rng);
    todo!()
}

/// Reconstructs a secret from at least `threshold` shares (uses the first
/// `threshold` after sorting by x). With a cache, reuse it across secrets.
///
/// # Errors
/// Fewer than `threshold` shares, duplicate or zero x, values >= p, or a
/// reconstructed chunk that does not fit in 7 bytes (inconsistent shares).
pub fn combine(
    shares: &[Share],
    threshold: usize,
    cache: &mut LagrangeCache,
) -> Result<[u8; 32], ProtocolError> {
    let _ = (shares, threshold, cache);
    todo!()
}

/// Lagrange coefficients at 0, memoised by the sorted set of x-coordinates.
#[derive(Debug, Default)]
pub struct LagrangeCache {
    _private: (),
}

impl LagrangeCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
}
