//! Lossless model downloads as a delta from a model the recipient holds.
//!
//! From one round to the next a global model moves a little, so each new
//! value's bit pattern mostly shares its sign, exponent and top mantissa bits
//! with the old one: the XOR of the two patterns has nearly all-zero high
//! bytes. [`ModelDelta`] splits the XOR words into their four byte planes
//! (every value's lowest byte, then every second byte, ...) and deflates the
//! planes, from the highest down, while deflating makes them smaller; the
//! low planes, close to random, go as they are. The recipient inflates, XORs with its copy and has the new model
//! bit for bit: both models are named by their [`ModelWeights::digest`], and
//! a delta that does not give the model it names is refused. The coordinator
//! sends a delta only to a participant it knows holds the base.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::{Deserialize, Serialize};

use crate::{error::ProtocolError, weights::ModelWeights};

/// Which participants the coordinator sends model deltas to. A delta
/// costs the coordinator a deflate and the participant an inflate, an XOR
/// and a digest (a few ms for a 1.6 MB model) to save 30-40% of the bytes:
/// worth it on a network, not on loopback, where bytes cost nothing but the
/// CPU both ends would spend on them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelDeltas {
    /// Deltas to every participant except those connected from a loopback
    /// address (on the coordinator's own machine).
    #[default]
    Auto,
    /// Deltas to every participant that holds the base.
    Always,
    /// Whole models to everyone.
    Never,
}

impl ModelDeltas {
    /// Whether a participant connected from `remote` gets deltas (`Auto`:
    /// unless it is [`on_this_machine`](crate::transport::on_this_machine)).
    pub fn for_peer(self, remote: std::net::IpAddr) -> bool {
        match self {
            ModelDeltas::Auto => !crate::transport::on_this_machine(remote),
            ModelDeltas::Always => true,
            ModelDeltas::Never => false,
        }
    }

    /// The name the command line uses: `auto`, `always` or `never`.
    pub fn name(self) -> &'static str {
        match self {
            ModelDeltas::Auto => "auto",
            ModelDeltas::Always => "always",
            ModelDeltas::Never => "never",
        }
    }
}

impl std::str::FromStr for ModelDeltas {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ModelDeltas::Auto),
            "always" => Ok(ModelDeltas::Always),
            "never" => Ok(ModelDeltas::Never),
            other => Err(format!(
                "unknown model-delta policy {other:?}: auto, always or never"
            )),
        }
    }
}

/// Bytes per model value (an `f32`), hence byte planes in a delta.
const PLANES: usize = 4;

/// A new model as a lossless delta from a base model (see the module docs).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDelta {
    /// [`ModelWeights::digest`] of the model the delta applies to.
    pub base: [u8; 32],
    /// [`ModelWeights::digest`] of the model it gives.
    pub result: [u8; 32],
    planes: Vec<Plane>,
}

/// One byte plane of the XOR words.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
enum Plane {
    /// The plane's bytes as they are.
    Raw(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The plane's bytes, raw-deflated.
    Deflated(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl std::fmt::Debug for ModelDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDelta")
            .field("base", &hex8(&self.base))
            .field("result", &hex8(&self.result))
            .field("bytes", &self.encoded_len())
            .finish()
    }
}

/// A digest's first 4 bytes in hex, for errors and `Debug` output.
pub(crate) fn hex8(digest: &[u8; 32]) -> String {
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl ModelDelta {
    /// The delta that turns `base` (digest `base_digest`) into `new`
    /// (digest `new_digest`).
    ///
    /// # Errors
    /// The two models' layouts differ.
    pub fn encode(
        base: &ModelWeights,
        base_digest: [u8; 32],
        new: &ModelWeights,
        new_digest: [u8; 32],
    ) -> Result<Self, ProtocolError> {
        if !base.same_layout(new) {
            return Err(ProtocolError::LayoutMismatch);
        }
        let n = base.num_parameters();
        let mut planes: [Vec<u8>; PLANES] = std::array::from_fn(|_| Vec::with_capacity(n));
        for (old, now) in base.tensors().iter().zip(new.tensors()) {
            for (a, b) in old.data.iter().zip(&now.data) {
                let bytes = (a.to_bits() ^ b.to_bits()).to_le_bytes();
                for (plane, byte) in planes.iter_mut().zip(bytes) {
                    plane.push(byte);
                }
            }
        }
        // From the highest plane down: once one does not deflate, the lower
        // ones (closer still to random) are not tried.
        let mut packed: Vec<Plane> = Vec::with_capacity(PLANES);
        let mut trying = true;
        for plane in planes.into_iter().rev() {
            let p = if trying {
                Plane::pack(plane)
            } else {
                Plane::Raw(plane)
            };
            trying = matches!(p, Plane::Deflated(_));
            packed.push(p);
        }
        packed.reverse();
        Ok(Self {
            base: base_digest,
            result: new_digest,
            planes: packed,
        })
    }

    /// The new model and its digest, from `base`, whose digest is
    /// `base_digest`.
    ///
    /// # Errors
    /// `base` is not the delta's base, a plane does not decode to one byte
    /// per value, or the result is not the model the delta names.
    pub fn apply(
        &self,
        base: &ModelWeights,
        base_digest: [u8; 32],
    ) -> Result<(ModelWeights, [u8; 32]), ProtocolError> {
        if base_digest != self.base {
            return Err(ProtocolError::InvalidWeights(format!(
                "the model delta applies to model {}, we hold model {}",
                hex8(&self.base),
                hex8(&base_digest)
            )));
        }
        if self.planes.len() != PLANES {
            return Err(ProtocolError::Malformed(format!(
                "a model delta has {} byte planes, not {PLANES}",
                self.planes.len()
            )));
        }
        let n = base.num_parameters();
        let planes = self
            .planes
            .iter()
            .map(|p| p.unpack(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut k = 0;
        let mut tensors = base.tensors().to_vec();
        for t in &mut tensors {
            for v in &mut t.data {
                let xor =
                    u32::from_le_bytes([planes[0][k], planes[1][k], planes[2][k], planes[3][k]]);
                *v = f32::from_bits(v.to_bits() ^ xor);
                k += 1;
            }
        }
        let model = ModelWeights::new(tensors)?;
        let digest = model.digest();
        if digest != self.result {
            return Err(ProtocolError::InvalidWeights(format!(
                "the model delta gives model {}, not the model {} it names",
                hex8(&digest),
                hex8(&self.result)
            )));
        }
        Ok((model, digest))
    }

    /// Bytes of the planes as sent (without framing).
    pub fn encoded_len(&self) -> usize {
        self.planes
            .iter()
            .map(|p| match p {
                Plane::Raw(b) | Plane::Deflated(b) => b.len(),
            })
            .sum()
    }
}

impl Plane {
    /// Deflated when that saves at least 1/16 of the plane, raw otherwise.
    fn pack(bytes: Vec<u8>) -> Plane {
        let mut out = Vec::with_capacity(bytes.len() / 2 + 64);
        let mut deflate = Compress::new(Compression::fast(), false);
        loop {
            let before = deflate.total_in() as usize;
            match deflate.compress_vec(&bytes[before..], &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => break,
                Ok(_) if out.len() < bytes.len() => out.reserve(bytes.len() / 4 + 64),
                // Larger than the plane itself: not worth it.
                _ => return Plane::Raw(bytes),
            }
        }
        if out.len() + bytes.len() / 16 < bytes.len() {
            Plane::Deflated(out)
        } else {
            Plane::Raw(bytes)
        }
    }

    /// The plane's `n` bytes; anything else (more, fewer, a broken stream)
    /// is an error. Inflating stops at `n` bytes, whatever the input claims.
    fn unpack(&self, n: usize) -> Result<std::borrow::Cow<'_, [u8]>, ProtocolError> {
        let wrong = |got: &str| {
            ProtocolError::Malformed(format!(
                "a model delta's byte plane holds {got}, not one byte per value ({n})"
            ))
        };
        match self {
            Plane::Raw(bytes) if bytes.len() == n => Ok(bytes.as_slice().into()),
            Plane::Raw(bytes) => Err(wrong(&format!("{} bytes", bytes.len()))),
            Plane::Deflated(bytes) => {
                let mut out = Vec::with_capacity(n);
                let mut inflate = Decompress::new(false);
                let status = inflate
                    .decompress_vec(bytes, &mut out, FlushDecompress::Finish)
                    .map_err(|e| wrong(&format!("a broken deflate stream ({e})")))?;
                let consumed = inflate.total_in() as usize;
                if status != Status::StreamEnd || out.len() != n || consumed != bytes.len() {
                    return Err(wrong(&format!(
                        "{} bytes{}",
                        out.len(),
                        if status == Status::StreamEnd {
                            ""
                        } else {
                            " or more"
                        }
                    )));
                }
                Ok(out.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::NamedTensor;

    #[test]
    fn the_policy_sends_deltas_off_this_machine_unless_told_otherwise() {
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let local6: std::net::IpAddr = "::1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let remote_mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ModelDeltas::default(), ModelDeltas::Auto);
        assert!(!ModelDeltas::Auto.for_peer(local));
        assert!(!ModelDeltas::Auto.for_peer(local6));
        assert!(!ModelDeltas::Auto.for_peer(mapped));
        assert!(ModelDeltas::Auto.for_peer(remote));
        assert!(ModelDeltas::Auto.for_peer(remote_mapped));
        assert!(ModelDeltas::Always.for_peer(local));
        assert!(!ModelDeltas::Never.for_peer(remote));
        for p in [ModelDeltas::Auto, ModelDeltas::Always, ModelDeltas::Never] {
            assert_eq!(p.name().parse::<ModelDeltas>(), Ok(p));
        }
        let err = "sometimes".parse::<ModelDeltas>().unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
    }

    fn model(values: Vec<f32>) -> ModelWeights {
        let split = values.len() / 3;
        let (a, b) = values.split_at(split);
        ModelWeights::new(vec![
            NamedTensor::new("a", vec![a.len()], a.to_vec()).unwrap(),
            NamedTensor::new("b", vec![b.len()], b.to_vec()).unwrap(),
        ])
        .unwrap()
    }

    /// A model of `n` values and the same model after a small step, as a
    /// round of training moves it.
    fn pair(n: usize) -> (ModelWeights, ModelWeights) {
        let old: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618).sin() * 0.1) + if i % 97 == 0 { 3.0 } else { 0.0 })
            .collect();
        let new = old
            .iter()
            .enumerate()
            .map(|(i, v)| v + 1e-3 * ((i as f32 * 1.7).cos()))
            .collect();
        (model(old), model(new))
    }

    fn delta(base: &ModelWeights, new: &ModelWeights) -> ModelDelta {
        ModelDelta::encode(base, base.digest(), new, new.digest()).unwrap()
    }

    #[test]
    fn a_delta_gives_the_new_model_bit_for_bit_and_pays_for_a_small_step() {
        let (old, new) = pair(100_003);
        let d = delta(&old, &new);
        let (back, digest) = d.apply(&old, old.digest()).unwrap();
        assert_eq!(digest, new.digest());
        let bits = |m: &ModelWeights| m.to_flat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&new));
        let raw = 4 * new.num_parameters();
        assert!(
            d.encoded_len() < raw * 3 / 4,
            "{} bytes for {raw} raw bytes",
            d.encoded_len()
        );
        // Through the wire encoding too.
        let config = bincode::config::standard();
        let wire = bincode::serde::encode_to_vec(&d, config).unwrap();
        let (decoded, _): (ModelDelta, usize) =
            bincode::serde::decode_from_slice(&wire, config).unwrap();
        assert_eq!(decoded, d);
    }

    #[test]
    fn special_values_survive_exactly() {
        let old = model(vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-42,
            5.0,
            f32::MAX,
        ]);
        let new = model(vec![
            -0.0,
            0.0,
            1e-41,
            f32::MIN_POSITIVE,
            7.0,
            -5.0,
            f32::MIN,
        ]);
        let (back, _) = delta(&old, &new).apply(&old, old.digest()).unwrap();
        let bits = |m: &ModelWeights| m.to_flat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&new));
        // Unchanged: every plane is zeros and deflates to almost nothing.
        let same = delta(&new, &new);
        assert!(same.encoded_len() < 40, "{}", same.encoded_len());
        assert_eq!(same.apply(&new, new.digest()).unwrap().0, new);
    }

    #[test]
    fn a_delta_for_another_base_or_a_damaged_one_is_refused() {
        let (old, new) = pair(10_000);
        let d = delta(&old, &new);
        let other = model(vec![1.0; 10_000]);
        let err = d.apply(&other, other.digest()).unwrap_err();
        assert!(err.to_string().contains("applies to model"), "{err}");
        // Layouts must match to encode.
        assert!(ModelDelta::encode(&old, old.digest(), &model(vec![1.0; 9]), [0; 32]).is_err());
        // A changed byte in any plane: the result is not the named model.
        for plane in 0..PLANES {
            let mut bytes = d.planes[plane].unpack(10_000).unwrap().into_owned();
            bytes[5_000] ^= 0x20;
            let mut bad = d.clone();
            bad.planes[plane] = Plane::pack(bytes);
            let err = bad.apply(&old, old.digest()).unwrap_err();
            assert!(
                err.to_string().contains("not the model"),
                "plane {plane}: {err}"
            );
        }
        // A stream that does not inflate.
        let mut broken = d.clone();
        broken.planes[3] = Plane::Deflated(vec![0xff; 100]);
        let err = broken.apply(&old, old.digest()).unwrap_err();
        assert!(err.to_string().contains("byte plane"), "{err}");
        // A plane of the wrong length, deflated or raw, and a missing plane.
        let mut long = d.clone();
        long.planes[0] = Plane::pack(vec![0; 10_001]);
        let err = long.apply(&old, old.digest()).unwrap_err();
        assert!(err.to_string().contains("one byte per value"), "{err}");
        let mut short = d.clone();
        short.planes[3] = Plane::Raw(vec![0; 9_999]);
        assert!(short.apply(&old, old.digest()).is_err());
        let mut missing = d;
        missing.planes.pop();
        assert!(missing.apply(&old, old.digest()).is_err());
    }
}
