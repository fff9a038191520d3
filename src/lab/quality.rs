//! Image-quality metrics on 8-bit grey images: MSE, PSNR and SSIM.
//!
//! They measure how much of a plain image an attack ([`super::attack`])
//! recovers: PSNR is infinite for an exact recovery, SSIM is 1 for identical
//! images, near 0 for unrelated ones and negative for inverted structure.
//!
//! # SSIM
//!
//! [`ssim`] is the mean SSIM index of Wang, Bovik, Sheikh and Simoncelli,
//! "Image quality assessment: from error visibility to structural
//! similarity" (IEEE TIP 2004), exactly as their reference `ssim_index.m`
//! computes it: an 11x11 Gaussian window with sigma 1.5 (normalised to sum
//! 1), `K1 = 0.01`, `K2 = 0.03`, dynamic range `L = 255`, local statistics
//! only where the window fits entirely inside the image (the "valid" region
//! of `(rows - 10) x (cols - 10)` windows, no padding), and population
//! (biased) variances. This equals scikit-image's
//! `structural_similarity(a, b, data_range=255, gaussian_weights=True,
//! sigma=1.5, use_sample_covariance=False)`. scikit-image's default
//! `use_sample_covariance=True` scales every variance and covariance by
//! `121 / 120` and gives slightly different values (in the 6th decimal on the
//! test images here). MATLAB's toolbox `ssim` pads the image instead of
//! cropping, so it differs near the border. The original's automatic
//! down-sampling only applies to images larger than 256 pixels per side and
//! is not done here.
//!
//! Implemented here rather than taken from a crate: `image-compare` (MIT)
//! averages SSIM over non-overlapping 8x8 uniform windows and is built on
//! the `image` crate, and `dssim` computes a multi-scale variant under the
//! AGPL.

use anyhow::{Result, anyhow};

/// Side of the SSIM window, in pixels.
pub const SSIM_WINDOW: usize = 11;

/// Standard deviation of the Gaussian SSIM window, in pixels.
pub const SSIM_SIGMA: f64 = 1.5;

/// SSIM's luminance stabiliser constant `K1` (`C1 = (K1 * 255)^2`).
pub const SSIM_K1: f64 = 0.01;

/// SSIM's contrast stabiliser constant `K2` (`C2 = (K2 * 255)^2`).
pub const SSIM_K2: f64 = 0.03;

/// Peak value of an 8-bit image, the dynamic range for PSNR and SSIM.
const PEAK: f64 = 255.0;

fn error(message: String) -> anyhow::Error {
    anyhow!(message)
}

/// Checks that two images have the same, non-zero number of pixels.
fn check_pair(what: &str, reference: &[u8], test: &[u8]) -> Result<()> {
    if reference.len() != test.len() {
        return Err(error(format!(
            "{what}: the reference has {} pixels but the test image {}",
            reference.len(),
            test.len()
        )));
    }
    if reference.is_empty() {
        return Err(error(format!("{what}: the images are empty")));
    }
    Ok(())
}

/// Mean squared error between two images of the same length.
///
/// # Errors
///
/// If the lengths differ or the images are empty.
pub fn mse(reference: &[u8], test: &[u8]) -> Result<f64> {
    check_pair("mse", reference, test)?;
    let sum: u64 = reference
        .iter()
        .zip(test)
        .map(|(&a, &b)| {
            let d = u64::from(a.abs_diff(b));
            d * d
        })
        .sum();
    Ok(sum as f64 / reference.len() as f64)
}

/// Peak signal-to-noise ratio in dB with peak 255:
/// `10 * log10(255^2 / mse)`; `f64::INFINITY` for identical images.
///
/// # Errors
///
/// If the lengths differ or the images are empty.
pub fn psnr(reference: &[u8], test: &[u8]) -> Result<f64> {
    let mse = mse(reference, test)?;
    if mse == 0.0 {
        Ok(f64::INFINITY)
    } else {
        Ok(10.0 * (PEAK * PEAK / mse).log10())
    }
}

/// The normalised 1-D Gaussian window; the 2-D window is its outer product.
fn gaussian_window() -> [f64; SSIM_WINDOW] {
    let centre = (SSIM_WINDOW / 2) as f64;
    let mut w = [0.0; SSIM_WINDOW];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - centre;
        *v = (-(x * x) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    for v in &mut w {
        *v /= sum;
    }
    w
}

/// Checks an image pair's lengths and size for SSIM.
fn check_ssim_geometry(reference: &[u8], test: &[u8], rows: usize, cols: usize) -> Result<()> {
    if rows < SSIM_WINDOW || cols < SSIM_WINDOW {
        return Err(error(format!(
            "ssim: images of {rows}x{cols} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window"
        )));
    }
    let len = rows
        .checked_mul(cols)
        .ok_or_else(|| error(format!("ssim: {rows}x{cols} pixels overflow")))?;
    for (name, image) in [("reference", reference), ("test image", test)] {
        if image.len() != len {
            return Err(error(format!(
                "ssim: the {name} has {} pixels, expected {rows}x{cols} = {len}",
                image.len()
            )));
        }
    }
    Ok(())
}

/// Mean SSIM of two `rows x cols` row-major images (see the
/// [module documentation](self) for the exact definition): 1 for identical
/// images, lower for less similar ones, negative for anti-correlated ones.
///
/// # Errors
///
/// If either image is not `rows * cols` pixels long, or `rows` or `cols` is
/// below [`SSIM_WINDOW`].
pub fn ssim(reference: &[u8], test: &[u8], rows: usize, cols: usize) -> Result<f64> {
    check_ssim_geometry(reference, test, rows, cols)?;
    let w = gaussian_window();
    let (out_rows, out_cols) = (rows - SSIM_WINDOW + 1, cols - SSIM_WINDOW + 1);

    // Horizontal pass (valid): five statistics per (row, output column).
    const STATS: usize = 5;
    let mut horizontal = vec![[0.0f64; STATS]; rows * out_cols];
    for r in 0..rows {
        let (x_row, y_row) = (
            &reference[r * cols..(r + 1) * cols],
            &test[r * cols..(r + 1) * cols],
        );
        for c in 0..out_cols {
            let mut acc = [0.0f64; STATS];
            for (j, &wj) in w.iter().enumerate() {
                let x = f64::from(x_row[c + j]);
                let y = f64::from(y_row[c + j]);
                acc[0] += wj * x;
                acc[1] += wj * y;
                acc[2] += wj * x * x;
                acc[3] += wj * y * y;
                acc[4] += wj * x * y;
            }
            horizontal[r * out_cols + c] = acc;
        }
    }

    // Vertical pass (valid) and the SSIM map, averaged on the fly.
    let c1 = (SSIM_K1 * PEAK).powi(2);
    let c2 = (SSIM_K2 * PEAK).powi(2);
    let mut total = 0.0f64;
    for r in 0..out_rows {
        for c in 0..out_cols {
            let mut m = [0.0f64; STATS];
            for (i, &wi) in w.iter().enumerate() {
                let h = &horizontal[(r + i) * out_cols + c];
                for (acc, v) in m.iter_mut().zip(h) {
                    *acc += wi * v;
                }
            }
            let [ux, uy, uxx, uyy, uxy] = m;
            let vx = uxx - ux * ux;
            let vy = uyy - uy * uy;
            let vxy = uxy - ux * uy;
            total += ((2.0 * ux * uy + c1) * (2.0 * vxy + c2))
                / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
        }
    }
    Ok(total / (out_rows * out_cols) as f64)
}

/// Mean of [`ssim`] over image pairs `(reference[i], test[i])`, all
/// `rows x cols`.
///
/// # Errors
///
/// If the two lists differ in length or are empty, or any pair fails
/// [`ssim`]'s checks.
pub fn mean_ssim(reference: &[&[u8]], test: &[&[u8]], rows: usize, cols: usize) -> Result<f64> {
    if reference.len() != test.len() {
        return Err(error(format!(
            "mean_ssim: {} reference images but {} test images",
            reference.len(),
            test.len()
        )));
    }
    if reference.is_empty() {
        return Err(error("mean_ssim: no images".to_string()));
    }
    let mut total = 0.0;
    for (a, b) in reference.iter().zip(test) {
        total += ssim(a, b, rows, cols)?;
    }
    Ok(total / reference.len() as f64)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    /// The deterministic test image of the pure-Python reference.
    fn pattern(rows: usize, cols: usize) -> Vec<u8> {
        (0..rows)
            .flat_map(|r| (0..cols).map(move |c| ((r * 37 + c * 11 + r * c * 5) % 256) as u8))
            .collect()
    }

    /// `pattern` plus a deterministic offset in -20..=20, clamped.
    fn perturbed(a: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let v = i64::from(a[i]) + ((r * 7 + c * 3) % 41) as i64 - 20;
                v.clamp(0, 255) as u8
            })
            .collect()
    }

    /// A soft disc on black, MNIST-like (Python: `int(round(...))`, ties to even).
    fn blob(rows: usize, cols: usize) -> Vec<u8> {
        (0..rows * cols)
            .map(|i| {
                let (r, c) = ((i / cols) as f64, (i % cols) as f64);
                let d = (r - 7.5).hypot(c - 6.0);
                if d < 5.0 {
                    (255.0 * (5.0 - d) / 2.0)
                        .round_ties_even()
                        .clamp(0.0, 255.0) as u8
                } else {
                    0
                }
            })
            .collect()
    }

    fn noisy(a: &[u8], amplitude: i32, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        a.iter()
            .map(|&v| (i32::from(v) + rng.random_range(-amplitude..=amplitude)).clamp(0, 255) as u8)
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn psnr_and_mse() {
        let a = [0u8, 10, 20, 30];
        assert_eq!(psnr(&a, &a).unwrap(), f64::INFINITY);
        assert_eq!(mse(&a, &a).unwrap(), 0.0);
        let b = [1u8, 9, 21, 29];
        assert_eq!(mse(&a, &b).unwrap(), 1.0);
        assert!(close(psnr(&a, &b).unwrap(), 20.0 * 255f64.log10()));
        let black = [0u8; 8];
        let white = [255u8; 8];
        assert!(close(psnr(&black, &white).unwrap(), 0.0));
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(psnr(&[1, 2, 3], &[1, 2]).is_err());
        assert!(psnr(&[], &[]).is_err());
        assert!(mse(&[1], &[]).is_err());
        let a = pattern(12, 12);
        assert!(ssim(&a, &a, 12, 12).is_ok());
        assert!(ssim(&a, &a[..143], 12, 12).is_err());
        assert!(ssim(&a[..143], &a, 12, 12).is_err());
        assert!(ssim(&a, &a, 12, 11).is_err());
        assert!(ssim(&a[..120], &a[..120], 12, 10).is_err());
        assert!(ssim(&a[..120], &a[..120], 10, 12).is_err());
        assert!(ssim(&[], &[], usize::MAX, 2).is_err());
        assert!(ssim(&[], &[], usize::MAX, usize::MAX).is_err());
        assert!(mean_ssim(&[], &[], 12, 12).is_err());
        assert!(mean_ssim(&[&a], &[&a, &a], 12, 12).is_err());
        assert!(mean_ssim(&[&a], &[&a[..100]], 12, 12).is_err());
    }

    #[test]
    fn identical_images_give_one() {
        for (rows, cols) in [(11, 11), (16, 13), (28, 28)] {
            let a = pattern(rows, cols);
            assert!(close(ssim(&a, &a, rows, cols).unwrap(), 1.0));
            let flat = vec![0u8; rows * cols];
            assert!(close(ssim(&flat, &flat, rows, cols).unwrap(), 1.0));
        }
    }

    /// Values from an independent pure-Python implementation (direct 2-D
    /// Gaussian sums over every valid 11x11 window, Wang et al.'s formula;
    /// numpy was not available to run scikit-image itself).
    #[test]
    fn known_values() {
        let (rows, cols) = (16, 13);
        let a = pattern(rows, cols);
        let b = perturbed(&a, rows, cols);
        let inv: Vec<u8> = a.iter().map(|v| 255 - v).collect();
        let tol = 1e-10;
        assert!((ssim(&a, &b, rows, cols).unwrap() - 0.987_488_101_838_991_2).abs() < tol);
        assert!((ssim(&b, &a, rows, cols).unwrap() - 0.987_488_101_838_991_2).abs() < tol);
        assert!((ssim(&a, &inv, rows, cols).unwrap() - -0.984_735_996_326_332_2).abs() < tol);

        let (br, bc) = (15, 12);
        let d = blob(br, bc);
        assert_eq!(&d[40..45], &[10, 50, 64, 50, 10]);
        let shifted: Vec<u8> = (0..br * bc)
            .map(|i| if i % bc >= 1 { d[i - 1] } else { 0 })
            .collect();
        assert!((ssim(&d, &shifted, br, bc).unwrap() - 0.830_332_460_523_424_8).abs() < tol);

        let e = pattern(11, 11);
        let f = perturbed(&e, 11, 11);
        assert!((ssim(&e, &f, 11, 11).unwrap() - 0.988_266_283_794_897_7).abs() < tol);
    }

    #[test]
    fn properties() {
        let (rows, cols) = (28, 28);
        let mut rng = StdRng::seed_from_u64(7);
        let a: Vec<u8> = (0..rows * cols).map(|_| rng.random()).collect();
        let b = noisy(&a, 60, 1);
        // Symmetric, and 1 only for equal images.
        let ab = ssim(&a, &b, rows, cols).unwrap();
        assert!(close(ab, ssim(&b, &a, rows, cols).unwrap()));
        assert!(ab < 1.0);
        let mut c = a.clone();
        c[rows * cols / 2] ^= 1;
        assert!(ssim(&a, &c, rows, cols).unwrap() < 1.0);
        // The negative image is strongly anti-correlated.
        let inv: Vec<u8> = a.iter().map(|v| 255 - v).collect();
        assert!(ssim(&a, &inv, rows, cols).unwrap() < -0.9);
        // More noise, lower SSIM.
        let smooth = pattern(rows, cols);
        let mut last = 1.0;
        for amplitude in [2, 8, 20, 50, 120] {
            let s = ssim(&smooth, &noisy(&smooth, amplitude, 3), rows, cols).unwrap();
            assert!(s < last, "amplitude {amplitude}: {s} >= {last}");
            last = s;
        }
        // Mean over pairs.
        let m = mean_ssim(&[&a, &a], &[&a, &b], rows, cols).unwrap();
        assert!(close(m, (1.0 + ab) / 2.0));
    }
}
