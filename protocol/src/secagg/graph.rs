//! The neighbour graph of SecAgg+: a Harary graph `H(k, n)` over the
//! participants in a random order chosen by the coordinator. Each participant
//! masks with, and shares its secrets among, only its `k` neighbours, so costs
//! grow with `k = O(log n)` instead of `n`. Full SecAgg is `k = n - 1`.
//!
//! [`graph_params`] picks the degree `k` and threshold `t` from `n` and bounds
//! on the dropout fraction `δ` and the corrupt fraction `γ` (see its docs for
//! the formula and the failure probability). In short: with neighbours drawn
//! at random, dropouts and corruptions are modelled as binomial (an
//! approximation of the hypergeometric draw), and a union bound over the `n`
//! participants gives `failure <= n * (P[Bin(k, 1-δ) < t] + P[Bin(k, γ) >= t])`;
//! `t` in `(k/2, k]` minimises it and `k` is the smallest even degree with
//! `failure <= 2^-σ`, `σ = 40` ([`SIGMA`]), else `k = n - 1`.

use std::collections::HashMap;

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::{error::ProtocolError, message::ParticipantId};

/// Target failure probability `2^-SIGMA` of [`graph_params`].
pub const SIGMA: f64 = 40.0;

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
///
/// **Model.** Participants are placed in a uniformly random order, so each
/// one's `k` neighbours are a random sample of the others. Participant `i`'s
/// secrets cannot be reconstructed when fewer than `t` of its neighbours
/// survive, and leak when at least `t` of them are corrupt (they could pool
/// both its shares). Approximating the hypergeometric draw by a binomial
/// one (each neighbour drops out with probability `δ`, is corrupt with
/// probability `γ`, independently) and taking a union bound over the `n`
/// participants:
///
/// ```text
/// failure(k, t) <= n * ( P[Bin(k, 1-δ) < t] + P[Bin(k, γ) >= t] )
/// ```
///
/// The binomial tails are summed exactly (probability mass functions in log
/// space). For each `k`, `t` is the value in `(k/2, k]` minimising the
/// bound (`t > k/2` also stops a coordinator from collecting both kinds of
/// shares of one participant through different views); `k` is the smallest
/// even degree `>= 2` whose bound is at most `2^-40` ([`SIGMA`]). When no
/// degree below `n - 1` reaches it, `k = n - 1` (full SecAgg, the complete
/// graph) with its best `t` is used and `failure_log2` reports the weaker
/// bound actually achieved: for small cohorts (e.g. `n = 10`) the bound is
/// far from `2^-40` and says more about `δ` and `γ` being too large for `n`
/// than about the graph. `failure_log2` is clamped to `[-1074, 0]`.
///
/// The dropout model is random, not adversarial: a coordinator that drops
/// chosen participants is covered only by `t > k/2` and the shares'
/// one-of-two rule, as in SecAgg+.
///
/// # Errors
/// [`ProtocolError::InvalidConfig`] unless `n >= 2`, `0 <= δ < 1`,
/// `0 <= γ < 1` and `δ + γ < 1`.
pub fn graph_params(
    n: usize,
    delta: f64,
    gamma: f64,
    full: bool,
) -> Result<GraphParams, ProtocolError> {
    if n < 2 {
        return Err(ProtocolError::InvalidConfig(format!(
            "secure aggregation needs at least 2 participants, got {n}"
        )));
    }
    let fraction = |x: f64| (0.0..1.0).contains(&x);
    if !fraction(delta) || !fraction(gamma) || delta + gamma >= 1.0 {
        return Err(ProtocolError::InvalidConfig(format!(
            "dropout fraction {delta} and corrupt fraction {gamma} must be in [0, 1) \
             with a sum below 1"
        )));
    }
    let complete = n - 1;
    let best = |k: usize| best_threshold(n, k, delta, gamma);
    if full {
        return Ok(best(complete));
    }
    // The bound shrinks (up to parity wiggles) as k grows: if even the
    // complete graph misses the target, no sparser graph reaches it.
    let at_complete = best(complete);
    if at_complete.failure_log2 > -SIGMA {
        return Ok(at_complete);
    }
    let target = |p: &GraphParams| p.failure_log2 <= -SIGMA;
    // Even degrees: linear scan while cheap, then doubling and bisection.
    const LINEAR_UP_TO: usize = 1024;
    let mut k = 2;
    while k < complete && k <= LINEAR_UP_TO {
        let p = best(k);
        if target(&p) {
            return Ok(p);
        }
        k += 2;
    }
    if k >= complete {
        return Ok(at_complete);
    }
    // Failed at k - 2; find an even k that meets the target by doubling...
    let mut lo = k - 2;
    let mut hi = None;
    while k < complete {
        let p = best(k);
        if target(&p) {
            hi = Some((k, p));
            break;
        }
        lo = k;
        k *= 2;
    }
    let Some((mut hi_k, mut hi_p)) = hi else {
        return Ok(at_complete);
    };
    // ... then bisect on even degrees between the last failure and it.
    while hi_k - lo > 2 {
        let mid = (lo + hi_k) / 4 * 2;
        let p = best(mid);
        if target(&p) {
            hi_k = mid;
            hi_p = p;
        } else {
            lo = mid;
        }
    }
    Ok(hi_p)
}

/// The threshold [`graph_params`] picks for degree `k` among `n`
/// participants with dropout bound `δ` and corruption bound `γ`: the value
/// in `(k/2, k]` minimising the union bound. Participants recompute it to
/// check a coordinator's choice ([`SecAggPolicy`](crate::secagg::auth::SecAggPolicy)).
pub fn threshold_for(n: usize, k: usize, delta: f64, gamma: f64) -> usize {
    best_threshold(n, k.max(1), delta, gamma).threshold
}

/// The threshold in `(k/2, k]` minimising the union bound for degree `k`.
fn best_threshold(n: usize, k: usize, delta: f64, gamma: f64) -> GraphParams {
    // P[Bin(k, 1-δ) < t] = P[Bin(k, δ) > k - t] = P[Bin(k, δ) >= k - t + 1].
    let dropped = log_upper_tails(k, delta);
    let corrupt = log_upper_tails(k, gamma);
    let ln_n = (n as f64).ln();
    let mut best = (k, f64::INFINITY);
    for t in (k / 2 + 1)..=k {
        let ln_bound = ln_n + log_add(dropped[k - t + 1], corrupt[t]);
        if ln_bound < best.1 {
            best = (t, ln_bound);
        }
    }
    let (threshold, ln_bound) = best;
    GraphParams {
        degree: k,
        threshold,
        failure_log2: (ln_bound / std::f64::consts::LN_2).clamp(-1074.0, 0.0),
    }
}

/// `ln(e^a + e^b)`, exact for infinite arguments.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `tails[j] = ln P[Bin(k, p) >= j]` for `j` in `0..=k + 1`.
fn log_upper_tails(k: usize, p: f64) -> Vec<f64> {
    let mut tails = vec![f64::NEG_INFINITY; k + 2];
    if p <= 0.0 {
        // All mass at 0.
        tails[0] = 0.0;
        return tails;
    }
    // ln pmf(j) = ln C(k, j) + j ln p + (k - j) ln(1 - p), built up term by term.
    let (ln_p, ln_q) = (p.ln(), (-p).ln_1p());
    let mut ln_pmf = Vec::with_capacity(k + 1);
    let mut ln_choose = 0.0;
    for j in 0..=k {
        if j > 0 {
            ln_choose += ((k - j + 1) as f64).ln() - (j as f64).ln();
        }
        ln_pmf.push(ln_choose + j as f64 * ln_p + (k - j) as f64 * ln_q);
    }
    for j in (0..=k).rev() {
        tails[j] = log_add(tails[j + 1], ln_pmf[j]);
    }
    tails
}

/// A Harary graph over a fixed order of participants.
///
/// Position `p` (in [`order`](Self::order)) is adjacent to `p ± 1, …,
/// p ± ⌊k/2⌋` (mod n). For odd `k`: with `k = n - 1` the graph is complete;
/// otherwise `n` must be even and `p` is also adjacent to `p + n/2` (the
/// diametric partner), so every participant has exactly `k` neighbours.
/// Odd `k < n - 1` with odd `n` has no `k`-regular Harary graph and is refused.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "GraphWire", into = "GraphWire")]
pub struct NeighbourGraph {
    order: Vec<ParticipantId>,
    degree: usize,
    /// Position of each participant in `order`.
    position: HashMap<ParticipantId, usize>,
}

/// The serialised form of a [`NeighbourGraph`], validated on the way in.
#[derive(Serialize, Deserialize)]
struct GraphWire {
    order: Vec<ParticipantId>,
    degree: usize,
}

impl TryFrom<GraphWire> for NeighbourGraph {
    type Error = ProtocolError;

    fn try_from(w: GraphWire) -> Result<Self, ProtocolError> {
        NeighbourGraph::from_order(w.order, w.degree)
    }
}

impl From<NeighbourGraph> for GraphWire {
    fn from(g: NeighbourGraph) -> Self {
        GraphWire {
            order: g.order,
            degree: g.degree,
        }
    }
}

impl std::fmt::Debug for NeighbourGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeighbourGraph")
            .field("order", &self.order)
            .field("degree", &self.degree)
            .finish()
    }
}

/// Uniform in `0..bound` (`bound > 0`) by rejection, no modulo bias.
fn uniform_below(rng: &mut impl CryptoRng, bound: u64) -> u64 {
    let zone = u64::MAX - u64::MAX % bound;
    loop {
        let r = rng.next_u64();
        if r < zone {
            return r % bound;
        }
    }
}

impl NeighbourGraph {
    /// `H(degree, n)` over `participants` shuffled with `rng`.
    ///
    /// # Errors
    /// As [`from_order`](Self::from_order).
    pub fn random(
        participants: &[ParticipantId],
        degree: usize,
        rng: &mut impl CryptoRng,
    ) -> Result<Self, ProtocolError> {
        let mut order = participants.to_vec();
        // Fisher–Yates.
        for i in (1..order.len()).rev() {
            let j = uniform_below(rng, i as u64 + 1) as usize;
            order.swap(i, j);
        }
        Self::from_order(order, degree)
    }

    /// `H(degree, n)` over `order` as given (participants receive the order
    /// and rebuild the same graph).
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] for fewer than 2 participants, a
    /// repeated id, a degree outside `1..=n-1`, or an odd degree below
    /// `n - 1` with `n` odd.
    pub fn from_order(order: Vec<ParticipantId>, degree: usize) -> Result<Self, ProtocolError> {
        let n = order.len();
        if n < 2 {
            return Err(ProtocolError::InvalidConfig(format!(
                "a neighbour graph needs at least 2 participants, got {n}"
            )));
        }
        if degree == 0 || degree >= n {
            return Err(ProtocolError::InvalidConfig(format!(
                "neighbour graph degree {degree} must be in 1..={} for {n} participants",
                n - 1
            )));
        }
        if degree % 2 == 1 && degree < n - 1 && n % 2 == 1 {
            return Err(ProtocolError::InvalidConfig(format!(
                "no {degree}-regular Harary graph on {n} participants (odd degree needs \
                 an even number of participants)"
            )));
        }
        let mut position = HashMap::with_capacity(n);
        for (p, &id) in order.iter().enumerate() {
            if position.insert(id, p).is_some() {
                return Err(ProtocolError::InvalidConfig(format!(
                    "participant {id} appears twice in the graph order"
                )));
            }
        }
        Ok(Self {
            order,
            degree,
            position,
        })
    }

    /// The participants in graph order.
    pub fn order(&self) -> &[ParticipantId] {
        &self.order
    }

    /// The degree `k`.
    pub fn degree(&self) -> usize {
        self.degree
    }

    fn is_complete(&self) -> bool {
        self.degree + 1 == self.order.len()
    }

    /// `id`'s neighbours (excluding `id`), ascending by id; empty if `id` is
    /// not in the graph.
    pub fn neighbours(&self, id: ParticipantId) -> Vec<ParticipantId> {
        let Some(&p) = self.position.get(&id) else {
            return Vec::new();
        };
        let n = self.order.len();
        let mut out: Vec<ParticipantId> = if self.is_complete() {
            self.order.iter().copied().filter(|&o| o != id).collect()
        } else {
            let half = self.degree / 2;
            let mut v = Vec::with_capacity(self.degree);
            for step in 1..=half {
                v.push(self.order[(p + step) % n]);
                v.push(self.order[(p + n - step) % n]);
            }
            if self.degree % 2 == 1 {
                v.push(self.order[(p + n / 2) % n]);
            }
            v
        };
        out.sort_unstable();
        out
    }

    /// True when `a` and `b` are neighbours.
    pub fn are_neighbours(&self, a: ParticipantId, b: ParticipantId) -> bool {
        let (Some(&pa), Some(&pb)) = (self.position.get(&a), self.position.get(&b)) else {
            return false;
        };
        if pa == pb {
            return false;
        }
        if self.is_complete() {
            return true;
        }
        let n = self.order.len();
        let diff = (pb + n - pa) % n;
        let distance = diff.min(n - diff);
        distance <= self.degree / 2 || (self.degree % 2 == 1 && 2 * distance == n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    /// Reference: the smallest even k in 2..n-1 meeting the target by
    /// exhaustive scan, else k = n - 1.
    fn brute_force(n: usize, delta: f64, gamma: f64) -> GraphParams {
        (1..n)
            .filter(|k| k % 2 == 0)
            .map(|k| best_threshold(n, k, delta, gamma))
            .find(|p| p.failure_log2 <= -SIGMA && p.degree < n - 1)
            .unwrap_or_else(|| best_threshold(n, n - 1, delta, gamma))
    }

    #[test]
    fn params_validation() {
        for (n, d, g) in [
            (0, 0.1, 0.1),
            (1, 0.1, 0.1),
            (10, -0.1, 0.1),
            (10, 1.0, 0.0),
            (10, 0.1, 1.0),
            (10, 0.5, 0.5),
            (10, f64::NAN, 0.1),
            (10, 0.1, f64::NAN),
        ] {
            assert!(
                matches!(
                    graph_params(n, d, g, false),
                    Err(ProtocolError::InvalidConfig(_))
                ),
                "{n} {d} {g}"
            );
        }
    }

    #[test]
    fn tiny_cohorts() {
        let p = graph_params(2, 0.1, 0.1, false).unwrap();
        assert_eq!((p.degree, p.threshold), (1, 1));
        assert!(p.failure_log2 <= 0.0);
        let p = graph_params(3, 0.1, 0.1, false).unwrap();
        assert_eq!((p.degree, p.threshold), (2, 2));
        let p = graph_params(2, 0.0, 0.0, false).unwrap();
        assert_eq!((p.degree, p.threshold), (1, 1));
        assert_eq!(p.failure_log2, -1074.0);
    }

    #[test]
    fn no_dropouts_no_corruption_is_a_ring() {
        let p = graph_params(1000, 0.0, 0.0, false).unwrap();
        assert_eq!((p.degree, p.threshold), (2, 2));
    }

    #[test]
    fn threshold_is_a_strict_majority_and_bound_is_met() {
        for n in [2, 3, 4, 5, 10, 31, 100, 1000, 5000] {
            for delta in [0.0, 0.01, 0.1, 0.3] {
                for gamma in [0.0, 0.05, 0.1, 0.3] {
                    for full in [false, true] {
                        let p = graph_params(n, delta, gamma, full).unwrap();
                        assert!(p.degree >= 1 && p.degree < n);
                        assert!(
                            2 * p.threshold > p.degree && p.threshold <= p.degree,
                            "{p:?}"
                        );
                        assert!((-1074.0..=0.0).contains(&p.failure_log2));
                        if full {
                            assert_eq!(p.degree, n - 1);
                        } else if p.degree < n - 1 {
                            assert_eq!(p.degree % 2, 0);
                            assert!(p.failure_log2 <= -SIGMA, "{n} {delta} {gamma} {p:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_exhaustive_scan() {
        for n in [4, 5, 6, 9, 10, 17, 40, 64, 101, 250] {
            for delta in [0.0, 0.05, 0.1, 0.2, 0.33] {
                for gamma in [0.0, 0.05, 0.1, 0.2, 0.33] {
                    assert_eq!(
                        graph_params(n, delta, gamma, false).unwrap(),
                        brute_force(n, delta, gamma),
                        "n={n} δ={delta} γ={gamma}"
                    );
                }
            }
        }
    }

    /// Degrees above the linear-scan range go through doubling and
    /// bisection: the result meets the target and k - 2 does not.
    #[test]
    fn large_degrees_are_minimal() {
        let (n, delta, gamma) = (20_000, 0.4, 0.4);
        let p = graph_params(n, delta, gamma, false).unwrap();
        assert!(p.degree > 1024 && p.degree < n - 1, "{p:?}");
        assert!(p.failure_log2 <= -SIGMA);
        assert!(best_threshold(n, p.degree - 2, delta, gamma).failure_log2 > -SIGMA);
    }

    #[test]
    fn binomial_tails() {
        // Bin(4, 1/2): P[>= j] = 16/16, 15/16, 11/16, 5/16, 1/16, 0.
        let tails = log_upper_tails(4, 0.5);
        let expected = [16.0, 15.0, 11.0, 5.0, 1.0];
        for (t, e) in tails.iter().zip(expected) {
            assert!((t.exp() - e / 16.0).abs() < 1e-12);
        }
        assert_eq!(tails[5], f64::NEG_INFINITY);
        let zero = log_upper_tails(3, 0.0);
        assert_eq!(zero[0], 0.0);
        assert!(zero[1..].iter().all(|&t| t == f64::NEG_INFINITY));
    }

    /// `cargo test -p greyfed-protocol --lib print_params_table -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn print_params_table() {
        for n in [10, 100, 1000, 10_000] {
            for (delta, gamma) in [(0.1, 0.1), (0.05, 0.05), (0.2, 0.1), (0.3, 0.2)] {
                let p = graph_params(n, delta, gamma, false).unwrap();
                println!(
                    "n={n:>6} δ={delta:.2} γ={gamma:.2}: k={:>4} t={:>4} failure_log2={:.1}",
                    p.degree, p.threshold, p.failure_log2
                );
            }
        }
    }

    fn check_graph(g: &NeighbourGraph) {
        let n = g.order().len();
        for &a in g.order() {
            let nb = g.neighbours(a);
            assert_eq!(nb.len(), g.degree(), "degree of {a}");
            assert!(nb.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
            assert!(!nb.contains(&a));
            assert!(!g.are_neighbours(a, a));
            for &b in g.order() {
                assert_eq!(g.are_neighbours(a, b), nb.contains(&b), "{a} {b}");
                assert_eq!(g.are_neighbours(a, b), g.are_neighbours(b, a));
            }
        }
        if g.degree() == n - 1 {
            for &a in g.order() {
                assert_eq!(g.neighbours(a).len(), n - 1);
            }
        }
    }

    #[test]
    fn harary_graphs_are_regular_and_symmetric() {
        let mut rng = StdRng::seed_from_u64(1);
        for n in 2..=16usize {
            let ids: Vec<ParticipantId> = (0..n as u32).map(|i| i * 3 + 5).collect();
            for k in 1..n {
                let g = NeighbourGraph::random(&ids, k, &mut rng);
                if k % 2 == 1 && k < n - 1 && n % 2 == 1 {
                    assert!(g.is_err());
                    continue;
                }
                let g = g.unwrap();
                check_graph(&g);
                let again = NeighbourGraph::from_order(g.order().to_vec(), k).unwrap();
                assert_eq!(again, g);
                let mut sorted = g.order().to_vec();
                sorted.sort_unstable();
                assert_eq!(sorted, ids);
            }
        }
        let ids: Vec<ParticipantId> = (0..200).collect();
        check_graph(&NeighbourGraph::random(&ids, 12, &mut rng).unwrap());
    }

    #[test]
    fn harary_layout() {
        let g = NeighbourGraph::from_order(vec![10, 20, 30, 40, 50, 60], 2).unwrap();
        assert_eq!(g.neighbours(10), vec![20, 60]);
        assert_eq!(g.neighbours(40), vec![30, 50]);
        let g = NeighbourGraph::from_order(vec![10, 20, 30, 40, 50, 60], 3).unwrap();
        assert_eq!(g.neighbours(10), vec![20, 40, 60]);
        assert!(g.neighbours(99).is_empty());
        assert!(!g.are_neighbours(10, 99));
    }

    #[test]
    fn random_orders_differ_and_are_reproducible() {
        let ids: Vec<ParticipantId> = (0..50).collect();
        let a = NeighbourGraph::random(&ids, 4, &mut StdRng::seed_from_u64(1)).unwrap();
        let b = NeighbourGraph::random(&ids, 4, &mut StdRng::seed_from_u64(1)).unwrap();
        let c = NeighbourGraph::random(&ids, 4, &mut StdRng::seed_from_u64(2)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.order(), c.order());
        assert_ne!(a.order(), &ids[..]);
    }

    #[test]
    fn invalid_graphs() {
        assert!(NeighbourGraph::from_order(vec![1], 0).is_err());
        assert!(NeighbourGraph::from_order(vec![], 0).is_err());
        assert!(NeighbourGraph::from_order(vec![1, 2, 3], 0).is_err());
        assert!(NeighbourGraph::from_order(vec![1, 2, 3], 3).is_err());
        assert!(NeighbourGraph::from_order(vec![1, 2, 1], 2).is_err());
        assert!(NeighbourGraph::from_order(vec![1, 2, 3, 4, 5], 3).is_err());
        assert!(NeighbourGraph::from_order(vec![1, 2, 3, 4, 5, 6], 3).is_ok());
    }

    #[test]
    fn serde_round_trip_validates() {
        let config = bincode::config::standard();
        let g = NeighbourGraph::from_order(vec![4, 2, 9, 7], 2).unwrap();
        let bytes = bincode::serde::encode_to_vec(&g, config).unwrap();
        let (back, _): (NeighbourGraph, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, g);
        assert!(back.are_neighbours(4, 7));
        let bad = bincode::serde::encode_to_vec(
            GraphWire {
                order: vec![1, 1, 2],
                degree: 2,
            },
            config,
        )
        .unwrap();
        assert!(bincode::serde::decode_from_slice::<NeighbourGraph, _>(&bad, config).is_err());
    }
}
