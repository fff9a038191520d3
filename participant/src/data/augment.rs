//! Data augmentation on plain images, before encryption.
//!
//! Two kinds, which combine:
//! - [`ShiftedCopies`]: translated copies added once to the training shard
//!   (offline; the shard grows and so does its aggregation weight);
//! - [`RandomAffine`]: every training image distorted afresh in every epoch
//!   (online; rotation, scaling, shear and translation with bilinear
//!   resampling), the images of each epoch encrypted like any others.
//!
//! Participants hold their plain images, so augmentation never needs the
//! key and never sees cipher images: a distorted plain image is encrypted
//! with the same key as the original.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::Dataset;
use crate::error::{ParticipantError, Result};

/// Data augmentation: offline [`ShiftedCopies`] and online [`RandomAffine`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Augmentation {
    /// Copies added once to the training shard.
    pub shifted_copies: ShiftedCopies,
    /// Distortion drawn afresh for every image in every epoch.
    pub random_affine: RandomAffine,
}

/// Translated copies of every training image, optionally with pixel noise,
/// added to a participant's plain images before they are encrypted (see
/// [`Dataset::with_shifted_copies`] and [`Dataset::with_pixel_noise`]).
/// Encryption does not get in the way: the cipher is applied to each copy
/// like to any other image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShiftedCopies {
    /// Copies of each image (0: no augmentation).
    pub copies: usize,
    /// Largest translation, in pixels, each way.
    pub max_shift: usize,
    /// Largest noise, in grey levels, added to each pixel of the copies (0:
    /// none; the original images never get any). Noise of 8 or more
    /// randomises a pixel's low 4 bits, which split images (`le`, `pixel`)
    /// otherwise let a model memorise.
    pub pixel_noise: u8,
}

impl ShiftedCopies {
    /// Participant `index`'s training images with their copies, drawn
    /// reproducibly from `data_seed` and `index`.
    pub fn apply(&self, train: Dataset, data_seed: u64, index: usize) -> Dataset {
        if self.copies == 0 {
            return train;
        }
        let seed = data_seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let originals = train.len();
        train
            .with_shifted_copies(self.copies, self.max_shift, seed)
            .with_pixel_noise(originals, self.pixel_noise, seed ^ PIXEL_NOISE_STREAM)
    }
}

/// Separates the pixel-noise draws from the translations drawn from the same
/// seed (so adding noise leaves the translations as they were).
const PIXEL_NOISE_STREAM: u64 = 0x006e_6f69_7365;

/// A random affine distortion of every image, drawn independently per image
/// (and, in training, per epoch): rotation by up to `max_rotation` degrees
/// either way, scaling by a factor in `1 ± max_scale`, shear by up to
/// `max_shear` degrees and translation by up to `max_shift` pixels along
/// each axis, about the image centre. Pixels are resampled bilinearly;
/// samples that fall outside the image take the nearest edge pixel (black
/// for digits on black, and no dark frame on brighter backgrounds).
///
/// All zero (the default) is no distortion. The parameters of torchvision's
/// `RandomAffine(degrees, translate, scale, shear)` map directly, with
/// `translate` in pixels rather than a fraction of the size.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RandomAffine {
    /// Largest rotation, degrees either way.
    pub max_rotation: f32,
    /// Largest relative change of scale (0.1: factors 0.9 to 1.1).
    pub max_scale: f32,
    /// Largest shear, degrees either way.
    pub max_shear: f32,
    /// Largest translation, pixels along each axis either way.
    pub max_shift: f32,
}

impl RandomAffine {
    /// Whether this draws anything but the identity.
    pub fn is_identity(&self) -> bool {
        self.max_rotation == 0.0
            && self.max_scale == 0.0
            && self.max_shear == 0.0
            && self.max_shift == 0.0
    }

    /// Checks the ranges: all finite and non-negative, rotation and shear
    /// at most 180 and 60 degrees, scale change below 1.
    ///
    /// # Errors
    /// The first parameter out of range, by name.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: f32, max: f32| {
            if v.is_finite() && (0.0..=max).contains(&v) {
                Ok(())
            } else {
                Err(ParticipantError::Dataset(format!(
                    "random affine {name} {v} is not in 0..={max}"
                )))
            }
        };
        check("rotation", self.max_rotation, 180.0)?;
        check("scale", self.max_scale, 0.9)?;
        check("shear", self.max_shear, 60.0)?;
        check("shift", self.max_shift, 1e6)
    }

    /// Every image of `data` distorted by its own draw from `seed` (labels
    /// and layout kept). The identity gives `data` back unchanged.
    pub fn apply(&self, data: &Dataset, seed: u64) -> Dataset {
        if self.is_identity() || data.is_empty() {
            return data.clone();
        }
        let (rows, cols, planes) = (data.rows(), data.cols(), data.channels());
        let plane_len = rows * cols;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = vec![0u8; data.pixels().len()];
        for (image, dst) in data
            .pixels()
            .chunks_exact(data.image_len())
            .zip(out.chunks_exact_mut(data.image_len()))
        {
            let map = self.draw(&mut rng, rows, cols);
            for (src, dst) in image
                .chunks_exact(plane_len)
                .zip(dst.chunks_exact_mut(plane_len))
            {
                map.warp(src, dst, rows, cols);
            }
        }
        debug_assert_eq!(planes * plane_len, data.image_len());
        data.with_pixels(out)
            .expect("the same number of pixels in the same layout")
    }

    /// One draw: the inverse map from output to source coordinates.
    fn draw(&self, rng: &mut StdRng, rows: usize, cols: usize) -> InverseAffine {
        let mut uniform = |max: f32| {
            if max > 0.0 {
                rng.random_range(-max..=max)
            } else {
                0.0
            }
        };
        let angle = uniform(self.max_rotation).to_radians();
        let scale = 1.0 + uniform(self.max_scale);
        let shear = uniform(self.max_shear).to_radians();
        let (dx, dy) = (uniform(self.max_shift), uniform(self.max_shift));
        // Forward map about the centre: p' = R(angle) * Shear_x(shear) * s * p + t.
        let (sin, cos) = angle.sin_cos();
        let k = shear.tan();
        let (a, b) = (cos * scale, (cos * k - sin) * scale);
        let (c, d) = (sin * scale, (sin * k + cos) * scale);
        let det = a * d - b * c;
        InverseAffine {
            m: [d / det, -b / det, -c / det, a / det],
            t: [dx, dy],
            centre: [(cols as f32 - 1.0) / 2.0, (rows as f32 - 1.0) / 2.0],
        }
    }
}

/// Output pixel `p` samples the source at `m * (p - centre - t) + centre`.
struct InverseAffine {
    m: [f32; 4],
    t: [f32; 2],
    centre: [f32; 2],
}

impl InverseAffine {
    /// Resamples one plane bilinearly, clamping to the edge.
    fn warp(&self, src: &[u8], dst: &mut [u8], rows: usize, cols: usize) {
        let [m00, m01, m10, m11] = self.m;
        let (max_x, max_y) = ((cols - 1) as f32, (rows - 1) as f32);
        for (y, row) in dst.chunks_exact_mut(cols).enumerate() {
            let oy = y as f32 - self.centre[1] - self.t[1];
            for (x, out) in row.iter_mut().enumerate() {
                let ox = x as f32 - self.centre[0] - self.t[0];
                let sx = (m00 * ox + m01 * oy + self.centre[0]).clamp(0.0, max_x);
                let sy = (m10 * ox + m11 * oy + self.centre[1]).clamp(0.0, max_y);
                let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(cols - 1), (y0 + 1).min(rows - 1));
                let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
                let at = |yy: usize, xx: usize| f32::from(src[yy * cols + xx]);
                let top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * fx;
                let bottom = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * fx;
                *out = (top + (bottom - top) * fy).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 9x9 image with one bright pixel at (row, col).
    fn dot(row: usize, col: usize) -> Dataset {
        let mut pixels = vec![0u8; 81];
        pixels[row * 9 + col] = 200;
        Dataset::new(9, 9, 2, pixels, vec![1]).unwrap()
    }

    fn bright(data: &Dataset) -> (usize, usize) {
        let i = (0..81).max_by_key(|&i| data.pixels()[i]).unwrap();
        (i / 9, i % 9)
    }

    #[test]
    fn the_identity_changes_nothing_and_every_draw_keeps_labels_and_layout() {
        let data = Dataset::new(
            9,
            9,
            3,
            (0..3 * 81).map(|i| (i * 7 % 256) as u8).collect(),
            vec![0, 2, 1],
        )
        .unwrap();
        assert_eq!(RandomAffine::default().apply(&data, 1), data);
        let affine = RandomAffine {
            max_rotation: 15.0,
            max_scale: 0.1,
            max_shear: 5.0,
            max_shift: 2.0,
        };
        let a = affine.apply(&data, 1);
        assert_eq!(a.labels(), data.labels());
        assert_eq!((a.rows(), a.cols(), a.len()), (9, 9, 3));
        assert_ne!(a.pixels(), data.pixels());
        assert_eq!(a, affine.apply(&data, 1), "reproducible from the seed");
        assert_ne!(a, affine.apply(&data, 2), "another seed, other draws");
    }

    #[test]
    fn a_rotation_by_ninety_degrees_turns_the_image_about_its_centre() {
        // A draw is random, so pin the map of exactly 90 degrees.
        let map = |angle: f32| {
            let (sin, cos) = angle.to_radians().sin_cos();
            InverseAffine {
                m: [cos, sin, -sin, cos],
                t: [0.0, 0.0],
                centre: [4.0, 4.0],
            }
        };
        let src = dot(1, 4);
        let mut out = vec![0u8; 81];
        map(90.0).warp(src.pixels(), &mut out, 9, 9);
        let turned = src.with_pixels(out).unwrap();
        // (row 1, col 4) is 3 above the centre, (x, y) - c = (0, -3); the
        // forward map sends it to (x cos - y sin, x sin + y cos) = (3, 0):
        // column 7, row 4.
        assert_eq!(bright(&turned), (4, 7));
        assert_eq!(turned.pixels()[4 * 9 + 7], 200);
    }

    #[test]
    fn shifts_move_the_image_by_whole_pixels_when_drawn_whole() {
        let map = InverseAffine {
            m: [1.0, 0.0, 0.0, 1.0],
            t: [2.0, -1.0],
            centre: [4.0, 4.0],
        };
        let mut out = vec![0u8; 81];
        map.warp(dot(4, 4).pixels(), &mut out, 9, 9);
        assert_eq!(bright(&dot(4, 4).with_pixels(out).unwrap()), (3, 6));
    }

    #[test]
    fn small_draws_stay_close_to_the_original() {
        // A smooth ramp: a shift of at most half a pixel changes each pixel
        // by at most half a step of the ramp (plus rounding).
        let pixels: Vec<u8> = (0..81).map(|i| ((i % 9) * 20) as u8).collect();
        let data = Dataset::new(9, 9, 1, pixels, vec![0]).unwrap();
        let affine = RandomAffine {
            max_shift: 0.5,
            ..RandomAffine::default()
        };
        for seed in 0..20 {
            let moved = affine.apply(&data, seed);
            for (r, (&a, &b)) in moved.pixels().iter().zip(data.pixels()).enumerate() {
                // The edge columns clamp, everywhere else the ramp moves.
                assert!(
                    (i16::from(a) - i16::from(b)).abs() <= 11,
                    "pixel {r}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let bad = RandomAffine {
            max_scale: 1.5,
            ..RandomAffine::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("scale"));
        let nan = RandomAffine {
            max_rotation: f32::NAN,
            ..RandomAffine::default()
        };
        assert!(nan.validate().unwrap_err().to_string().contains("rotation"));
        assert!(RandomAffine::default().validate().is_ok());
    }
}
