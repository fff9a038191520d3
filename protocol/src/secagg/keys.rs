//! Key agreement and derivations: fresh X25519 key pairs every round,
//! HKDF-SHA256 bound to the session and round, and ChaCha20-Poly1305 for the
//! shares routed through the coordinator.
//!
//! Derivations (all HKDF-SHA256, salt = `"greyfed/secagg/v1" || session_id
//! (8 bytes BE) || round (4 bytes BE)`, ikm = the X25519 shared secret):
//! - pairwise mask seed of `a` and `b`: info = `"pairwise-mask" || min(a,b) || max(a,b)` (4 bytes BE each), 32 bytes;
//! - share-channel key of `a` and `b`: info = `"share-key" || min || max`, 32 bytes.
//!
//! Shares are sealed with ChaCha20-Poly1305 under the share-channel key,
//! nonce = `from (4 bytes BE) || to (4 bytes BE) || 0u32`, associated data =
//! salt || from || to, so a ciphertext cannot be replayed to another round,
//! pair or direction.

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::{error::ProtocolError, message::ParticipantId, secagg::shamir::Share};

/// Session and round a derivation is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundContext {
    /// Coordinator session id.
    pub session_id: u64,
    /// Round number.
    pub round: u32,
}

/// An X25519 key pair, zeroised on drop.
pub struct KeyPair {
    _private: (),
}

impl KeyPair {
    /// A fresh key pair.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let _ = rng;
        todo!()
    }

    /// Rebuilds a key pair from its 32 secret bytes (after Shamir reconstruction).
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let _ = bytes;
        todo!()
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        todo!()
    }

    /// The secret bytes, for Shamir sharing only.
    pub fn secret_bytes(&self) -> [u8; 32] {
        todo!()
    }

    /// X25519 with `peer`; errors on a low-order peer key (all-zero shared secret).
    pub fn agree(&self, peer: &[u8; 32]) -> Result<[u8; 32], ProtocolError> {
        let _ = peer;
        todo!()
    }
}

/// Seed of the pairwise mask between `a` and `b` (symmetric in `a`, `b`).
pub fn pairwise_mask_seed(
    shared: &[u8; 32],
    ctx: &RoundContext,
    a: ParticipantId,
    b: ParticipantId,
) -> [u8; 32] {
    let _ = (shared, ctx, a, b);
    todo!()
}

/// Key of the share channel between `a` and `b` (symmetric).
pub fn share_channel_key(
    shared: &[u8; 32],
    ctx: &RoundContext,
    a: ParticipantId,
    b: ParticipantId,
) -> [u8; 32] {
    let _ = (shared, ctx, a, b);
    todo!()
}

/// What `from` sends `to` in stage 2: its shares of its `s` secret key and of
/// its self-mask seed `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharePair {
    /// Sender.
    pub from: ParticipantId,
    /// Recipient.
    pub to: ParticipantId,
    /// Share of the sender's mask-agreement secret key.
    pub key_share: Share,
    /// Share of the sender's self-mask seed.
    pub self_mask_share: Share,
}

/// Encrypts `pair` from `pair.from` to `pair.to` under `key`.
pub fn seal_share_pair(key: &[u8; 32], ctx: &RoundContext, pair: &SharePair) -> Vec<u8> {
    let _ = (key, ctx, pair);
    todo!()
}

/// Decrypts and checks a sealed share pair claimed to be from `from` to `to`.
///
/// # Errors
/// Authentication failure, malformed plaintext, or ids that differ from the claim.
pub fn open_share_pair(
    key: &[u8; 32],
    ctx: &RoundContext,
    from: ParticipantId,
    to: ParticipantId,
    ciphertext: &[u8],
) -> Result<SharePair, ProtocolError> {
    let _ = (key, ctx, from, to, ciphertext);
    todo!()
}
