//! `greyfed encrypt --preview out.png`: a picture of what the coordinator or
//! an eavesdropper would see of participants' images under every cipher
//! mode, next to what the attacks recover from it.
//!
//! Layout: the first row holds the plain images; then one row per mode with
//! three groups of the same images: the cipher images (split modes: the
//! cipher bytes read as 8-bit pixels), the known-plaintext attack's
//! decryption (from `--known-pairs` pairs of other images) and the
//! ciphertext-only fold attack's picture. The row order is written to
//! `out.png.md` with each mode's SSIM figures.
//!
//! [`render_preview`] draws the same picture in memory: `greyfed report`
//! shows it for the run's cipher ([`crate::report`]).

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result, bail};
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    data::Dataset,
};
use greyfed_protocol::cipher::CipherSteps;

use crate::lab::quality::mean_ssim;
use crate::lab::security::{attack_views, slices};

/// Pixels between tiles and between groups.
const GAP: usize = 2;
const GROUP_GAP: usize = 8;
/// Grey of the background between tiles.
const BACKGROUND: u8 = 96;

/// A grey-scale picture, 8 bits a pixel, row by row.
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` grey values.
    pub pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![BACKGROUND; width * height],
        }
    }

    /// Draws a `rows x cols` image at (`top`, `left`), each pixel `scale` times.
    fn draw(
        &mut self,
        image: &[u8],
        rows: usize,
        cols: usize,
        top: usize,
        left: usize,
        scale: usize,
    ) {
        for r in 0..rows * scale {
            for c in 0..cols * scale {
                let (y, x) = (top + r, left + c);
                if y < self.height && x < self.width {
                    self.pixels[y * self.width + x] = image[(r / scale) * cols + c / scale];
                }
            }
        }
    }

    /// A grid of groups of `rows x cols` images, each pixel `scale` times:
    /// `cells[i][g]` is the group of images in row `i`, column group `g`,
    /// drawn side by side; groups are separated by a wider gap.
    pub fn grid(cells: &[Vec<Vec<Vec<u8>>>], rows: usize, cols: usize, scale: usize) -> Canvas {
        let (tile_h, tile_w) = (rows * scale + GAP, cols * scale + GAP);
        let groups = cells.iter().map(Vec::len).max().unwrap_or(0);
        let per_group = cells.iter().flatten().map(Vec::len).max().unwrap_or(0);
        let group_w = per_group * tile_w;
        let width = groups * (group_w + GROUP_GAP) + GAP;
        let mut canvas = Canvas::new(width.max(1), (cells.len() * tile_h + GAP).max(1));
        for (i, row) in cells.iter().enumerate() {
            for (g, group) in row.iter().enumerate() {
                for (j, image) in group.iter().enumerate() {
                    if image.len() == rows * cols {
                        let left = GAP + g * (group_w + GROUP_GAP) + j * tile_w;
                        canvas.draw(image, rows, cols, GAP + i * tile_h, left, scale);
                    }
                }
            }
        }
        canvas
    }

    /// The picture as a PNG file's bytes.
    pub fn png_bytes(&self) -> Result<Vec<u8>> {
        encode_png(
            self.width,
            self.height,
            png::ColorType::Grayscale,
            &self.pixels,
        )
    }

    fn write_png(&self, path: &Path) -> Result<()> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        write_png_to(
            BufWriter::new(file),
            self.width,
            self.height,
            png::ColorType::Grayscale,
            &self.pixels,
        )
    }
}

/// Encodes 8-bit `pixels` (`color` says how many values a pixel has) as PNG.
pub fn encode_png(
    width: usize,
    height: usize,
    color: png::ColorType,
    pixels: &[u8],
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_png_to(&mut bytes, width, height, color, pixels)?;
    Ok(bytes)
}

fn write_png_to(
    out: impl std::io::Write,
    width: usize,
    height: usize,
    color: png::ColorType,
    pixels: &[u8],
) -> Result<()> {
    let mut encoder = png::Encoder::new(out, width as u32, height as u32);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("writing the PNG header")?;
    writer
        .write_image_data(pixels)
        .context("writing the PNG image")?;
    writer.finish().context("finishing the PNG")?;
    Ok(())
}

/// One row of `images` (each `rows x cols`), every pixel `scale` times:
/// the plain-image picture of runs without encryption.
pub fn image_row(images: &[&[u8]], rows: usize, cols: usize, scale: usize) -> Canvas {
    let (tile_h, tile_w) = (rows * scale + GAP, cols * scale + GAP);
    let mut canvas = Canvas::new(images.len() * tile_w + GAP, tile_h + GAP);
    for (j, image) in images.iter().enumerate() {
        canvas.draw(image, rows, cols, GAP, GAP + j * tile_w, scale);
    }
    canvas
}

/// Writes the preview of `count` test images of `test` under `modes` to
/// `path` (PNG) and its legend to `path.md`; returns the legend.
///
/// The known-plaintext attack gets `known_pairs` images of `known` with
/// their encryption. `key` is the image key to preview with.
#[allow(clippy::too_many_arguments)]
pub fn write_preview(
    path: &Path,
    test: &Dataset,
    known: &Dataset,
    modes: &[CipherSteps],
    key: &ImageKey,
    block_size: usize,
    count: usize,
    known_pairs: usize,
    scale: usize,
) -> Result<String> {
    let (canvas, legend) = render_preview(
        test,
        known,
        modes,
        key,
        block_size,
        count,
        known_pairs,
        scale,
    )?;
    canvas.write_png(path)?;
    let legend_path = path.with_extension("png.md");
    std::fs::write(&legend_path, &legend)
        .with_context(|| format!("writing {}", legend_path.display()))?;
    Ok(legend)
}

/// The picture [`write_preview`] writes, and its legend (a Markdown table
/// of each mode's SSIM figures, then a line on the columns).
#[allow(clippy::too_many_arguments)]
pub fn render_preview(
    test: &Dataset,
    known: &Dataset,
    modes: &[CipherSteps],
    key: &ImageKey,
    block_size: usize,
    count: usize,
    known_pairs: usize,
    scale: usize,
) -> Result<(Canvas, String)> {
    let count = count.min(test.len());
    if count == 0 || modes.is_empty() {
        bail!("nothing to preview: give at least one image and one mode");
    }
    if test.channels() != 1 || known.channels() != 1 {
        bail!("the preview takes plain grey-scale images");
    }
    let (rows, cols) = (test.rows(), test.cols());
    let plain: Vec<&[u8]> = (0..count).map(|i| test.image(i)).collect();
    let mut mode_rows = Vec::new();
    let mut legend = String::from(
        "| row | mode | SSIM(plain, cipher) | KPA SSIM | fold SSIM |\n|---:|---|---:|---:|---:|\n| 1 | plain | 1.000 | | |\n",
    );
    for (i, &steps) in modes.iter().enumerate() {
        let cipher = ImageCipher::new(key, steps, block_size, rows, cols)?;
        let views = attack_views(&cipher, known, known_pairs, &plain)?;
        let _ = writeln!(
            legend,
            "| {} | {steps} | {:.3} | {:.3} | {:.3} |",
            i + 2,
            mean_ssim(&plain, &slices(&views.cipher), rows, cols)?,
            mean_ssim(&plain, &slices(&views.kpa), rows, cols)?,
            mean_ssim(&plain, &slices(&views.fold), rows, cols)?
        );
        mode_rows.push(views);
    }
    let (tile_h, tile_w) = (rows * scale + GAP, cols * scale + GAP);
    let group_w = count * tile_w;
    let width = 3 * group_w + 2 * GROUP_GAP + GAP;
    let height = (1 + mode_rows.len()) * tile_h + GAP;
    let mut canvas = Canvas::new(width, height);
    for (j, image) in plain.iter().enumerate() {
        canvas.draw(image, rows, cols, GAP, GAP + j * tile_w, scale);
    }
    for (i, row) in mode_rows.iter().enumerate() {
        let top = GAP + (i + 1) * tile_h;
        for (g, group) in [&row.cipher, &row.kpa, &row.fold].into_iter().enumerate() {
            for (j, image) in group.iter().enumerate() {
                let left = GAP + g * (group_w + GROUP_GAP) + j * tile_w;
                canvas.draw(image, rows, cols, top, left, scale);
            }
        }
    }
    let _ = write!(
        legend,
        "\nColumns: {count} cipher images | their known-plaintext-attack decryption \
         ({known_pairs} known pairs of other images) | the fold attack's picture (ciphertext only).\n"
    );
    Ok((canvas, legend))
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_participant::data::synthetic::builtin_splits;

    #[test]
    fn preview_png_has_a_row_per_mode_and_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preview.png");
        let splits = builtin_splits(1);
        let modes: Vec<CipherSteps> = ["block", "le", "pixel"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect();
        let key = ImageKey::from_bytes([7; 32]);
        let legend =
            write_preview(&path, &splits.test, &splits.train, &modes, &key, 4, 3, 5, 1).unwrap();
        assert!(legend.contains("| 3 | le |"), "{legend}");
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.height as usize, 4 * (28 + GAP) + GAP);
        assert_eq!(
            info.width as usize,
            3 * 3 * (28 + GAP) + 2 * GROUP_GAP + GAP
        );
        // The first plain tile is the first test image.
        let w = info.width as usize;
        assert_eq!(
            buf[GAP * w + GAP..GAP * w + GAP + 28],
            splits.test.image(0)[..28]
        );
        assert!(
            std::fs::read_to_string(path.with_extension("png.md"))
                .unwrap()
                .contains("pixel")
        );
        assert!(write_preview(&path, &splits.test, &splits.train, &[], &key, 4, 3, 5, 1).is_err());
    }
}
