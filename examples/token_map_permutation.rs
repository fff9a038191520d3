//! How much of the cipher's block permutation a trained grid CNN shows
//! through its token map (docs/threat-model.md, docs/accuracy.md).
//!
//! For every cipher block `q`, the grid cell its column of the token map
//! weighs most (`argmax_c |M[c, q]|`) is taken as the guess of where the
//! block belongs; the example prints the fraction of blocks guessed right
//! (chance: one in the number of blocks) and, for a model from the aligned
//! start, it is 1 by construction.
//!
//! ```sh
//! cargo run --release --example token_map_permutation -- OUT/model.safetensors OUT/keys/ca/image.key block 4
//! ```
//!
//! Arguments: a grid CNN model file (e.g. a simulation's
//! `model.safetensors`), the image key file, the cipher and its block size.

use anyhow::{Context, Result, bail};
use greyfed_participant::cipher::{ImageCipher, ImageKey};
use greyfed_protocol::model_file::ModelFile;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, key, cipher, block] = args.as_slice() else {
        bail!("usage: token_map_permutation MODEL KEY_FILE CIPHER BLOCK_SIZE");
    };
    let file = ModelFile::from_safetensors(&std::fs::read(model).context("reading the model")?)?;
    if file.spec.name() != "gridcnn" {
        bail!("{model} is a {} model, not a grid CNN", file.spec.name());
    }
    let (rows, cols) = file.spec.image_size();
    let key = ImageKey::read_file(key)?;
    let cipher = ImageCipher::new(
        &key,
        cipher.parse().map_err(anyhow::Error::msg)?,
        block.parse().context("BLOCK_SIZE")?,
        rows as usize,
        cols as usize,
    )?;
    let pi = cipher.block_permutation();
    let t = pi.len();
    let map = &file.weights.tensors()[2];
    if map.shape != [t, t] {
        bail!("token map {:?} does not fit {t} blocks", map.shape);
    }
    let right = pi
        .iter()
        .enumerate()
        .filter(|&(q, &cell)| {
            let guess = (0..t)
                .max_by(|&a, &b| {
                    map.data[a * t + q]
                        .abs()
                        .total_cmp(&map.data[b * t + q].abs())
                })
                .unwrap_or(0);
            guess == cell
        })
        .count();
    println!(
        "blocks placed right by the token map: {right} of {t} ({:.1}%; chance {:.1}%)",
        100.0 * right as f64 / t as f64,
        100.0 / t as f64
    );
    Ok(())
}
