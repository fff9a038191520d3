//! Writes any dataset greyfed reads (an IDX directory such as MNIST, a
//! `.npz` file, a CSV manifest, or the built-in digits) as an image folder
//! of grey PNG files, `OUT/train/CLASS/NNNNN.png` and
//! `OUT/test/CLASS/NNNNN.png`, optionally padded with black borders. It
//! shows the layout `greyfed simulate --data` and `greyfed participant
//! --data` read, and makes image-folder copies of the IDX test data for
//! measurements.
//!
//! ```sh
//! cargo run --release --example export_image_folder -- ../shared/data/mnist-10k out/mnist-png 2
//! cargo run --release --example export_image_folder -- builtin out/digits-png
//! ```
//!
//! Arguments: the dataset (`builtin` for the built-in digits), the output
//! folder (must not exist), and the border width in pixels (default 0).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use greyfed_participant::data::{Dataset, LoadOptions, load_data, synthetic::builtin_splits};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(source), Some(out)) = (args.first(), args.get(1)) else {
        bail!("usage: export_image_folder DATASET|builtin OUT [PAD]");
    };
    let pad: u32 = match args.get(2) {
        Some(p) => p.parse().context("PAD must be a whole number")?,
        None => 0,
    };
    let out = PathBuf::from(out);
    if out.exists() {
        bail!("{} exists; choose a new folder", out.display());
    }
    let splits = if source == "builtin" {
        builtin_splits(0)
    } else {
        load_data(Path::new(source), &LoadOptions::default())
            .with_context(|| format!("loading {source}"))?
    };
    for (name, data) in [("train", &splits.train), ("test", &splits.test)] {
        write_split(&out.join(name), data, &splits.classes, pad)?;
        println!("{name}: {} images", data.len());
    }
    println!(
        "wrote {} ({} classes, {}x{} pixels)",
        out.display(),
        splits.classes.len(),
        splits.train.rows() as u32 + 2 * pad,
        splits.train.cols() as u32 + 2 * pad
    );
    Ok(())
}

/// Writes every image of `data` as `dir/CLASS/NNNNN.png`, with a border of
/// `pad` black pixels.
fn write_split(dir: &Path, data: &Dataset, classes: &[String], pad: u32) -> Result<()> {
    if data.channels() != 1 {
        bail!("only grey-scale (one-plane) images can be written");
    }
    for class in classes {
        std::fs::create_dir_all(dir.join(class))
            .with_context(|| format!("creating {}", dir.join(class).display()))?;
    }
    let (rows, cols) = (data.rows() as u32, data.cols() as u32);
    for i in 0..data.len() {
        let mut image = image::GrayImage::new(cols + 2 * pad, rows + 2 * pad);
        for (k, &p) in data.image(i).iter().enumerate() {
            let (r, c) = (k as u32 / cols, k as u32 % cols);
            image.put_pixel(c + pad, r + pad, image::Luma([p]));
        }
        let path = dir
            .join(&classes[data.label(i) as usize])
            .join(format!("{i:05}.png"));
        image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
