//! A ciphertext-only attack on the image cipher with many images under one
//! key: the attacker holds `N` encrypted images of one participant and
//! plain *public* images of the same kind (other digits), never the
//! plaintexts, and knows the mode and block size (they are public in the
//! model's `CipherSpec`).
//!
//! Every mode is a value table `cipher[d] = values[source[d]] ^ xor[d]`
//! ([`super::attack`]). The attack estimates the table in the order the
//! structure of the mode allows:
//!
//! 1. **Inversions** (`negpos`, `pixel-negpos`): the background value `0`
//!    dominates almost every position, so at each cipher position the more
//!    frequent of the values `0` and `255` (`0` and `15 * 17` in split
//!    modes) says whether it was inverted. Where one key bit covers the same
//!    in-block position of every block (`negpos` without `per-block`) the
//!    votes of all blocks are pooled.
//! 2. **In-block permutation, blocks in place** (`pixel-shuffle`,
//!    `rotate-flip`, `le`): each cipher value is described by its mean and
//!    its correlation with the total brightness of the four neighbouring
//!    blocks (which an in-block permutation does not change): a value at
//!    the left edge of its block correlates with the block on its left.
//!    Matching these profiles against the public images' is an assignment
//!    problem (Hungarian method), per block or pooled over blocks when the
//!    in-block key is shared.
//! 3. **In-block permutation, blocks moved** (`block`, `extended`): the
//!    correlation matrix of the values of a block (pooled over blocks when
//!    the key is shared) is matched against the public images' by local
//!    search (a small quadratic assignment problem). Correlations within a
//!    square block are symmetric under its 8 rotations and reflections, so
//!    this gives the permutation up to one of them; step 4 picks it.
//! 4. **Block permutation** (`block-shuffle`): a jigsaw puzzle. Each cipher
//!    block's mean (in each candidate orientation) is matched to the public
//!    blocks' means (Hungarian method), then pairs of blocks are swapped
//!    while that lowers the mean-matching cost plus the mean squared
//!    difference of facing edges of neighbouring blocks over all images.
//! 5. **Component shuffle** (`pixel`): for each pixel, the two 4-bit halves
//!    are told apart by smoothness: the high half of a pixel correlates with
//!    its neighbours' high halves more than the noisy low half does
//!    (the many-image form of Chang et al.'s smoothness attack on
//!    pixel-based encryption).
//!
//! [`ciphertext_only`] returns the estimated table; the caller measures it
//! with [`RecoveredTable::fraction_correct`] and reads images with
//! [`RecoveredTable::decrypt`]. `greyfed experiment attacks` runs it per
//! mode and `N` and writes the figures; on MNIST (`docs/attacks.md`) every
//! preset is read from about a hundred images of one participant (`block`:
//! the whole key from 1,000), in at most 1.3 s on one core.

use std::collections::HashMap;

use anyhow::{Result, bail, ensure};
use greyfed_participant::cipher::dihedral_source;
use greyfed_protocol::cipher::CipherSteps;
use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// The public shape of a cipher's value vectors: mode, block size and image
/// size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The cipher's steps.
    pub steps: CipherSteps,
    /// Block size in pixels.
    pub block: usize,
    /// Image rows.
    pub rows: usize,
    /// Image columns.
    pub cols: usize,
}

impl Layout {
    fn planes(&self) -> usize {
        if self.steps.split { 2 } else { 1 }
    }

    /// Length of a value vector (`rows * cols`, twice that in split modes).
    pub fn len(&self) -> usize {
        self.planes() * self.rows * self.cols
    }

    /// Whether the value vectors are empty (a zero-sized image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / self.block
    }

    fn num_blocks(&self) -> usize {
        (self.rows / self.block) * self.blocks_per_row()
    }

    /// Values per block (`block^2` per plane).
    fn offsets(&self) -> usize {
        self.planes() * self.block * self.block
    }

    /// The value-vector index of in-block offset `offset` of block `block`
    /// (the layout `participant::cipher` uses).
    fn value(&self, block: usize, offset: usize) -> usize {
        let (b, bb) = (self.block, self.block * self.block);
        let (ch, r, c) = (offset / bb, offset % bb / b, offset % b);
        let row = block / self.blocks_per_row() * b + r;
        let col = block % self.blocks_per_row() * b + c;
        ch * self.rows * self.cols + row * self.cols + col
    }

    /// The neighbouring block of `block` in direction `dir` (left, right,
    /// up, down), if any.
    fn neighbour(&self, block: usize, dir: usize) -> Option<usize> {
        let w = self.blocks_per_row();
        let h = self.num_blocks() / w.max(1);
        let (r, c) = (block / w, block % w);
        match dir {
            0 if c > 0 => Some(block - 1),
            1 if c + 1 < w => Some(block + 1),
            2 if r > 0 => Some(block - w),
            3 if r + 1 < h => Some(block + w),
            _ => None,
        }
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.block > 0
                && self.rows.is_multiple_of(self.block)
                && self.cols.is_multiple_of(self.block)
                && self.rows > 0,
            "ciphertext-only attack: {}x{} images do not split into {}x{} blocks",
            self.rows,
            self.cols,
            self.block,
            self.block
        );
        let moves = self.steps.block_shuffle || self.steps.pixel_shuffle || self.steps.rotate_flip;
        if self.steps.component_shuffle && moves {
            bail!(
                "ciphertext-only attack: component-shuffle together with steps that move values \
                 ({}) is not modelled",
                self.steps
            );
        }
        Ok(())
    }
}

/// A value table estimated by an attack: for every cipher position the
/// plain position it came from and its inversion (`0x00` or `0xFF`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredTable {
    source: Vec<usize>,
    xor: Vec<u8>,
    block_permutation: Option<Vec<usize>>,
}

impl RecoveredTable {
    /// Estimated plain position of each cipher position (a permutation).
    pub fn source(&self) -> &[usize] {
        &self.source
    }

    /// Estimated inversion of each cipher position.
    pub fn xor(&self) -> &[u8] {
        &self.xor
    }

    /// Estimated plain block of each cipher block (modes with
    /// `block-shuffle`).
    pub fn block_permutation(&self) -> Option<&[usize]> {
        self.block_permutation.as_deref()
    }

    /// Fraction of cipher positions whose source and inversion are both
    /// right.
    pub fn fraction_correct(&self, true_source: &[usize], true_xor: &[u8]) -> Result<f64> {
        self.check_len(true_source.len(), true_xor.len())?;
        let right = (0..self.source.len())
            .filter(|&d| self.source[d] == true_source[d] && self.xor[d] == true_xor[d])
            .count();
        Ok(right as f64 / self.source.len().max(1) as f64)
    }

    /// Fraction of cipher positions whose inversion is right.
    pub fn fraction_xor_correct(&self, true_xor: &[u8]) -> Result<f64> {
        self.check_len(self.source.len(), true_xor.len())?;
        let right = self
            .xor
            .iter()
            .zip(true_xor)
            .filter(|(a, b)| a == b)
            .count();
        Ok(right as f64 / self.xor.len().max(1) as f64)
    }

    /// Fraction of cipher blocks placed at their true plain block, if the
    /// mode moves blocks.
    pub fn fraction_blocks_correct(&self, true_permutation: &[usize]) -> Option<f64> {
        let perm = self.block_permutation.as_ref()?;
        (perm.len() == true_permutation.len()).then(|| {
            let right = perm
                .iter()
                .zip(true_permutation)
                .filter(|(a, b)| a == b)
                .count();
            right as f64 / perm.len().max(1) as f64
        })
    }

    fn check_len(&self, source: usize, xor: usize) -> Result<()> {
        ensure!(
            source == self.source.len() && xor == self.source.len(),
            "the true table has {source}/{xor} entries, the recovered one {}",
            self.source.len()
        );
        Ok(())
    }

    /// Decrypts a cipher value vector with the estimated table: the plain
    /// value vector (split modes: expand to pixels with
    /// [`super::attack::merge_split`]).
    pub fn decrypt(&self, cipher: &[u8]) -> Result<Vec<u8>> {
        ensure!(
            cipher.len() == self.source.len(),
            "cipher has {} values, the table {}",
            cipher.len(),
            self.source.len()
        );
        let mut plain = vec![0; cipher.len()];
        for ((&c, &s), &x) in cipher.iter().zip(&self.source).zip(&self.xor) {
            plain[s] = c ^ x;
        }
        Ok(plain)
    }
}

/// Value vectors as columns: `at(d)[n]` is value `d` of image `n`, in
/// `0..=1`.
struct Columns {
    n: usize,
    data: Vec<f32>,
}

impl Columns {
    fn new(images: &[&[u8]], len: usize, xor: Option<&[u8]>) -> Columns {
        let n = images.len();
        let mut data = vec![0f32; n * len];
        for (i, image) in images.iter().enumerate() {
            for (d, &v) in image.iter().enumerate() {
                let v = xor.map_or(v, |x| v ^ x[d]);
                data[d * n + i] = f32::from(v) / 255.0;
            }
        }
        Columns { n, data }
    }

    fn at(&self, d: usize) -> &[f32] {
        &self.data[d * self.n..(d + 1) * self.n]
    }

    fn mean(&self, d: usize) -> f64 {
        self.at(d).iter().map(|&v| f64::from(v)).sum::<f64>() / self.n.max(1) as f64
    }
}

/// Covariance of two equally long series.
fn covariance(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().max(1) as f64;
    let (ma, mb) = (
        a.iter().map(|&v| f64::from(v)).sum::<f64>() / n,
        b.iter().map(|&v| f64::from(v)).sum::<f64>() / n,
    );
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - ma) * (f64::from(y) - mb))
        .sum::<f64>()
        / n
}

/// Correlation of two series; `0` where either is constant.
fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let denominator = (covariance(a, a) * covariance(b, b)).sqrt();
    if denominator > 1e-12 {
        covariance(a, b) / denominator
    } else {
        0.0
    }
}

/// The minimum-cost assignment of rows to columns of a square cost matrix.
fn assign(costs: &[Vec<f64>]) -> Vec<usize> {
    let k = costs.len();
    if k == 0 {
        return Vec::new();
    }
    let scaled = costs
        .iter()
        .flatten()
        .map(|&c| {
            if c.is_finite() {
                (c * 1e6).round().clamp(-1e15, 1e15) as i64
            } else {
                1_000_000_000_000_000
            }
        })
        .collect::<Vec<_>>();
    match Matrix::from_vec(k, k, scaled) {
        Ok(matrix) => kuhn_munkres_min(&matrix).1,
        Err(_) => (0..k).collect(),
    }
}

/// `sigma` composed with each of the 8 rotations/reflections of the block.
fn dihedral_variants(sigma: &[usize], b: usize) -> Vec<Vec<usize>> {
    let bb = b * b;
    (0..8u8)
        .map(|t| {
            sigma
                .iter()
                .map(|&e| e / bb * bb + dihedral_source(t, b, e % bb))
                .collect()
        })
        .collect()
}

/// Estimates the cipher's value table from `ciphers` (value vectors encrypted
/// under one key) and `public` plain value vectors of the same kind (split
/// modes: expanded with [`super::attack::split_values`]); `seed` drives the
/// local searches' restarts.
///
/// # Errors
///
/// If the vectors do not fit `layout`, there are no images, or the mode
/// combines component shuffling with steps that move values.
pub fn ciphertext_only(
    layout: &Layout,
    ciphers: &[&[u8]],
    public: &[&[u8]],
    seed: u64,
) -> Result<RecoveredTable> {
    layout.check()?;
    let len = layout.len();
    ensure!(
        !ciphers.is_empty() && !public.is_empty(),
        "ciphertext-only attack needs cipher images and public images ({} and {} given)",
        ciphers.len(),
        public.len()
    );
    if let Some(bad) = ciphers.iter().chain(public).find(|v| v.len() != len) {
        bail!(
            "ciphertext-only attack: a value vector has {} values, the {} mode's {}x{} images \
             have {len}",
            bad.len(),
            layout.steps,
            layout.rows,
            layout.cols
        );
    }
    let xor = estimate_xor(layout, ciphers);
    let cipher = Columns::new(ciphers, len, Some(&xor));
    let plain = Columns::new(public, len, None);
    let mut rng = StdRng::seed_from_u64(seed);
    let steps = layout.steps;
    let (q, k) = (layout.num_blocks(), layout.offsets());
    let identity: Vec<usize> = (0..k).collect();
    let in_block_moves = steps.pixel_shuffle || steps.rotate_flip;
    let in_place: Vec<usize> = (0..q).collect();

    let (permutation, sigmas) = if steps.block_shuffle {
        // Candidate in-block maps per cipher block.
        let mut best = if !in_block_moves {
            place_blocks(layout, &cipher, &plain, &vec![vec![identity]; q])
        } else if !steps.pixel_shuffle {
            // Rotate/flip only: the map is one of the 8 dihedral transforms.
            let options = vec![dihedral_variants(&identity, layout.block); q];
            place_blocks(layout, &cipher, &plain, &options)
        } else {
            let public_corr = pooled_correlation(layout, &plain, 0..q);
            if steps.per_block {
                let options: Vec<Vec<Vec<usize>>> = (0..q)
                    .map(|block| {
                        let corr = pooled_correlation(layout, &cipher, block..block + 1);
                        let sigma = match_correlations(&corr, &public_corr, k, 8, &mut rng);
                        dihedral_variants(&sigma, layout.block)
                    })
                    .collect();
                place_blocks(layout, &cipher, &plain, &options)
            } else {
                let corr = pooled_correlation(layout, &cipher, 0..q);
                let sigma = match_correlations(&corr, &public_corr, k, 24, &mut rng);
                // One shared map: try each orientation for all blocks at once.
                dihedral_variants(&sigma, layout.block)
                    .into_iter()
                    .map(|v| place_blocks(layout, &cipher, &plain, &vec![vec![v]; q]))
                    .min_by(|a, b| a.objective.total_cmp(&b.objective))
                    .unwrap_or_else(|| {
                        place_blocks(layout, &cipher, &plain, &vec![vec![identity]; q])
                    })
            }
        };
        // With the blocks placed, neighbours are known: re-estimate the
        // in-block maps from value profiles (as for blocks in place) and
        // keep the placement while that lowers the objective.
        if in_block_moves {
            for _ in 0..3 {
                let mut at = vec![0; q];
                for (c, &p) in best.permutation.iter().enumerate() {
                    at[p] = c;
                }
                let mut sigmas = vec![Vec::new(); q];
                if steps.per_block {
                    for p in 0..q {
                        sigmas[at[p]] = match_profiles(layout, &cipher, &at, &plain, p..p + 1);
                    }
                } else {
                    sigmas = vec![match_profiles(layout, &cipher, &at, &plain, 0..q); q];
                }
                let options: Vec<Vec<Vec<usize>>> = sigmas.into_iter().map(|s| vec![s]).collect();
                let refined = place_blocks(layout, &cipher, &plain, &options);
                if refined.objective < best.objective - 1e-9 {
                    best = refined;
                } else {
                    break;
                }
            }
        }
        (best.permutation, best.sigmas)
    } else if in_block_moves {
        let sigmas = if steps.per_block {
            (0..q)
                .map(|block| match_profiles(layout, &cipher, &in_place, &plain, block..block + 1))
                .collect()
        } else {
            vec![match_profiles(layout, &cipher, &in_place, &plain, 0..q); q]
        };
        ((0..q).collect(), sigmas)
    } else {
        ((0..q).collect(), vec![identity; q])
    };
    let mut recovered = table(layout, xor, permutation, sigmas, steps.block_shuffle);
    if steps.component_shuffle {
        unswap_components(layout, &cipher, &mut recovered);
    }
    Ok(recovered)
}

/// The value table of a block permutation and per-block in-block maps.
fn table(
    layout: &Layout,
    xor: Vec<u8>,
    permutation: Vec<usize>,
    sigmas: Vec<Vec<usize>>,
    moved: bool,
) -> RecoveredTable {
    let mut source = vec![0; layout.len()];
    for (q, (&p, sigma)) in permutation.iter().zip(&sigmas).enumerate() {
        for (o, &e) in sigma.iter().enumerate() {
            source[layout.value(q, o)] = layout.value(p, e);
        }
    }
    RecoveredTable {
        source,
        xor,
        block_permutation: moved.then_some(permutation),
    }
}

/// Step 1: the inversion of every cipher position by majority of the
/// background value, pooled over blocks where one key bit covers them.
fn estimate_xor(layout: &Layout, ciphers: &[&[u8]]) -> Vec<u8> {
    let steps = layout.steps;
    let len = layout.len();
    if !steps.negative_positive && !steps.pixel_negative_positive {
        return vec![0; len];
    }
    // votes[d] > 0: more zeros than 255s.
    let mut votes = vec![0i64; len];
    for image in ciphers {
        for (vote, &v) in votes.iter_mut().zip(image.iter()) {
            match v {
                0 => *vote += 1,
                255 => *vote -= 1,
                _ => {}
            }
        }
    }
    let mut means = vec![0f64; len];
    for image in ciphers {
        for (m, &v) in means.iter_mut().zip(image.iter()) {
            *m += f64::from(v);
        }
    }
    let shared = steps.negative_positive && !steps.per_block && !steps.pixel_negative_positive;
    if shared {
        // One bit per in-block offset, the same in every block.
        let (q, k) = (layout.num_blocks(), layout.offsets());
        let mut pooled = vec![0i64; k];
        let mut pooled_means = vec![0f64; k];
        for block in 0..q {
            for o in 0..k {
                pooled[o] += votes[layout.value(block, o)];
                pooled_means[o] += means[layout.value(block, o)];
            }
        }
        for block in 0..q {
            for o in 0..k {
                let d = layout.value(block, o);
                votes[d] = pooled[o];
                means[d] = pooled_means[o] / q as f64;
            }
        }
    }
    let half = 127.5 * ciphers.len() as f64;
    votes
        .iter()
        .zip(&means)
        .map(|(&vote, &mean)| match vote.cmp(&0) {
            std::cmp::Ordering::Greater => 0,
            std::cmp::Ordering::Less => 0xFF,
            std::cmp::Ordering::Equal if mean > half => 0xFF,
            std::cmp::Ordering::Equal => 0,
        })
        .collect()
}

/// The correlation matrix (`k x k`, row-major) of in-block offsets, pooled
/// over `blocks`: covariances summed over blocks, then normalised.
fn pooled_correlation(
    layout: &Layout,
    columns: &Columns,
    blocks: std::ops::Range<usize>,
) -> Vec<f64> {
    let k = layout.offsets();
    let mut cov = vec![0f64; k * k];
    for block in blocks {
        for i in 0..k {
            let a = columns.at(layout.value(block, i));
            for j in i..k {
                let c = covariance(a, columns.at(layout.value(block, j)));
                cov[i * k + j] += c;
                if i != j {
                    cov[j * k + i] += c;
                }
            }
        }
    }
    let mut corr = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            let d = (cov[i * k + i] * cov[j * k + j]).sqrt();
            corr[i * k + j] = if d > 1e-12 { cov[i * k + j] / d } else { 0.0 };
        }
    }
    corr
}

/// Step 3: the map `sigma` (cipher offset to plain offset) that best aligns
/// the cipher correlation matrix with the public one (maximises
/// `sum corr[i][j] * public[sigma i][sigma j]`), by pair-swap descent from
/// `restarts` random starts.
fn match_correlations(
    corr: &[f64],
    public: &[f64],
    k: usize,
    restarts: usize,
    rng: &mut StdRng,
) -> Vec<usize> {
    let score = |sigma: &[usize]| {
        let mut s = 0.0;
        for i in 0..k {
            for j in 0..k {
                if i != j {
                    s += corr[i * k + j] * public[sigma[i] * k + sigma[j]];
                }
            }
        }
        s
    };
    let mut best: (f64, Vec<usize>) = (f64::NEG_INFINITY, (0..k).collect());
    for _ in 0..restarts.max(1) {
        let mut sigma: Vec<usize> = (0..k).collect();
        sigma.shuffle(rng);
        loop {
            let mut improved = false;
            for i in 0..k {
                for j in i + 1..k {
                    let (si, sj) = (sigma[i], sigma[j]);
                    let delta: f64 = (0..k)
                        .filter(|&l| l != i && l != j)
                        .map(|l| {
                            let sl = sigma[l];
                            2.0 * (corr[i * k + l] - corr[j * k + l])
                                * (public[sj * k + sl] - public[si * k + sl])
                        })
                        .sum();
                    if delta > 1e-12 {
                        sigma.swap(i, j);
                        improved = true;
                    }
                }
            }
            if !improved {
                break;
            }
        }
        let s = score(&sigma);
        if s > best.0 {
            best = (s, sigma);
        }
    }
    best.1
}

/// Features of the values at plain block positions `positions`, where
/// position `p` holds block `at[p]` of `columns`: per position and offset,
/// the mean and the correlation with each neighbouring position's total
/// brightness.
fn profiles(
    layout: &Layout,
    columns: &Columns,
    at: &[usize],
    positions: std::ops::Range<usize>,
) -> Vec<Vec<[f64; 5]>> {
    let k = layout.offsets();
    let n = columns.n;
    let totals: Vec<Vec<f32>> = (0..layout.num_blocks())
        .map(|block| {
            let mut total = vec![0f32; n];
            for o in 0..k {
                for (t, &v) in total.iter_mut().zip(columns.at(layout.value(block, o))) {
                    *t += v;
                }
            }
            total
        })
        .collect();
    positions
        .map(|p| {
            (0..k)
                .map(|o| {
                    let d = layout.value(at[p], o);
                    let mut f = [columns.mean(d) * 2.0, 0.0, 0.0, 0.0, 0.0];
                    for dir in 0..4 {
                        if let Some(np) = layout.neighbour(p, dir) {
                            f[dir + 1] = correlation(columns.at(d), &totals[at[np]]);
                        }
                    }
                    f
                })
                .collect()
        })
        .collect()
}

/// Steps 2 (and 4's refinement): the in-block map (cipher offset to plain
/// offset) that matches the value profiles of the cipher blocks at plain
/// positions `positions` (cipher block `at[p]` at position `p`), summed
/// over them, to the public images' profiles at those positions.
fn match_profiles(
    layout: &Layout,
    cipher: &Columns,
    at: &[usize],
    plain: &Columns,
    positions: std::ops::Range<usize>,
) -> Vec<usize> {
    let k = layout.offsets();
    let identity: Vec<usize> = (0..layout.num_blocks()).collect();
    let c = profiles(layout, cipher, at, positions.clone());
    let p = profiles(layout, plain, &identity, positions);
    let mut costs = vec![vec![0f64; k]; k];
    for (cb, pb) in c.iter().zip(&p) {
        for (o, row) in costs.iter_mut().enumerate() {
            for (e, cost) in row.iter_mut().enumerate() {
                *cost += cb[o]
                    .iter()
                    .zip(&pb[e])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>();
            }
        }
    }
    assign(&costs)
}

/// A placement of cipher blocks: see [`place_blocks`].
struct Placement {
    /// Plain block of each cipher block.
    permutation: Vec<usize>,
    /// In-block map (cipher offset to plain offset) of each cipher block.
    sigmas: Vec<Vec<usize>>,
    /// Mean-matching plus edge cost; lower is better.
    objective: f64,
}

/// Step 4: places cipher blocks on plain block positions given candidate
/// in-block maps per cipher block.
fn place_blocks(
    layout: &Layout,
    cipher: &Columns,
    plain: &Columns,
    options: &[Vec<Vec<usize>>],
) -> Placement {
    let q = layout.num_blocks();
    let k = layout.offsets();
    let public_means: Vec<Vec<f64>> = (0..q)
        .map(|p| (0..k).map(|e| plain.mean(layout.value(p, e))).collect())
        .collect();
    // Mean of cipher block `c` at plain offset e under option `i`.
    let cipher_means: Vec<Vec<Vec<f64>>> = options
        .iter()
        .enumerate()
        .map(|(c, opts)| {
            opts.iter()
                .map(|sigma| {
                    let mut m = vec![0f64; k];
                    for (o, &e) in sigma.iter().enumerate() {
                        m[e] = cipher.mean(layout.value(c, o));
                    }
                    m
                })
                .collect()
        })
        .collect();
    // Best option and its cost per (cipher block, plain position).
    let mut option_at = vec![vec![0usize; q]; q];
    let mut cost = vec![vec![0f64; q]; q];
    for c in 0..q {
        for p in 0..q {
            let (i, best) = cipher_means[c]
                .iter()
                .map(|m| {
                    m.iter()
                        .zip(&public_means[p])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f64>()
                })
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or((0, 0.0));
            option_at[c][p] = i;
            cost[c][p] = best;
        }
    }
    let mut position = assign(&cost);
    let mut edges = EdgeCosts::new(layout, cipher, options);
    let mut at = vec![0usize; q];
    for (c, &p) in position.iter().enumerate() {
        at[p] = c;
    }
    // Local objective of plain position p holding cipher block at[p].
    let local = |p: usize, at: &[usize], edges: &mut EdgeCosts| -> f64 {
        let c = at[p];
        let mut total = cost[c][p];
        for dir in 0..4 {
            if let Some(np) = layout.neighbour(p, dir) {
                let nc = at[np];
                // Horizontal pairs (dir 0/1) and vertical (2/3), each pair
                // counted once from its left/top member.
                let e = match dir {
                    0 => edges.cost(nc, option_at[nc][np], c, option_at[c][p], false),
                    1 => edges.cost(c, option_at[c][p], nc, option_at[nc][np], false),
                    2 => edges.cost(nc, option_at[nc][np], c, option_at[c][p], true),
                    _ => edges.cost(c, option_at[c][p], nc, option_at[nc][np], true),
                };
                total += 0.5 * e;
            }
        }
        total
    };
    for _pass in 0..20 {
        let mut improved = false;
        for p1 in 0..q {
            for p2 in p1 + 1..q {
                let mut touched: Vec<usize> = vec![p1, p2];
                for p in [p1, p2] {
                    touched.extend((0..4).filter_map(|dir| layout.neighbour(p, dir)));
                }
                touched.sort_unstable();
                touched.dedup();
                let before: f64 = touched.iter().map(|&p| local(p, &at, &mut edges)).sum();
                at.swap(p1, p2);
                let after: f64 = touched.iter().map(|&p| local(p, &at, &mut edges)).sum();
                if after < before - 1e-9 {
                    improved = true;
                } else {
                    at.swap(p1, p2);
                }
            }
        }
        if !improved {
            break;
        }
    }
    let objective: f64 = (0..q).map(|p| local(p, &at, &mut edges)).sum();
    for (p, &c) in at.iter().enumerate() {
        position[c] = p;
    }
    let sigmas = (0..q)
        .map(|c| options[c][option_at[c][position[c]]].clone())
        .collect();
    Placement {
        permutation: position,
        sigmas,
        objective,
    }
}

/// Mean squared difference of facing block edges over all images, per
/// (block, option) pair, computed on demand.
struct EdgeCosts<'a> {
    layout: &'a Layout,
    cipher: &'a Columns,
    options: &'a [Vec<Vec<usize>>],
    memo: HashMap<(usize, usize, usize, usize, bool), f64>,
}

impl<'a> EdgeCosts<'a> {
    fn new(layout: &'a Layout, cipher: &'a Columns, options: &'a [Vec<Vec<usize>>]) -> Self {
        EdgeCosts {
            layout,
            cipher,
            options,
            memo: HashMap::new(),
        }
    }

    /// Cipher offsets holding plain offset `e` per option: the inverse map.
    fn cipher_offset(&self, block: usize, option: usize, e: usize) -> usize {
        self.options[block][option]
            .iter()
            .position(|&x| x == e)
            .unwrap_or(e)
    }

    /// Cost of cipher block `a` (option `ia`) left of (or above, when
    /// `vertical`) cipher block `b` (option `ib`).
    fn cost(&mut self, a: usize, ia: usize, b: usize, ib: usize, vertical: bool) -> f64 {
        if let Some(&c) = self.memo.get(&(a, ia, b, ib, vertical)) {
            return c;
        }
        let (bs, bb) = (self.layout.block, self.layout.block * self.layout.block);
        let mut total = 0f64;
        for ch in 0..self.layout.planes() {
            for i in 0..bs {
                // Plain offsets facing each other.
                let (ea, eb) = if vertical {
                    ((bs - 1) * bs + i, i)
                } else {
                    (i * bs + bs - 1, i * bs)
                };
                let oa = self.cipher_offset(a, ia, ch * bb + ea);
                let ob = self.cipher_offset(b, ib, ch * bb + eb);
                let xa = self.cipher.at(self.layout.value(a, oa));
                let xb = self.cipher.at(self.layout.value(b, ob));
                total += xa
                    .iter()
                    .zip(xb)
                    .map(|(&x, &y)| f64::from((x - y) * (x - y)))
                    .sum::<f64>();
            }
        }
        let c = total / self.cipher.n.max(1) as f64;
        self.memo.insert((a, ia, b, ib, vertical), c);
        c
    }
}

/// Step 5: for each pixel, which of its two values is the high half, by
/// correlation with the neighbours' current high halves (a few sweeps).
fn unswap_components(layout: &Layout, cipher: &Columns, table: &mut RecoveredTable) {
    let n = layout.rows * layout.cols;
    // swapped[i]: cipher value i holds the low half (and n + i the high).
    let mut swapped = vec![false; n];
    let high = |i: usize, swapped: &[bool]| if swapped[i] { n + i } else { i };
    for _sweep in 0..6 {
        let mut changed = false;
        for i in 0..n {
            let (r, c) = (i / layout.cols, i % layout.cols);
            let mut neighbours = vec![0f32; cipher.n];
            let mut count = 0;
            for (dr, dc) in [(-1i64, 0i64), (1, 0), (0, -1), (0, 1)] {
                let (nr, nc) = (r as i64 + dr, c as i64 + dc);
                if nr < 0 || nc < 0 || nr >= layout.rows as i64 || nc >= layout.cols as i64 {
                    continue;
                }
                let j = nr as usize * layout.cols + nc as usize;
                for (s, &v) in neighbours.iter_mut().zip(cipher.at(high(j, &swapped))) {
                    *s += v;
                }
                count += 1;
            }
            if count == 0 {
                continue;
            }
            let a = correlation(cipher.at(i), &neighbours);
            let b = correlation(cipher.at(n + i), &neighbours);
            let swap = b > a + 1e-9;
            if swap != swapped[i] {
                swapped[i] = swap;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    // The inversions belong to cipher positions and stay; only the sources
    // of the two halves trade places.
    for (i, _) in swapped.iter().enumerate().filter(|(_, s)| **s) {
        table.source.swap(i, n + i);
    }
}

#[cfg(test)]
mod tests {
    use greyfed_participant::cipher::{ImageCipher, ImageKey};
    use greyfed_participant::data::synthetic::synthetic_digits;

    use super::super::attack::split_values;
    use super::*;

    /// Encrypts `count` synthetic digits under `mode` and attacks them with
    /// other synthetic digits as the public images; returns the fraction of
    /// the table recovered, of the inversions and of the blocks.
    fn run(mode: &str, count: usize) -> (f64, f64, Option<f64>) {
        let steps: CipherSteps = mode.parse().unwrap();
        let key = ImageKey::from_bytes([11; 32]);
        let cipher = ImageCipher::new(&key, steps, 4, 28, 28).unwrap();
        let target = synthetic_digits(count, 1);
        let public = synthetic_digits(2000, 2);
        let values = |p: &[u8]| {
            if steps.split {
                split_values(p)
            } else {
                p.to_vec()
            }
        };
        let ciphers: Vec<Vec<u8>> = (0..target.len())
            .map(|i| {
                let mut out = vec![0; cipher.cipher_len()];
                cipher.encrypt_image(target.image(i), &mut out).unwrap();
                out
            })
            .collect();
        let public: Vec<Vec<u8>> = (0..public.len()).map(|i| values(public.image(i))).collect();
        let layout = Layout {
            steps,
            block: 4,
            rows: 28,
            cols: 28,
        };
        let c: Vec<&[u8]> = ciphers.iter().map(Vec::as_slice).collect();
        let p: Vec<&[u8]> = public.iter().map(Vec::as_slice).collect();
        let recovered = ciphertext_only(&layout, &c, &p, 0).unwrap();
        // The table must decrypt what it was estimated from consistently.
        let plain = recovered.decrypt(&ciphers[0]).unwrap();
        assert_eq!(plain.len(), layout.len());
        (
            recovered
                .fraction_correct(cipher.value_source(), cipher.value_xor())
                .unwrap(),
            recovered.fraction_xor_correct(cipher.value_xor()).unwrap(),
            recovered.fraction_blocks_correct(cipher.block_permutation()),
        )
    }

    #[test]
    fn inversions_fall_to_the_background_majority() {
        let (table, xor, blocks) = run("negpos", 200);
        assert!(xor > 0.99, "inversions {xor}");
        assert!(table > 0.99, "table {table}");
        assert_eq!(blocks, None);
        let (_, xor, _) = run("pixel-negpos", 200);
        assert!(xor > 0.95, "pixel inversions {xor}");
    }

    #[test]
    fn blocks_are_placed_well_above_chance() {
        let (_, xor, blocks) = run("block-shuffle+negpos", 1000);
        let blocks = blocks.unwrap();
        assert!(xor > 0.99, "inversions {xor}");
        // Chance is 1/49; blank border blocks are interchangeable.
        assert!(blocks > 0.4, "blocks {blocks}");
    }

    #[test]
    fn in_block_shuffles_in_place_are_undone() {
        let (table, _, _) = run("le", 1000);
        assert!(table > 0.3, "le table {table}");
        let (table, _, _) = run("pixel", 1000);
        assert!(table > 0.6, "pixel table {table}");
    }

    #[test]
    fn bad_input_is_refused() {
        let layout = Layout {
            steps: "block".parse().unwrap(),
            block: 4,
            rows: 28,
            cols: 28,
        };
        let short = [0u8; 10];
        let err = ciphertext_only(&layout, &[&short], &[&short], 0).unwrap_err();
        assert!(err.to_string().contains("10 values"), "{err}");
        assert!(ciphertext_only(&layout, &[], &[&short], 0).is_err());
        let odd = Layout { block: 5, ..layout };
        assert!(ciphertext_only(&odd, &[&short], &[&short], 0).is_err());
    }
}
