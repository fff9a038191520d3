//! Image files to 8-bit grey images, and decoded images to [`DatasetSplits`].
//!
//! Shared by the image-folder ([`super::folder`]) and manifest
//! ([`super::manifest`]) loaders:
//!
//! - Files are decoded with the `image` crate (PNG, JPEG, BMP, TIFF, PNM),
//!   the format guessed from the content (the extension as a fallback), under
//!   [`decoding_limits`] so that a hostile file cannot exhaust memory.
//! - Colour becomes grey with the ITU-R BT.601 luma weights
//!   (`0.299 R + 0.587 G + 0.114 B`, rounded; alpha is ignored). The `image`
//!   crate's own `to_luma8` uses the Rec. 709 weights instead, so the
//!   conversion is done here ([`luma_bt601`]).
//! - 16-bit samples are scaled to 8 bits as `round(v * 255 / 65535)`
//!   ([`scale_16_to_8`]); floating-point samples (`0.0..=1.0`) as
//!   `round(v * 255)`, clamped.
//! - With an image size given, every image is resized to it after the grey
//!   conversion with [`RESIZE_FILTER`] (bilinear); otherwise all images must
//!   have the same size.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageError, ImageReader, Limits};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::{Dataset, DatasetSplits, LoadOptions};
use crate::error::{ParticipantError, Result};

/// Largest image width and height the decoder accepts, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// Most memory the decoder may allocate for one image (256 MiB): enough for
/// a 16384x16384 grey image or an 8192x8192 RGBA one.
pub const MAX_DECODE_ALLOC: u64 = 256 << 20;

/// File extensions (lower case) read as images; other files are skipped.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "bmp", "tif", "tiff", "pgm", "ppm", "pbm", "pnm", "pam",
];

/// The filter used to resize images: `Triangle`, i.e. bilinear
/// interpolation (averaging over the covered pixels when shrinking).
pub const RESIZE_FILTER: FilterType = FilterType::Triangle;

/// The decoding limits every image file is read under: at most
/// [`MAX_IMAGE_SIDE`] pixels each way and [`MAX_DECODE_ALLOC`] bytes.
pub fn decoding_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

/// An 8-bit grey image, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreyImage {
    /// Height in pixels.
    pub rows: usize,
    /// Width in pixels.
    pub cols: usize,
    /// `rows * cols` grey levels, row after row.
    pub pixels: Vec<u8>,
}

/// True when `path` names an image file by its extension (one of
/// [`IMAGE_EXTENSIONS`], any case) and is not hidden (its name does not
/// start with `.`).
pub fn is_image_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// BT.601 luma of an 8-bit RGB pixel: `round(0.299 R + 0.587 G + 0.114 B)`,
/// computed exactly in integers.
pub fn luma_bt601(r: u8, g: u8, b: u8) -> u8 {
    let sum = 299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b);
    ((sum + 500) / 1000) as u8
}

/// BT.601 luma of a 16-bit RGB pixel, scaled to 8 bits:
/// `round((0.299 R + 0.587 G + 0.114 B) * 255 / 65535)`, exactly.
pub fn luma_bt601_16(r: u16, g: u16, b: u16) -> u8 {
    let sum = 299 * u64::from(r) + 587 * u64::from(g) + 114 * u64::from(b);
    const DIV: u64 = 1000 * 65_535;
    ((sum * 255 + DIV / 2) / DIV) as u8
}

/// A 16-bit sample scaled to 8 bits: `round(v * 255 / 65535)` (not `v >> 8`,
/// which would darken every level slightly).
pub fn scale_16_to_8(v: u16) -> u8 {
    ((u32::from(v) * 255 + 32_767) / 65_535) as u8
}

/// BT.601 luma of a floating-point RGB pixel with samples in `0.0..=1.0`,
/// as an 8-bit grey level (clamped; NaN becomes 0).
fn luma_f32(r: f32, g: f32, b: f32) -> u8 {
    let y = 0.299 * r + 0.587 * g + 0.114 * b;
    (y.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// The grey version of a decoded image (BT.601 luma, alpha ignored, 16-bit
/// and float samples scaled to 8 bits; see the module documentation).
pub fn to_grey(image: &DynamicImage) -> GreyImage {
    use DynamicImage as D;
    let pixels: Vec<u8> = match image {
        D::ImageLuma8(b) => b.as_raw().clone(),
        D::ImageLumaA8(b) => b.as_raw().chunks_exact(2).map(|p| p[0]).collect(),
        D::ImageRgb8(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma_bt601(p[0], p[1], p[2]))
            .collect(),
        D::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma_bt601(p[0], p[1], p[2]))
            .collect(),
        D::ImageLuma16(b) => b.as_raw().iter().map(|&v| scale_16_to_8(v)).collect(),
        D::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| scale_16_to_8(p[0]))
            .collect(),
        D::ImageRgb16(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma_bt601_16(p[0], p[1], p[2]))
            .collect(),
        D::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma_bt601_16(p[0], p[1], p[2]))
            .collect(),
        D::ImageRgb32F(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma_f32(p[0], p[1], p[2]))
            .collect(),
        D::ImageRgba32F(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma_f32(p[0], p[1], p[2]))
            .collect(),
        // Layouts added to `image` later: through 8-bit RGBA.
        other => other
            .to_rgba8()
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma_bt601(p[0], p[1], p[2]))
            .collect(),
    };
    GreyImage {
        rows: image.height() as usize,
        cols: image.width() as usize,
        pixels,
    }
}

/// Checks a requested image size (rows, cols): both sides in
/// `1..=MAX_IMAGE_SIDE`.
pub fn check_image_size((rows, cols): (usize, usize)) -> Result<()> {
    let max = MAX_IMAGE_SIDE as usize;
    if rows == 0 || cols == 0 || rows > max || cols > max {
        return Err(ParticipantError::Dataset(format!(
            "image size {rows}x{cols} must have both sides in 1..={max}"
        )));
    }
    Ok(())
}

/// `image` resized to `rows x cols` with [`RESIZE_FILTER`] (a copy when it
/// already has that size). Both sizes must be non-zero.
pub fn resize_grey(image: &GreyImage, rows: usize, cols: usize) -> GreyImage {
    if (image.rows, image.cols) == (rows, cols) {
        return image.clone();
    }
    // The buffer length always matches the dimensions of a GreyImage built here.
    let src = GrayImage::from_raw(image.cols as u32, image.rows as u32, image.pixels.clone())
        .expect("grey image buffer matches its size");
    let out = image::imageops::resize(&src, cols as u32, rows as u32, RESIZE_FILTER);
    GreyImage {
        rows,
        cols,
        pixels: out.into_raw(),
    }
}

/// Decodes the image file at `path` to grey, under [`decoding_limits`], and
/// resizes it to `image_size` (rows, cols) when given. Errors name the file.
pub fn decode_grey(path: &Path, image_size: Option<(usize, usize)>) -> Result<GreyImage> {
    decode_grey_with_limits(path, image_size, decoding_limits())
}

/// [`decode_grey`] under other limits (so tests can exercise the limit
/// check without huge files).
pub(crate) fn decode_grey_with_limits(
    path: &Path,
    image_size: Option<(usize, usize)>,
    limits: Limits,
) -> Result<GreyImage> {
    let err = |what: String| ParticipantError::Dataset(format!("image {}: {what}", path.display()));
    let describe = |limits: &Limits| {
        let side = |s: Option<u32>| s.map_or("any".to_owned(), |s| s.to_string());
        let bytes = |a: u64| match a % (1 << 20) {
            0 => format!("{} MiB", a >> 20),
            _ => format!("{a} bytes"),
        };
        format!(
            "the decoding limit is {}x{} pixels and {} of decoder memory",
            side(limits.max_image_width),
            side(limits.max_image_height),
            limits.max_alloc.map_or("any amount".to_owned(), bytes)
        )
    };
    let mut reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| err(format!("cannot read: {e}")))?;
    reader.limits(limits.clone());
    let decoded = reader.decode().map_err(|e| match e {
        ImageError::Limits(e) => err(format!("too large to decode ({}): {e}", describe(&limits))),
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            err(format!("cannot decode, the file is truncated: {e}"))
        }
        ImageError::IoError(e) => err(format!("cannot read: {e}")),
        e => err(format!("cannot decode: {e}")),
    })?;
    let grey = to_grey(&decoded);
    drop(decoded);
    if grey.rows == 0 || grey.cols == 0 {
        return Err(err("the image is empty (0 pixels)".into()));
    }
    Ok(match image_size {
        Some((rows, cols)) => resize_grey(&grey, rows, cols),
        None => grey,
    })
}

/// An image file to load, with its label and, for error messages, where it
/// was listed (e.g. `"data.csv line 4"`).
#[derive(Clone, Debug)]
pub(crate) struct LabelledFile {
    pub path: PathBuf,
    pub label: u8,
    pub origin: Option<String>,
}

impl LabelledFile {
    /// The file, with its origin when it has one (for error messages).
    fn describe(&self) -> String {
        match &self.origin {
            Some(o) => format!("{} ({o})", self.path.display()),
            None => self.path.display().to_string(),
        }
    }
}

/// Where the test images come from.
pub(crate) enum Files {
    /// Given train and test lists.
    Split {
        train: Vec<LabelledFile>,
        test: Vec<LabelledFile>,
    },
    /// One list, to split by [`LoadOptions::test_fraction`].
    Unsplit(Vec<LabelledFile>),
}

/// Seeds the stratified train/test split.
const SPLIT_STREAM: u64 = 0x0073_706c_6974;
/// Seeds the order of the samples within each split.
const ORDER_STREAM: u64 = 0x006f_7264_6572;

/// Checks a test fraction: finite and strictly between 0 and 1.
pub(crate) fn check_test_fraction(fraction: f64) -> Result<()> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(ParticipantError::Dataset(format!(
            "--test-fraction {fraction} must be strictly between 0 and 1"
        )));
    }
    Ok(())
}

/// The test fraction for data at `source` that has no test split of its own,
/// or an error saying how to give one.
pub(crate) fn required_test_fraction(source: &Path, options: &LoadOptions) -> Result<f64> {
    let fraction = options.test_fraction.ok_or_else(|| {
        ParticipantError::Dataset(format!(
            "{} has no test split; pass --test-fraction F (e.g. 0.2) to hold out that \
             fraction of each class for testing",
            source.display()
        ))
    })?;
    check_test_fraction(fraction)?;
    Ok(fraction)
}

/// Splits sample indices `0..labels.len()` into (train, test): from each
/// class, `round(fraction * n)` randomly drawn samples go to the test split.
fn stratified_split(labels: &[u8], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed ^ SPLIT_STREAM);
    let mut classes: Vec<Vec<usize>> = vec![Vec::new(); 256];
    for (i, &l) in labels.iter().enumerate() {
        classes[usize::from(l)].push(i);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for mut members in classes.into_iter().filter(|m| !m.is_empty()) {
        members.shuffle(&mut rng);
        let k = ((fraction * members.len() as f64).round() as usize).min(members.len());
        test.extend_from_slice(&members[..k]);
        train.extend_from_slice(&members[k..]);
    }
    (train, test)
}

/// Decodes `files` (in parallel; the first error in list order is the one
/// reported), splits them and builds the two datasets with `classes`.
///
/// With [`Files::Unsplit`], `source` is named when no test fraction is
/// given. The samples of each split are put in a seeded random order, so
/// that a prefix of a split is not one class.
pub(crate) fn assemble(
    files: Files,
    classes: Vec<String>,
    source: &Path,
    options: &LoadOptions,
) -> Result<DatasetSplits> {
    if let Some(size) = options.image_size {
        check_image_size(size)?;
    }
    let (files, fraction, n_train) = match files {
        Files::Split { mut train, test } => {
            let n = train.len();
            train.extend(test);
            (train, None, n)
        }
        Files::Unsplit(all) => {
            let f = required_test_fraction(source, options)?;
            let n = all.len();
            (all, Some(f), n)
        }
    };
    let images: Vec<GreyImage> = files
        .par_iter()
        .map(|f| {
            decode_grey(&f.path, options.image_size).map_err(|e| match (e, &f.origin) {
                (ParticipantError::Dataset(m), Some(o)) => {
                    ParticipantError::Dataset(format!("{o}: {m}"))
                }
                (e, _) => e,
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<_>>()?;
    let (rows, cols) = match images.first() {
        Some(img) => (img.rows, img.cols),
        None => {
            return Err(ParticipantError::Dataset(format!(
                "{} holds no images",
                source.display()
            )));
        }
    };
    if let Some(i) = images
        .iter()
        .position(|img| (img.rows, img.cols) != (rows, cols))
    {
        return Err(ParticipantError::Dataset(format!(
            "images differ in size: {} is {rows}x{cols} but {} is {}x{}; pass \
             --image-size HxW (e.g. --image-size {rows}x{cols}) to resize every image",
            files[0].describe(),
            files[i].describe(),
            images[i].rows,
            images[i].cols
        )));
    }
    let labels: Vec<u8> = files.iter().map(|f| f.label).collect();
    let (mut train, mut test) = match fraction {
        Some(f) => stratified_split(&labels, f, options.seed),
        None => ((0..n_train).collect(), (n_train..files.len()).collect()),
    };
    let mut rng = StdRng::seed_from_u64(options.seed ^ ORDER_STREAM);
    train.shuffle(&mut rng);
    test.shuffle(&mut rng);
    for (name, split) in [("train", &train), ("test", &test)] {
        if split.is_empty() {
            let hint = match fraction {
                Some(f) => format!(" (test fraction {f} of {} images)", files.len()),
                None => String::new(),
            };
            return Err(ParticipantError::Dataset(format!(
                "the {name} split of {} is empty{hint}",
                source.display()
            )));
        }
    }
    let build = |indices: &[usize]| {
        let mut pixels = Vec::with_capacity(indices.len() * rows * cols);
        for &i in indices {
            pixels.extend_from_slice(&images[i].pixels);
        }
        let labels = indices.iter().map(|&i| labels[i]).collect();
        Dataset::new(rows, cols, classes.len(), pixels, labels)
    };
    let (train, test) = (build(&train)?, build(&test)?);
    DatasetSplits::new(train, test, classes)
}

#[cfg(test)]
pub(crate) mod tests {
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    use super::*;

    /// The message of a `Dataset` error (panics on any other result).
    pub(crate) fn message<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(ParticipantError::Dataset(m)) => m,
            other => panic!("expected a Dataset error, got {other:?}"),
        }
    }

    /// Writes a `rows x cols` grey PNG filled with `value`.
    pub(crate) fn write_grey_png(path: &Path, rows: u32, cols: u32, value: u8) {
        GrayImage::from_pixel(cols, rows, Luma([value]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn bt601_weights_exactly() {
        assert_eq!(luma_bt601(255, 0, 0), 76); // 76.245
        assert_eq!(luma_bt601(0, 255, 0), 150); // 149.685
        assert_eq!(luma_bt601(0, 0, 255), 29); // 29.07
        assert_eq!(luma_bt601(10, 200, 30), 124); // 123.81 (Rec. 709: 147)
        assert_eq!(luma_bt601(255, 255, 255), 255);
        assert_eq!(luma_bt601(0, 0, 0), 0);
        // Rounds half up: 0.299*1 + 0.587*1 + 0.114*0 = 0.886 -> 1.
        assert_eq!(luma_bt601(1, 1, 0), 1);
        assert_eq!(luma_bt601_16(65_535, 0, 0), 76);
        assert_eq!(luma_bt601_16(65_535, 65_535, 65_535), 255);
        assert_eq!(luma_bt601_16(2570, 51_400, 7710), 124); // 257 * (10, 200, 30)
    }

    #[test]
    fn sixteen_bit_scaling_rounds() {
        assert_eq!(scale_16_to_8(0), 0);
        assert_eq!(scale_16_to_8(65_535), 255);
        assert_eq!(scale_16_to_8(128 * 257), 128);
        assert_eq!(scale_16_to_8(128), 0); // 0.498
        assert_eq!(scale_16_to_8(129), 1); // 0.502 (v >> 8 would give 0)
        assert_eq!(scale_16_to_8(65_280), 254); // 254.008; v >> 8 would give 255
        assert_eq!(scale_16_to_8(65_407), 255); // 254.502
    }

    #[test]
    fn every_layout_turns_grey() {
        let rgb = DynamicImage::ImageRgb8(ImageBuffer::from_fn(3, 2, |x, y| {
            Rgb([10 * x as u8, 200, 30 + y as u8])
        }));
        let g = to_grey(&rgb);
        assert_eq!((g.rows, g.cols), (2, 3));
        assert_eq!(g.pixels[0], luma_bt601(0, 200, 30));
        assert_eq!(g.pixels[4], luma_bt601(10, 200, 31));
        let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_pixel(1, 1, Rgba([10, 200, 30, 0])));
        assert_eq!(to_grey(&rgba).pixels, [124]); // alpha ignored
        let rgb16 = DynamicImage::ImageRgb16(ImageBuffer::from_pixel(1, 1, Rgb([65_535u16, 0, 0])));
        assert_eq!(to_grey(&rgb16).pixels, [76]);
        let l16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(2, 1, Luma([129u16])));
        assert_eq!(to_grey(&l16).pixels, [1, 1]);
        let f = DynamicImage::ImageRgb32F(ImageBuffer::from_pixel(1, 1, Rgb([1.0f32, 0.0, 0.0])));
        assert_eq!(to_grey(&f).pixels, [76]);
    }

    #[test]
    fn resize_keeps_flat_images_flat_and_sets_the_size() {
        let flat = GreyImage {
            rows: 7,
            cols: 5,
            pixels: vec![77; 35],
        };
        let small = resize_grey(&flat, 3, 4);
        assert_eq!((small.rows, small.cols), (3, 4));
        assert_eq!(small.pixels, vec![77; 12]);
        // A left-to-right ramp stays a ramp: first column dark, last bright.
        let ramp = GreyImage {
            rows: 4,
            cols: 8,
            pixels: (0..32).map(|i| (i % 8 * 30) as u8).collect(),
        };
        let half = resize_grey(&ramp, 2, 4);
        assert_eq!(half.pixels.len(), 8);
        assert!(half.pixels[0] < half.pixels[1] && half.pixels[2] < half.pixels[3]);
        assert_eq!(half.pixels[..4], half.pixels[4..]);
        assert!(check_image_size((0, 4)).is_err());
        assert!(check_image_size((4, 16_385)).is_err());
        assert!(check_image_size((28, 28)).is_ok());
    }

    #[test]
    fn decodes_every_supported_format() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Grey PNG, exact.
        write_grey_png(&d.join("g.png"), 2, 3, 200);
        let g = decode_grey(&d.join("g.png"), None).unwrap();
        assert_eq!((g.rows, g.cols, g.pixels.clone()), (2, 3, vec![200; 6]));
        // RGB PNG, BT.601.
        let rgb = ImageBuffer::from_pixel(4, 2, Rgb([10u8, 200, 30]));
        rgb.save(d.join("c.png")).unwrap();
        assert_eq!(
            decode_grey(&d.join("c.png"), None).unwrap().pixels,
            [124; 8]
        );
        // BMP, TIFF, PGM: lossless, exact.
        for name in ["c.bmp", "c.tiff", "c.ppm"] {
            rgb.save(d.join(name)).unwrap();
            let img = decode_grey(&d.join(name), None).unwrap();
            assert_eq!(img.pixels, [124; 8], "{name}");
        }
        GrayImage::from_pixel(3, 3, Luma([17u8]))
            .save(d.join("g.pgm"))
            .unwrap();
        assert_eq!(decode_grey(&d.join("g.pgm"), None).unwrap().pixels, [17; 9]);
        // JPEG is lossy: close to the BT.601 value.
        ImageBuffer::from_pixel(16, 16, Rgb([10u8, 200, 30]))
            .save(d.join("c.jpg"))
            .unwrap();
        let j = decode_grey(&d.join("c.jpg"), None).unwrap();
        assert_eq!((j.rows, j.cols), (16, 16));
        assert!(
            j.pixels.iter().all(|&v| v.abs_diff(124) <= 3),
            "{:?}",
            j.pixels
        );
        // 16-bit grey PNG: rounded, not truncated.
        ImageBuffer::from_pixel(2, 2, Luma([129u16]))
            .save(d.join("w.png"))
            .unwrap();
        assert_eq!(decode_grey(&d.join("w.png"), None).unwrap().pixels, [1; 4]);
        // 16-bit RGB PNG.
        ImageBuffer::from_pixel(1, 1, Rgb([2570u16, 51_400, 7710]))
            .save(d.join("w3.png"))
            .unwrap();
        assert_eq!(decode_grey(&d.join("w3.png"), None).unwrap().pixels, [124]);
        // Resizing on load.
        let r = decode_grey(&d.join("g.png"), Some((5, 4))).unwrap();
        assert_eq!((r.rows, r.cols, r.pixels), (5, 4, vec![200; 20]));
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let missing = d.join("missing.png");
        let m = message(decode_grey(&missing, None));
        assert!(
            m.contains("missing.png") && m.contains("cannot read"),
            "{m}"
        );
        std::fs::write(d.join("text.png"), "not an image").unwrap();
        let m = message(decode_grey(&d.join("text.png"), None));
        assert!(m.contains("text.png") && m.contains("cannot decode"), "{m}");
        // A truncated PNG.
        write_grey_png(&d.join("full.png"), 40, 40, 9);
        let bytes = std::fs::read(d.join("full.png")).unwrap();
        std::fs::write(d.join("cut.png"), &bytes[..bytes.len() / 2]).unwrap();
        let m = message(decode_grey(&d.join("cut.png"), None));
        assert!(m.contains("cut.png") && m.contains("truncated"), "{m}");
    }

    #[test]
    fn the_decoding_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.png");
        write_grey_png(&path, 8, 9, 1);
        let mut narrow = decoding_limits();
        narrow.max_image_width = Some(8);
        let m = message(decode_grey_with_limits(&path, None, narrow));
        assert!(
            m.contains("big.png") && m.contains("too large") && m.contains("8x16384 pixels"),
            "{m}"
        );
        let mut small = decoding_limits();
        small.max_alloc = Some(40);
        let m = message(decode_grey_with_limits(&path, None, small));
        assert!(m.contains("too large") && m.contains("40 bytes"), "{m}");
        // Headers promising huge images fail before any pixel is allocated:
        // over the side limit, and over the memory limit (16-bit, 488 MiB).
        let wide = dir.path().join("wide.pgm");
        std::fs::write(&wide, "P5\n20000 3\n255\n").unwrap();
        let m = message(decode_grey(&wide, None));
        assert!(
            m.contains("wide.pgm") && m.contains("too large") && m.contains("16384x16384"),
            "{m}"
        );
        let deep = dir.path().join("deep.pgm");
        std::fs::write(&deep, "P5\n16000 16000\n65535\n").unwrap();
        let m = message(decode_grey(&deep, None));
        assert!(m.contains("too large") && m.contains("256 MiB"), "{m}");
        assert_eq!(
            decode_grey_with_limits(&path, None, decoding_limits())
                .unwrap()
                .pixels
                .len(),
            72
        );
    }

    #[test]
    fn image_files_are_recognised_by_extension() {
        for yes in ["a.png", "b.JPG", "c.jpeg", "d.Tiff", "e.pgm", "f.bmp"] {
            assert!(is_image_file(Path::new(yes)), "{yes}");
        }
        for no in ["a.txt", ".hidden.png", "README", "x.png.bak", "y.gif"] {
            assert!(!is_image_file(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn stratified_split_takes_the_fraction_of_every_class() {
        let labels: Vec<u8> = (0..100).map(|i| (i % 4) as u8).collect();
        let (train, test) = stratified_split(&labels, 0.2, 3);
        assert_eq!((train.len(), test.len()), (80, 20));
        for c in 0..4 {
            assert_eq!(test.iter().filter(|&&i| labels[i] == c).count(), 5);
        }
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(stratified_split(&labels, 0.2, 3), (train, test.clone()));
        assert_ne!(stratified_split(&labels, 0.2, 4).1, test);
    }
}
