//! Where the inputs of one secure sum lie in its masked vector.
//!
//! A round sums one input, or two ([`PairedSetup`](super::message::PairedSetup)):
//! a model update and, after it, the evaluation of the model it started
//! from. Both are masked by the same keystreams over their concatenation,
//! but each keeps its own ring `Z_{2^m}`: its elements are reduced modulo
//! its own `2^m` and packed in `m` bits, so a second input with a smaller
//! ring costs no more bytes than it needs. Masks cancel in every ring, since
//! each `2^m` divides the `2^32` the arithmetic wraps at.

use crate::error::ProtocolError;
use crate::secagg::encode::{pack, packed_len, unpack_add};

/// The runs of a masked vector: `(elements, ring bits)` of the first input
/// and, if the round pairs one, of the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Elements and ring bits of the first input.
    pub first: (usize, u32),
    /// Elements and ring bits of the second input, if any.
    pub second: Option<(usize, u32)>,
}

impl RingLayout {
    /// A vector of one input: `len` elements in a ring of `bits` bits.
    pub fn single(len: usize, bits: u32) -> Self {
        Self {
            first: (len, bits),
            second: None,
        }
    }

    /// Elements of the whole vector.
    pub fn len(&self) -> usize {
        self.first.0 + self.second.map_or(0, |(n, _)| n)
    }

    /// Whether the vector has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The runs in order.
    fn runs(&self) -> impl Iterator<Item = (usize, u32)> {
        std::iter::once(self.first).chain(self.second)
    }

    /// Reduces every element modulo its run's ring.
    ///
    /// # Panics
    /// If `values` is shorter than the layout.
    pub fn reduce(&self, values: &mut [u32]) {
        let mut rest = values;
        for (len, bits) in self.runs() {
            let (run, tail) = rest.split_at_mut(len);
            let mask = ring_mask(bits);
            run.iter_mut().for_each(|v| *v &= mask);
            rest = tail;
        }
    }

    /// Packs `values` (reduced, as long as the layout), each run in its
    /// ring's bits, the runs one after the other.
    pub fn pack(&self, values: &[u32]) -> Vec<u8> {
        let (first, second) = values.split_at(self.first.0.min(values.len()));
        let mut out = pack(first, self.first.1);
        if let Some((_, bits)) = self.second {
            out.extend_from_slice(&pack(second, bits));
        }
        out
    }

    /// Adds the packed vector `bytes` to `acc` (as long as the layout)
    /// element by element (wrapping).
    ///
    /// # Errors
    /// [`ProtocolError::Malformed`] for bytes of the wrong length or with
    /// padding bits set; `acc` is untouched then.
    pub fn unpack_add(&self, bytes: &[u8], acc: &mut [u32]) -> Result<(), ProtocolError> {
        if acc.len() != self.len() {
            return Err(ProtocolError::Malformed(format!(
                "a sum of {} elements for a layout of {}",
                acc.len(),
                self.len()
            )));
        }
        let Some((len2, bits2)) = self.second else {
            return unpack_add(bytes, self.first.1, acc);
        };
        let (len1, bits1) = self.first;
        let bytes1 = packed_len(len1, bits1).unwrap_or(usize::MAX);
        let bytes2 = packed_len(len2, bits2).unwrap_or(usize::MAX);
        if Some(bytes.len()) != bytes1.checked_add(bytes2) {
            return Err(ProtocolError::Malformed(format!(
                "packed vector of {} bytes, expected {} for {len1} values of {bits1} bits and \
                 {len2} of {bits2}",
                bytes.len(),
                bytes1.saturating_add(bytes2)
            )));
        }
        let (b1, b2) = bytes.split_at(bytes1);
        let (acc1, acc2) = acc.split_at_mut(len1);
        // Check the second run on a scratch sum first, so that a bad
        // second run leaves `acc` untouched.
        let mut second = vec![0u32; len2];
        unpack_add(b2, bits2, &mut second)?;
        unpack_add(b1, bits1, acc1)?;
        for (a, v) in acc2.iter_mut().zip(second) {
            *a = a.wrapping_add(v);
        }
        Ok(())
    }
}

/// `2^bits - 1` for `bits` in 1..=32.
fn ring_mask(bits: u32) -> u32 {
    ((1u64 << bits.min(32)) - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_runs_pack_in_their_own_bits_and_round_trip() {
        let layout = RingLayout {
            first: (5, 30),
            second: Some((3, 12)),
        };
        let mut values: Vec<u32> = vec![u32::MAX, 7, 1 << 29, 0, 12345, u32::MAX, 4095, 77];
        layout.reduce(&mut values);
        assert_eq!(values[0], (1 << 30) - 1);
        assert_eq!(values[5], 4095);
        let packed = layout.pack(&values);
        // ceil(5 * 30 / 8) + ceil(3 * 12 / 8) bytes.
        assert_eq!(packed.len(), 19 + 5);
        let mut acc = vec![1u32; 8];
        layout.unpack_add(&packed, &mut acc).unwrap();
        let expected: Vec<u32> = values.iter().map(|v| v.wrapping_add(1)).collect();
        assert_eq!(acc, expected);
    }

    #[test]
    fn a_bad_second_run_leaves_the_sum_untouched() {
        let layout = RingLayout {
            first: (4, 8),
            second: Some((1, 4)),
        };
        let mut acc = vec![3u32; 5];
        // The second run's byte has padding bits set.
        let bytes = [1, 2, 3, 4, 0xf0];
        assert!(matches!(
            layout.unpack_add(&bytes, &mut acc),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(acc, vec![3u32; 5]);
        assert!(layout.unpack_add(&bytes[..4], &mut acc).is_err());
        assert_eq!(acc, vec![3u32; 5]);
    }
}
