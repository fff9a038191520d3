//! The neighbour graph of SecAgg+: a Harary graph `H(k, n)` over the
//! participants in a random order chosen by the coordinator. Each participant
//! masks with, and shares its secrets among, only its `k` neighbours, so costs
//! grow with `k = O(log n)` instead of `n`. Full SecAgg is `k = n - 1`.
//!
//! [`graph_params`] picks the degree `k` and threshold `t` from `n` and bounds
//! on the dropout fraction `δ` and the corrupt fraction `γ` (see its docs for
//! the formula and the failure probability).

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::{error::ProtocolError, message::ParticipantId};

/// Degree, threshold and the failure bound they achieve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphParams {
    /// Neighbours per participant `k`.
    pub degree: usize,
    /// Shares needed to reconstruct a secret `t` (`k/2 < t <= k`).
    pub threshold: usize,
    /// log2 of the bound on the probability that the round fails
    /// (too few surviving neighbours) or leaks (t corrupt neighbours).
    pub failure_log2: f64,
}

/// Chooses `k` and `t` for `n` participants, dropout fraction `delta` and
/// corrupt fraction `gamma` (`full`: k = n - 1, full SecAgg).
pub fn graph_params(
    n: usize,
    delta: f64,
    gamma: f64,
    full: bool,
) -> Result<GraphParams, ProtocolError> {
    let _ = (n, delta, gamma, full);
    todo!()
}

/// A Harary graph over a fixed order of participants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourGraph {
    order: Vec<ParticipantId>,
    degree: usize,
}

impl NeighbourGraph {
    /// `H(degree, n)` over `participants` shuffled with `rng`.
    pub fn random(
        participants: &[ParticipantId],
        degree: usize,
        rng: &mut impl CryptoRng,
    ) -> Result<Self, ProtocolError> {
        let _ = (participants, degree, rng);
        todo!()
    }

    /// `H(degree, n)` over `order` as given (participants receive the order
    /// and rebuild the same graph).
    pub fn from_order(order: Vec<ParticipantId>, degree: usize) -> Result<Self, ProtocolError> {
        let _ = (order, degree);
        todo!()
    }

    /// The participants in graph order.
    pub fn order(&self) -> &[ParticipantId] {
        &self.order
    }

    /// The degree `k`.
    pub fn degree(&self) -> usize {
        self.degree
    }

    /// `id`'s neighbours (excluding `id`), ascending by id; empty if `id` is
    /// not in the graph.
    pub fn neighbours(&self, id: ParticipantId) -> Vec<ParticipantId> {
        let _ = id;
        todo!()
    }

    /// True when `a` and `b` are neighbours.
    pub fn are_neighbours(&self, a: ParticipantId, b: ParticipantId) -> bool {
        let _ = (a, b);
        todo!()
    }
}
