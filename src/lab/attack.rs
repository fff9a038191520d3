//! Attacks on the image cipher ([`greyfed_participant::cipher`]), for measuring what it
//! hides.
//!
//! # The model attacked
//!
//! Every greyfed cipher mode works on a *value vector*: the image itself
//! (8-bit modes, `n = rows * cols`), or its public, keyless
//! [split](split_values) into 4-bit halves stored as `h * 17` (split modes,
//! `n = 2 * rows * cols`). The keyed
//! part is always a permutation plus an inversion mask:
//! `cipher[d] = plain[source[d]] ^ xor[d]` with `source` a permutation of
//! `0..n` and `xor[d]` in `{0x00, 0xFF}` (`(h * 17) ^ 0xFF = (15 - h) * 17`).
//! The attacks here take value vectors; callers expand plain images with
//! [`split_values`] for split modes and turn results back into pictures with
//! [`merge_split`].
//!
//! # Attacks
//!
//! - [`KnownPlaintextAttack`]: the image key is shared by all participants,
//!   so (plain, cipher) pairs leaked by anyone expose the table for
//!   everyone. Each pair narrows, for every cipher position, the source
//!   positions and inversions that fit.
//! - [`fold`] / [`fold_image`] (ciphertext only): inversion maps `v` to
//!   `255 - v`, and `fold(v) = min(v, 255 - v)` forgets exactly that, so
//!   folding undoes every negative-positive step without the key.
//!
//! # Measured
//!
//! On real MNIST digits (the project's `mnist-10k` set: known pairs from the
//! training split, 500 held-out test images), block size `B = 4`, with
//! random tables built the way [`greyfed_participant::cipher`] builds them (one table per
//! mode; rotate/flip left out, as the in-block shuffle already covers it).
//!
//! Known-plaintext attack, by number `K` of known pairs. "Unique" is
//! [`fraction_unique`](KnownPlaintextAttack::fraction_unique); "SSIM" and
//! "exact" are the mean [SSIM](super::quality::ssim) of the decrypted
//! held-out images and the fraction decrypted without a single wrong pixel:
//!
//! | K                 | 1     | 2     | 5     | 10    | 20    | 50    | 100   | 300   |
//! |-------------------|-------|-------|-------|-------|-------|-------|-------|-------|
//! | unique, 8-bit     | 0.019 | 0.136 | 0.284 | 0.375 | 0.483 | 0.583 | 0.643 | 0.710 |
//! | `block`: SSIM     | 0.12  | 0.41  | 0.74  | 0.89  | 0.97  | 0.998 | 0.999 | 1.000 |
//! | `block`: exact    | 0     | 0     | 0.002 | 0.07  | 0.24  | 0.64  | 0.79  | 0.92  |
//! | unique, split     | 0.000 | 0.015 | 0.193 | 0.323 | 0.420 | 0.555 | 0.628 | 0.693 |
//! | `le`: SSIM        | 0.11  | 0.20  | 0.60  | 0.87  | 0.97  | 0.996 | 0.999 | 1.000 |
//! | `le`: exact       | 0     | 0     | 0     | 0.04  | 0.15  | 0.47  | 0.73  | 0.90  |
//!
//! `extended` behaves like `block`, and `pixel` like `le` (somewhat better
//! for the attacker at `K <= 5`: SSIM 0.36 at `K = 2`, as lowest-first
//! guesses favour its table, which moves values only within a pixel). The
//! unique fraction depends only on the known plain images (it is the same
//! for every key and every mode of one representation) and stays near 0.7:
//! about 30% of the positions (mostly the border) are black in all 300
//! known digits and can never be told apart. They do not need to be: a
//! wrong guess among positions that are black in every known image only
//! misplaces the rare held-out strokes that fall there, so 20 leaked pairs,
//! from any participant, decrypt everyone's images to SSIM 0.97, and 50 to
//! 0.996. The attack is generic; one that used the structure of a mode
//! (e.g. the intra-block transform that `block` shares across all blocks)
//! would need fewer pairs. Building the attack takes well under 2 ms for
//! `K = 300`.
//!
//! Fold, ciphertext only ([`fold_image`] of the cipher compared with the
//! plain digit; the cipher itself has SSIM 0.02 or less with it in every
//! mode):
//!
//! - `negpos` alone (8-bit): `fold_image(cipher) == fold_image(plain)` for
//!   every image. The anti-aliased rim of each stroke (pixels 16..=239,
//!   52% of the digit's non-black pixels) appears in outline, nothing of
//!   the background; SSIM with the plain digit 0.34.
//! - `pixel`: also identical to the fold of the plain image for every image:
//!   the low half of a grey pixel is almost never 0 or 15, so 96% of the
//!   digit's non-black pixels light up and no background pixel does: the
//!   filled silhouette of the digit, SSIM 0.47.
//! - `le`: values move only inside their block, so each 4x4 block's folded
//!   brightness follows the number of non-black pixels it holds
//!   (correlation 0.95 per image): a 7x7 mosaic of the digit (72% of the
//!   digit's pixels lit against 9% of the background; SSIM 0.22).
//! - `block`, `extended`: block shuffling hides where the blocks are
//!   (block-level correlation -0.13 and 0.02, SSIM 0.05 and 0.03); folding
//!   only strips the inversions off a jigsaw puzzle of blocks, the starting
//!   point of jigsaw-solver attacks (not implemented here).

use std::collections::HashMap;

use anyhow::{Result, anyhow};

fn error(message: String) -> anyhow::Error {
    anyhow!(message)
}

/// Largest folded value of a split value, `7 * 17` (half `7` or `8`).
const SPLIT_FOLD_MAX: u32 = 7 * 17;

/// The public two-plane expansion of 8-bit pixels used by split modes:
/// `2 * image.len()` values, first `(p >> 4) * 17` for every pixel
/// (plane 0, row-major), then `(p & 15) * 17` for every pixel (plane 1).
pub fn split_values(image: &[u8]) -> Vec<u8> {
    let high = image.iter().map(|&p| (p >> 4) * 17);
    let low = image.iter().map(|&p| (p & 15) * 17);
    high.chain(low).collect()
}

/// Inverse of [`split_values`] for `rows x cols` images: pixel `i` is
/// `(half(values[i]) << 4) | half(values[n + i])` with `n = rows * cols`,
/// where `half(v)` is `v / 17` rounded to the nearest half (so estimates
/// that are not multiples of 17, e.g. fill values, still give a pixel).
///
/// # Errors
///
/// If `values` is not `2 * rows * cols` long.
pub fn merge_split(values: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let n = rows
        .checked_mul(cols)
        .filter(|n| n.checked_mul(2) == Some(values.len()))
        .ok_or_else(|| {
            error(format!(
                "merge_split: {} values do not form two {rows}x{cols} planes",
                values.len()
            ))
        })?;
    let half = |v: u8| ((u16::from(v) + 8) / 17) as u8;
    let (high, low) = values.split_at(n);
    Ok(high
        .iter()
        .zip(low)
        .map(|(&h, &l)| (half(h) << 4) | half(l))
        .collect())
}

/// Folds every value onto `0..=127`: `v > 127` becomes `255 - v`.
///
/// Inverting a value (`v ^ 0xFF = 255 - v`) does not change its fold, so
/// `fold(cipher) == fold(plain)` wherever only negative-positive steps were
/// applied; on split values `h * 17` it maps half `h > 7` to `15 - h`. What
/// is lost is which of `v` and `255 - v` was there: on MNIST-like images
/// black background (0) and saturated strokes (255) both fold to 0, and
/// only mid-grey pixels, i.e. the anti-aliased rims of the strokes, stay
/// bright.
pub fn fold(values: &[u8]) -> Vec<u8> {
    values
        .iter()
        .map(|&v| if v > 127 { 255 - v } else { v })
        .collect()
}

/// Turns a cipher value vector into a `rows x cols` 8-bit picture that a
/// person can compare with the plain image, without the key.
///
/// - One plane (`rows * cols` values, 8-bit modes): `2 * fold(v)` per
///   position (at most 254).
/// - Two planes (`2 * rows * cols` values, split modes): per pixel position
///   `i`, the larger of the folded values at `i` and `rows * cols + i`,
///   stretched from `0..=119` (`7 * 17`, the largest folded half) to
///   `0..=255`, saturating. Taking the larger ignores which plane a half
///   came from, so it is unchanged by `component-shuffle` (which swaps the
///   two halves of a pixel) as well as by every inversion.
///
/// Positions stay where the cipher put them: wherever the mode moves no
/// value except between the two halves of a pixel (`negpos`, `pixel-negpos`,
/// `pixel`), the picture is exactly `fold_image` of the plain value vector
/// (see the [module documentation](self) for what that shows on MNIST). Where blocks
/// stay in place but values move inside them (`le`), it shows which blocks
/// hold mid-grey values; with `block-shuffle` it is a scrambled puzzle of
/// such blocks.
///
/// # Errors
///
/// If `values` is neither `rows * cols` nor `2 * rows * cols` long.
pub fn fold_image(values: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let bad = || {
        error(format!(
            "fold_image: {} values are neither one nor two {rows}x{cols} planes",
            values.len()
        ))
    };
    let n = rows.checked_mul(cols).ok_or_else(bad)?;
    let folded = fold(values);
    if folded.len() == n {
        Ok(folded.iter().map(|&v| v.saturating_mul(2)).collect())
    } else if Some(folded.len()) == n.checked_mul(2) {
        let (first, second) = folded.split_at(n);
        Ok(first
            .iter()
            .zip(second)
            .map(|(&a, &b)| {
                let m = u32::from(a.max(b));
                ((m * 255 + SPLIT_FOLD_MAX / 2) / SPLIT_FOLD_MAX).min(255) as u8
            })
            .collect())
    } else {
        Err(bad())
    }
}

/// A known-plaintext attack on `cipher[d] = plain[source[d]] ^ xor[d]`
/// from `K` (plain, cipher) value-vector pairs encrypted under one key.
///
/// For every cipher position `d` the *candidates* are the `(s, x)`, `x` in
/// `{0x00, 0xFF}`, with `plain_k[s] ^ x == cipher_k[d]` for every pair `k`.
/// Source positions are grouped by their column signature
/// `(plain_1[s], .., plain_K[s])`, so the candidates of `d` are the group of
/// its cipher signature (with `x = 0x00`) plus the group of the inverted
/// signature (with `x = 0xFF`): `O(n * K)` work instead of `O(n^2 * K)`.
///
/// The estimated [`table`](Self::table) takes, for each `d` in increasing
/// order, the lowest source position among its candidates not yet taken by
/// an earlier `d`. All candidates of all positions in one signature class
/// are interchangeable, so when the pairs come from a real permutation this
/// greedy choice is always a permutation, and it reproduces every pair it
/// was built from exactly (even where it guessed wrong). Only inconsistent
/// pairs (not from one permutation-plus-inversion table) can leave a
/// position without candidates (`None`) or make two positions share a
/// source.
///
/// Lowest-first makes the guess the identity wherever the ambiguity allows,
/// so for modes that move no values (`negpos` alone) even ambiguous
/// positions come out right; [`fraction_unique`](Self::fraction_unique) is
/// the measure that does not depend on such luck.
///
/// Sparse images make the attack weak per pair but not per key: on MNIST,
/// positions that are black in every known plain image are all
/// interchangeable, so few pairs leave many positions ambiguous
/// ([`fraction_unique`](Self::fraction_unique) well below 1), and the guess
/// misplaces strokes of other images that fall there.
#[derive(Clone, Debug)]
pub struct KnownPlaintextAttack {
    /// Estimated `(source, xor)` per cipher position.
    table: Vec<Option<(usize, u8)>>,
    /// Number of candidates per cipher position.
    candidates: Vec<usize>,
    /// Number of pairs the estimate was built from.
    pairs: usize,
}

impl KnownPlaintextAttack {
    /// Runs the attack on `pairs` of (plain, cipher) value vectors, all of
    /// one length `n`.
    ///
    /// # Errors
    ///
    /// If there are no pairs, the vectors are empty, or any vector's length
    /// differs from the first plain vector's.
    pub fn new<P: AsRef<[u8]>, C: AsRef<[u8]>>(pairs: &[(P, C)]) -> Result<KnownPlaintextAttack> {
        let Some((first, _)) = pairs.first() else {
            return Err(error(
                "known-plaintext attack: no (plain, cipher) pairs".to_string(),
            ));
        };
        let n = first.as_ref().len();
        if n == 0 {
            return Err(error(
                "known-plaintext attack: empty value vectors".to_string(),
            ));
        }
        for (k, (plain, cipher)) in pairs.iter().enumerate() {
            let (p, c) = (plain.as_ref().len(), cipher.as_ref().len());
            if p != n || c != n {
                return Err(error(format!(
                    "known-plaintext attack: pair {k} has {p} plain and {c} cipher values, \
                     expected {n} each"
                )));
            }
        }
        let k = pairs.len();

        // Column signatures, position-major: signature of s is sig[s*k..(s+1)*k].
        let mut plain_sig = vec![0u8; n * k];
        let mut cipher_sig = vec![0u8; n * k];
        for (j, (plain, cipher)) in pairs.iter().enumerate() {
            for (s, &v) in plain.as_ref().iter().enumerate() {
                plain_sig[s * k + j] = v;
            }
            for (d, &v) in cipher.as_ref().iter().enumerate() {
                cipher_sig[d * k + j] = v;
            }
        }

        // Source positions grouped by signature, each group ascending.
        let mut group_of: HashMap<&[u8], usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (s, sig) in plain_sig.chunks_exact(k).enumerate() {
            let g = *group_of.entry(sig).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(s);
        }
        // Members before next[g] have been taken (groups are taken in order).
        let mut next = vec![0usize; groups.len()];

        let mut table = Vec::with_capacity(n);
        let mut candidates = Vec::with_capacity(n);
        let mut inverted = vec![0u8; k];
        for sig in cipher_sig.chunks_exact(k) {
            for (i, &v) in inverted.iter_mut().zip(sig) {
                *i = v ^ 0xFF;
            }
            // (group, xor): plain == cipher, or plain == inverted cipher.
            let options = [
                group_of.get(sig).map(|&g| (g, 0x00u8)),
                group_of.get(&inverted[..]).map(|&g| (g, 0xFFu8)),
            ];
            let options = options.iter().flatten();
            candidates.push(options.clone().map(|&(g, _)| groups[g].len()).sum());
            // Lowest untaken candidate; else (inconsistent pairs) the lowest one.
            let untaken = options
                .clone()
                .filter_map(|&(g, x)| groups[g].get(next[g]).map(|&s| (s, x, Some(g))))
                .min();
            let choice = untaken.or_else(|| {
                options
                    .clone()
                    .filter_map(|&(g, x)| groups[g].first().map(|&s| (s, x, None)))
                    .min()
            });
            table.push(choice.map(|(s, x, g)| {
                if let Some(g) = g {
                    next[g] += 1;
                }
                (s, x)
            }));
        }
        Ok(KnownPlaintextAttack {
            table,
            candidates,
            pairs: k,
        })
    }

    /// Length `n` of the value vectors attacked.
    pub fn num_values(&self) -> usize {
        self.table.len()
    }

    /// Number of (plain, cipher) pairs the estimate was built from.
    pub fn num_pairs(&self) -> usize {
        self.pairs
    }

    /// The estimated table: `table()[d] = Some((source, xor))`, or `None`
    /// where no candidate fits the pairs (impossible for pairs from one
    /// real table).
    pub fn table(&self) -> &[Option<(usize, u8)>] {
        &self.table
    }

    /// `candidate_counts()[d]`: how many `(source, xor)` fit every pair at
    /// cipher position `d` (1 means the table entry is certain).
    pub fn candidate_counts(&self) -> &[usize] {
        &self.candidates
    }

    /// Fraction of cipher positions with exactly one candidate, i.e. whose
    /// table entry the pairs determine.
    pub fn fraction_unique(&self) -> f64 {
        let unique = self.candidates.iter().filter(|&&c| c == 1).count();
        unique as f64 / self.num_values() as f64
    }

    /// Whether the estimated table is a permutation: every position has an
    /// entry and no two share a source.
    pub fn is_permutation(&self) -> bool {
        let mut seen = vec![false; self.num_values()];
        self.table.iter().all(|entry| match entry {
            Some((s, _)) => seen
                .get_mut(*s)
                .is_some_and(|used| !std::mem::replace(used, true)),
            None => false,
        })
    }

    /// Fraction of cipher positions whose estimate equals the true
    /// `(true_source[d], true_xor[d])` (for evaluating the attack).
    ///
    /// # Errors
    ///
    /// If `true_source` or `true_xor` is not [`num_values`](Self::num_values)
    /// long.
    pub fn fraction_correct(&self, true_source: &[usize], true_xor: &[u8]) -> Result<f64> {
        let n = self.num_values();
        if true_source.len() != n || true_xor.len() != n {
            return Err(error(format!(
                "fraction_correct: true table has {} sources and {} masks, expected {n} each",
                true_source.len(),
                true_xor.len()
            )));
        }
        let correct = self
            .table
            .iter()
            .zip(true_source.iter().zip(true_xor))
            .filter(|(estimate, (s, x))| **estimate == Some((**s, **x)))
            .count();
        Ok(correct as f64 / n as f64)
    }

    /// Decrypts a cipher value vector with the estimated table:
    /// `plain[s] = cipher[d] ^ x` for every `table()[d] = Some((s, x))`.
    /// Plain positions no entry points to stay 0 (black, the most likely
    /// value on MNIST-like images; this only happens for inconsistent
    /// pairs). For split modes pass the result to [`merge_split`].
    ///
    /// # Errors
    ///
    /// If `cipher` is not [`num_values`](Self::num_values) long.
    pub fn decrypt(&self, cipher: &[u8]) -> Result<Vec<u8>> {
        let n = self.num_values();
        if cipher.len() != n {
            return Err(error(format!(
                "decrypt: {} cipher values, expected {n}",
                cipher.len()
            )));
        }
        let mut plain = vec![0u8; n];
        for (&c, entry) in cipher.iter().zip(&self.table) {
            if let Some((s, x)) = *entry {
                plain[s] = c ^ x;
            }
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::lab::quality::psnr;

    /// A random keyed table: a permutation of `0..n` and an inversion mask.
    fn random_table(n: usize, rng: &mut StdRng) -> (Vec<usize>, Vec<u8>) {
        let mut source: Vec<usize> = (0..n).collect();
        source.shuffle(rng);
        let xor = (0..n)
            .map(|_| if rng.random_bool(0.5) { 0xFF } else { 0 })
            .collect();
        (source, xor)
    }

    fn encrypt(plain: &[u8], source: &[usize], xor: &[u8]) -> Vec<u8> {
        source
            .iter()
            .zip(xor)
            .map(|(&s, &x)| plain[s] ^ x)
            .collect()
    }

    fn random_image(len: usize, rng: &mut StdRng) -> Vec<u8> {
        (0..len).map(|_| rng.random()).collect()
    }

    /// A black 28x28 image with one short bright mid-grey stroke.
    fn sparse_image() -> Vec<u8> {
        let mut image = vec![0u8; 28 * 28];
        for (i, r) in (10..18).enumerate() {
            image[r * 28 + 12] = 255;
            image[r * 28 + 13] = 100 + 10 * i as u8;
        }
        image
    }

    fn check_full_recovery(values_of: impl Fn(&[u8]) -> Vec<u8>, pairs: usize, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = values_of(&[0; 28 * 28]).len();
        let (source, xor) = random_table(n, &mut rng);
        let known: Vec<(Vec<u8>, Vec<u8>)> = (0..pairs)
            .map(|_| {
                let plain = values_of(&random_image(28 * 28, &mut rng));
                let cipher = encrypt(&plain, &source, &xor);
                (plain, cipher)
            })
            .collect();
        let attack = KnownPlaintextAttack::new(&known).unwrap();
        assert_eq!(attack.num_values(), n);
        assert_eq!(attack.num_pairs(), pairs);
        assert_eq!(attack.fraction_unique(), 1.0);
        assert_eq!(attack.fraction_correct(&source, &xor).unwrap(), 1.0);
        assert!(attack.is_permutation());
        for _ in 0..5 {
            let held_out = values_of(&random_image(28 * 28, &mut rng));
            let recovered = attack.decrypt(&encrypt(&held_out, &source, &xor)).unwrap();
            assert_eq!(recovered, held_out);
            assert_eq!(psnr(&held_out, &recovered).unwrap(), f64::INFINITY);
        }
    }

    #[test]
    fn kpa_recovers_an_8bit_table_from_random_pairs() {
        check_full_recovery(<[u8]>::to_vec, 4, 1);
    }

    #[test]
    fn kpa_recovers_a_split_table_from_random_pairs() {
        // 4-bit halves: 16 levels per pair, so more pairs are needed.
        check_full_recovery(split_values, 8, 2);
    }

    #[test]
    fn kpa_on_one_sparse_pair_is_ambiguous() {
        let mut rng = StdRng::seed_from_u64(3);
        let plain = sparse_image();
        let (source, xor) = random_table(plain.len(), &mut rng);
        let cipher = encrypt(&plain, &source, &xor);
        let attack = KnownPlaintextAttack::new(&[(&plain, &cipher)]).unwrap();
        let unique = attack.fraction_unique();
        // Only the 8 distinct mid-grey stroke pixels are certain.
        assert!(unique < 1.0);
        assert_eq!(unique, 8.0 / 784.0);
        let correct = attack.fraction_correct(&source, &xor).unwrap();
        assert!(correct < 0.1, "{correct}");
        // The guess is still a permutation that explains the known pair...
        assert!(attack.is_permutation());
        assert_eq!(attack.decrypt(&cipher).unwrap(), plain);
        // ...but misplaces other images.
        let other = random_image(plain.len(), &mut rng);
        let recovered = attack.decrypt(&encrypt(&other, &source, &xor)).unwrap();
        assert_ne!(recovered, other);
        assert!(psnr(&other, &recovered).unwrap() < 15.0);
        // A black or white cipher position can come from any of the 768
        // black and 8 white plain positions (with the matching inversion).
        let counts = attack.candidate_counts();
        assert_eq!(*counts.iter().max().unwrap(), 784 - 8);
    }

    #[test]
    fn kpa_tolerates_inconsistent_pairs() {
        let plain = [0u8, 0, 0];
        let cipher = [0u8, 7, 0];
        let attack = KnownPlaintextAttack::new(&[(&plain, &cipher)]).unwrap();
        assert_eq!(attack.table(), &[Some((0, 0)), None, Some((1, 0))]);
        assert_eq!(attack.candidate_counts(), &[3, 0, 3]);
        assert!(!attack.is_permutation());
        assert_eq!(attack.decrypt(&[5, 6, 7]).unwrap(), vec![5, 7, 0]);
        // More positions want the all-zero source than there are: reuse.
        let attack = KnownPlaintextAttack::new(&[([0u8, 1], [0u8, 0])]).unwrap();
        assert_eq!(attack.table(), &[Some((0, 0)), Some((0, 0))]);
        assert!(!attack.is_permutation());
    }

    #[test]
    fn kpa_rejects_bad_inputs() {
        let none: [(Vec<u8>, Vec<u8>); 0] = [];
        assert!(KnownPlaintextAttack::new(&none).is_err());
        assert!(KnownPlaintextAttack::new(&[([0u8; 0], [0u8; 0])]).is_err());
        assert!(KnownPlaintextAttack::new(&[(vec![1u8, 2], vec![1u8])]).is_err());
        assert!(
            KnownPlaintextAttack::new(&[(vec![1u8, 2], vec![1u8, 2]), (vec![1], vec![1])]).is_err()
        );
        let attack = KnownPlaintextAttack::new(&[([1u8, 2], [2u8, 1])]).unwrap();
        assert_eq!(attack.table(), &[Some((1, 0)), Some((0, 0))]);
        assert!(attack.decrypt(&[1]).is_err());
        assert!(attack.fraction_correct(&[1], &[0, 0]).is_err());
        assert!(attack.fraction_correct(&[1, 0], &[0]).is_err());
        assert_eq!(attack.fraction_correct(&[1, 0], &[0, 0]).unwrap(), 1.0);
        assert_eq!(attack.fraction_correct(&[1, 0], &[0, 0xFF]).unwrap(), 0.5);
    }

    #[test]
    fn fold_undoes_negative_positive() {
        let mut rng = StdRng::seed_from_u64(4);
        let plain = random_image(28 * 28, &mut rng);
        let (_, xor) = random_table(plain.len(), &mut rng);
        let identity: Vec<usize> = (0..plain.len()).collect();
        let cipher = encrypt(&plain, &identity, &xor);
        assert_ne!(cipher, plain);
        assert_eq!(fold(&cipher), fold(&plain));
        assert_eq!(
            fold_image(&cipher, 28, 28).unwrap(),
            fold_image(&plain, 28, 28).unwrap()
        );
        assert!(fold(&cipher).iter().all(|&v| v <= 127));
        assert_eq!(
            fold(&[0, 1, 127, 128, 254, 255]),
            vec![0, 1, 127, 127, 1, 0]
        );
        // On split values the fold maps half h > 7 to 15 - h.
        for h in 0..16u8 {
            assert_eq!(fold(&[h * 17]), vec![h.min(15 - h) * 17]);
        }
    }

    #[test]
    fn fold_image_sees_through_the_pixel_mode() {
        // `pixel`: swap the halves of some pixels, invert some values.
        let mut rng = StdRng::seed_from_u64(5);
        let plain = random_image(28 * 28, &mut rng);
        let values = split_values(&plain);
        let n = plain.len();
        let mut source: Vec<usize> = (0..2 * n).collect();
        for i in 0..n {
            if rng.random_bool(0.5) {
                source.swap(i, n + i);
            }
        }
        let (_, xor) = random_table(2 * n, &mut rng);
        let cipher = encrypt(&values, &source, &xor);
        let seen = fold_image(&cipher, 28, 28).unwrap();
        assert_eq!(seen, fold_image(&values, 28, 28).unwrap());
        // Mid-grey is brightest, black and white vanish.
        let probe = split_values(&[0x00, 0xFF, 0x78, 0x87, 0x30]);
        assert_eq!(fold_image(&probe, 1, 5).unwrap(), vec![0, 0, 255, 255, 109]);
        assert_eq!(
            fold_image(&[0, 255, 100, 200], 2, 2).unwrap(),
            vec![0, 0, 200, 110]
        );
    }

    #[test]
    fn split_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let values = split_values(&all);
        assert_eq!(values.len(), 512);
        assert_eq!(values[0x4A], 4 * 17);
        assert_eq!(values[256 + 0x4A], 10 * 17);
        assert_eq!(merge_split(&values, 16, 16).unwrap(), all);
        assert_eq!(merge_split(&values, 1, 256).unwrap(), all);
        // Values off the 17-grid round to the nearest half.
        assert_eq!(merge_split(&[25, 26], 1, 1).unwrap(), vec![0x12]);
        assert_eq!(merge_split(&[255, 0], 1, 1).unwrap(), vec![0xF0]);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(merge_split(&[0; 7], 2, 2).is_err());
        assert!(merge_split(&[0; 4], 2, 2).is_err());
        assert!(merge_split(&[], usize::MAX, usize::MAX).is_err());
        assert!(merge_split(&[0; 2], usize::MAX / 2 + 1, 1).is_err());
        assert!(fold_image(&[0; 5], 2, 2).is_err());
        assert!(fold_image(&[0; 12], 2, 2).is_err());
        assert!(fold_image(&[], usize::MAX, 3).is_err());
        assert!(fold_image(&[0; 2], usize::MAX / 2 + 1, 1).is_err());
        assert_eq!(fold_image(&[], 0, 5).unwrap(), Vec::<u8>::new());
        assert_eq!(split_values(&[]), Vec::<u8>::new());
    }
}
