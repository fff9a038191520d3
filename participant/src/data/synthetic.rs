//! Built-in synthetic hand-written-style digits, so that greyfed runs with no
//! files and no network.
//!
//! Each class is a set of stroke primitives (line segments, quadratic Bézier
//! curves and elliptic arcs) in a normalised frame (`x` roughly in
//! `-0.6..0.6`, `y` in `-1..1`, `y` pointing down). Per sample the generator
//! randomises the template's parameters, bends the strokes with a smooth
//! random warp, then applies a random slant, rotation (±15°), scale
//! (0.8–1.1), aspect ratio and shift (±3 px, pulled back where it would cut
//! the digit off at the border), and draws the strokes
//! anti-aliased with a random thickness (1.2–3.0 px) and intensity into a
//! 28x28 canvas. Pixel noise and, sometimes, small blobs are added. Like
//! MNIST, the background is black (near 0) and strokes are white.
//!
//! Generation is deterministic from the seed: each image uses its own
//! generator derived from the seed and its index. The generator is rand's
//! `StdRng`, whose algorithm is not guaranteed to stay the same across rand
//! versions, so the exact bytes may change when rand is upgraded.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use super::{Dataset, DatasetSplits, numbered_classes};

/// Height and width of the synthetic images.
pub const SIDE: usize = 28;

/// Number of classes (the digits 0 to 9).
pub const NUM_CLASSES: usize = 10;

/// Number of training samples in [`builtin_splits`].
pub const BUILTIN_TRAIN_SIZE: usize = 6000;

/// Number of test samples in [`builtin_splits`].
pub const BUILTIN_TEST_SIZE: usize = 1000;

/// Pixels per normalised unit at scale 1: a digit is about 20 px tall, as in
/// MNIST.
const PX_PER_UNIT: f32 = 10.0;

type Pt = [f32; 2];

/// A stroke primitive in the normalised frame.
#[derive(Clone, Copy, Debug)]
enum Stroke {
    /// Straight segment.
    Line(Pt, Pt),
    /// Quadratic Bézier curve: start, control point, end.
    Quad(Pt, Pt, Pt),
    /// Elliptic arc: centre, radii, start and end angle in degrees (0° points
    /// right, 90° down); drawn from start to end.
    Arc { c: Pt, r: Pt, a0: f32, a1: f32 },
}

fn arc_point(c: Pt, r: Pt, deg: f32) -> Pt {
    let t = deg.to_radians();
    [c[0] + r[0] * t.cos(), c[1] + r[1] * t.sin()]
}

fn u(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    rng.random_range(lo..hi)
}

fn normal(rng: &mut StdRng) -> f32 {
    rng.sample(StandardNormal)
}

/// The strokes of `digit` with randomised parameters.
fn template(digit: u8, rng: &mut StdRng) -> Vec<Stroke> {
    use Stroke::{Arc, Line, Quad};
    match digit {
        0 => {
            let a0 = u(rng, -110.0, -70.0);
            vec![Arc {
                c: [0.0, 0.0],
                r: [u(rng, 0.42, 0.62), u(rng, 0.85, 1.0)],
                a0,
                a1: a0 + 360.0 + u(rng, 0.0, 25.0),
            }]
        }
        1 => {
            let top = [u(rng, -0.05, 0.12), -0.95];
            let mut s = vec![Line(top, [u(rng, -0.12, 0.05), 0.95])];
            if rng.random_bool(0.5) {
                let d = u(rng, 0.2, 0.35);
                s.push(Line(top, [top[0] - d, -0.95 + d * u(rng, 0.6, 1.1)]));
            }
            if rng.random_bool(0.15) {
                s.push(Line([-0.3, 0.95], [0.3, 0.95]));
            }
            s
        }
        2 => {
            let (c, r) = ([0.0, -0.42], [u(rng, 0.45, 0.55), u(rng, 0.42, 0.55)]);
            let a1 = u(rng, 375.0, 410.0);
            let e = arc_point(c, r, a1);
            let b = [u(rng, -0.6, -0.45), u(rng, 0.88, 0.98)];
            let mid = [(e[0] + b[0]) / 2.0, (e[1] + b[1]) / 2.0];
            vec![
                Arc {
                    c,
                    r,
                    a0: u(rng, 190.0, 215.0),
                    a1,
                },
                Quad(
                    e,
                    [mid[0] + u(rng, -0.1, 0.1), mid[1] + u(rng, -0.1, 0.1)],
                    b,
                ),
                Line(b, [u(rng, 0.45, 0.65), u(rng, 0.88, 1.0)]),
            ]
        }
        3 => {
            let join = [u(rng, -0.15, 0.05), u(rng, -0.12, 0.02)];
            let top_c = [join[0] * 0.5, (join[1] - 0.95) / 2.0];
            let top_r = [u(rng, 0.38, 0.5), (join[1] + 0.95) / 2.0];
            let bot_c = [join[0] * 0.5, (join[1] + 0.95) / 2.0];
            let bot_r = [u(rng, 0.45, 0.58), (0.95 - join[1]) / 2.0];
            vec![
                Arc {
                    c: top_c,
                    r: top_r,
                    a0: u(rng, 190.0, 220.0),
                    a1: 450.0,
                },
                Arc {
                    c: bot_c,
                    r: bot_r,
                    a0: 270.0,
                    a1: u(rng, 490.0, 520.0),
                },
            ]
        }
        4 => {
            let stem_x = u(rng, 0.15, 0.35);
            let bar_y = u(rng, 0.15, 0.4);
            if rng.random_bool(0.6) {
                // Closed 4: diagonal from the top of the stem.
                let top = [stem_x, -0.95];
                let left = [u(rng, -0.6, -0.45), bar_y];
                vec![
                    Line(top, left),
                    Line(left, [u(rng, 0.5, 0.65), bar_y]),
                    Line(top, [stem_x + u(rng, -0.05, 0.05), 0.95]),
                ]
            } else {
                // Open 4: separate left arm.
                let left = [u(rng, -0.55, -0.4), bar_y];
                vec![
                    Line([u(rng, -0.45, -0.3), -0.95], left),
                    Line(left, [u(rng, 0.5, 0.65), bar_y]),
                    Line(
                        [stem_x, u(rng, -0.95, -0.6)],
                        [stem_x + u(rng, -0.05, 0.05), 0.95],
                    ),
                ]
            }
        }
        5 => {
            let c = [0.0, u(rng, 0.35, 0.45)];
            let r = [u(rng, 0.45, 0.58), u(rng, 0.45, 0.55)];
            let a0 = u(rng, 215.0, 240.0);
            let s = arc_point(c, r, a0);
            let corner = [s[0] + u(rng, -0.05, 0.1), -0.95];
            vec![
                Line([u(rng, 0.45, 0.65), u(rng, -1.0, -0.9)], corner),
                Line(corner, s),
                Arc {
                    c,
                    r,
                    a0,
                    a1: u(rng, 490.0, 520.0),
                },
            ]
        }
        6 => {
            let c = [0.0, u(rng, 0.4, 0.5)];
            let r = [u(rng, 0.42, 0.55), u(rng, 0.4, 0.5)];
            let start = arc_point(c, r, 180.0);
            vec![
                Quad(
                    [u(rng, 0.25, 0.5), -0.95],
                    [u(rng, -0.6, -0.35), u(rng, -0.6, -0.2)],
                    start,
                ),
                Arc {
                    c,
                    r,
                    a0: 180.0,
                    a1: 540.0 + u(rng, 0.0, 20.0),
                },
            ]
        }
        7 => {
            let corner = [u(rng, 0.5, 0.65), u(rng, -1.0, -0.9)];
            let mut s = vec![
                Line([u(rng, -0.6, -0.4), -0.95], corner),
                Quad(
                    corner,
                    [u(rng, 0.05, 0.35), u(rng, -0.1, 0.2)],
                    [u(rng, -0.25, 0.05), 0.95],
                ),
            ];
            if rng.random_bool(0.2) {
                s.push(Line([u(rng, -0.25, -0.1), 0.0], [u(rng, 0.3, 0.45), 0.0]));
            }
            s
        }
        8 => {
            let join_y = u(rng, -0.15, 0.0);
            let a0 = u(rng, 0.0, 360.0);
            let b0 = u(rng, 0.0, 360.0);
            vec![
                Arc {
                    c: [0.0, (join_y - 0.95) / 2.0],
                    r: [u(rng, 0.32, 0.45), (join_y + 0.95) / 2.0],
                    a0,
                    a1: a0 + 365.0,
                },
                Arc {
                    c: [0.0, (join_y + 0.95) / 2.0],
                    r: [u(rng, 0.42, 0.58), (0.95 - join_y) / 2.0],
                    a0: b0,
                    a1: b0 + 365.0,
                },
            ]
        }
        _ => {
            // 9: loop on top, stem down from its right side.
            let c = [0.0, u(rng, -0.5, -0.4)];
            let r = [u(rng, 0.4, 0.52), u(rng, 0.38, 0.5)];
            let right = arc_point(c, r, 0.0);
            vec![
                Arc {
                    c,
                    r,
                    a0: 0.0,
                    a1: 365.0,
                },
                Quad(
                    right,
                    [right[0] + u(rng, -0.05, 0.05), u(rng, 0.0, 0.4)],
                    [u(rng, 0.0, 0.4), 0.95],
                ),
            ]
        }
    }
}

/// Samples a stroke primitive as a polyline.
fn flatten(stroke: &Stroke) -> Vec<Pt> {
    match *stroke {
        Stroke::Line(a, b) => vec![a, b],
        Stroke::Quad(a, c, b) => (0..=10)
            .map(|i| {
                let t = i as f32 / 10.0;
                let (s0, s1, s2) = ((1.0 - t) * (1.0 - t), 2.0 * (1.0 - t) * t, t * t);
                [
                    s0 * a[0] + s1 * c[0] + s2 * b[0],
                    s0 * a[1] + s1 * c[1] + s2 * b[1],
                ]
            })
            .collect(),
        Stroke::Arc { c, r, a0, a1 } => {
            let steps = ((a1 - a0).abs() / 12.0).ceil().max(1.0) as usize;
            (0..=steps)
                .map(|i| arc_point(c, r, a0 + (a1 - a0) * i as f32 / steps as f32))
                .collect()
        }
    }
}

/// Per-sample geometry: a smooth warp followed by an affine map to pixels.
struct Geometry {
    /// Warp: `(amplitude x, amplitude y, frequency x, frequency y, phase)` terms.
    warp: [[f32; 5]; 3],
    /// Linear part of the affine map (row-major 2x2), in pixels per unit.
    m: [f32; 4],
    /// Translation, in pixels.
    t: Pt,
}

impl Geometry {
    fn random(rng: &mut StdRng) -> Self {
        let amp = u(rng, 0.02, 0.1);
        let mut warp = [[0.0; 5]; 3];
        for w in &mut warp {
            let dir = u(rng, 0.0, std::f32::consts::TAU);
            let freq = u(rng, 1.0, 3.0);
            *w = [
                amp * normal(rng).clamp(-2.5, 2.5),
                amp * normal(rng).clamp(-2.5, 2.5),
                freq * dir.cos(),
                freq * dir.sin(),
                u(rng, 0.0, std::f32::consts::TAU),
            ];
        }
        let scale = u(rng, 0.8, 1.1) * PX_PER_UNIT;
        let (sx, sy) = (scale * u(rng, 0.8, 1.2), scale);
        let shear = u(rng, -0.25, 0.25);
        let (sin, cos) = u(rng, -15.0f32, 15.0).to_radians().sin_cos();
        // M = R * [[sx, shear * sy], [0, sy]]
        let m = [
            cos * sx,
            cos * shear * sy - sin * sy,
            sin * sx,
            sin * shear * sy + cos * sy,
        ];
        let centre = SIDE as f32 / 2.0;
        let t = [centre + u(rng, -3.0, 3.0), centre + u(rng, -3.0, 3.0)];
        Self { warp, m, t }
    }

    fn apply(&self, p: Pt) -> Pt {
        let (mut x, mut y) = (p[0], p[1]);
        for w in &self.warp {
            let s = (w[2] * p[0] + w[3] * p[1] + w[4]).sin();
            x += w[0] * s;
            y += w[1] * s;
        }
        [
            self.m[0] * x + self.m[1] * y + self.t[0],
            self.m[2] * x + self.m[3] * y + self.t[1],
        ]
    }
}

/// Draws segment `a`-`b` with half-width `r` and peak `value` into `canvas`
/// (taking the maximum), anti-aliased over a ramp of about 1.5 px.
fn draw_segment(canvas: &mut [f32], a: Pt, b: Pt, r: f32, value: f32) {
    const INNER: f32 = 0.5;
    const OUTER: f32 = 1.0;
    let reach = r + OUTER;
    let side = SIDE as f32;
    let x0 = (a[0].min(b[0]) - reach).floor().clamp(0.0, side) as usize;
    let x1 = (a[0].max(b[0]) + reach).ceil().clamp(0.0, side) as usize;
    let y0 = (a[1].min(b[1]) - reach).floor().clamp(0.0, side) as usize;
    let y1 = (a[1].max(b[1]) + reach).ceil().clamp(0.0, side) as usize;
    let d = [b[0] - a[0], b[1] - a[1]];
    let len2 = d[0] * d[0] + d[1] * d[1];
    for py in y0..y1 {
        for px in x0..x1 {
            let q = [px as f32 + 0.5 - a[0], py as f32 + 0.5 - a[1]];
            let t = if len2 > 0.0 {
                ((q[0] * d[0] + q[1] * d[1]) / len2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (ex, ey) = (q[0] - t * d[0], q[1] - t * d[1]);
            let dist = (ex * ex + ey * ey).sqrt();
            let cover = ((reach - dist) / (INNER + OUTER)).clamp(0.0, 1.0);
            let v = cover * value;
            let cell = &mut canvas[py * SIDE + px];
            if v > *cell {
                *cell = v;
            }
        }
    }
}

/// Shifts the polylines so that, with a margin of `margin` pixels, they lie
/// inside the canvas (centred along an axis where they cannot fit), so that
/// random shifts never cut a digit off.
fn keep_inside(lines: &mut [Vec<Pt>], margin: f32) {
    let side = SIDE as f32;
    for axis in 0..2 {
        let (lo, hi) = lines
            .iter()
            .flatten()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p[axis]), hi.max(p[axis]))
            });
        let (lo, hi) = (lo - margin, hi + margin);
        let shift = if hi - lo > side {
            (side - lo - hi) / 2.0
        } else if lo < 0.0 {
            -lo
        } else if hi > side {
            side - hi
        } else {
            0.0
        };
        if shift != 0.0 && shift.is_finite() {
            for p in lines.iter_mut().flatten() {
                p[axis] += shift;
            }
        }
    }
}

/// Renders one sample of `digit` into `out` (`SIDE * SIDE` bytes).
fn render(digit: u8, rng: &mut StdRng, out: &mut [u8]) {
    let strokes = template(digit, rng);
    let geo = Geometry::random(rng);
    let thickness = u(rng, 1.2, 3.0);
    let intensity = u(rng, 0.75, 1.0);
    let mut lines: Vec<Vec<Pt>> = strokes
        .iter()
        .map(|s| flatten(s).into_iter().map(|p| geo.apply(p)).collect())
        .collect();
    keep_inside(&mut lines, 0.5 * thickness * 1.15 + 1.0);
    let mut canvas = [0.0f32; SIDE * SIDE];
    for pts in &lines {
        let r = 0.5 * thickness * u(rng, 0.85, 1.15);
        let value = intensity * u(rng, 0.85, 1.0);
        for seg in pts.windows(2) {
            draw_segment(&mut canvas, seg[0], seg[1], r, value);
        }
    }
    // Occasional small blobs (specks of ink or dirt).
    if rng.random_bool(0.25) {
        for _ in 0..rng.random_range(1..=2) {
            let c = [
                u(rng, 2.0, SIDE as f32 - 2.0),
                u(rng, 2.0, SIDE as f32 - 2.0),
            ];
            let r = u(rng, 0.3, 1.2);
            draw_segment(&mut canvas, c, c, r, u(rng, 0.2, 0.7));
        }
    }
    let sigma = u(rng, 0.0, 0.05);
    for (o, &v) in out.iter_mut().zip(canvas.iter()) {
        *o = ((v + sigma * normal(rng)).clamp(0.0, 1.0) * 255.0).round() as u8;
    }
}

/// A 64-bit mixing function (SplitMix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derives an independent seed for `stream` from `seed`.
fn derive(seed: u64, stream: u64) -> u64 {
    mix(mix(seed) ^ mix(stream.wrapping_mul(0x2545_f491_4f6c_dd1d)))
}

/// `count` synthetic 28x28 digit images with 10 classes, deterministic from
/// `seed`.
///
/// Labels are balanced (class counts differ by at most one) and in a seeded
/// random order. The same seed gives identical bytes; different seeds give
/// different images.
pub fn synthetic_digits(count: usize, seed: u64) -> Dataset {
    let mut labels: Vec<u8> = (0..count).map(|i| (i % NUM_CLASSES) as u8).collect();
    labels.shuffle(&mut StdRng::seed_from_u64(derive(seed, u64::MAX)));
    let mut pixels = vec![0u8; count * SIDE * SIDE];
    for (i, (out, &label)) in pixels
        .chunks_exact_mut(SIDE * SIDE)
        .zip(&labels)
        .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(derive(seed, i as u64));
        render(label, &mut rng, out);
    }
    // Sizes and labels are consistent by construction, so no validation is needed.
    Dataset {
        rows: SIDE,
        cols: SIDE,
        channels: 1,
        num_classes: NUM_CLASSES,
        pixels,
        labels,
    }
}

/// The built-in dataset: [`BUILTIN_TRAIN_SIZE`] training and
/// [`BUILTIN_TEST_SIZE`] test samples of [`synthetic_digits`], generated
/// from different seeds derived from `seed`, with classes `"0"` to `"9"`.
pub fn builtin_splits(seed: u64) -> DatasetSplits {
    DatasetSplits {
        train: synthetic_digits(BUILTIN_TRAIN_SIZE, derive(seed, 0x0074_7261_696e)),
        test: synthetic_digits(BUILTIN_TEST_SIZE, derive(seed, 0x7465_7374)),
        classes: numbered_classes(NUM_CLASSES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ascii(image: &[u8]) -> String {
        const SHADES: &[u8] = b" .:-=+*#%@";
        image
            .chunks(SIDE)
            .map(|row| {
                row.iter()
                    .map(|&v| SHADES[v as usize * (SHADES.len() - 1) / 255] as char)
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn shape_and_labels() {
        let ds = synthetic_digits(103, 5);
        assert_eq!((ds.rows(), ds.cols(), ds.num_classes()), (28, 28, 10));
        assert_eq!(ds.len(), 103);
        assert_eq!(ds.pixels().len(), 103 * 784);
        let counts = ds.class_counts();
        assert!(counts.iter().all(|&c| c == 10 || c == 11), "{counts:?}");
        // Dataset::new accepts what we built directly.
        let checked = Dataset::new(28, 28, 10, ds.pixels().to_vec(), ds.labels().to_vec()).unwrap();
        assert_eq!(checked, ds);
        assert!(synthetic_digits(0, 5).is_empty());
        // Not simply round-robin.
        assert_ne!(ds.labels()[..10], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = synthetic_digits(50, 1);
        assert_eq!(a, synthetic_digits(50, 1));
        let b = synthetic_digits(50, 2);
        assert_ne!(a.pixels(), b.pixels());
        let splits = builtin_splits(3);
        assert_eq!(splits.train.len(), BUILTIN_TRAIN_SIZE);
        assert_eq!(splits.test.len(), BUILTIN_TEST_SIZE);
        assert_eq!(splits.train.num_classes(), splits.test.num_classes());
        assert_eq!(
            splits.classes,
            ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
        );
        // Train and test come from different streams.
        assert_ne!(splits.train.image(0), splits.test.image(0));
        assert_ne!(
            &splits.train.pixels()[..784 * 50],
            synthetic_digits(50, 3).pixels()
        );
    }

    #[test]
    fn pixel_statistics_look_like_mnist() {
        let ds = synthetic_digits(500, 11);
        for i in 0..ds.len() {
            let img = ds.image(i);
            let dark = img.iter().filter(|&&v| v < 40).count();
            let bright = img.iter().filter(|&&v| v > 150).count();
            assert!(
                dark > 784 * 6 / 10,
                "image {i}: only {dark} dark pixels\n{}",
                ascii(img)
            );
            assert!(
                bright >= 15,
                "image {i}: only {bright} bright pixels\n{}",
                ascii(img)
            );
            // Ink reaches away from the border only mostly: the corners are dark.
            assert!(img[0] < 100 && img[783] < 100, "image {i}\n{}", ascii(img));
        }
        // No two images of a class are identical.
        let mut images: Vec<&[u8]> = (0..ds.len()).map(|i| ds.image(i)).collect();
        images.sort();
        images.dedup();
        assert_eq!(images.len(), ds.len());
        // Mean ink is in MNIST's ballpark (MNIST: mean pixel about 33).
        let mean = ds.pixels().iter().map(|&v| v as f64).sum::<f64>() / ds.pixels().len() as f64;
        assert!((15.0..70.0).contains(&mean), "mean pixel {mean}");
    }

    /// Multinomial logistic regression trained with SGD: returns test accuracy.
    fn logistic_regression_accuracy(train: &Dataset, test: &Dataset, epochs: usize) -> f64 {
        let (d, k) = (train.image_len(), train.num_classes());
        let mut w = vec![0.0f32; k * d];
        let mut b = vec![0.0f32; k];
        let features = |img: &[u8]| img.iter().map(|&v| v as f32 / 255.0).collect::<Vec<f32>>();
        let logits = |w: &[f32], b: &[f32], x: &[f32]| {
            (0..k)
                .map(|c| {
                    b[c] + w[c * d..(c + 1) * d]
                        .iter()
                        .zip(x)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                })
                .collect::<Vec<f32>>()
        };
        let xs: Vec<Vec<f32>> = (0..train.len()).map(|i| features(train.image(i))).collect();
        for epoch in 0..epochs {
            let lr = 0.05 / (1.0 + epoch as f32);
            for (x, &y) in xs.iter().zip(train.labels()) {
                let z = logits(&w, &b, x);
                let max = z.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = z.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for c in 0..k {
                    let g = e[c] / sum - if c == y as usize { 1.0 } else { 0.0 };
                    b[c] -= lr * g;
                    for (wi, xi) in w[c * d..(c + 1) * d].iter_mut().zip(x) {
                        *wi -= lr * g * xi;
                    }
                }
            }
        }
        let correct = (0..test.len())
            .filter(|&i| {
                let z = logits(&w, &b, &features(test.image(i)));
                let pred = (0..k).max_by(|&a, &c| z[a].total_cmp(&z[c])).unwrap();
                pred == test.label(i) as usize
            })
            .count();
        correct as f64 / test.len() as f64
    }

    #[test]
    fn learnable_but_not_by_brightness_alone() {
        let train = synthetic_digits(2000, 21);
        let test = synthetic_digits(1000, 22);
        let acc = logistic_regression_accuracy(&train, &test, 8);
        eprintln!("logistic regression test accuracy: {acc:.3}");
        assert!(acc > 0.6, "logistic regression accuracy {acc}");

        // Nearest class mean of total brightness: should be weak.
        let brightness =
            |ds: &Dataset, i: usize| ds.image(i).iter().map(|&v| v as f64).sum::<f64>();
        let mut sums = [0.0; 10];
        for i in 0..train.len() {
            sums[train.label(i) as usize] += brightness(&train, i);
        }
        let counts = train.class_counts();
        let means: Vec<f64> = sums
            .iter()
            .zip(&counts)
            .map(|(s, &n)| s / n as f64)
            .collect();
        let correct = (0..test.len())
            .filter(|&i| {
                let b = brightness(&test, i);
                let pred = (0..10)
                    .min_by(|&a, &c| (means[a] - b).abs().total_cmp(&(means[c] - b).abs()))
                    .unwrap();
                pred == test.label(i) as usize
            })
            .count();
        let bacc = correct as f64 / test.len() as f64;
        eprintln!("brightness-only accuracy: {bacc:.3}");
        assert!(bacc < 0.35, "brightness alone gives accuracy {bacc}");
    }

    /// Prints a few samples of every class: `cargo test -p greyfed-participant
    /// --lib ascii_preview -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn ascii_preview() {
        let ds = synthetic_digits(40, 0);
        for digit in 0..10u8 {
            let imgs: Vec<String> = (0..ds.len())
                .filter(|&i| ds.label(i) == digit)
                .take(3)
                .map(|i| ascii(ds.image(i)))
                .collect();
            println!("digit {digit}:");
            let rows: Vec<Vec<&str>> = imgs.iter().map(|s| s.lines().collect()).collect();
            for r in 0..SIDE {
                let line: Vec<&str> = rows.iter().map(|img| img[r]).collect();
                println!("|{}|", line.join("|"));
            }
        }
    }
}
