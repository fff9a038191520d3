//! What the image cipher hides from an observer, measured: the
//! known-plaintext attack and the ciphertext-only "fold" attack
//! ([`super::attack`]) on each cipher mode, with the SSIM and PSNR
//! ([`super::quality`]) of what they recover. `greyfed experiment
//! encryption` writes these tables next to its accuracy tables, and the run
//! report's sample images use [`attack_views`].

use std::fmt::Write as _;

use anyhow::{Context, Result};
use greyfed_participant::{cipher::ImageCipher, data::Dataset, data::DatasetSplits};
use serde::Serialize;

use super::attack::{KnownPlaintextAttack, fold_image, merge_split, split_values};
use super::experiment::{experiment_key, parse_mode};
use super::quality::{mean_ssim, psnr};

/// Security figures of one mode.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeSecurity {
    /// The mode.
    pub mode: String,
    /// log2 of the transform family (see `ImageCipher::key_space_bits`).
    pub key_bits: f64,
    /// Mean SSIM between plain test images and their encryption (split
    /// modes: the cipher bytes read as 8-bit pixels `hi << 4 | lo`).
    pub ssim: f64,
    /// Known plain/cipher pairs the known-plaintext attack used.
    pub known_pairs: usize,
    /// Fraction of the cipher's value map the attack pinned down uniquely.
    pub kpa_unique: f64,
    /// Mean SSIM of held-out images decrypted with the recovered map.
    pub kpa_ssim: f64,
    /// Mean PSNR (dB, capped at 99) of those images.
    pub kpa_psnr: f64,
    /// Mean SSIM between the plain images and the fold attack's picture
    /// (ciphertext only).
    pub fold_ssim: f64,
}

/// What an observer sees of some plain images under one cipher, and what
/// the attacks recover from it: 8-bit pictures, one per image.
pub struct AttackViews {
    /// The cipher images (split modes: the cipher bytes read as 8-bit
    /// pixels, `hi << 4 | lo`).
    pub cipher: Vec<Vec<u8>>,
    /// The known-plaintext attack's decryptions.
    pub kpa: Vec<Vec<u8>>,
    /// The fold attack's pictures (ciphertext only).
    pub fold: Vec<Vec<u8>>,
    /// Known plain/cipher pairs the known-plaintext attack used.
    pub known_pairs: usize,
    /// Fraction of the cipher's value map the attack pinned down uniquely.
    pub kpa_unique: f64,
}

/// Encrypts `images` with `cipher` and runs the attacks on them; the
/// known-plaintext attack gets the first `known_pairs` images of `known`
/// with their encryption.
pub fn attack_views(
    cipher: &ImageCipher,
    known: &Dataset,
    known_pairs: usize,
    images: &[&[u8]],
) -> Result<AttackViews> {
    let (rows, cols) = (cipher.rows(), cipher.cols());
    let split = cipher.channels() == 2;
    let encrypt = |plain: &[u8]| -> Result<Vec<u8>> {
        let mut out = vec![0; cipher.cipher_len()];
        cipher.encrypt_image(plain, &mut out)?;
        Ok(out)
    };
    let view = |values: &[u8]| -> Result<Vec<u8>> {
        Ok(if split {
            merge_split(values, rows, cols)?
        } else {
            values.to_vec()
        })
    };
    let known_pairs = known_pairs.min(known.len());
    let pairs = (0..known_pairs)
        .map(|i| {
            let p = known.image(i);
            let values = if split { split_values(p) } else { p.to_vec() };
            Ok((values, encrypt(p)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let attack = KnownPlaintextAttack::new(&pairs)?;
    let mut views = AttackViews {
        cipher: Vec::with_capacity(images.len()),
        kpa: Vec::with_capacity(images.len()),
        fold: Vec::with_capacity(images.len()),
        known_pairs,
        kpa_unique: attack.fraction_unique(),
    };
    for plain in images {
        let c = encrypt(plain)?;
        views.cipher.push(view(&c)?);
        views.kpa.push(view(&attack.decrypt(&c)?)?);
        views.fold.push(fold_image(&c, rows, cols)?);
    }
    Ok(views)
}

/// The security figures are averaged over the keys of seeds
/// `0..SECURITY_KEYS`: one key can be degenerate (a small family like
/// `rotate-flip`'s 8 transforms contains the identity).
pub const SECURITY_KEYS: u64 = 4;

/// Measures the security figures of `mode` on `splits` with `known_pairs`
/// pairs from the training split and `samples` held-out test images, as
/// means over the keys of seeds `0..SECURITY_KEYS`.
pub fn mode_security(
    splits: &DatasetSplits,
    mode: &str,
    block: usize,
    known_pairs: usize,
    samples: usize,
) -> Result<ModeSecurity> {
    let steps = parse_mode(mode)?.context("plain has no security figures")?;
    let (rows, cols) = (splits.test.rows(), splits.test.cols());
    let plain: Vec<&[u8]> = (0..samples.min(splits.test.len()))
        .map(|i| splits.test.image(i))
        .collect();
    let mut sum = ModeSecurity {
        mode: mode.to_string(),
        ..ModeSecurity::default()
    };
    for seed in 0..SECURITY_KEYS {
        let cipher = ImageCipher::new(&experiment_key(seed), steps, block, rows, cols)?;
        let views = attack_views(&cipher, &splits.train, known_pairs, &plain)?;
        let psnr_sum = plain
            .iter()
            .zip(&views.kpa)
            .map(|(p, r)| Ok(psnr(p, r)?.min(99.0)))
            .sum::<Result<f64>>()?;
        sum.key_bits = cipher.key_space_bits();
        sum.known_pairs = views.known_pairs;
        sum.ssim += mean_ssim(&plain, &slices(&views.cipher), rows, cols)?;
        sum.kpa_unique += views.kpa_unique;
        sum.kpa_ssim += mean_ssim(&plain, &slices(&views.kpa), rows, cols)?;
        sum.kpa_psnr += psnr_sum / plain.len().max(1) as f64;
        sum.fold_ssim += mean_ssim(&plain, &slices(&views.fold), rows, cols)?;
    }
    let keys = SECURITY_KEYS as f64;
    Ok(ModeSecurity {
        ssim: sum.ssim / keys,
        kpa_unique: sum.kpa_unique / keys,
        kpa_ssim: sum.kpa_ssim / keys,
        kpa_psnr: sum.kpa_psnr / keys,
        fold_ssim: sum.fold_ssim / keys,
        ..sum
    })
}

/// The attack table as Markdown.
pub fn attacks_markdown(rows: &[ModeSecurity]) -> String {
    let mut s = String::from(
        "| mode | key bits | SSIM(plain, cipher) | known pairs | KPA unique | KPA SSIM | KPA PSNR (dB) | fold SSIM |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.3} | {} | {:.1}% | {:.3} | {:.1} | {:.3} |",
            r.mode,
            r.key_bits,
            r.ssim,
            r.known_pairs,
            100.0 * r.kpa_unique,
            r.kpa_ssim,
            r.kpa_psnr,
            r.fold_ssim
        );
    }
    s
}

/// The attack table as CSV.
pub fn attacks_csv(rows: &[ModeSecurity]) -> String {
    let mut s =
        String::from("mode,key_bits,ssim,known_pairs,kpa_unique,kpa_ssim,kpa_psnr,fold_ssim\n");
    for r in rows {
        let _ = writeln!(
            s,
            "{},{:.1},{:.4},{},{:.4},{:.4},{:.2},{:.4}",
            r.mode,
            r.key_bits,
            r.ssim,
            r.known_pairs,
            r.kpa_unique,
            r.kpa_ssim,
            r.kpa_psnr,
            r.fold_ssim
        );
    }
    s
}

/// Borrows every image of `images`.
pub(crate) fn slices(images: &[Vec<u8>]) -> Vec<&[u8]> {
    images.iter().map(Vec::as_slice).collect()
}
