//! Mask expansion: a 32-byte seed becomes a stream of `u32` mask words from a
//! standard stream cipher's raw keystream (never through RNG traits, so both
//! sides regenerate masks bit for bit).
//!
//! - [`PrgKind::Aes128Ctr`]: AES-128 in CTR mode (big-endian 128-bit counter),
//!   key = seed[0..16], initial counter block = seed[16..32]. Used where the
//!   CPU has AES instructions.
//! - [`PrgKind::ChaCha12`]: ChaCha12 with key = seed, nonce = 12 zero bytes,
//!   counter from 0. Used otherwise.
//!
//! Mask word `k` is the little-endian `u32` at keystream bytes `4k..4k+4`.
//! Seeds are fresh per round and per pair, so a fixed nonce is safe.

use serde::{Deserialize, Serialize};

/// Which stream cipher expands mask seeds. Chosen by the coordinator at run
/// time ([`PrgKind::fastest`]) and recorded in the round so both sides agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrgKind {
    /// AES-128-CTR.
    Aes128Ctr,
    /// ChaCha12.
    ChaCha12,
}

impl PrgKind {
    /// AES-128-CTR when this CPU has AES instructions, ChaCha12 otherwise.
    pub fn fastest() -> PrgKind {
        todo!("runtime CPU feature detection")
    }
}

/// `out[k] = out[k].wrapping_add(mask[k])` for the mask stream of `seed`.
pub fn add_mask(kind: PrgKind, seed: &[u8; 32], out: &mut [u32]) {
    let _ = (kind, seed, out);
    todo!()
}

/// `out[k] = out[k].wrapping_sub(mask[k])` for the mask stream of `seed`.
pub fn sub_mask(kind: PrgKind, seed: &[u8; 32], out: &mut [u32]) {
    let _ = (kind, seed, out);
    todo!()
}

/// Writes the raw mask stream of `seed` into `out` (for benchmarks: the
/// keystream lower bound, and for tests).
pub fn fill_mask(kind: PrgKind, seed: &[u8; 32], out: &mut [u32]) {
    let _ = (kind, seed, out);
    todo!()
}
