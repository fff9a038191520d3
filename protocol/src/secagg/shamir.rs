//! t-of-n Shamir secret sharing of 32-byte secrets over the prime field
//! GF(p), p = 2^61 - 1 (a Mersenne prime: fast reduction with `u128`
//! products). A secret is split into 5 chunks of 7 bytes (56 bits < 61), each
//! shared with its own random polynomial of degree t - 1; a share is the 5
//! field elements at one x-coordinate. x-coordinates are the holders'
//! participant ids + 1 (never 0).
//!
//! Chunk `c` is secret bytes `[7c .. min(7c + 7, 32)]` as a little-endian
//! integer: `[0..7]`, `[7..14]`, `[14..21]`, `[21..28]` and `[28..32]` (the
//! last has 4 bytes). A reconstructed chunk that does not fit its bytes
//! reveals inconsistent shares (a wrong share passes this check with
//! probability about `2^-5` per 7-byte chunk and `2^-29` for the last).
//!
//! Reconstruction interpolates at 0 with Lagrange coefficients that depend
//! only on the set of x-coordinates, so [`LagrangeCache`] computes them once
//! per holder set and reuses them for every secret shared to that set.
//!
//! [`reconstruct_verified`] tolerates wrong shares: given a check of the
//! secret against a public commitment, it finds a subset of shares whose
//! secret passes the check and names the holders whose shares do not lie on
//! its polynomial (see its docs for the search and its bounded cost).

use std::collections::HashMap;

use rand::{CryptoRng, Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{error::ProtocolError, message::ParticipantId};

/// Field elements per share (32-byte secret in 7-byte chunks).
pub const CHUNKS: usize = 5;

/// The field modulus `p = 2^61 - 1`.
pub const MODULUS: u64 = (1 << 61) - 1;

/// Bytes of the secret in each chunk: `[0..7]`, `[7..14]`, `[14..21]`,
/// `[21..28]`, `[28..32]`, each read as a little-endian integer.
const CHUNK_BYTES: usize = 7;

/// Holder sets kept by a [`LagrangeCache`] before it starts afresh.
const CACHE_ENTRIES: usize = 4096;

/// One share of a 32-byte secret: the evaluations at `x` of the 5 chunk
/// polynomials. 48 bytes on the wire. Secret material: not `Copy`, its
/// `Debug` shows only `x`, and its values are zeroised when dropped.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop,
)]
pub struct Share {
    /// Evaluation point (holder id + 1, never 0).
    pub x: u64,
    /// One value in [0, p) per chunk.
    pub y: [u64; CHUNKS],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("x", &self.x)
            .finish_non_exhaustive()
    }
}

/// Arithmetic in GF(2^61 - 1); operands are always reduced (`< p`).
mod field {
    use super::MODULUS as P;

    /// `x mod p` for `x < 2^122` (any product of two reduced elements).
    #[inline(always)]
    pub fn reduce(x: u128) -> u64 {
        // 2^61 = 1 (mod p): fold the high bits onto the low ones twice.
        let s = (x as u64 & P) + (x >> 61) as u64; // < 2^62
        let s = (s & P) + (s >> 61); // <= p + 1
        if s >= P { s - P } else { s }
    }

    #[inline(always)]
    pub fn add(a: u64, b: u64) -> u64 {
        let s = a + b;
        if s >= P { s - P } else { s }
    }

    #[inline(always)]
    pub fn sub(a: u64, b: u64) -> u64 {
        if a >= b { a - b } else { a + P - b }
    }

    #[inline(always)]
    pub fn mul(a: u64, b: u64) -> u64 {
        reduce(a as u128 * b as u128)
    }

    /// `a^e`.
    pub fn pow(mut a: u64, mut e: u64) -> u64 {
        let mut r = 1;
        while e > 0 {
            if e & 1 == 1 {
                r = mul(r, a);
            }
            a = mul(a, a);
            e >>= 1;
        }
        r
    }

    /// `a^-1` by Fermat (`a^(p-2)`); `a` must be non-zero.
    pub fn inv(a: u64) -> u64 {
        debug_assert!(a != 0);
        pow(a, P - 2)
    }

    /// Inverts every element in place with one inversion (Montgomery's
    /// trick); all elements must be non-zero.
    pub fn batch_inv(v: &mut [u64]) {
        let mut prefix = Vec::with_capacity(v.len());
        let mut acc = 1;
        for &a in v.iter() {
            prefix.push(acc);
            acc = mul(acc, a);
        }
        let mut inv_acc = inv(acc);
        for (a, before) in v.iter_mut().zip(prefix).rev() {
            let inv_a = mul(inv_acc, before);
            inv_acc = mul(inv_acc, *a);
            *a = inv_a;
        }
    }
}

/// A uniform field element by rejection sampling on 61-bit draws.
fn random_element(rng: &mut impl CryptoRng) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < MODULUS {
            return v;
        }
    }
}

fn chunk_range(c: usize) -> std::ops::Range<usize> {
    let start = c * CHUNK_BYTES;
    start..(start + CHUNK_BYTES).min(32)
}

fn check_x(x: u64) -> Result<(), ProtocolError> {
    if x == 0 || x >= MODULUS {
        return Err(ProtocolError::Crypto(format!(
            "invalid share x-coordinate {x} (must be in 1..2^61-1)"
        )));
    }
    Ok(())
}

/// Splits `secret` into one share per x in `xs` (distinct, non-zero, below p);
/// any `threshold` of them reconstruct it, fewer reveal nothing.
///
/// Chunk `c` of the secret is bytes `[7c .. min(7c + 7, 32)]` read as a
/// little-endian integer (the last chunk has 4 bytes); each chunk is the
/// constant term of its own uniformly random polynomial of degree
/// `threshold - 1`.
///
/// # Errors
/// `threshold` is 0 or exceeds `xs.len()`, or an x is 0, repeated or >= p.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u64],
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, ProtocolError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(ProtocolError::InvalidConfig(format!(
            "Shamir threshold {threshold} must be between 1 and the {} holders",
            xs.len()
        )));
    }
    for &x in xs {
        check_x(x)?;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(ProtocolError::Crypto(format!(
            "duplicate share x-coordinate {}",
            w[0]
        )));
    }

    let mut shares: Vec<Share> = xs.iter().map(|&x| Share { x, y: [0; CHUNKS] }).collect();
    // coeffs[0] = the chunk, coeffs[1..] uniform: degree threshold - 1.
    let mut coeffs = vec![0u64; threshold];
    for c in 0..CHUNKS {
        let mut chunk = [0u8; 8];
        let range = chunk_range(c);
        chunk[..range.len()].copy_from_slice(&secret[range]);
        coeffs[0] = u64::from_le_bytes(chunk);
        chunk.zeroize();
        for a in &mut coeffs[1..] {
            *a = random_element(rng);
        }
        for share in &mut shares {
            // Horner's rule from the highest coefficient down.
            let mut y = 0;
            for &a in coeffs.iter().rev() {
                y = field::add(field::mul(y, share.x), a);
            }
            share.y[c] = y;
        }
    }
    coeffs.zeroize();
    Ok(shares)
}

/// Reconstructs a secret from at least `threshold` shares (uses the first
/// `threshold` after sorting by x). With a cache, reuse it across secrets.
///
/// Extra shares beyond the first `threshold` are not used (nor verified).
///
/// # Errors
/// Fewer than `threshold` shares, duplicate or zero x, values >= p, or a
/// reconstructed chunk that does not fit in 7 bytes (inconsistent shares).
/// All are [`ProtocolError::Crypto`] except `threshold == 0`
/// ([`ProtocolError::InvalidConfig`]); callers that know whose secret it is
/// should check the share count first and report
/// [`ProtocolError::NotEnoughShares`].
pub fn combine(
    shares: &[Share],
    threshold: usize,
    cache: &mut LagrangeCache,
) -> Result<[u8; 32], ProtocolError> {
    if threshold == 0 {
        return Err(ProtocolError::InvalidConfig(
            "Shamir threshold must be at least 1".into(),
        ));
    }
    if shares.len() < threshold {
        return Err(ProtocolError::Crypto(format!(
            "only {} shares, {threshold} needed to reconstruct",
            shares.len()
        )));
    }
    let mut sorted: Vec<&Share> = shares.iter().collect();
    sorted.sort_unstable_by_key(|s| s.x);
    for s in &sorted {
        check_x(s.x)?;
        if s.y.iter().any(|&y| y >= MODULUS) {
            return Err(ProtocolError::Crypto(
                "share value outside the field".into(),
            ));
        }
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0].x == w[1].x) {
        return Err(ProtocolError::Crypto(format!(
            "duplicate share x-coordinate {}",
            w[0].x
        )));
    }
    let used = &sorted[..threshold];
    let xs: Vec<u64> = used.iter().map(|s| s.x).collect();
    let lambdas = cache.coefficients(&xs);

    let mut secret = [0u8; 32];
    for c in 0..CHUNKS {
        let mut v = 0;
        for (s, &l) in used.iter().zip(lambdas) {
            v = field::add(v, field::mul(s.y[c], l));
        }
        let range = chunk_range(c);
        if v >> (8 * range.len()) != 0 {
            secret.zeroize();
            return Err(ProtocolError::Crypto(
                "inconsistent shares: a reconstructed chunk does not fit its bytes".into(),
            ));
        }
        let mut bytes = v.to_le_bytes();
        secret[range.clone()].copy_from_slice(&bytes[..range.len()]);
        bytes.zeroize();
    }
    Ok(secret)
}

/// Lagrange coefficients at 0, memoised by the sorted set of x-coordinates.
///
/// Computing them costs O(t^2) field multiplications and one inversion per
/// holder set; combining a secret then costs 5t multiplications. The cache
/// holds up to 4096 holder sets and starts afresh when full.
#[derive(Debug, Default)]
pub struct LagrangeCache {
    coefficients: HashMap<Vec<u64>, Vec<u64>>,
}

impl LagrangeCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of holder sets cached.
    pub fn len(&self) -> usize {
        self.coefficients.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.coefficients.is_empty()
    }

    /// Coefficients for `xs` (sorted, distinct, non-zero, below p).
    fn coefficients(&mut self, xs: &[u64]) -> &[u64] {
        if !self.coefficients.contains_key(xs) {
            if self.coefficients.len() >= CACHE_ENTRIES {
                self.coefficients.clear();
            }
            self.coefficients.insert(xs.to_vec(), lagrange_at_zero(xs));
        }
        &self.coefficients[xs]
    }
}

/// `λ_j = Π_{m≠j} x_m / (x_m - x_j)` for distinct non-zero `xs`, computed
/// as `(Π_m x_m) / (x_j · Π_{m≠j} (x_m - x_j))` with one batch inversion.
fn lagrange_at_zero(xs: &[u64]) -> Vec<u64> {
    let numerator = xs.iter().fold(1, |acc, &x| field::mul(acc, x));
    let mut denominators: Vec<u64> = xs
        .iter()
        .enumerate()
        .map(|(j, &xj)| {
            xs.iter()
                .enumerate()
                .filter(|&(m, _)| m != j)
                .fold(xj, |acc, (_, &xm)| field::mul(acc, field::sub(xm, xj)))
        })
        .collect();
    field::batch_inv(&mut denominators);
    denominators
        .into_iter()
        .map(|d| field::mul(numerator, d))
        .collect()
}

/// Most candidate reconstructions [`reconstruct_verified`] makes for one
/// secret, so that wrong shares cannot make it search for long. Each costs
/// about `t^2` field multiplications; above `t = 128` the cap is lowered to
/// keep the work near `2^26` multiplications (but at least 64 candidates).
pub const MAX_RECONSTRUCT_ATTEMPTS: usize = 4096;

/// Field multiplications the subset search of [`reconstruct_verified`] may
/// spend on one secret, about (`t^2` per candidate).
const RECONSTRUCT_WORK: usize = 1 << 26;

/// The cap on candidate reconstructions for threshold `t` (see
/// [`MAX_RECONSTRUCT_ATTEMPTS`]).
fn attempt_cap(t: usize) -> usize {
    MAX_RECONSTRUCT_ATTEMPTS.min((RECONSTRUCT_WORK / t.saturating_mul(t).max(1)).max(64))
}

/// A secret that [`reconstruct_verified`] reconstructed and the caller's
/// check accepted. Its `Debug` never shows the secret.
pub struct VerifiedSecret {
    /// The secret (zeroised when dropped).
    pub secret: Zeroizing<[u8; 32]>,
    /// Holders whose shares do not lie on the secret's polynomial (wrong
    /// values in any chunk, or malformed: an x-coordinate other than
    /// holder + 1, a value outside the field), ascending.
    pub inconsistent: Vec<ParticipantId>,
    /// Candidate reconstructions made (1 when the first `t` shares were right).
    pub attempts: usize,
}

impl std::fmt::Debug for VerifiedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedSecret")
            .field("inconsistent", &self.inconsistent)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Why [`reconstruct_verified`] found no secret that passes the check. Never
/// carries share values; holders are named only where a share is provably
/// malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RobustReconstructError {
    /// The threshold is 0.
    #[error("the Shamir threshold must be at least 1")]
    InvalidThreshold,
    /// One holder appears twice among the shares (a caller's mistake).
    #[error("holder {0} is listed twice among the shares of one secret")]
    DuplicateHolder(ParticipantId),
    /// Fewer than `need` well-formed shares.
    #[error(
        "only {have} well-formed shares, {need} needed to reconstruct{}",
        malformed_note(.malformed)
    )]
    NotEnoughShares {
        /// Well-formed shares.
        have: usize,
        /// The threshold.
        need: usize,
        /// Holders whose shares were malformed, ascending.
        malformed: Vec<ParticipantId>,
    },
    /// Exactly `threshold` well-formed shares whose secret fails the check:
    /// at least one is wrong, but without a spare share nobody can tell which.
    #[error(
        "the {shares} shares (exactly the threshold) do not reconstruct the committed secret: \
         at least one is wrong, but without a spare share the wrong ones cannot be \
         identified{}",
        malformed_note(.malformed)
    )]
    Unidentifiable {
        /// Well-formed shares.
        shares: usize,
        /// Holders whose shares were malformed, ascending.
        malformed: Vec<ParticipantId>,
    },
    /// Every well-formed share lies on one polynomial whose secret fails the
    /// check: the owner shared another secret than the one it committed to
    /// (or more than `shares - threshold` holders colluded).
    #[error(
        "all {shares} shares lie on one polynomial but its secret does not match the \
         commitment: the secret's owner shared another secret than it committed to (or more \
         than {} holders colluded)",
        .shares - .threshold
    )]
    OwnerInconsistent {
        /// Well-formed shares.
        shares: usize,
        /// The threshold.
        threshold: usize,
    },
    /// Every `threshold`-subset was tried and none passes the check: more
    /// than `shares - threshold` shares are wrong.
    #[error(
        "no {threshold} of the {shares} shares reconstruct the committed secret ({attempts} \
         candidates tried, every subset): more than {} of them are wrong{}",
        .shares - .threshold,
        malformed_note(.malformed)
    )]
    TooManyWrong {
        /// Well-formed shares.
        shares: usize,
        /// The threshold.
        threshold: usize,
        /// Candidate reconstructions made.
        attempts: usize,
        /// Holders whose shares were malformed, ascending.
        malformed: Vec<ParticipantId>,
    },
    /// The search stopped at its cap (see [`MAX_RECONSTRUCT_ATTEMPTS`]) without
    /// a secret that passes the check: too many wrong shares to find the
    /// right ones in bounded time.
    #[error(
        "no verified secret from {shares} shares with threshold {threshold} within the cap of \
         {cap} candidate reconstructions: too many wrong shares{}",
        malformed_note(.malformed)
    )]
    AttemptsExhausted {
        /// Well-formed shares.
        shares: usize,
        /// The threshold.
        threshold: usize,
        /// The cap on candidate reconstructions.
        cap: usize,
        /// Holders whose shares were malformed, ascending.
        malformed: Vec<ParticipantId>,
    },
}

fn malformed_note(malformed: &[ParticipantId]) -> String {
    if malformed.is_empty() {
        String::new()
    } else {
        format!(" (malformed shares from holders {malformed:?} were left out)")
    }
}

impl From<RobustReconstructError> for ProtocolError {
    fn from(e: RobustReconstructError) -> Self {
        match e {
            RobustReconstructError::InvalidThreshold => ProtocolError::InvalidConfig(e.to_string()),
            e => ProtocolError::Crypto(e.to_string()),
        }
    }
}

/// Reconstructs a secret from `shares`, tolerating wrong ones: `verify`
/// checks a candidate secret against a public commitment (the X25519 public
/// key of a mask key, a SHA-256 commitment of a self-mask seed); the result
/// is the first secret it accepts, with the holders whose shares do not lie
/// on that secret's polynomial.
///
/// `shares` are `(holder, share)` pairs in any order; a share must sit at
/// `x = holder + 1`. Malformed shares (another x, a value outside the field)
/// are left out and named as inconsistent.
///
/// The search, each step only while nothing has passed `verify`:
/// 1. the `t` shares of the lowest x, with `cache` (the usual case: 1 attempt);
/// 2. with spare shares, Reed–Solomon decoding (Gao's algorithm, `O(n^2)`
///    per chunk), which corrects up to `(n - t) / 2` wrong shares at once;
/// 3. other `t`-subsets: all of them when there are at most as many as the
///    attempts left (then failing means more than `n - t` shares are wrong),
///    otherwise windows that leave out `n - t` consecutive shares, then
///    subsets drawn at random (from a fixed seed),
///
/// at most [`MAX_RECONSTRUCT_ATTEMPTS`] candidates in all (fewer for `t`
/// above 128, see there; the decoding counts as one). A candidate whose
/// chunks do not fit their bytes is discarded without calling `verify`.
/// Once a secret passes, every other share is checked against its
/// polynomial (`O(t)` per share). With `b` wrong shares among `n` the
/// secret is always found when `b <= (n - t) / 2`, or when `b <= n - t` and
/// `n` choose `t` is below the cap.
///
/// # Errors
/// See [`RobustReconstructError`]; none contains share values. In brief:
/// threshold 0, a holder listed twice, fewer than `t` well-formed shares,
/// exactly `t` shares that fail the check (the wrong one cannot be named),
/// all shares consistent but failing the check (the owner's fault), no
/// subset passes, or the cap was reached.
pub fn reconstruct_verified(
    shares: &[(ParticipantId, Share)],
    threshold: usize,
    cache: &mut LagrangeCache,
    mut verify: impl FnMut(&[u8; 32]) -> bool,
) -> Result<VerifiedSecret, RobustReconstructError> {
    let t = threshold;
    if t == 0 {
        return Err(RobustReconstructError::InvalidThreshold);
    }
    let mut holders: Vec<ParticipantId> = shares.iter().map(|(h, _)| *h).collect();
    holders.sort_unstable();
    if let Some(w) = holders.windows(2).find(|w| w[0] == w[1]) {
        return Err(RobustReconstructError::DuplicateHolder(w[0]));
    }
    let mut malformed = Vec::new();
    let mut usable: Vec<(ParticipantId, &Share)> = Vec::with_capacity(shares.len());
    for (h, s) in shares {
        if s.x != u64::from(*h) + 1 || s.y.iter().any(|&y| y >= MODULUS) {
            malformed.push(*h);
        } else {
            usable.push((*h, s));
        }
    }
    malformed.sort_unstable();
    // x = holder + 1 and the holders are distinct: so are the x.
    usable.sort_unstable_by_key(|(_, s)| s.x);
    let n = usable.len();
    if n < t {
        return Err(RobustReconstructError::NotEnoughShares {
            have: n,
            need: t,
            malformed,
        });
    }
    let xs: Vec<u64> = usable.iter().map(|(_, s)| s.x).collect();
    let ys: Vec<&[u64; CHUNKS]> = usable.iter().map(|(_, s)| &s.y).collect();
    let mut search = Search {
        xs: &xs,
        ys: &ys,
        t,
        attempts: 0,
    };
    let finish = |secret: Zeroizing<[u8; 32]>,
                  bad: Vec<usize>,
                  attempts: usize|
     -> Result<VerifiedSecret, RobustReconstructError> {
        let mut inconsistent: Vec<ParticipantId> = bad
            .into_iter()
            .map(|i| usable[i].0)
            .chain(malformed.iter().copied())
            .collect();
        inconsistent.sort_unstable();
        Ok(VerifiedSecret {
            secret,
            inconsistent,
            attempts,
        })
    };

    // 1. The first t, with the cached coefficients.
    let first: Vec<usize> = (0..t).collect();
    let lambdas = cache.coefficients(&xs[..t]).to_vec();
    if let Some(secret) = search.try_subset(&first, &lambdas, &mut verify) {
        let bad = search.off_polynomial(&first, &lambdas);
        return finish(secret, bad, search.attempts);
    }
    if n == t {
        return Err(RobustReconstructError::Unidentifiable {
            shares: n,
            malformed: malformed.clone(),
        });
    }

    // 2. Error-correcting decoding.
    {
        search.attempts += 1;
        if let Some(polys) = decode(&xs, &ys, t) {
            let disagree: Vec<usize> = (0..n)
                .filter(|&i| (0..CHUNKS).any(|c| horner(&polys[c], xs[i]) != ys[i][c]))
                .collect();
            let consts = Zeroizing::new(std::array::from_fn(|c| polys[c][0]));
            match secret_from_chunks(&consts) {
                Some(secret) if verify(&secret) => {
                    return finish(secret, disagree, search.attempts);
                }
                _ if disagree.is_empty() => {
                    return Err(RobustReconstructError::OwnerInconsistent {
                        shares: n,
                        threshold: t,
                    });
                }
                _ => {}
            }
        }
    }

    // 3. Other t-subsets, within the cap.
    let spare = n - t;
    let cap = attempt_cap(t);
    let left = cap.saturating_sub(search.attempts);
    let exhaustive = binomial_at_most(n, spare, left as u128).is_some();
    let mut left_out = vec![false; n];
    let mut try_excluding = |search: &mut Search<'_>, excluded: &[usize]| {
        left_out.fill(false);
        for &i in excluded {
            left_out[i] = true;
        }
        let subset: Vec<usize> = (0..n).filter(|&i| !left_out[i]).collect();
        let lambdas = lagrange_at_zero(&subset.iter().map(|&i| xs[i]).collect::<Vec<_>>());
        search
            .try_subset(&subset, &lambdas, &mut verify)
            .map(|secret| (secret, search.off_polynomial(&subset, &lambdas)))
    };
    if exhaustive {
        // Every choice of `spare` shares to leave out, in lexicographic order.
        let mut excluded: Vec<usize> = (0..spare).collect();
        loop {
            if let Some((secret, bad)) = try_excluding(&mut search, &excluded) {
                return finish(secret, bad, search.attempts);
            }
            // The next combination: bump the rightmost index that can move.
            let Some(k) = (0..spare).rev().find(|&k| excluded[k] < n - spare + k) else {
                break;
            };
            excluded[k] += 1;
            for j in k + 1..spare {
                excluded[j] = excluded[j - 1] + 1;
            }
        }
        return Err(RobustReconstructError::TooManyWrong {
            shares: n,
            threshold: t,
            attempts: search.attempts,
            malformed: malformed.clone(),
        });
    }
    // Windows of `spare` consecutive shares (cyclically) left out.
    for start in 0..n {
        if search.attempts >= cap {
            break;
        }
        let excluded: Vec<usize> = (0..spare).map(|k| (start + k) % n).collect();
        if let Some((secret, bad)) = try_excluding(&mut search, &excluded) {
            return finish(secret, bad, search.attempts);
        }
    }
    // Random subsets from a fixed seed (the search is deterministic).
    let mut rng = StdRng::seed_from_u64(0x5ec2e7 ^ ((n as u64) << 32) ^ t as u64);
    let mut order: Vec<usize> = (0..n).collect();
    while search.attempts < cap {
        // A partial Fisher-Yates shuffle: the last `spare` are left out.
        for k in 0..spare {
            let j = k + (rng.next_u64() % (n - k) as u64) as usize;
            order.swap(k, j);
        }
        let mut excluded = order[..spare].to_vec();
        excluded.sort_unstable();
        if let Some((secret, bad)) = try_excluding(&mut search, &excluded) {
            return finish(secret, bad, search.attempts);
        }
    }
    Err(RobustReconstructError::AttemptsExhausted {
        shares: n,
        threshold: t,
        cap,
        malformed: malformed.clone(),
    })
}

/// The state of one [`reconstruct_verified`] search: the well-formed
/// shares sorted by x, and the candidates made so far.
struct Search<'a> {
    xs: &'a [u64],
    ys: &'a [&'a [u64; CHUNKS]],
    t: usize,
    attempts: usize,
}

impl Search<'_> {
    /// The secret interpolated from the shares at `subset` (`t` indices,
    /// ascending) with their Lagrange coefficients at 0, if it fits its
    /// bytes and passes `verify`. Counts one attempt.
    fn try_subset(
        &mut self,
        subset: &[usize],
        lambdas: &[u64],
        verify: &mut impl FnMut(&[u8; 32]) -> bool,
    ) -> Option<Zeroizing<[u8; 32]>> {
        debug_assert_eq!(subset.len(), self.t);
        self.attempts += 1;
        let mut consts = Zeroizing::new([0u64; CHUNKS]);
        for (c, v) in consts.iter_mut().enumerate() {
            for (&i, &l) in subset.iter().zip(lambdas) {
                *v = field::add(*v, field::mul(self.ys[i][c], l));
            }
        }
        let secret = secret_from_chunks(&consts)?;
        verify(&secret).then_some(secret)
    }

    /// Indices of the shares outside `subset` that do not lie on the
    /// polynomials through the shares at `subset` (whose Lagrange
    /// coefficients at 0 are `lambdas`), ascending.
    ///
    /// Barycentric form: with `M(x) = Π_j (x - x_j)` and
    /// `w_j = 1 / Π_{m≠j} (x_j - x_m) = -x_j λ_j / M(0)`, the polynomial
    /// is `P(x) = M(x) Σ_j w_j y_j / (x - x_j)`: `O(t)` per share checked.
    fn off_polynomial(&self, subset: &[usize], lambdas: &[u64]) -> Vec<usize> {
        let sx: Vec<u64> = subset.iter().map(|&i| self.xs[i]).collect();
        let m0 = sx
            .iter()
            .fold(1, |acc, &x| field::mul(acc, field::sub(0, x)));
        let inv_m0 = field::inv(m0);
        let w: Vec<u64> = sx
            .iter()
            .zip(lambdas)
            .map(|(&x, &l)| field::mul(field::mul(field::sub(0, x), l), inv_m0))
            .collect();
        let mut bad = Vec::new();
        let mut d = vec![0u64; sx.len()];
        let mut next = subset.iter().peekable();
        for i in 0..self.xs.len() {
            if next.peek() == Some(&&i) {
                next.next();
                continue;
            }
            let x = self.xs[i];
            for (dj, &xj) in d.iter_mut().zip(&sx) {
                *dj = field::sub(x, xj);
            }
            let mx = d.iter().fold(1, |acc, &v| field::mul(acc, v));
            field::batch_inv(&mut d);
            let on = (0..CHUNKS).all(|c| {
                let s = subset
                    .iter()
                    .zip(&w)
                    .zip(&d)
                    .fold(0, |acc, ((&j, &wj), &dj)| {
                        field::add(acc, field::mul(field::mul(wj, dj), self.ys[j][c]))
                    });
                field::mul(mx, s) == self.ys[i][c]
            });
            if !on {
                bad.push(i);
            }
        }
        bad
    }
}

/// The secret whose chunks are `consts`, if every chunk fits its bytes.
fn secret_from_chunks(consts: &[u64; CHUNKS]) -> Option<Zeroizing<[u8; 32]>> {
    let mut secret = Zeroizing::new([0u8; 32]);
    for (c, &v) in consts.iter().enumerate() {
        let range = chunk_range(c);
        if v >> (8 * range.len()) != 0 {
            return None;
        }
        let bytes = Zeroizing::new(v.to_le_bytes());
        secret[range.clone()].copy_from_slice(&bytes[..range.len()]);
    }
    Some(secret)
}

/// `p(x)` for coefficients `p` (constant first).
fn horner(p: &[u64], x: u64) -> u64 {
    p.iter()
        .rev()
        .fold(0, |acc, &a| field::add(field::mul(acc, x), a))
}

/// `C(n, k)` when it is at most `cap` (and `cap` times `n` fits 128
/// bits), else `None`; `k <= n`.
fn binomial_at_most(n: usize, k: usize, cap: u128) -> Option<u128> {
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 0..k {
        // C(n, i + 1) = C(n, i) * (n - i) / (i + 1), exact at every step.
        c = c.checked_mul((n - i) as u128)? / (i + 1) as u128;
        if c > cap {
            return None;
        }
    }
    Some(c)
}

/// A polynomial over the field, constant coefficient first, zeroised when
/// dropped (it may be a secret's).
type Poly = Zeroizing<Vec<u64>>;

/// Gao's Reed–Solomon decoding of each chunk: the polynomials of degree
/// `< t` that agree with all but at most `e = (n - t) / 2` of the `n > t`
/// points `(xs[i], ys[i][c])` (distinct non-zero x), or `None` when some
/// chunk has more wrong points. `O(n^2)` field operations per chunk.
fn decode(xs: &[u64], ys: &[&[u64; CHUNKS]], t: usize) -> Option<[Poly; CHUNKS]> {
    let n = xs.len();
    // g0 = Π (x - x_i) and the barycentric weights w_i = 1 / Π_{j≠i} (x_i - x_j),
    // shared by the chunks.
    let mut g0 = vec![1u64];
    for &x in xs {
        g0 = poly_mul_linear(&g0, x);
    }
    let mut w: Vec<u64> = xs
        .iter()
        .enumerate()
        .map(|(i, &xi)| {
            xs.iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .fold(1, |acc, (_, &xj)| field::mul(acc, field::sub(xi, xj)))
        })
        .collect();
    field::batch_inv(&mut w);
    // g0 / (x - x_i) for every i: the Lagrange numerators.
    let numerators: Vec<Vec<u64>> = xs.iter().map(|&x| poly_div_linear(&g0, x)).collect();
    let mut out: [Poly; CHUNKS] = Default::default();
    for (c, poly) in out.iter_mut().enumerate() {
        // g1: the interpolation polynomial through all n points, degree < n.
        let mut g1 = Zeroizing::new(vec![0u64; n]);
        for ((num, &wi), y) in numerators.iter().zip(&w).zip(ys) {
            let f = field::mul(wi, y[c]);
            if f != 0 {
                for (a, &b) in g1.iter_mut().zip(num) {
                    *a = field::add(*a, field::mul(f, b));
                }
            }
        }
        *poly = gao(&g0, g1, n, t)?;
    }
    Some(out)
}

/// Gao's decoding step for one chunk: the extended Euclidean algorithm on
/// `(g0, g1)` stops at the first remainder `g` of degree below `(n + t) / 2`,
/// with `g = u g0 + v g1`; the message polynomial is `g / v` when that
/// division is exact and has degree `< t`.
fn gao(g0: &[u64], g1: Poly, n: usize, t: usize) -> Option<Poly> {
    let mut r0 = Zeroizing::new(g0.to_vec());
    let mut r1 = g1;
    trim(&mut r1);
    let mut v0 = Zeroizing::new(Vec::new());
    let mut v1 = Zeroizing::new(vec![1u64]);
    // deg(r1) < (n + t) / 2, with deg(0) = -1.
    while 2 * r1.len() > n + t + 1 {
        let (q, r) = poly_divmod(&r0, &r1)?;
        let qv1 = poly_mul(&q, &v1);
        let v2 = Zeroizing::new(poly_sub(&v0, &qv1));
        r0 = std::mem::replace(&mut r1, r);
        v0 = std::mem::replace(&mut v1, v2);
    }
    let (p, rem) = poly_divmod(&r1, &v1)?;
    (rem.is_empty() && p.len() <= t).then(|| {
        let mut p = p;
        p.resize(t, 0);
        p
    })
}

/// Drops leading zero coefficients (the zero polynomial is empty).
fn trim(p: &mut Vec<u64>) {
    while p.last() == Some(&0) {
        p.pop();
    }
}

/// `p * (x - a)`.
fn poly_mul_linear(p: &[u64], a: u64) -> Vec<u64> {
    let mut out = vec![0u64; p.len() + 1];
    for (k, &c) in p.iter().enumerate() {
        out[k + 1] = field::add(out[k + 1], c);
        out[k] = field::sub(out[k], field::mul(c, a));
    }
    out
}

/// `p / (x - a)` for a `p` that `a` is a root of (synthetic division).
fn poly_div_linear(p: &[u64], a: u64) -> Vec<u64> {
    let mut out = vec![0u64; p.len().saturating_sub(1)];
    let mut carry = 0;
    for k in (1..p.len()).rev() {
        carry = field::add(p[k], field::mul(carry, a));
        out[k - 1] = carry;
    }
    out
}

/// `a * b`, trimmed.
fn poly_mul(a: &[u64], b: &[u64]) -> Vec<u64> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let mut out = vec![0u64; a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            out[i + j] = field::add(out[i + j], field::mul(x, y));
        }
    }
    trim(&mut out);
    out
}

/// `a - b`, trimmed.
fn poly_sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = (0..a.len().max(b.len()))
        .map(|k| {
            field::sub(
                a.get(k).copied().unwrap_or(0),
                b.get(k).copied().unwrap_or(0),
            )
        })
        .collect();
    trim(&mut out);
    out
}

/// `(a / b, a mod b)`, both trimmed; `None` when `b` is zero.
fn poly_divmod(a: &[u64], b: &[u64]) -> Option<(Poly, Poly)> {
    let lead = *b.last()?;
    let mut rem = Zeroizing::new(a.to_vec());
    trim(&mut rem);
    if rem.len() < b.len() {
        return Some((Zeroizing::new(Vec::new()), rem));
    }
    let inv_lead = field::inv(lead);
    let mut quo = Zeroizing::new(vec![0u64; rem.len() - b.len() + 1]);
    for k in (0..quo.len()).rev() {
        let coef = field::mul(rem[k + b.len() - 1], inv_lead);
        quo[k] = coef;
        if coef != 0 {
            for (j, &bj) in b.iter().enumerate() {
                rem[k + j] = field::sub(rem[k + j], field::mul(coef, bj));
            }
        }
    }
    trim(&mut quo);
    trim(&mut rem);
    Some((quo, rem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

    fn random_secret(rng: &mut StdRng) -> [u8; 32] {
        let mut s = [0u8; 32];
        rng.fill_bytes(&mut s);
        s
    }

    #[test]
    fn a_share_shows_only_its_point_and_zeroises() {
        use zeroize::Zeroize;
        let mut share = Share {
            x: 3,
            y: [123_456_789, 2, 3, 4, 5],
        };
        let shown = format!("{share:?}");
        assert!(shown.contains("x: 3"), "{shown}");
        assert!(!shown.contains("123456789"), "{shown}");
        share.zeroize();
        assert_eq!((share.x, share.y), (0, [0; CHUNKS]));
    }

    fn xs(n: usize) -> Vec<u64> {
        (1..=n as u64).map(|i| i * 7 + 3).collect()
    }

    #[test]
    fn field_reduction_matches_u128_remainder() {
        let mut rng = StdRng::seed_from_u64(1);
        let edge = [0, 1, 2, MODULUS - 2, MODULUS - 1, 1 << 60, (1 << 60) + 1];
        let mut values: Vec<u64> = (0..2000).map(|_| random_element(&mut rng)).collect();
        values.extend(edge);
        for w in values.windows(2) {
            let (a, b) = (w[0], w[1]);
            let p = MODULUS as u128;
            assert_eq!(field::mul(a, b) as u128, a as u128 * b as u128 % p);
            assert_eq!(field::add(a, b) as u128, (a as u128 + b as u128) % p);
            assert_eq!(field::sub(a, b) as u128, (a as u128 + p - b as u128) % p);
        }
        for x in [u128::MAX >> 6, (MODULUS as u128) * (MODULUS as u128), 0] {
            assert_eq!(field::reduce(x) as u128, x % MODULUS as u128);
        }
    }

    #[test]
    fn inverses() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut v: Vec<u64> = (0..200)
            .map(|_| random_element(&mut rng).max(1))
            .chain([1, 2, MODULUS - 1])
            .collect();
        let original = v.clone();
        field::batch_inv(&mut v);
        for (a, ia) in original.iter().zip(&v) {
            assert_eq!(field::mul(*a, *ia), 1);
            assert_eq!(field::inv(*a), *ia);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip_any_subset(t in 1usize..=20, extra in 0usize..=20, seed: u64) {
            let n = t + extra;
            let mut rng = StdRng::seed_from_u64(seed);
            let secret = random_secret(&mut rng);
            let holders = xs(n);
            let mut shares = split(&secret, t, &holders, &mut rng).unwrap();
            prop_assert_eq!(shares.len(), n);
            for (s, &x) in shares.iter().zip(&holders) {
                prop_assert_eq!(s.x, x);
                prop_assert!(s.y.iter().all(|&y| y < MODULUS));
            }
            shares.shuffle(&mut rng);
            let mut cache = LagrangeCache::new();
            prop_assert_eq!(combine(&shares[..t], t, &mut cache).unwrap(), secret);
            // More shares than needed also work.
            prop_assert_eq!(combine(&shares, t, &mut cache).unwrap(), secret);
            // Fewer than t: an error.
            prop_assert!(combine(&shares[..t - 1], t, &mut cache).is_err());
            // t - 1 shares interpolated as if t - 1 sufficed: not the secret.
            if t >= 2 {
                let wrong = combine(&shares[..t - 1], t - 1, &mut cache);
                prop_assert!(wrong != Ok(secret));
            }
        }
    }

    #[test]
    fn all_zero_and_all_ones_secrets() {
        let mut rng = StdRng::seed_from_u64(3);
        for secret in [[0u8; 32], [0xff; 32]] {
            let shares = split(&secret, 3, &xs(5), &mut rng).unwrap();
            let mut cache = LagrangeCache::new();
            assert_eq!(combine(&shares[2..], 3, &mut cache).unwrap(), secret);
        }
    }

    #[test]
    fn split_rejects_bad_parameters() {
        let mut rng = StdRng::seed_from_u64(4);
        let s = [7u8; 32];
        assert!(split(&s, 0, &[1, 2, 3], &mut rng).is_err());
        assert!(split(&s, 4, &[1, 2, 3], &mut rng).is_err());
        assert!(split(&s, 1, &[], &mut rng).is_err());
        assert!(split(&s, 2, &[1, 0, 3], &mut rng).is_err());
        assert!(split(&s, 2, &[1, MODULUS, 3], &mut rng).is_err());
        assert!(split(&s, 2, &[1, u64::MAX, 3], &mut rng).is_err());
        assert!(split(&s, 2, &[1, 3, 1], &mut rng).is_err());
        assert!(split(&s, 3, &[1, 2, MODULUS - 1], &mut rng).is_ok());
    }

    #[test]
    fn combine_rejects_bad_shares() {
        let mut rng = StdRng::seed_from_u64(5);
        let secret = random_secret(&mut rng);
        let shares = split(&secret, 3, &xs(5), &mut rng).unwrap();
        let mut cache = LagrangeCache::new();
        assert!(combine(&shares, 0, &mut cache).is_err());

        let mut dup = shares.clone();
        dup[1].x = dup[0].x;
        assert!(combine(&dup, 3, &mut cache).is_err());

        let mut zero = shares.clone();
        zero[0].x = 0;
        assert!(combine(&zero, 3, &mut cache).is_err());

        let mut big = shares.clone();
        big[0].y[2] = MODULUS;
        assert!(combine(&big, 3, &mut cache).is_err());

        // A tampered share makes every chunk a random-looking field element,
        // which does not fit in 7 (4) bytes with overwhelming probability.
        let mut tampered = shares[..3].to_vec();
        for y in &mut tampered[1].y {
            *y = field::add(*y, 1);
        }
        assert!(matches!(
            combine(&tampered, 3, &mut cache),
            Err(ProtocolError::Crypto(_))
        ));
        assert_eq!(combine(&shares, 3, &mut cache).unwrap(), secret);
    }

    #[test]
    fn cache_matches_fresh_computation() {
        let mut rng = StdRng::seed_from_u64(6);
        let holders = xs(30);
        let mut cache = LagrangeCache::new();
        for round in 0..20 {
            let secret = random_secret(&mut rng);
            let mut shares = split(&secret, 10, &holders, &mut rng).unwrap();
            // Alternate between two holder sets.
            if round % 2 == 0 {
                shares.reverse();
            }
            let subset = &shares[..10];
            let cached = combine(subset, 10, &mut cache).unwrap();
            let fresh = combine(subset, 10, &mut LagrangeCache::new()).unwrap();
            assert_eq!(cached, fresh);
            assert_eq!(cached, secret);
        }
        assert_eq!(cache.len(), 2);
    }

    /// t = 500: 1000 reconstructions for one holder set reuse the cached
    /// coefficients (the O(t^2) work happens once).
    #[test]
    fn large_threshold_many_secrets() {
        let t = 500;
        let mut rng = StdRng::seed_from_u64(7);
        let holders = xs(t);
        let secrets: Vec<[u8; 32]> = (0..4).map(|_| random_secret(&mut rng)).collect();
        let shares: Vec<Vec<Share>> = secrets
            .iter()
            .map(|s| split(s, t, &holders, &mut rng).unwrap())
            .collect();
        let mut cache = LagrangeCache::new();
        for i in 0..1000 {
            let k = i % secrets.len();
            assert_eq!(combine(&shares[k], t, &mut cache).unwrap(), secrets[k]);
        }
        assert_eq!(cache.len(), 1);
    }

    /// Tests of [`reconstruct_verified`].
    mod robust {
        use super::*;

        /// `n` shares of a random secret, threshold `t`, held by participants
        /// `3i + 1` (x = holder + 1), in holder order.
        fn deal(rng: &mut StdRng, t: usize, n: usize) -> ([u8; 32], Vec<(ParticipantId, Share)>) {
            let secret = random_secret(rng);
            let holders: Vec<ParticipantId> = (0..n as u32).map(|i| 3 * i + 1).collect();
            let xs: Vec<u64> = holders.iter().map(|&h| u64::from(h) + 1).collect();
            let shares = split(&secret, t, &xs, rng).unwrap();
            (secret, holders.into_iter().zip(shares).collect())
        }

        /// Adds a random non-zero offset to a random non-empty set of chunks.
        fn corrupt(share: &mut Share, rng: &mut StdRng) {
            let mask = rng.random_range(1u32..(1 << CHUNKS));
            for c in 0..CHUNKS {
                if mask & (1 << c) != 0 {
                    let delta = rng.random_range(1..MODULUS);
                    share.y[c] = field::add(share.y[c], delta);
                }
            }
        }

        /// Corrupts the shares at `positions`; returns their holders, ascending.
        fn corrupt_at(
            shares: &mut [(ParticipantId, Share)],
            positions: &[usize],
            rng: &mut StdRng,
        ) -> Vec<ParticipantId> {
            let mut bad: Vec<ParticipantId> = positions
                .iter()
                .map(|&i| {
                    corrupt(&mut shares[i].1, rng);
                    shares[i].0
                })
                .collect();
            bad.sort_unstable();
            bad
        }

        fn run(
            shares: &[(ParticipantId, Share)],
            t: usize,
            secret: [u8; 32],
        ) -> Result<VerifiedSecret, RobustReconstructError> {
            reconstruct_verified(shares, t, &mut LagrangeCache::new(), |s| *s == secret)
        }

        #[test]
        fn good_shares_give_the_secret_at_the_first_attempt() {
            let mut rng = StdRng::seed_from_u64(11);
            for (t, n) in [(1, 1), (3, 3), (5, 5), (60, 60), (4, 7), (60, 63)] {
                let (secret, mut shares) = deal(&mut rng, t, n);
                shares.shuffle(&mut rng);
                let got = run(&shares, t, secret).unwrap();
                assert_eq!(*got.secret, secret);
                assert!(got.inconsistent.is_empty(), "{got:?}");
                assert_eq!(got.attempts, 1);
            }
        }

        #[test]
        fn spare_shares_expose_exactly_the_wrong_holders() {
            let mut rng = StdRng::seed_from_u64(12);
            for t in [1, 2, 5, 20, 60] {
                let n = t + 2;
                // One or two wrong shares, at the front (among the first t
                // by x), at the back, and spread out.
                for positions in [
                    vec![0],
                    vec![n - 1],
                    vec![t / 2],
                    vec![0, 1],
                    vec![0, n - 1],
                    vec![n - 2, n - 1],
                    vec![t / 3, (2 * t) / 3 + 1],
                ] {
                    let (secret, mut shares) = deal(&mut rng, t, n);
                    let bad = corrupt_at(&mut shares, &positions, &mut rng);
                    shares.shuffle(&mut rng);
                    let got = run(&shares, t, secret)
                        .unwrap_or_else(|e| panic!("t {t}, wrong {positions:?}: {e}"));
                    assert_eq!(*got.secret, secret);
                    assert_eq!(got.inconsistent, bad, "t {t}, wrong {positions:?}");
                    assert!(got.attempts <= MAX_RECONSTRUCT_ATTEMPTS);
                }
            }
        }

        #[test]
        fn many_spares_correct_many_wrong_shares_by_decoding() {
            // (n - t) / 2 wrong shares: far too many subsets to search,
            // corrected by the decoding step.
            let mut rng = StdRng::seed_from_u64(13);
            for (t, n) in [(31, 60), (100, 300), (2, 9)] {
                let (secret, mut shares) = deal(&mut rng, t, n);
                let mut positions: Vec<usize> = (0..n).collect();
                positions.shuffle(&mut rng);
                let bad = corrupt_at(&mut shares, &positions[..(n - t) / 2], &mut rng);
                let got = run(&shares, t, secret).unwrap();
                assert_eq!(*got.secret, secret);
                assert_eq!(got.inconsistent, bad);
                assert!(got.attempts <= 2, "{got:?}");
            }
        }

        #[test]
        fn exactly_threshold_shares_with_a_wrong_one_cannot_name_it() {
            let mut rng = StdRng::seed_from_u64(14);
            for t in [1, 2, 10] {
                let (secret, mut shares) = deal(&mut rng, t, t);
                corrupt_at(&mut shares, &[t - 1], &mut rng);
                let e = run(&shares, t, secret).unwrap_err();
                assert_eq!(
                    e,
                    RobustReconstructError::Unidentifiable {
                        shares: t,
                        malformed: vec![]
                    }
                );
                assert!(e.to_string().contains("cannot be identified"), "{e}");
            }
        }

        #[test]
        fn too_many_wrong_shares_fail_in_bounded_work() {
            let mut rng = StdRng::seed_from_u64(15);
            // Few enough subsets to try them all: a definite answer.
            let (secret, mut shares) = deal(&mut rng, 3, 5);
            corrupt_at(&mut shares, &[0, 2, 4], &mut rng);
            match run(&shares, 3, secret) {
                Err(RobustReconstructError::TooManyWrong {
                    shares: 5,
                    threshold: 3,
                    attempts,
                    ..
                }) => assert!(attempts <= 12, "{attempts}"),
                other => panic!("{other:?}"),
            }
            // Far too many: the cap, named in the error.
            let (t, n) = (40, 50);
            let (secret, mut shares) = deal(&mut rng, t, n);
            let bad: Vec<usize> = (0..n).step_by(2).collect();
            corrupt_at(&mut shares, &bad, &mut rng);
            let mut calls = 0;
            let started = std::time::Instant::now();
            let e = reconstruct_verified(&shares, t, &mut LagrangeCache::new(), |s| {
                calls += 1;
                *s == secret
            })
            .unwrap_err();
            assert_eq!(
                e,
                RobustReconstructError::AttemptsExhausted {
                    shares: n,
                    threshold: t,
                    cap: MAX_RECONSTRUCT_ATTEMPTS,
                    malformed: vec![]
                }
            );
            assert!(
                e.to_string()
                    .contains(&MAX_RECONSTRUCT_ATTEMPTS.to_string()),
                "{e}"
            );
            assert!(calls <= MAX_RECONSTRUCT_ATTEMPTS);
            assert!(started.elapsed() < std::time::Duration::from_secs(60));
        }

        #[test]
        fn consistent_shares_of_another_secret_blame_the_owner() {
            let mut rng = StdRng::seed_from_u64(16);
            let (_, shares) = deal(&mut rng, 4, 7);
            let committed = random_secret(&mut rng);
            let e = run(&shares, 4, committed).unwrap_err();
            assert_eq!(
                e,
                RobustReconstructError::OwnerInconsistent {
                    shares: 7,
                    threshold: 4
                }
            );
        }

        #[test]
        fn malformed_shares_are_named_and_bad_input_refused() {
            let mut rng = StdRng::seed_from_u64(17);
            let (secret, mut shares) = deal(&mut rng, 3, 6);
            shares[1].1.x += 1; // not at holder + 1
            shares[4].1.y[2] = MODULUS; // outside the field
            let got = run(&shares, 3, secret).unwrap();
            assert_eq!(*got.secret, secret);
            assert_eq!(got.inconsistent, vec![shares[1].0, shares[4].0]);
            // Too few well-formed shares left.
            let e = run(&shares[..4], 4, secret).unwrap_err();
            assert_eq!(
                e,
                RobustReconstructError::NotEnoughShares {
                    have: 3,
                    need: 4,
                    malformed: vec![shares[1].0]
                }
            );
            let mut dup = shares.clone();
            dup[0].0 = dup[2].0;
            assert_eq!(
                run(&dup, 3, secret).unwrap_err(),
                RobustReconstructError::DuplicateHolder(dup[2].0)
            );
            assert_eq!(
                run(&shares, 0, secret).unwrap_err(),
                RobustReconstructError::InvalidThreshold
            );
            assert_eq!(
                run(&[], 1, secret).unwrap_err(),
                RobustReconstructError::NotEnoughShares {
                    have: 0,
                    need: 1,
                    malformed: vec![]
                }
            );
        }

        #[test]
        fn neither_errors_nor_debug_show_secrets_or_share_values() {
            let mut rng = StdRng::seed_from_u64(18);
            let (secret, mut shares) = deal(&mut rng, 3, 3);
            let got = run(&shares, 3, secret).unwrap();
            let shown = format!("{got:?}");
            assert!(!shown.contains("secret"), "{shown}");
            corrupt_at(&mut shares, &[1], &mut rng);
            let e = run(&shares, 3, secret).unwrap_err();
            let texts = [e.to_string(), format!("{e:?}")];
            for text in &texts {
                for (_, s) in &shares {
                    for y in s.y {
                        assert!(!text.contains(&y.to_string()), "{text}");
                    }
                }
            }
            // Converted for the state machines: a crypto error.
            assert!(matches!(ProtocolError::from(e), ProtocolError::Crypto(_)));
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]
            /// Any threshold, spare count and set of wrong holders with at
            /// least `t` right shares: the secret and exactly the wrong
            /// holders, whenever the search is guaranteed to find them
            /// (`b <= (n - t) / 2`, or few enough subsets to try them all);
            /// otherwise the cap, never a wrong secret or a panic.
            #[test]
            fn finds_the_secret_and_the_wrong_holders(
                t in 1usize..=24,
                spare in 0usize..=6,
                wrong in 0usize..=6,
                seed: u64,
            ) {
                let wrong = wrong.min(spare);
                let n = t + spare;
                let mut rng = StdRng::seed_from_u64(seed);
                let (secret, mut shares) = deal(&mut rng, t, n);
                let mut positions: Vec<usize> = (0..n).collect();
                positions.shuffle(&mut rng);
                let bad = corrupt_at(&mut shares, &positions[..wrong], &mut rng);
                shares.shuffle(&mut rng);
                let guaranteed = 2 * wrong <= spare
                    || binomial_at_most(n, spare, MAX_RECONSTRUCT_ATTEMPTS as u128 - 2).is_some();
                match run(&shares, t, secret) {
                    Ok(got) => {
                        prop_assert_eq!(*got.secret, secret);
                        prop_assert_eq!(got.inconsistent, bad);
                        prop_assert!(got.attempts <= MAX_RECONSTRUCT_ATTEMPTS);
                    }
                    Err(e) => {
                        prop_assert!(!guaranteed, "t {} n {} wrong {}: {}", t, n, wrong, e);
                        let capped = matches!(
                            e,
                            RobustReconstructError::AttemptsExhausted { .. }
                        );
                        prop_assert!(capped, "{}", e);
                    }
                }
            }
        }

        #[test]
        fn binomials_stop_at_the_cap() {
            assert_eq!(binomial_at_most(5, 2, 100), Some(10));
            assert_eq!(binomial_at_most(62, 2, 4096), Some(1891));
            assert_eq!(binomial_at_most(62, 60, 4096), Some(1891));
            assert_eq!(binomial_at_most(7, 0, 1), Some(1));
            assert_eq!(binomial_at_most(63, 3, 4096), None);
            assert_eq!(binomial_at_most(1000, 500, u128::MAX >> 8), None);
            assert_eq!(attempt_cap(1), MAX_RECONSTRUCT_ATTEMPTS);
            assert_eq!(attempt_cap(128), MAX_RECONSTRUCT_ATTEMPTS);
            assert_eq!(attempt_cap(500), (1 << 26) / 250_000);
            assert_eq!(attempt_cap(100_000), 64);
        }
    }
}
