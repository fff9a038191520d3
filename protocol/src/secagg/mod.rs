//! Secure aggregation in the style of SecAgg (Bonawitz et al., CCS 2017)
//! with the sparse neighbour graph of SecAgg+ (Bell et al., CCS 2020),
//! sans-IO: the coordinator learns `sum(w_i * x_i)` and `sum(w_i)` over the
//! surviving participants and nothing else, even when participants drop out
//! at any stage.
//!
//! Stages of one round (messages in [`message`]):
//! 1. **advertise keys**: each participant sends two fresh X25519 public keys
//!    (`c` for the share channel, `s` for mask agreement);
//! 2. **share keys**: each participant Shamir-shares its `s` secret key and a
//!    fresh self-mask seed `b` among its graph neighbours, t-of-k, encrypted
//!    (AEAD) to each neighbour and routed through the coordinator;
//! 3. **masked input**: each participant uploads its encoded input plus the
//!    self mask `PRG(b)` plus pairwise masks `±PRG(s_ij)` with every
//!    neighbour that completed stage 2 (they cancel in the sum);
//! 4. **unmasking**: each survivor reveals, per neighbour, either the share
//!    of `b` (neighbour survived) or the share of `s` (neighbour dropped),
//!    never both; the coordinator reconstructs and removes the masks.
//!
//! Building blocks: [`prg`] (mask expansion), [`shamir`] (t-of-k sharing
//! over a prime field), [`encode`] (clipping, stochastic rounding, the ring
//! and its bit budget, packing), [`graph`] (Harary neighbour graph, k and t),
//! [`keys`] (X25519, HKDF derivations, share encryption). State machines:
//! [`participant`] and [`coordinator`].

pub mod auth;
pub mod coordinator;
pub mod encode;
pub mod graph;
pub mod keys;
pub mod layout;
pub mod message;
pub mod participant;
pub mod prg;
pub mod seal;
pub mod shamir;
#[cfg(any(test, feature = "test-credentials"))]
pub mod testing;
pub mod x509;

#[cfg(test)]
mod tests;
