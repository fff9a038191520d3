//! What participants do to their images before training: the image cipher's
//! configuration ([`CipherSpec`]), shared by every party and recorded with the
//! model so that a model always says what input it expects.
//!
//! The configuration is public (it names the steps, the block size and the
//! key's fingerprint); the key itself never leaves the participants. The
//! transforms are implemented in `greyfed-participant`'s `cipher` module,
//! whose documentation is the normative specification.
//!
//! # Steps and modes
//!
//! A mode is a set of steps, written as names joined by `+`
//! (`block-shuffle+negpos`), or a preset name that stands for several steps:
//!
//! | step                | family      | what it does                                                        |
//! |---------------------|-------------|---------------------------------------------------------------------|
//! | `block-shuffle`     | block-wise  | permute block positions                                             |
//! | `rotate-flip`       | block-wise  | one of the 8 rotations/reflections inside blocks                    |
//! | `negpos`            | block-wise  | invert a keyed subset of in-block positions (one mask per block key)|
//! | `pixel-shuffle`     | block-wise  | permute the values inside blocks                                    |
//! | `split`             | representation | split every pixel into two 4-bit halves (two image planes)        |
//! | `pixel-negpos`      | pixel-based | invert each value with its own key bit (about half of them)         |
//! | `component-shuffle` | pixel-based | swap the two 4-bit halves of a pixel with its own key bit (`split`) |
//! | `per-block`         | keying      | a different intra-block key for every block position ("extended")  |
//!
//! | preset        | steps                                                     | reference |
//! |---------------|-----------------------------------------------------------|-----------|
//! | `block`       | `block-shuffle+rotate-flip+negpos+pixel-shuffle`          | block scrambling (EtC; Kiya et al.) |
//! | `extended`    | `block` + `per-block`                                     | extended block scrambling |
//! | `le`          | `split+pixel-shuffle+negpos`                              | learnable encryption (Tanaka, 2018) |
//! | `le-extended` | `le` + `per-block`                                        | |
//! | `pixel`       | `split+component-shuffle+pixel-negpos`                    | pixel-based encryption (Sirichotedumrong, Kinoshita and Kiya, 2019) |
//!
//! In Sirichotedumrong et al. "pixel shuffling" permutes the colour
//! components of each pixel; a grey-scale pixel has one component, so its
//! grey-scale analogue here permutes the two 4-bit halves, which needs
//! `split`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The steps of an image cipher; see the [module documentation](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CipherSteps {
    /// Permute block positions.
    pub block_shuffle: bool,
    /// Rotate/flip inside blocks (one of 8 dihedral transforms).
    pub rotate_flip: bool,
    /// Invert a keyed set of in-block positions (block-wise).
    pub negative_positive: bool,
    /// Permute values inside blocks.
    pub pixel_shuffle: bool,
    /// Two planes of 4-bit halves instead of one plane of 8-bit pixels.
    pub split: bool,
    /// Invert every value with its own key bit (pixel-based).
    pub pixel_negative_positive: bool,
    /// Swap the two halves of a pixel with its own key bit (needs `split`).
    pub component_shuffle: bool,
    /// A different intra-block key for every block position.
    pub per_block: bool,
}

/// Step names in their canonical order, with the field each one sets.
const STEP_NAMES: [&str; 8] = [
    "split",
    "block-shuffle",
    "rotate-flip",
    "pixel-shuffle",
    "negpos",
    "component-shuffle",
    "pixel-negpos",
    "per-block",
];

/// The preset names and their definitions (see the module documentation).
pub const PRESETS: [(&str, &str); 5] = [
    ("block", "block-shuffle+rotate-flip+pixel-shuffle+negpos"),
    (
        "extended",
        "block-shuffle+rotate-flip+pixel-shuffle+negpos+per-block",
    ),
    ("le", "split+pixel-shuffle+negpos"),
    ("le-extended", "split+pixel-shuffle+negpos+per-block"),
    ("pixel", "split+component-shuffle+pixel-negpos"),
];

impl CipherSteps {
    fn flag(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "split" => &mut self.split,
            "block-shuffle" => &mut self.block_shuffle,
            "rotate-flip" => &mut self.rotate_flip,
            "pixel-shuffle" => &mut self.pixel_shuffle,
            "negpos" => &mut self.negative_positive,
            "component-shuffle" => &mut self.component_shuffle,
            "pixel-negpos" => &mut self.pixel_negative_positive,
            "per-block" => &mut self.per_block,
            _ => return None,
        })
    }

    /// The block scrambling preset (`block`).
    pub fn block() -> CipherSteps {
        CipherSteps::preset("block")
    }

    /// A preset by name; panics on an unknown name (use [`str::parse`] for
    /// user input).
    fn preset(name: &str) -> CipherSteps {
        let (_, steps) = PRESETS.iter().find(|(n, _)| *n == name).expect("preset");
        steps.parse().expect("presets parse")
    }

    /// Number of image planes the cipher produces: 2 with `split`, else 1.
    pub fn output_channels(&self) -> u32 {
        if self.split { 2 } else { 1 }
    }

    /// True when no block-wise step is enabled (only `split` and the
    /// pixel-based steps), so the block size does not matter.
    pub fn is_pixel_based(&self) -> bool {
        !(self.block_shuffle || self.rotate_flip || self.negative_positive || self.pixel_shuffle)
    }

    /// Checks that the steps go together: `component-shuffle` needs `split`,
    /// `per-block` needs an intra-block step.
    pub fn validate(&self) -> Result<(), String> {
        if self.component_shuffle && !self.split {
            return Err(
                "component-shuffle swaps the two 4-bit halves of a pixel and needs split".into(),
            );
        }
        if self.per_block && !(self.rotate_flip || self.negative_positive || self.pixel_shuffle) {
            return Err(
                "per-block keys intra-block steps; add rotate-flip, negpos or pixel-shuffle".into(),
            );
        }
        Ok(())
    }
}

impl fmt::Display for CipherSteps {
    /// The preset name when the steps equal a preset, else the step names
    /// joined by `+` in canonical order (`plain` for no step).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((name, _)) = PRESETS
            .iter()
            .find(|(name, _)| CipherSteps::preset(name) == *self)
        {
            return f.write_str(name);
        }
        let mut copy = *self;
        let names: Vec<&str> = STEP_NAMES
            .into_iter()
            .filter(|name| copy.flag(name).is_some_and(|v| *v))
            .collect();
        if names.is_empty() {
            f.write_str("plain")
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

impl FromStr for CipherSteps {
    type Err = String;

    /// Parses `+`-joined step and preset names (`plain` for no step).
    fn from_str(text: &str) -> Result<CipherSteps, String> {
        let mut steps = CipherSteps::default();
        if text.trim() == "plain" {
            return Ok(steps);
        }
        for token in text.split('+').map(str::trim) {
            if let Some((_, definition)) = PRESETS.iter().find(|(n, _)| *n == token) {
                for step in definition.split('+') {
                    *steps.flag(step).expect("presets name steps") = true;
                }
            } else if let Some(flag) = steps.flag(token) {
                *flag = true;
            } else {
                let presets: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown cipher step {token:?}; steps: {}; presets: {}",
                    STEP_NAMES.join(", "),
                    presets.join(", ")
                ));
            }
        }
        steps.validate()?;
        Ok(steps)
    }
}

/// A complete, public image-cipher configuration: the steps, the block size
/// and the fingerprint of the key (never the key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CipherSpec {
    /// Which steps are applied.
    pub steps: CipherSteps,
    /// Block side in pixels for the block-wise steps; divides both image sides.
    pub block_size: u32,
    /// Fingerprint of the image key (16 hex characters).
    pub key_id: String,
}

impl fmt::Display for CipherSpec {
    /// E.g. `block B=4 key=0123456789abcdef`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} B={} key={}",
            self.steps, self.block_size, self.key_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_their_names() {
        for (name, definition) in PRESETS {
            let steps: CipherSteps = name.parse().unwrap();
            assert_eq!(steps, definition.parse().unwrap());
            assert_eq!(steps.to_string(), name);
        }
        assert_eq!(CipherSteps::block().to_string(), "block");
        assert!(CipherSteps::block().validate().is_ok());
    }

    #[test]
    fn steps_compose_and_print_canonically() {
        let steps: CipherSteps = "negpos + block-shuffle".parse().unwrap();
        assert!(steps.negative_positive && steps.block_shuffle && !steps.split);
        assert_eq!(steps.to_string(), "block-shuffle+negpos");
        let steps: CipherSteps = "block+pixel-negpos".parse().unwrap();
        assert_eq!(
            steps.to_string(),
            "block-shuffle+rotate-flip+pixel-shuffle+negpos+pixel-negpos"
        );
        assert_eq!(steps.output_channels(), 1);
        assert_eq!("le".parse::<CipherSteps>().unwrap().output_channels(), 2);
        let plain: CipherSteps = "plain".parse().unwrap();
        assert_eq!(plain, CipherSteps::default());
        assert_eq!(plain.to_string(), "plain");
    }

    #[test]
    fn bad_modes_are_refused_with_the_choices() {
        let err = "block+sparkle".parse::<CipherSteps>().unwrap_err();
        assert!(
            err.contains("\"sparkle\"") && err.contains("le-extended"),
            "{err}"
        );
        let err = "component-shuffle".parse::<CipherSteps>().unwrap_err();
        assert!(err.contains("needs split"), "{err}");
        let err = "block-shuffle+per-block"
            .parse::<CipherSteps>()
            .unwrap_err();
        assert!(err.contains("per-block"), "{err}");
    }
}
