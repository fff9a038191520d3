//! Splitting a dataset among participants: IID or Dirichlet label skew.
//!
//! Both schemes are deterministic functions of the labels, the number of
//! parts and a seed, so every participant can compute its own shard locally
//! and the shards of all participants are disjoint and cover the dataset.
//! (The seeded generator is rand's `StdRng`, whose algorithm may change
//! between rand versions; shards are reproducible for a given build.)

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::Gamma;

use super::Dataset;
use crate::error::{ParticipantError, Result};

/// How samples are distributed among participants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Uniformly at random: every part gets near-equal size and the global
    /// label distribution.
    Iid,
    /// Label skew: for each class, the parts' shares are drawn from a
    /// symmetric Dirichlet distribution with concentration `alpha`. Small
    /// `alpha` (e.g. 0.1) gives each part few classes; large `alpha`
    /// (e.g. 100) approaches IID.
    Dirichlet {
        /// Concentration parameter, finite and positive.
        alpha: f64,
    },
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Partition::Iid => f.write_str("iid"),
            Partition::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
        }
    }
}

impl FromStr for Partition {
    type Err = ParticipantError;

    /// Parses `iid` or `dirichlet:ALPHA` with `ALPHA` finite and positive.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("iid") {
            return Ok(Partition::Iid);
        }
        let Some((scheme, alpha)) = s.split_once(':') else {
            return Err(ParticipantError::Partition(format!(
                "unknown partition {s:?}; expected \"iid\" or \"dirichlet:ALPHA\" (e.g. dirichlet:0.5)"
            )));
        };
        if !scheme.trim().eq_ignore_ascii_case("dirichlet") {
            return Err(ParticipantError::Partition(format!(
                "unknown partition scheme {scheme:?}; expected \"iid\" or \"dirichlet:ALPHA\""
            )));
        }
        let alpha_str = alpha.trim();
        let alpha: f64 = alpha_str.parse().map_err(|_| {
            ParticipantError::Partition(format!(
                "dirichlet concentration {alpha_str:?} is not a number (e.g. dirichlet:0.5)"
            ))
        })?;
        check_alpha(alpha)?;
        Ok(Partition::Dirichlet { alpha })
    }
}

fn check_alpha(alpha: f64) -> Result<()> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(ParticipantError::Partition(format!(
            "dirichlet concentration must be finite and positive, got {alpha}"
        )));
    }
    Ok(())
}

/// How many times a Dirichlet partition is re-drawn when some part comes out
/// empty before falling back to moving samples into the empty parts.
const DIRICHLET_REDRAWS: usize = 16;

/// Splits sample indices `0..labels.len()` into `parts` disjoint, non-empty
/// parts that together cover every index, deterministically from `seed`.
///
/// - [`Partition::Iid`]: a seeded shuffle cut into contiguous chunks whose
///   sizes differ by at most one.
/// - [`Partition::Dirichlet`]: for each class, shares `p ~ Dir(alpha)` over
///   the parts (normalised Gamma draws; if all draws underflow to zero, as
///   can happen for tiny `alpha`, the whole class goes to one random part),
///   and the class's shuffled samples are cut by those shares. If a part
///   comes out empty the whole draw is repeated, up to 16 times; after that
///   empty parts each take one sample from the currently largest part. Each
///   part is shuffled at the end so it is not ordered by class.
///
/// Errors when `parts` is zero or exceeds the number of samples, when a
/// label is not below `num_classes`, or when `alpha` is not finite and
/// positive.
pub fn partition_indices(
    labels: &[u8],
    num_classes: usize,
    parts: usize,
    partition: Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    if parts == 0 {
        return Err(ParticipantError::Partition(
            "cannot split a dataset into 0 parts".to_owned(),
        ));
    }
    if parts > labels.len() {
        return Err(ParticipantError::Partition(format!(
            "cannot split {} samples into {parts} non-empty parts",
            labels.len()
        )));
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= num_classes)
    {
        return Err(ParticipantError::Partition(format!(
            "label {l} of sample {i} is not below the number of classes {num_classes}"
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    match partition {
        Partition::Iid => Ok(iid(labels.len(), parts, &mut rng)),
        Partition::Dirichlet { alpha } => {
            check_alpha(alpha)?;
            dirichlet(labels, num_classes, parts, alpha, &mut rng)
        }
    }
}

fn iid(n: usize, parts: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut indices: Vec<usize> = (0..n).collect();
    indices.shuffle(rng);
    let (base, extra) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for k in 0..parts {
        let len = base + usize::from(k < extra);
        out.push(indices[start..start + len].to_vec());
        start += len;
    }
    out
}

fn dirichlet(
    labels: &[u8],
    num_classes: usize,
    parts: usize,
    alpha: f64,
    rng: &mut StdRng,
) -> Result<Vec<Vec<usize>>> {
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| {
        ParticipantError::Partition(format!("dirichlet concentration {alpha}: {e}"))
    })?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let mut out = Vec::new();
    for _ in 0..DIRICHLET_REDRAWS {
        out = vec![Vec::new(); parts];
        let mut shares = vec![0.0f64; parts];
        for class in &mut by_class {
            if class.is_empty() {
                continue;
            }
            class.shuffle(rng);
            for s in &mut shares {
                *s = rng.sample(gamma);
            }
            let total: f64 = shares.iter().sum();
            if !(total.is_finite() && total > 0.0) {
                // All draws underflowed: the limit of Dir(alpha) as alpha -> 0
                // puts everything on one uniformly chosen part.
                shares.fill(0.0);
                shares[rng.random_range(0..parts)] = 1.0;
            }
            let total: f64 = shares.iter().sum();
            let n = class.len();
            let mut cum = 0.0;
            let mut start = 0;
            for (k, &s) in shares.iter().enumerate() {
                cum += s;
                let end = if k + 1 == parts {
                    n
                } else {
                    ((cum / total * n as f64).round() as usize).clamp(start, n)
                };
                out[k].extend_from_slice(&class[start..end]);
                start = end;
            }
        }
        if out.iter().all(|p| !p.is_empty()) {
            break;
        }
    }
    // Fallback after the re-draws: fill each empty part from the largest one
    // (which has at least two samples because parts <= labels.len()).
    while let Some(empty) = out.iter().position(Vec::is_empty) {
        let largest = (0..parts).max_by_key(|&k| out[k].len()).unwrap_or(0);
        if out[largest].len() < 2 {
            return Err(ParticipantError::Partition(format!(
                "cannot give each of {parts} parts a sample"
            )));
        }
        if let Some(i) = out[largest].pop() {
            out[empty].push(i);
        }
    }
    for part in &mut out {
        part.shuffle(rng);
    }
    Ok(out)
}

/// Part `index` (counting from 0) of `dataset` split into `parts` parts by
/// [`partition_indices`] with the same `partition` and `seed`.
pub fn shard(
    dataset: &Dataset,
    index: usize,
    parts: usize,
    partition: Partition,
    seed: u64,
) -> Result<Dataset> {
    if index >= parts {
        return Err(ParticipantError::Partition(format!(
            "part index {index} is out of range for {parts} parts (indices start at 0)"
        )));
    }
    let mut all = partition_indices(
        dataset.labels(),
        dataset.num_classes(),
        parts,
        partition,
        seed,
    )?;
    Ok(dataset.subset(&all.swap_remove(index)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn balanced_labels(n: usize, classes: usize) -> Vec<u8> {
        (0..n).map(|i| (i % classes) as u8).collect()
    }

    fn assert_exact_cover(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![false; n];
        for part in parts {
            assert!(!part.is_empty(), "empty part");
            for &i in part {
                assert!(i < n, "index {i} out of range");
                assert!(!seen[i], "index {i} in two parts");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "some index in no part");
    }

    /// Mean total-variation distance between each part's label histogram and
    /// the global one.
    fn mean_tv(labels: &[u8], classes: usize, parts: &[Vec<usize>]) -> f64 {
        let hist = |idx: &mut dyn Iterator<Item = u8>| {
            let mut h = vec![0.0; classes];
            let mut n = 0.0;
            for l in idx {
                h[l as usize] += 1.0;
                n += 1.0;
            }
            h.iter().map(|c| c / n).collect::<Vec<f64>>()
        };
        let global = hist(&mut labels.iter().copied());
        parts
            .iter()
            .map(|p| {
                let h = hist(&mut p.iter().map(|&i| labels[i]));
                0.5 * h
                    .iter()
                    .zip(&global)
                    .map(|(a, b)| (a - b).abs())
                    .sum::<f64>()
            })
            .sum::<f64>()
            / parts.len() as f64
    }

    #[test]
    fn parse_and_display_round_trip() {
        for (s, p) in [
            ("iid", Partition::Iid),
            ("dirichlet:0.1", Partition::Dirichlet { alpha: 0.1 }),
            ("dirichlet:100", Partition::Dirichlet { alpha: 100.0 }),
            ("dirichlet:1e-3", Partition::Dirichlet { alpha: 0.001 }),
        ] {
            let parsed: Partition = s.parse().unwrap();
            assert_eq!(parsed, p);
            assert_eq!(parsed.to_string().parse::<Partition>().unwrap(), p);
        }
        assert_eq!(Partition::Iid.to_string(), "iid");
        assert_eq!(
            Partition::Dirichlet { alpha: 0.5 }.to_string(),
            "dirichlet:0.5"
        );
        assert_eq!(" IID ".parse::<Partition>().unwrap(), Partition::Iid);
        assert_eq!(
            "Dirichlet: 2".parse::<Partition>().unwrap(),
            Partition::Dirichlet { alpha: 2.0 }
        );
    }

    #[test]
    fn parse_errors_are_clear() {
        for (s, needle) in [
            ("", "unknown partition"),
            ("random", "unknown partition"),
            ("shards:3", "unknown partition scheme"),
            ("dirichlet", "unknown partition"),
            ("dirichlet:", "not a number"),
            ("dirichlet:abc", "not a number"),
            ("dirichlet:0", "finite and positive"),
            ("dirichlet:-1", "finite and positive"),
            ("dirichlet:inf", "finite and positive"),
            ("dirichlet:NaN", "finite and positive"),
        ] {
            match s.parse::<Partition>() {
                Err(ParticipantError::Partition(msg)) => {
                    assert!(msg.contains(needle), "{s:?}: {msg}")
                }
                other => panic!("{s:?}: expected a Partition error, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let labels = balanced_labels(10, 10);
        let err = |r: Result<Vec<Vec<usize>>>| match r {
            Err(ParticipantError::Partition(msg)) => msg,
            other => panic!("expected a Partition error, got {other:?}"),
        };
        assert!(err(partition_indices(&labels, 10, 0, Partition::Iid, 1)).contains("0 parts"));
        assert!(err(partition_indices(&labels, 10, 11, Partition::Iid, 1)).contains("10 samples"));
        assert!(err(partition_indices(&[], 10, 1, Partition::Iid, 1)).contains("0 samples"));
        assert!(err(partition_indices(&labels, 5, 2, Partition::Iid, 1)).contains("label 5"));
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let msg = err(partition_indices(
                &labels,
                10,
                2,
                Partition::Dirichlet { alpha },
                1,
            ));
            assert!(msg.contains("finite and positive"), "{msg}");
        }
        let ds = Dataset::new(1, 1, 10, vec![0; 10], labels).unwrap();
        match shard(&ds, 3, 3, Partition::Iid, 1) {
            Err(ParticipantError::Partition(msg)) => assert!(msg.contains("out of range"), "{msg}"),
            other => panic!("expected a Partition error, got {other:?}"),
        }
    }

    #[test]
    fn iid_is_balanced_and_deterministic() {
        let labels = balanced_labels(1003, 10);
        let parts = partition_indices(&labels, 10, 7, Partition::Iid, 42).unwrap();
        assert_exact_cover(&parts, labels.len());
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
        assert_eq!(
            parts,
            partition_indices(&labels, 10, 7, Partition::Iid, 42).unwrap()
        );
        assert_ne!(
            parts,
            partition_indices(&labels, 10, 7, Partition::Iid, 43).unwrap()
        );
        assert!(mean_tv(&labels, 10, &parts) < 0.1);
    }

    #[test]
    fn dirichlet_is_deterministic() {
        let labels = balanced_labels(500, 10);
        let p = Partition::Dirichlet { alpha: 0.5 };
        let a = partition_indices(&labels, 10, 5, p, 9).unwrap();
        assert_exact_cover(&a, labels.len());
        assert_eq!(a, partition_indices(&labels, 10, 5, p, 9).unwrap());
        assert_ne!(a, partition_indices(&labels, 10, 5, p, 10).unwrap());
    }

    #[test]
    fn small_alpha_is_much_more_skewed_than_large_alpha() {
        let labels = balanced_labels(10_000, 10);
        let tv = |alpha| {
            let parts =
                partition_indices(&labels, 10, 10, Partition::Dirichlet { alpha }, 7).unwrap();
            assert_exact_cover(&parts, labels.len());
            mean_tv(&labels, 10, &parts)
        };
        let (skewed, flat, iid) = (tv(0.1), tv(100.0), {
            let parts = partition_indices(&labels, 10, 10, Partition::Iid, 7).unwrap();
            mean_tv(&labels, 10, &parts)
        });
        assert!(skewed > 0.5, "alpha 0.1: mean TV {skewed}");
        assert!(flat < 0.1, "alpha 100: mean TV {flat}");
        assert!(iid < 0.1, "iid: mean TV {iid}");
    }

    #[test]
    fn tiny_alpha_still_gives_every_part_a_sample() {
        // alpha this small makes Gamma draws underflow and most parts empty,
        // exercising both the all-zero case and the fallback.
        let labels = balanced_labels(30, 3);
        for seed in 0..20 {
            let parts =
                partition_indices(&labels, 3, 30, Partition::Dirichlet { alpha: 1e-6 }, seed)
                    .unwrap();
            assert_exact_cover(&parts, labels.len());
            assert!(parts.iter().all(|p| p.len() == 1));
        }
    }

    #[test]
    fn shard_returns_the_matching_part() {
        let labels = balanced_labels(50, 5);
        let pixels: Vec<u8> = (0..50).map(|i| i as u8).collect();
        let ds = Dataset::new(1, 1, 5, pixels, labels.clone()).unwrap();
        let p = Partition::Dirichlet { alpha: 1.0 };
        let parts = partition_indices(&labels, 5, 4, p, 3).unwrap();
        let mut total = 0;
        for (k, idx) in parts.iter().enumerate() {
            let s = shard(&ds, k, 4, p, 3).unwrap();
            assert_eq!(s.num_classes(), 5);
            assert_eq!(s.len(), idx.len());
            // Pixel value == original index, so the shard's images name its samples.
            let got: Vec<usize> = s.pixels().iter().map(|&v| v as usize).collect();
            assert_eq!(&got, idx);
            assert!(got.iter().zip(s.labels()).all(|(&i, &l)| labels[i] == l));
            total += s.len();
        }
        assert_eq!(total, 50);
    }

    fn any_partition() -> impl Strategy<Value = Partition> {
        prop_oneof![
            Just(Partition::Iid),
            (0.001f64..1000.0).prop_map(|alpha| Partition::Dirichlet { alpha }),
        ]
    }

    proptest! {
        #[test]
        fn partitions_are_disjoint_and_cover(
            labels in prop::collection::vec(0u8..10, 1..300),
            parts_frac in 0.0f64..1.0,
            partition in any_partition(),
            seed in any::<u64>(),
        ) {
            let n = labels.len();
            let parts = 1 + ((n - 1) as f64 * parts_frac * parts_frac) as usize;
            let out = partition_indices(&labels, 10, parts, partition, seed).unwrap();
            prop_assert_eq!(out.len(), parts);
            assert_exact_cover(&out, n);
            prop_assert_eq!(&out, &partition_indices(&labels, 10, parts, partition, seed).unwrap());
            if partition == Partition::Iid {
                let sizes: Vec<usize> = out.iter().map(Vec::len).collect();
                prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }

        #[test]
        fn display_parse_round_trip(partition in any_partition()) {
            prop_assert_eq!(partition.to_string().parse::<Partition>().unwrap(), partition);
        }
    }
}
