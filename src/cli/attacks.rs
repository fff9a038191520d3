//! `greyfed experiment attacks`: the attack table's flags.

use std::path::PathBuf;

use clap::Args;

use super::DataArgs;
use crate::lab::attack_table::AttackSettings;

/// `greyfed experiment attacks`.
#[derive(Debug, Args)]
pub struct AttackArgs {
    /// Directory for attacks.md, attacks.csv and attacks.png.
    #[arg(long, default_value = "experiment-attacks")]
    pub out: PathBuf,
    /// Cipher modes, comma-separated: presets (block, extended, le,
    /// le-extended, pixel) or steps joined by `+`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "negpos,block-shuffle,block,extended,le,pixel"
    )]
    pub modes: Vec<String>,
    /// Block size of the ciphers.
    #[arg(long, default_value_t = 4)]
    pub block_size: usize,
    /// Cipher images of one participant given to the ciphertext-only
    /// attack, comma-separated; `all` is every image the participant has.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000,all",
          value_parser = parse_count)]
    pub cipher_images: Vec<Count>,
    /// Known plain/cipher pairs given to the known-plaintext attack,
    /// comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,5,10,20")]
    pub known_pairs: Vec<usize>,
    /// Public plain images the attacker holds (the last training images;
    /// the participant's are the ones before them).
    #[arg(long, default_value_t = 2000)]
    pub public_images: usize,
    /// Test images decrypted and measured per row.
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// Keys the figures are averaged over.
    #[arg(long, default_value_t = 2)]
    pub keys: u64,
    /// The plain-image classifier that reads the decryptions.
    #[arg(long, default_value = "blocknet")]
    pub classifier: String,
    /// Its training epochs on the plain training split.
    #[arg(long, default_value_t = 10)]
    pub classifier_epochs: u32,
    /// Epochs of the grid CNN (masked aligned start) trained on the
    /// participant's encrypted images whose weights the model attack reads,
    /// as the coordinator would; 0 leaves the model attack out.
    #[arg(long, default_value_t = 2)]
    pub model_epochs: u32,
    /// Data settings (--data DIR; default: built-in digits).
    #[command(flatten)]
    pub data: DataArgs,
}

/// A number of images, or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub Option<usize>);

fn parse_count(text: &str) -> Result<Count, String> {
    if text == "all" {
        return Ok(Count(None));
    }
    text.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .map(|n| Count(Some(n)))
        .ok_or_else(|| format!("{text:?} is neither a positive number nor `all`"))
}

impl AttackArgs {
    /// The typed settings of the attack table.
    pub fn settings(&self) -> anyhow::Result<AttackSettings> {
        for mode in &self.modes {
            crate::lab::experiment::parse_mode(mode)?
                .ok_or_else(|| anyhow::anyhow!("`plain` has no attacks; list cipher modes"))?;
        }
        anyhow::ensure!(self.block_size > 0, "--block-size must be positive");
        Ok(AttackSettings {
            modes: self.modes.clone(),
            block_size: self.block_size,
            cipher_images: self.cipher_images.iter().map(|c| c.0).collect(),
            known_pairs: self.known_pairs.clone(),
            public_images: self.public_images,
            samples: self.samples,
            keys: self.keys,
            classifier: self.classifier.clone(),
            classifier_epochs: self.classifier_epochs,
            model_epochs: self.model_epochs,
        })
    }
}
