//! [`ModelWeights`]: an ordered list of named `f32` tensors, the unit that
//! travels between coordinator and participants and that is checkpointed.
//!
//! Order matters: flattening ([`ModelWeights::to_flat`]) concatenates the
//! tensors in their stored order, and that flat vector is what aggregation
//! sums. Two weight sets can be combined only when they have the same
//! [layout](ModelWeights::same_layout) (names, order and shapes).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// safetensors metadata key that records the tensor order (safetensors itself
/// stores tensors sorted, not in insertion order).
const ORDER_KEY: &str = "greyfed.tensor_order";
/// Metadata key of a model file naming its architecture.
pub const MODEL_METADATA: &str = "greyfed.model";
/// Metadata key of a model file holding the input it expects: the cipher
/// spec as JSON, `null` for plain images.
pub const CIPHER_METADATA: &str = "greyfed.cipher";
/// Metadata key of a model file holding the rounds completed.
pub const ROUNDS_METADATA: &str = "greyfed.rounds_completed";
/// Metadata key of a model file whose key-bearing tensors carry the image
/// key's layer mask (`"true"`; absent or `"false"`: they do not).
pub const KEY_LAYER_MASK_METADATA: &str = "greyfed.key_layer_mask";

/// One named, shaped `f32` tensor in row-major order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    /// Unique name within its [`ModelWeights`], e.g. `"conv.weight"`.
    pub name: String,
    /// Dimensions, outermost first; their product is `data.len()`.
    pub shape: Vec<usize>,
    /// Values in row-major order (in binary formats, one run of
    /// little-endian bytes).
    #[serde(with = "f32_bytes")]
    pub data: Vec<f32>,
}

/// `values` as little-endian bytes: on little-endian machines their own
/// memory, without a copy (a model is the bulk of every frame that carries
/// one, and every participant hashes it each round).
fn le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// `Vec<f32>` as one run of little-endian bytes in binary formats, so that
/// a model is encoded and decoded in one pass rather than a value at a
/// time through serde (decoding models was 0.5% of a 10-participant run's
/// CPU); as a list of numbers in human-readable formats.
mod f32_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

    pub fn serialize<S: Serializer>(values: &[f32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return values.serialize(s);
        }
        s.serialize_bytes(&super::le_bytes(values))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        if d.is_human_readable() {
            return Vec::<f32>::deserialize(d);
        }
        d.deserialize_bytes(Floats)
    }

    struct Floats;

    impl de::Visitor<'_> for Floats {
        type Value = Vec<f32>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("f32 values as little-endian bytes")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<f32>, E> {
            if !bytes.len().is_multiple_of(4) {
                return Err(E::invalid_length(bytes.len(), &"a multiple of 4 bytes"));
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        }
    }
}

impl NamedTensor {
    /// Creates a tensor, checking that `shape` matches `data.len()`.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<Self, ProtocolError> {
        let name = name.into();
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(ProtocolError::InvalidWeights(format!(
                "tensor {name:?}: shape {shape:?} needs {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Self { name, shape, data })
    }
}

/// An ordered set of named `f32` tensors: a model's parameters, or an update
/// (difference of parameters) with the same layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelWeights {
    tensors: Vec<NamedTensor>,
}

impl ModelWeights {
    /// Builds weights from tensors, checking shapes and that names are unique
    /// and non-empty.
    pub fn new(tensors: Vec<NamedTensor>) -> Result<Self, ProtocolError> {
        let weights = Self { tensors };
        weights.validate()?;
        Ok(weights)
    }

    /// Checks the invariants [`ModelWeights::new`] establishes. Weights decoded
    /// from the wire are validated with this before use.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.tensors {
            if t.name.is_empty() || t.name.contains('\n') {
                return Err(ProtocolError::InvalidWeights(format!(
                    "invalid tensor name {:?}",
                    t.name
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(ProtocolError::InvalidWeights(format!(
                    "duplicate tensor name {:?}",
                    t.name
                )));
            }
            let expected = t
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if expected != Some(t.data.len()) {
                return Err(ProtocolError::InvalidWeights(format!(
                    "tensor {:?}: shape {:?} does not match {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                )));
            }
        }
        Ok(())
    }

    /// The tensors in order.
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    /// Consumes the weights, returning the tensors in order.
    pub fn into_tensors(self) -> Vec<NamedTensor> {
        self.tensors
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// BLAKE3 over `"greyfed/model/v2"` and every tensor in order: its
    /// name's length (u64 BE) and bytes, its rank (u64 BE), its dimensions
    /// (u64 BE each) and its values (f32 little-endian bits). Secure
    /// aggregation binds each round to this digest, so participants given
    /// different models cannot complete a round together. (BLAKE3 rather
    /// than SHA-256: every participant hashes the whole model each round,
    /// and BLAKE3 is several times faster on large inputs.)
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"greyfed/model/v2");
        for t in &self.tensors {
            h.update(&(t.name.len() as u64).to_be_bytes());
            h.update(t.name.as_bytes());
            h.update(&(t.shape.len() as u64).to_be_bytes());
            for d in &t.shape {
                h.update(&(*d as u64).to_be_bytes());
            }
            h.update(&le_bytes(&t.data));
        }
        h.finalize().into()
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// True when `other` has the same names, order and shapes.
    pub fn same_layout(&self, other: &ModelWeights) -> bool {
        self.tensors.len() == other.tensors.len()
            && self
                .tensors
                .iter()
                .zip(&other.tensors)
                .all(|(a, b)| a.name == b.name && a.shape == b.shape)
    }

    fn check_layout(&self, other: &ModelWeights) -> Result<(), ProtocolError> {
        if self.same_layout(other) {
            Ok(())
        } else {
            Err(ProtocolError::LayoutMismatch)
        }
    }

    /// All values concatenated in tensor order.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.num_parameters());
        for t in &self.tensors {
            flat.extend_from_slice(&t.data);
        }
        flat
    }

    /// Weights with the layout of `self` and the values of `flat`.
    pub fn with_flat_values(&self, flat: &[f32]) -> Result<ModelWeights, ProtocolError> {
        if flat.len() != self.num_parameters() {
            return Err(ProtocolError::InvalidWeights(format!(
                "expected {} values, got {}",
                self.num_parameters(),
                flat.len()
            )));
        }
        let mut offset = 0;
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                let n = t.data.len();
                let data = flat[offset..offset + n].to_vec();
                offset += n;
                NamedTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data,
                }
            })
            .collect();
        Ok(ModelWeights { tensors })
    }

    /// Overwrites the values at flat positions `start..start + values.len()`
    /// (tensor order, as in [`Self::to_flat`]).
    ///
    /// # Errors
    /// A range past the last value.
    pub fn set_flat_range(&mut self, start: usize, values: &[f32]) -> Result<(), ProtocolError> {
        let end = start.checked_add(values.len());
        if end.is_none_or(|end| end > self.num_parameters()) {
            return Err(ProtocolError::InvalidWeights(format!(
                "{} values from position {start} do not fit {} parameters",
                values.len(),
                self.num_parameters()
            )));
        }
        let mut offset = 0;
        let mut rest = values;
        let mut at = start;
        for t in &mut self.tensors {
            let n = t.data.len();
            if !rest.is_empty() && at < offset + n {
                let from = at - offset;
                let take = (n - from).min(rest.len());
                t.data[from..from + take].copy_from_slice(&rest[..take]);
                rest = &rest[take..];
                at += take;
            }
            offset += n;
        }
        Ok(())
    }

    /// `self - other`, element-wise (an update from a base model).
    pub fn sub(&self, other: &ModelWeights) -> Result<ModelWeights, ProtocolError> {
        self.check_layout(other)?;
        let mut out = self.clone();
        for (t, o) in out.tensors.iter_mut().zip(&other.tensors) {
            for (a, b) in t.data.iter_mut().zip(&o.data) {
                *a -= *b;
            }
        }
        Ok(out)
    }

    /// `self += alpha * other`, element-wise.
    pub fn add_scaled(&mut self, other: &ModelWeights, alpha: f32) -> Result<(), ProtocolError> {
        self.check_layout(other)?;
        for (t, o) in self.tensors.iter_mut().zip(&other.tensors) {
            for (a, b) in t.data.iter_mut().zip(&o.data) {
                *a += alpha * *b;
            }
        }
        Ok(())
    }

    /// True when every value is finite (no NaN or infinity).
    pub fn is_finite(&self) -> bool {
        self.tensors
            .iter()
            .all(|t| t.data.iter().all(|v| v.is_finite()))
    }

    /// Serialises to the safetensors format, with the tensor order and the
    /// given `metadata` in the header.
    pub fn to_safetensors(
        &self,
        metadata: &HashMap<String, String>,
    ) -> Result<Vec<u8>, ProtocolError> {
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views = self
            .tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                TensorView::new(Dtype::F32, t.shape.clone(), b)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| ProtocolError::Safetensors(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut meta = metadata.clone();
        meta.insert(
            ORDER_KEY.to_string(),
            self.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        safetensors::serialize(views, Some(meta))
            .map_err(|e| ProtocolError::Safetensors(e.to_string()))
    }

    /// Parses safetensors bytes written by [`ModelWeights::to_safetensors`] (or
    /// any safetensors file of `f32` tensors), returning the weights and the
    /// header metadata (without greyfed's internal keys).
    pub fn from_safetensors(
        bytes: &[u8],
    ) -> Result<(ModelWeights, HashMap<String, String>), ProtocolError> {
        let parse_err = |e: safetensors::SafeTensorError| ProtocolError::Safetensors(e.to_string());
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(parse_err)?;
        let mut meta = header.metadata().clone().unwrap_or_default();
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(parse_err)?;
        let mut names: Vec<String> = match meta.remove(ORDER_KEY) {
            Some(order) if !order.is_empty() => order.split('\n').map(str::to_string).collect(),
            _ => {
                let mut n: Vec<String> = file.names().into_iter().map(|s| s.to_string()).collect();
                n.sort();
                n
            }
        };
        if names.len() != file.len() {
            return Err(ProtocolError::Safetensors(format!(
                "tensor order lists {} names but the file holds {} tensors",
                names.len(),
                file.len()
            )));
        }
        let tensors = names
            .drain(..)
            .map(|name| {
                let view = file.tensor(&name).map_err(parse_err)?;
                if view.dtype() != Dtype::F32 {
                    return Err(ProtocolError::Safetensors(format!(
                        "tensor {name:?} has dtype {:?}, expected F32",
                        view.dtype()
                    )));
                }
                let data = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                NamedTensor::new(name, view.shape().to_vec(), data)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((ModelWeights::new(tensors)?, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary formats carry the values as bytes, bit for bit (signed zeros,
    /// subnormals, infinities and NaN payloads included); JSON as numbers;
    /// a byte run that is not whole values is refused.
    #[test]
    fn tensor_values_travel_bit_for_bit() {
        let odd = [
            -0.0,
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::from_bits(0x7fc0_1234),
            1.5,
        ];
        let t = NamedTensor::new("w", vec![5], odd.to_vec()).unwrap();
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&t, config).unwrap();
        // name (1 + 1), shape (1 + 1), values (1 + 20)
        assert_eq!(bytes.len(), 2 + 2 + 21);
        let (back, _): (NamedTensor, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.data), bits(&odd));
        let weights = sample();
        let json = serde_json::to_string(&weights).unwrap();
        assert!(json.contains("\"data\":[1.0,-2.0,3.5,"), "{json}");
        assert_eq!(
            serde_json::from_str::<ModelWeights>(&json).unwrap(),
            weights
        );
        let mut cut = bytes.clone();
        cut[4] = 19; // 19 bytes of values: not a whole number of f32
        cut.pop();
        let err = bincode::serde::decode_from_slice::<NamedTensor, _>(&cut, config).unwrap_err();
        assert!(err.to_string().contains("multiple of 4"), "{err}");
    }

    #[test]
    fn the_digest_changes_with_any_value_name_or_shape() {
        let base = sample().digest();
        assert_eq!(base, sample().digest(), "deterministic");
        let mut tensors = sample().tensors;
        tensors[0].data[4] = f32::from_bits(tensors[0].data[4].to_bits() ^ 1);
        assert_ne!(
            ModelWeights::new(tensors).unwrap().digest(),
            base,
            "one bit of one value"
        );
        let mut tensors = sample().tensors;
        tensors[1].name = "a.bias2".into();
        assert_ne!(ModelWeights::new(tensors).unwrap().digest(), base, "a name");
        let mut tensors = sample().tensors;
        tensors[0].shape = vec![3, 2];
        assert_ne!(
            ModelWeights::new(tensors).unwrap().digest(),
            base,
            "a shape"
        );
        let mut tensors = sample().tensors;
        tensors.swap(0, 1);
        assert_ne!(
            ModelWeights::new(tensors).unwrap().digest(),
            base,
            "the order"
        );
    }

    fn sample() -> ModelWeights {
        ModelWeights::new(vec![
            NamedTensor::new(
                "z.weight",
                vec![2, 3],
                vec![1.0, -2.0, 3.5, 0.0, 1e-7, -0.25],
            )
            .unwrap(),
            NamedTensor::new("a.bias", vec![3], vec![0.1, 0.2, 0.3]).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn safetensors_round_trip_keeps_order_values_and_metadata() {
        let w = sample();
        let mut meta = HashMap::new();
        meta.insert("greyfed.model".to_string(), "blocknet".to_string());
        let bytes = w.to_safetensors(&meta).unwrap();
        let (back, back_meta) = ModelWeights::from_safetensors(&bytes).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.tensors()[0].name, "z.weight");
        assert_eq!(back_meta, meta);
    }

    #[test]
    fn safetensors_rejects_truncated_and_garbage() {
        let bytes = sample().to_safetensors(&HashMap::new()).unwrap();
        assert!(ModelWeights::from_safetensors(&bytes[..bytes.len() - 3]).is_err());
        assert!(ModelWeights::from_safetensors(b"not a safetensors file").is_err());
        assert!(ModelWeights::from_safetensors(&[]).is_err());
    }

    #[test]
    fn new_rejects_bad_shapes_and_duplicate_names() {
        assert!(NamedTensor::new("x", vec![2, 2], vec![1.0; 3]).is_err());
        let t = NamedTensor::new("x", vec![1], vec![1.0]).unwrap();
        assert!(ModelWeights::new(vec![t.clone(), t]).is_err());
        let bad = NamedTensor {
            name: "y".into(),
            shape: vec![usize::MAX, 2],
            data: vec![],
        };
        assert!(ModelWeights::new(vec![bad]).is_err());
    }

    #[test]
    fn flat_round_trip_and_arithmetic() {
        let w = sample();
        let flat = w.to_flat();
        assert_eq!(flat.len(), w.num_parameters());
        assert_eq!(w.with_flat_values(&flat).unwrap(), w);
        assert!(w.with_flat_values(&flat[1..]).is_err());
        let mut acc = w.clone();
        acc.add_scaled(&w, 1.0).unwrap();
        let diff = acc.sub(&w).unwrap();
        assert_eq!(diff, w);
        let other =
            ModelWeights::new(vec![NamedTensor::new("q", vec![1], vec![0.0]).unwrap()]).unwrap();
        assert_eq!(acc.sub(&other), Err(ProtocolError::LayoutMismatch));
    }

    #[test]
    fn a_flat_range_is_written_across_tensor_boundaries_and_nothing_else() {
        let w = sample();
        let n = w.num_parameters();
        for start in 0..n {
            for len in 0..=(n - start) {
                let mut written = w.clone();
                let values: Vec<f32> = (0..len).map(|i| 100.0 + i as f32).collect();
                written.set_flat_range(start, &values).unwrap();
                let mut expected = w.to_flat();
                expected[start..start + len].copy_from_slice(&values);
                assert_eq!(written.to_flat(), expected, "{start}+{len}");
            }
        }
        let mut w = sample();
        assert!(w.set_flat_range(n - 1, &[1.0, 2.0]).is_err());
        assert!(w.set_flat_range(usize::MAX, &[1.0]).is_err());
        assert_eq!(w, sample(), "a refused write changes nothing");
    }
}
