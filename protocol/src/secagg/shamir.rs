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

use std::collections::HashMap;

use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::error::ProtocolError;

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
}
