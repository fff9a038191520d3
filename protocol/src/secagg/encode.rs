//! Encoding of updates into the ring Z_{2^m}, and packing on the wire.
//!
//! A participant's update `x` (d floats) and integer weight `w`:
//! 0. if the round sets an L2 norm bound `C`, scale `x` by `min(1, C / ‖x‖₂)`;
//! 1. clip each value to `[-c, c]`;
//! 2. map to `[0, 2^b - 1]` by `q = stochastic_round((x + c) / (2c) * (2^b - 1))`
//!    (unbiased: `E[q]` is the exact scaled value);
//! 3. multiply by the weight: `y = w * q`; append `w` as element `d`.
//!
//! The coordinator unmasks `sum(w_i * q_i)` and `sum(w_i)`, so the weighted
//! mean is `x̂ = sum(w_i q_i) / sum(w_i) / (2^b - 1) * 2c - c`.
//!
//! **Bit budget.** The largest possible sum is `n * max_weight * (2^b - 1)`;
//! the ring has `m = bits needed for that sum` bits and must fit in 32. All
//! arithmetic (masks included) is done in `u32` with wrapping and reduced mod
//! `2^m`, which is exact because `2^m` divides `2^32`. Masked elements travel
//! packed in `m` bits each.
//!
//! **Noise for distributed DP.** With a noise variance `σ²` (ring units²),
//! every participant adds an independent discrete Gaussian `N_Z(0, σ²)` to
//! each of its `d` encoded values before masking (not to the weight), so
//! the unmasked sum carries noise of variance `n_survivors · σ²` and no
//! party ever sees a sum without it. The ring then also holds a headroom
//! `H = ⌈14 √(n σ²)⌉` on each side of the noiseless range (a coordinate
//! leaves it with probability below 10⁻⁴³), and the decoder reads each sum
//! as the integer in `[−H, 2^m − H)`.

use rand::{CryptoRng, Rng};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::ProtocolError;
use crate::privacy::discrete_gaussian::DiscreteGaussian;
use crate::secagg::prg::{KeystreamRng, PrgKind};

/// Largest ring: all arithmetic is in `u32`.
const MAX_RING_BITS: u32 = 32;

/// Elements encoded per block of random bits.
const ENCODE_BLOCK: usize = 1024;

/// Encoding agreed for a round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncodingParams {
    /// Clipping bound `c > 0` of every element.
    pub clip: f32,
    /// L2 norm bound `C > 0` of the whole update, if the round sets one:
    /// an honest participant scales a longer update down to it before
    /// encoding (a malicious one is not prevented from exceeding it; see
    /// docs/threat-model.md).
    pub max_norm: Option<f32>,
    /// Quantisation bits `b` (1..=24).
    pub bits: u32,
    /// Largest weight a participant may use.
    pub max_weight: u32,
    /// Ring bits `m` (derived; `<= 32`).
    pub ring_bits: u32,
    /// Variance `σ²` (ring units²) of the discrete Gaussian noise each
    /// participant adds to each value; 0: none.
    pub noise_variance: u64,
    /// Noise headroom `H` on each side of the noiseless range (derived).
    pub noise_headroom: u64,
}

/// Standard deviations of the summed noise the ring holds on each side.
const NOISE_TAIL_SIGMAS: f64 = 14.0;

/// `⌈14 √(n σ²)⌉`: the headroom for the noise of `n` participants.
fn noise_headroom(participants: usize, variance: u64) -> u64 {
    if variance == 0 {
        return 0;
    }
    (NOISE_TAIL_SIGMAS * (participants as f64 * variance as f64).sqrt()).ceil() as u64
}

/// Bits needed to write `v` (at least 1).
fn bit_length(v: u128) -> u32 {
    (128 - v.leading_zeros()).max(1)
}

/// `2^b - 1` for `b` in 0..=32.
fn levels(bits: u32) -> u64 {
    (1u64 << bits.min(32)) - 1
}

impl EncodingParams {
    /// Parameters for `participants` inputs, checking the bit budget.
    ///
    /// The ring has `m` = the bit length of `participants * max_weight *
    /// (2^b - 1)` bits (the largest possible sum), at least 1.
    ///
    /// # Errors
    /// [`ProtocolError::BitBudget`] when `b + log2(max_weight) + log2(n)`
    /// exceeds 32 bits, with a message saying what to lower;
    /// [`ProtocolError::InvalidConfig`] for a `clip` that is not finite and
    /// positive, `bits` outside 1..=24, or a zero `max_weight` or
    /// `participants`.
    pub fn new(
        clip: f32,
        bits: u32,
        max_weight: u32,
        participants: usize,
    ) -> Result<Self, ProtocolError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "secure-aggregation clipping bound must be finite and > 0, got {clip}"
            )));
        }
        if !(1..=24).contains(&bits) {
            return Err(ProtocolError::InvalidConfig(format!(
                "secure-aggregation quantisation bits must be in 1..=24, got {bits}"
            )));
        }
        if max_weight == 0 {
            return Err(ProtocolError::InvalidConfig(
                "secure-aggregation maximum weight must be at least 1".into(),
            ));
        }
        if participants == 0 {
            return Err(ProtocolError::InvalidConfig(
                "secure aggregation needs at least 1 participant".into(),
            ));
        }
        let n = participants as u128;
        let w = u128::from(max_weight);
        let q = u128::from(levels(bits));
        let ring_bits = bit_length(n * w * q);
        if ring_bits > MAX_RING_BITS {
            return Err(ProtocolError::BitBudget(budget_advice(
                bits,
                max_weight,
                participants,
                ring_bits,
            )));
        }
        Ok(Self {
            clip,
            max_norm: None,
            bits,
            max_weight,
            ring_bits,
            noise_variance: 0,
            noise_headroom: 0,
        })
    }

    /// The same parameters for `participants` inputs, each with discrete
    /// Gaussian noise of variance `variance` (ring units²; 0: none) on
    /// every value, the ring widened by the noise headroom.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] for a variance the sampler refuses
    /// (above [`MAX_VARIANCE`](crate::privacy::discrete_gaussian::MAX_VARIANCE));
    /// [`ProtocolError::BitBudget`] when the sum and its headroom need more
    /// than 32 bits.
    pub fn with_noise(mut self, variance: u64, participants: usize) -> Result<Self, ProtocolError> {
        if variance > 0 {
            DiscreteGaussian::new(variance)?; // the sampler's range
        }
        let participants = participants.max(1);
        let headroom = noise_headroom(participants, variance);
        let largest =
            participants as u128 * u128::from(self.max_weight) * u128::from(levels(self.bits))
                + 2 * u128::from(headroom);
        let ring_bits = bit_length(largest);
        if ring_bits > MAX_RING_BITS {
            return Err(ProtocolError::BitBudget(format!(
                "{}-bit quantisation × weights up to {} × {participants} participants with \
                 noise of standard deviation {:.0} ring units each needs {ring_bits} bits, \
                 the ring has {MAX_RING_BITS}: lower --secagg-bits, the noise or the L2 bound",
                self.bits,
                self.max_weight,
                (variance as f64).sqrt()
            )));
        }
        self.noise_variance = variance;
        self.noise_headroom = headroom;
        self.ring_bits = ring_bits.max(self.ring_bits);
        self.validate()?;
        Ok(self)
    }

    /// The same parameters with L2 norm bound `max_norm` (`None`: none).
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] for a bound that is not finite and
    /// positive.
    pub fn with_max_norm(mut self, max_norm: Option<f32>) -> Result<Self, ProtocolError> {
        self.max_norm = max_norm;
        self.validate()?;
        Ok(self)
    }

    /// `2^m - 1`: AND with this to reduce mod `2^m`.
    pub fn ring_mask(&self) -> u32 {
        levels(self.ring_bits) as u32
    }

    /// Bytes per masked element on the wire (`m / 8`).
    pub fn bytes_per_element(&self) -> f64 {
        f64::from(self.ring_bits) / 8.0
    }

    /// Quantisation step `2c / (2^b - 1)`: the decoded weighted mean is within
    /// one step of the weighted mean of the clipped inputs.
    pub fn step(&self) -> f32 {
        (2.0 * f64::from(self.clip) / levels(self.bits) as f64) as f32
    }

    /// Checks parameters that may have arrived over the wire.
    fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |what: String| Err(ProtocolError::InvalidConfig(what));
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!(
                "clipping bound {} is not finite and > 0",
                self.clip
            ));
        }
        if let Some(n) = self.max_norm
            && !(n.is_finite() && n > 0.0)
        {
            return bad(format!("L2 norm bound {n} is not finite and > 0"));
        }
        if !(1..=24).contains(&self.bits) {
            return bad(format!("quantisation bits {} not in 1..=24", self.bits));
        }
        if self.max_weight == 0 {
            return bad("maximum weight 0".into());
        }
        if (self.noise_variance == 0) != (self.noise_headroom == 0)
            || self.noise_variance > crate::privacy::discrete_gaussian::MAX_VARIANCE
            || (self.noise_variance > 0
                && self.noise_headroom < noise_headroom(1, self.noise_variance))
        {
            return bad(format!(
                "noise variance {} with headroom {}",
                self.noise_variance, self.noise_headroom
            ));
        }
        if !(1..=MAX_RING_BITS).contains(&self.ring_bits)
            || bit_length(
                u128::from(self.max_weight) * u128::from(levels(self.bits))
                    + 2 * u128::from(self.noise_headroom),
            ) > self.ring_bits
        {
            return bad(format!(
                "ring of {} bits cannot hold one {}-bit input of weight {}",
                self.ring_bits, self.bits, self.max_weight
            ));
        }
        Ok(())
    }
}

/// The [`ProtocolError::BitBudget`] message: what is needed and, for each of
/// bits, weights and participants, the largest value that fits (others fixed).
fn budget_advice(bits: u32, max_weight: u32, participants: usize, needed: u32) -> String {
    let budget = u128::from(u32::MAX); // largest sum that fits in 32 bits
    let n = participants as u128;
    let w = u128::from(max_weight);
    let q = u128::from(levels(bits));
    let mut fixes = Vec::new();
    if let Some(b) = (1..bits)
        .rev()
        .find(|&b| n * w * u128::from(levels(b)) <= budget)
    {
        fixes.push(format!("lower --secagg-bits to {b}"));
    }
    let w_max = budget / (n * q);
    if w_max >= 1 {
        fixes.push(format!("cap weights at {w_max}"));
    }
    let n_max = budget / (w * q);
    if n_max >= 1 {
        fixes.push(format!("use at most {n_max} participants"));
    }
    let advice = match fixes.len() {
        0 => "no single change fits; lower several of them".to_string(),
        1 => fixes.remove(0),
        _ => {
            let last = fixes.pop().unwrap_or_default();
            format!("{}, or {last}", fixes.join(", "))
        }
    };
    format!(
        "{bits}-bit quantisation × weights up to {max_weight} × {participants} participants \
         needs {needed} bits, the ring has {MAX_RING_BITS}: {advice}"
    )
}

/// Encodes `update` with weight `weight` (1..=max_weight) into `d + 1` ring
/// elements (each `< 2^m`).
///
/// Stochastic rounding rounds up with probability equal to the fractional
/// part, compared against a 32-bit uniform per element (so `E[q]` is exact
/// up to `2^-32` of a level). The uniforms are 4 bytes per element of a
/// [`KeystreamRng`] seeded with 32 bytes of `rng`, drawn in blocks of 4 KiB,
/// whatever the data.
///
/// # Errors
/// [`ProtocolError::InvalidContribution`] for a weight outside
/// `1..=max_weight` or a NaN in `update`; [`ProtocolError::InvalidConfig`]
/// for inconsistent `params`.
pub fn encode(
    params: &EncodingParams,
    update: &[f32],
    weight: u32,
    rng: &mut impl CryptoRng,
) -> Result<Vec<u32>, ProtocolError> {
    params.validate()?;
    if !(1..=params.max_weight).contains(&weight) {
        return Err(ProtocolError::InvalidContribution(format!(
            "weight {weight} outside 1..={}",
            params.max_weight
        )));
    }
    if let Some(i) = update.iter().position(|x| x.is_nan()) {
        return Err(ProtocolError::InvalidContribution(format!(
            "update element {i} is NaN"
        )));
    }
    let c = f64::from(params.clip);
    let top = levels(params.bits) as f64;
    let quantiser = Quantiser {
        c,
        top,
        scale: top / (2.0 * c),
        shrink: norm_scale(params.max_norm, update),
        weight,
    };
    let mut out = vec![0u32; update.len() + 1];
    // The uniforms come from a keystream seeded by `rng` (AES-CTR where the
    // CPU has AES instructions: about twice as fast as `StdRng`), drawn in
    // blocks, 32 bits per element.
    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut seed[..]);
    let mut uniforms = KeystreamRng::new(PrgKind::fastest(), &seed);
    let mut random = [0u8; 4 * ENCODE_BLOCK];
    for (block, dst) in update
        .chunks(ENCODE_BLOCK)
        .zip(out.chunks_mut(ENCODE_BLOCK))
    {
        let random = &mut random[..4 * block.len()];
        uniforms.fill_bytes(random);
        quantiser.run(block, random, dst);
    }
    random.zeroize();
    if params.noise_variance > 0 {
        let noise = DiscreteGaussian::new(params.noise_variance)?;
        let values = &mut out[..update.len()];
        noise.add_to(rng, values);
        let mask = params.ring_mask();
        values.iter_mut().for_each(|v| *v &= mask);
    }
    out[update.len()] = weight;
    Ok(out)
}

/// Stochastic rounding of one block of an update, weighted: the inner loop
/// of [`encode`]. The crates build for baseline x86-64 (SSE2); where the CPU
/// has AVX2 the loop runs compiled for it (same results: no fused steps).
struct Quantiser {
    /// Clipping bound.
    c: f64,
    /// Largest level, `2^b - 1`.
    top: f64,
    /// Levels per unit, `top / 2c`.
    scale: f64,
    /// The norm bound's factor.
    shrink: f64,
    /// The contribution's weight.
    weight: u32,
}

impl Quantiser {
    /// `dst[i] = weight * round(x[i])`, rounding up when the `i`-th 32-bit
    /// little-endian uniform of `random` is below the fractional part.
    fn run(&self, x: &[f32], random: &[u8], dst: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature `run_avx2` is compiled for.
            return unsafe { self.run_avx2(x, random, dst) };
        }
        self.body(x, random, dst);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self, x: &[f32], random: &[u8], dst: &mut [u32]) {
        self.body(x, random, dst);
    }

    #[inline(always)]
    fn body(&self, x: &[f32], random: &[u8], dst: &mut [u32]) {
        let Quantiser {
            c,
            top,
            scale,
            shrink,
            weight,
        } = *self;
        for ((o, &x), r) in dst.iter_mut().zip(x).zip(random.as_chunks::<4>().0) {
            // No NaN reaches here (encode refuses them), so `clamp` is a
            // plain min/max pair, which vectorises.
            let clipped = (f64::from(x) * shrink).clamp(-c, c);
            let scaled = ((clipped + c) * scale).clamp(0.0, top);
            // SAFETY: 0 <= scaled <= 2^24 - 1 (bits <= 24, checked by
            // validate), so it is in i32's range, where truncation is floor.
            let floor = unsafe { scaled.to_int_unchecked::<i32>() };
            let frac = scaled - f64::from(floor);
            // The 32-bit uniform through a signed conversion (SSE2 and AVX2
            // have no unsigned one): the same value as `r as f64`, exactly.
            let r = u32::from_le_bytes(*r).wrapping_sub(1 << 31) as i32;
            let u = (f64::from(r) + 2_147_483_648.0) * (1.0 / 4_294_967_296.0);
            let q = floor as u32 + u32::from(u < frac);
            // w * q <= max_weight * (2^b - 1) < 2^m <= 2^32 (checked by validate).
            *o = weight * q;
        }
    }
}

/// The factor `min(1, C / ‖update‖₂)` that brings `update` within the L2
/// norm bound `C` (1 without a bound; infinities count as the largest
/// float, so an infinite update is scaled to finite values).
fn norm_scale(max_norm: Option<f32>, update: &[f32]) -> f64 {
    let Some(bound) = max_norm else {
        return 1.0;
    };
    let norm = update
        .iter()
        .map(|&x| {
            let x = f64::from(x.clamp(f32::MIN, f32::MAX));
            x * x
        })
        .sum::<f64>()
        .sqrt();
    if norm > f64::from(bound) {
        f64::from(bound) / norm
    } else {
        1.0
    }
}

/// Decodes an unmasked ring sum (`d + 1` elements) into the weighted mean
/// update and the total weight.
///
/// # Errors
/// Total weight 0, or a sum inconsistent with the weights (a corrupted sum).
/// An empty `sum` is [`ProtocolError::Malformed`], the others
/// [`ProtocolError::Crypto`] (a wrong unmasking is the usual cause).
pub fn decode(params: &EncodingParams, sum: &[u32]) -> Result<(Vec<f32>, u64), ProtocolError> {
    params.validate()?;
    let Some((&total, values)) = sum.split_last() else {
        return Err(ProtocolError::Malformed(
            "empty secure-aggregation sum (the total weight is missing)".into(),
        ));
    };
    let mask = params.ring_mask();
    let total = u64::from(total & mask);
    if total == 0 {
        return Err(ProtocolError::Crypto(
            "unmasked total weight is 0 (no contributions, or a wrong unmasking)".into(),
        ));
    }
    let top = levels(params.bits);
    let limit = i64::try_from(total * top).unwrap_or(i64::MAX);
    // Each sum as the integer in [-H, 2^m - H): noise may take it below 0.
    let h = params.noise_headroom;
    let signed =
        |v: u32| -> i64 { (u64::from(v).wrapping_add(h) & u64::from(mask)) as i64 - h as i64 };
    let slack = h as i64;
    if let Some(i) = values
        .iter()
        .position(|&v| !(-slack..=limit.saturating_add(slack)).contains(&signed(v)))
    {
        return Err(ProtocolError::Crypto(format!(
            "unmasked sum is inconsistent with total weight {total} at element {i} \
             (a wrong unmasking or a corrupted sum)"
        )));
    }
    let c = f64::from(params.clip);
    let factor = 2.0 * c / (total as f64 * top as f64);
    let mean = values
        .iter()
        .map(|&v| (signed(v) as f64 * factor - c) as f32)
        .collect();
    Ok((mean, total))
}

/// `ceil(len * bits / 8)`, or `None` on overflow.
pub(crate) fn packed_len(len: usize, bits: u32) -> Option<usize> {
    len.checked_mul(bits as usize)?
        .checked_add(7)
        .map(|b| b / 8)
}

/// Packs `values` (each `< 2^bits`) into `ceil(len * bits / 8)` bytes, little-endian bit order.
///
/// `bits` must be in 1..=32 (0 gives no bytes, more than 32 counts as 32);
/// bits of a value above `bits` are dropped.
pub fn pack(values: &[u32], bits: u32) -> Vec<u8> {
    if bits == 0 {
        return Vec::new();
    }
    let bits = bits.min(32);
    debug_assert!(
        values.iter().all(|&v| u64::from(v) <= levels(bits)),
        "value >= 2^{bits}"
    );
    let total = packed_len(values.len(), bits).unwrap_or(usize::MAX);
    let mut out = vec![0u8; total];
    macro_rules! dispatch {
        ($($b:literal)*) => {
            match bits {
                8 => pack_bytes::<1>(values, &mut out),
                16 => pack_bytes::<2>(values, &mut out),
                24 => pack_bytes::<3>(values, &mut out),
                32 => pack_bytes::<4>(values, &mut out),
                $($b => pack_bits::<$b>(values, &mut out),)*
                _ => unreachable!("bits is in 1..=32"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 9 10 11 12 13 14 15 17 18 19 20 21 22 23 25 26 27 28 29 30 31);
    out
}

/// Packs values whose width is a whole number `W` of bytes.
fn pack_bytes<const W: usize>(values: &[u32], out: &mut [u8]) {
    for (chunk, v) in out.as_chunks_mut::<W>().0.iter_mut().zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes()[..W]);
    }
}

/// Packs 8 values of `B` bits into exactly `B` bytes (value `j` at bits
/// `jB..(j+1)B`) through four 64-bit words; `B` is a constant, so the
/// loop unrolls into register shifts.
#[inline(always)]
fn pack_group<const B: usize>(group: &[u32; 8]) -> [u8; 32] {
    let mask = (1u64 << B) - 1;
    let mut acc = [0u64; 5];
    for (j, &v) in group.iter().enumerate() {
        let v = u64::from(v) & mask;
        let (w, shift) = (j * B / 64, j * B % 64);
        acc[w] |= v << shift;
        if shift + B > 64 {
            acc[w + 1] |= v >> (64 - shift);
        }
    }
    let mut out = [0u8; 32];
    for (dst, word) in out.as_chunks_mut::<8>().0.iter_mut().zip(acc) {
        *dst = word.to_le_bytes();
    }
    out
}

/// Packs values of `B` (< 32, not a multiple of 8) bits, 8 values (`B`
/// bytes) at a time; a short last group is zero-padded.
fn pack_bits<const B: usize>(values: &[u32], out: &mut [u8]) {
    let (groups, rest) = values.as_chunks::<8>();
    let (out_groups, out_rest) = out.split_at_mut(groups.len() * B);
    for (group, dst) in groups.iter().zip(out_groups.chunks_exact_mut(B)) {
        dst.copy_from_slice(&pack_group::<B>(group)[..B]);
    }
    if !rest.is_empty() {
        let mut last = [0u32; 8];
        last[..rest.len()].copy_from_slice(rest);
        let bytes = pack_group::<B>(&last);
        out_rest.copy_from_slice(&bytes[..out_rest.len()]);
    }
}

/// Unpacks `len` values of `bits` bits; errors if `bytes` has the wrong length.
///
/// # Errors
/// [`ProtocolError::Malformed`] when `bytes` is not exactly
/// `ceil(len * bits / 8)` long, when padding bits in the last byte are set,
/// or when `bits` is not in 1..=32.
pub fn unpack(bytes: &[u8], bits: u32, len: usize) -> Result<Vec<u32>, ProtocolError> {
    check_packed(bytes, bits, len)?;
    let mut out = Vec::with_capacity(len);
    for_each_unpacked(bytes, bits, len, |values| out.extend_from_slice(values));
    Ok(out)
}

/// Adds the `acc.len()` values of `bits` bits packed in `bytes` to `acc`
/// element by element (wrapping): [`unpack`] and a sum in one pass, without
/// a vector per input (how the coordinator sums masked inputs). The values
/// are below `2^bits` by construction.
///
/// # Errors
/// As [`unpack`]; `acc` is untouched then (every check comes first).
pub fn unpack_add(bytes: &[u8], bits: u32, acc: &mut [u32]) -> Result<(), ProtocolError> {
    check_packed(bytes, bits, acc.len())?;
    let mut rest = &mut acc[..];
    for_each_unpacked(bytes, bits, rest.len(), |values| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(values.len());
        for (a, v) in head.iter_mut().zip(values) {
            *a = a.wrapping_add(*v);
        }
        rest = tail;
    });
    Ok(())
}

/// Checks that `bytes` can hold exactly `len` values of `bits` bits: the
/// errors of [`unpack`].
fn check_packed(bytes: &[u8], bits: u32, len: usize) -> Result<(), ProtocolError> {
    if !(1..=32).contains(&bits) {
        return Err(ProtocolError::Malformed(format!(
            "cannot unpack {bits}-bit values"
        )));
    }
    let expected = packed_len(len, bits)
        .ok_or_else(|| ProtocolError::Malformed(format!("{len} values of {bits} bits overflow")))?;
    if bytes.len() != expected {
        return Err(ProtocolError::Malformed(format!(
            "packed vector of {} bytes, expected {expected} for {len} values of {bits} bits",
            bytes.len()
        )));
    }
    let used = (len * bits as usize % 8) as u32;
    if let Some(&last) = bytes.last()
        && used != 0
        && last >> used != 0
    {
        return Err(ProtocolError::Malformed(
            "packed vector has non-zero padding bits".into(),
        ));
    }
    Ok(())
}

/// Values handed to the sink of [`for_each_unpacked`] at a time (a multiple
/// of 8; 1 KiB, so a batch stays in L1).
const UNPACK_BATCH: usize = 256;

/// Unpacks the `len` values in `bytes` (checked by [`check_packed`]) and
/// hands them to `sink` in order, in batches of up to [`UNPACK_BATCH`].
fn for_each_unpacked(bytes: &[u8], bits: u32, len: usize, mut sink: impl FnMut(&[u32])) {
    macro_rules! dispatch {
        ($($b:literal)*) => {
            match bits {
                8 => unpack_bytes::<1>(bytes, &mut sink),
                16 => unpack_bytes::<2>(bytes, &mut sink),
                24 => unpack_bytes::<3>(bytes, &mut sink),
                32 => unpack_bytes::<4>(bytes, &mut sink),
                $($b => unpack_bits::<$b>(bytes, len, &mut sink),)*
                _ => unreachable!("bits is in 1..=32"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 9 10 11 12 13 14 15 17 18 19 20 21 22 23 25 26 27 28 29 30 31)
}

/// Unpacks the values of `bytes` whose width is a whole number `W` of bytes.
fn unpack_bytes<const W: usize>(bytes: &[u8], sink: &mut impl FnMut(&[u32])) {
    let mut batch = [0u32; UNPACK_BATCH];
    for block in bytes.chunks(W * UNPACK_BATCH) {
        let chunks = block.as_chunks::<W>().0;
        for (v, chunk) in batch.iter_mut().zip(chunks) {
            let mut word = [0u8; 4];
            word[..W].copy_from_slice(chunk);
            *v = u32::from_le_bytes(word);
        }
        sink(&batch[..chunks.len()]);
    }
}

/// Unpacks 8 values of `B` bits from a group of `B` bytes (zero-padded to
/// 32) through four 64-bit words.
#[inline(always)]
fn unpack_group<const B: usize>(buf: &[u8; 32]) -> [u32; 8] {
    let mask = (1u64 << B) - 1;
    let mut acc = [0u64; 5];
    for (word, src) in acc.iter_mut().zip(buf.as_chunks::<8>().0) {
        *word = u64::from_le_bytes(*src);
    }
    core::array::from_fn(|j| {
        let (w, shift) = (j * B / 64, j * B % 64);
        let mut v = acc[w] >> shift;
        if shift + B > 64 {
            v |= acc[w + 1] << (64 - shift);
        }
        (v & mask) as u32
    })
}

/// Unpacks `len` values of `B` (< 32, not a multiple of 8) bits, 8 at a time.
fn unpack_bits<const B: usize>(bytes: &[u8], len: usize, sink: &mut impl FnMut(&[u32])) {
    let groups = len / 8;
    let (in_groups, in_rest) = bytes.split_at(groups * B);
    let mut batch = [0u32; UNPACK_BATCH];
    let mut buf = [0u8; 32];
    for block in in_groups.chunks(B * UNPACK_BATCH / 8) {
        let (out, _) = batch.as_chunks_mut::<8>();
        let mut n = 0;
        for (src, dst) in block.chunks_exact(B).zip(out) {
            buf[..B].copy_from_slice(src);
            *dst = unpack_group::<B>(&buf);
            n += 8;
        }
        sink(&batch[..n]);
    }
    let rest = len - groups * 8;
    if rest > 0 {
        let mut buf = [0u8; 32];
        buf[..in_rest.len()].copy_from_slice(in_rest);
        sink(&unpack_group::<B>(&buf)[..rest]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// The rounding loop gives the same words whichever build of it runs
    /// (AVX2 or baseline), and every word is the weight times the floor or
    /// the ceiling of the scaled value, the ceiling exactly when the
    /// uniform is below the fraction.
    #[test]
    fn the_rounding_loop_is_the_same_in_every_build() {
        let mut rng = StdRng::seed_from_u64(11);
        let n = 3 * 1024 + 7;
        let x: Vec<f32> = (0..n)
            .map(|k| match k % 5 {
                0 => f32::INFINITY,
                1 => -3.5,
                _ => (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 2.5,
            })
            .collect();
        let mut random = vec![0u8; 4 * n];
        rng.fill_bytes(&mut random);
        let q = Quantiser {
            c: 1.0,
            top: 65535.0,
            scale: 65535.0 / 2.0,
            shrink: 1.0,
            weight: 3,
        };
        let (mut fast, mut plain) = (vec![0u32; n], vec![0u32; n]);
        q.run(&x, &random, &mut fast);
        q.body(&x, &random, &mut plain);
        assert_eq!(fast, plain);
        for (k, (&w, &v)) in plain.iter().zip(&x).enumerate() {
            let scaled = ((f64::from(v).clamp(-1.0, 1.0) + 1.0) * q.scale).clamp(0.0, q.top);
            let u = f64::from(u32::from_le_bytes(
                random[4 * k..4 * k + 4].try_into().unwrap(),
            )) / 4_294_967_296.0;
            let level = scaled.floor()
                + if u < scaled - scaled.floor() {
                    1.0
                } else {
                    0.0
                };
            assert_eq!(w, 3 * level as u32, "element {k} ({v})");
        }
    }

    fn params(clip: f32, bits: u32, max_weight: u32, n: usize) -> EncodingParams {
        EncodingParams::new(clip, bits, max_weight, n).unwrap()
    }

    #[test]
    fn updates_longer_than_the_norm_bound_are_scaled_down_to_it() {
        let p = params(1.0, 16, 1, 1).with_max_norm(Some(2.0)).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        // Norm 5 (100 × 0.5): scaled by 2/5 to 0.2 each.
        let (mean, w) = decode(&p, &encode(&p, &[0.5; 100], 1, &mut rng).unwrap()).unwrap();
        assert_eq!(w, 1);
        for x in &mean {
            assert!((x - 0.2).abs() <= p.step(), "{x}");
        }
        // Norm 1: left alone.
        let (mean, _) = decode(&p, &encode(&p, &[0.1; 100], 1, &mut rng).unwrap()).unwrap();
        for x in &mean {
            assert!((x - 0.1).abs() <= p.step(), "{x}");
        }
        // An infinite element is scaled to a finite, bounded update.
        let mut update = vec![0.0f32; 10];
        update[3] = f32::INFINITY;
        let (mean, _) = decode(&p, &encode(&p, &update, 1, &mut rng).unwrap()).unwrap();
        let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm <= 1.0 + 10.0 * p.step(), "{norm}");
    }

    #[test]
    fn a_norm_bound_must_be_finite_and_positive() {
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let err = params(1.0, 16, 1, 1).with_max_norm(Some(bad)).unwrap_err();
            assert!(err.to_string().contains("norm bound"), "{err}");
        }
        assert_eq!(
            params(1.0, 16, 1, 1).with_max_norm(None).unwrap().max_norm,
            None
        );
    }

    #[test]
    fn ring_bits_and_accessors() {
        let p = params(1.0, 16, 1, 1);
        assert_eq!(p.ring_bits, 16);
        assert_eq!(p.ring_mask(), 0xffff);
        assert_eq!(p.bytes_per_element(), 2.0);
        assert!((p.step() - 2.0 / 65535.0).abs() < 1e-9);
        // 1000 * 100 * 255 = 25_500_000 < 2^25.
        let p = params(0.5, 8, 100, 1000);
        assert_eq!(p.ring_bits, 25);
        assert_eq!(p.ring_mask(), (1 << 25) - 1);
        assert_eq!(p.bytes_per_element(), 25.0 / 8.0);
        let p = params(1.0, 1, 1, 1);
        assert_eq!(p.ring_bits, 1);
        assert_eq!(p.ring_mask(), 1);
        assert_eq!(p.step(), 2.0);
    }

    #[test]
    fn bit_budget_boundary() {
        // 2^8 participants * 2^8 weight * (2^16 - 1) < 2^32: exactly 32 bits.
        let p = params(1.0, 16, 256, 256);
        assert_eq!(p.ring_bits, 32);
        assert_eq!(p.ring_mask(), u32::MAX);
        // One more participant needs 33 bits.
        let err = EncodingParams::new(1.0, 16, 256, 257).unwrap_err();
        let ProtocolError::BitBudget(msg) = err else {
            panic!("expected BitBudget, got {err:?}");
        };
        assert!(msg.contains("needs 33 bits"), "{msg}");
        assert!(msg.contains("use at most 256 participants"), "{msg}");
        assert!(msg.contains("cap weights at 255"), "{msg}");
        assert!(msg.contains("lower --secagg-bits to 15"), "{msg}");
    }

    #[test]
    fn bit_budget_message() {
        let err = EncodingParams::new(1.0, 16, 65536, 1000).unwrap_err();
        let ProtocolError::BitBudget(msg) = err else {
            panic!("expected BitBudget, got {err:?}");
        };
        assert!(
            msg.starts_with(
                "16-bit quantisation × weights up to 65536 × 1000 participants needs 42 bits, \
                 the ring has 32: lower --secagg-bits to 6, cap weights at 65"
            ),
            "{msg}"
        );
        // Nothing fits by changing one knob alone: say so.
        let err = EncodingParams::new(1.0, 24, u32::MAX, usize::MAX).unwrap_err();
        assert!(matches!(err, ProtocolError::BitBudget(m) if m.contains("no single change")));
    }

    #[test]
    fn invalid_parameters() {
        for (clip, bits, w, n) in [
            (0.0, 8, 1, 1),
            (-1.0, 8, 1, 1),
            (f32::NAN, 8, 1, 1),
            (f32::INFINITY, 8, 1, 1),
            (1.0, 0, 1, 1),
            (1.0, 25, 1, 1),
            (1.0, 8, 0, 1),
            (1.0, 8, 1, 0),
        ] {
            assert!(
                matches!(
                    EncodingParams::new(clip, bits, w, n),
                    Err(ProtocolError::InvalidConfig(_))
                ),
                "{clip} {bits} {w} {n}"
            );
        }
    }

    #[test]
    fn encode_rejects_bad_input() {
        let p = params(1.0, 8, 4, 10);
        let mut rng = StdRng::seed_from_u64(1);
        for w in [0, 5] {
            assert!(matches!(
                encode(&p, &[0.0], w, &mut rng),
                Err(ProtocolError::InvalidContribution(_))
            ));
        }
        assert!(matches!(
            encode(&p, &[0.0, f32::NAN], 1, &mut rng),
            Err(ProtocolError::InvalidContribution(_))
        ));
        // Parameters from the wire are checked too.
        let mut bad = p;
        bad.ring_bits = 40;
        assert!(encode(&bad, &[0.0], 1, &mut rng).is_err());
        assert!(decode(&bad, &[0, 1]).is_err());
        let mut bad = p;
        bad.bits = 0;
        assert!(encode(&bad, &[0.0], 1, &mut rng).is_err());
        let mut bad = p;
        bad.ring_bits = 9; // cannot hold 4 * 255
        assert!(encode(&bad, &[0.0], 1, &mut rng).is_err());
    }

    #[test]
    fn encode_layout_and_extremes() {
        let p = params(2.0, 4, 3, 5);
        let mut rng = StdRng::seed_from_u64(2);
        let y = encode(
            &p,
            &[-5.0, -2.0, 2.0, 7.0, f32::INFINITY, f32::NEG_INFINITY],
            3,
            &mut rng,
        )
        .unwrap();
        assert_eq!(y, vec![0, 0, 45, 45, 45, 0, 3]);
        assert!(encode(&p, &[], 2, &mut rng).unwrap() == vec![2]);
    }

    #[test]
    fn decode_rejects_bad_sums() {
        let p = params(1.0, 8, 2, 3);
        assert!(matches!(decode(&p, &[]), Err(ProtocolError::Malformed(_))));
        assert!(matches!(decode(&p, &[5, 0]), Err(ProtocolError::Crypto(_))));
        // Total weight 2 allows element sums up to 2 * 255.
        assert!(decode(&p, &[510, 2]).is_ok());
        assert!(matches!(
            decode(&p, &[511, 2]),
            Err(ProtocolError::Crypto(_))
        ));
        // Bits above the ring are ignored (reduced mod 2^m).
        let high = 1u32 << p.ring_bits;
        assert_eq!(decode(&p, &[high | 10, high | 2]).unwrap().1, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn single_participant_within_one_step(
            bits in 1u32..=24,
            clip in 0.01f32..100.0,
            w in 1u32..=50,
            xs in proptest::collection::vec(-200.0f32..200.0, 0..64),
            seed: u64,
        ) {
            let p = params(clip, bits, 50, 3);
            let mut rng = StdRng::seed_from_u64(seed);
            let y = encode(&p, &xs, w, &mut rng).unwrap();
            prop_assert_eq!(y.len(), xs.len() + 1);
            prop_assert!(y.iter().all(|&v| v <= p.ring_mask()));
            let (mean, total) = decode(&p, &y).unwrap();
            prop_assert_eq!(total, u64::from(w));
            let tol = p.step() * 1.0001 + clip * 1e-6;
            for (x, m) in xs.iter().zip(&mean) {
                let clipped = x.clamp(-clip, clip);
                prop_assert!((m - clipped).abs() <= tol, "{} vs {} (step {})", m, clipped, p.step());
            }
        }

        #[test]
        fn ring_sum_decodes_weighted_mean(
            bits in 1u32..=16,
            n in 1usize..=12,
            d in 1usize..=16,
            seed: u64,
        ) {
            let max_weight = 20;
            let clip = 1.5f32;
            let p = params(clip, bits, max_weight, n);
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sum = vec![0u32; d + 1];
            let mut weighted = vec![0f64; d];
            let mut total = 0u64;
            for _ in 0..n {
                let w = rng.random_range(1..=max_weight);
                let xs: Vec<f32> = (0..d).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let y = encode(&p, &xs, w, &mut rng).unwrap();
                // Masks would make each element uniform: add one and remove it later.
                let mask: Vec<u32> = (0..=d).map(|_| rng.next_u32()).collect();
                for ((s, v), m) in sum.iter_mut().zip(&y).zip(&mask) {
                    *s = s.wrapping_add(v.wrapping_add(*m));
                }
                for (s, m) in sum.iter_mut().zip(&mask) {
                    *s = s.wrapping_sub(*m);
                }
                for (acc, x) in weighted.iter_mut().zip(&xs) {
                    *acc += f64::from(w) * f64::from(x.clamp(-clip, clip));
                }
                total += u64::from(w);
            }
            for s in &mut sum {
                *s &= p.ring_mask();
            }
            let (mean, got_total) = decode(&p, &sum).unwrap();
            prop_assert_eq!(got_total, total);
            let tol = f64::from(p.step()) * 1.0001 + 1e-5;
            for (m, acc) in mean.iter().zip(&weighted) {
                let expected = acc / total as f64;
                prop_assert!((f64::from(*m) - expected).abs() <= tol, "{} vs {}", m, expected);
            }
        }

        #[test]
        fn pack_round_trip(bits in 1u32..=32, len in 0usize..300, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mask = levels(bits) as u32;
            let values: Vec<u32> = (0..len).map(|_| rng.next_u32() & mask).collect();
            let bytes = pack(&values, bits);
            prop_assert_eq!(bytes.len(), (len * bits as usize).div_ceil(8));
            prop_assert_eq!(unpack(&bytes, bits, len).unwrap(), values.clone());
            // Wrong lengths are rejected.
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(matches!(unpack(&longer, bits, len), Err(ProtocolError::Malformed(_))));
            if !bytes.is_empty() {
                prop_assert!(matches!(
                    unpack(&bytes[..bytes.len() - 1], bits, len),
                    Err(ProtocolError::Malformed(_))
                ));
            }
            prop_assert!(unpack(&bytes, bits, len + 8).is_err());
            // unpack_add sums the same values, and leaves the sum alone when
            // it rejects the input.
            let before: Vec<u32> = (0..len).map(|_| rng.next_u32()).collect();
            let mut acc = before.clone();
            unpack_add(&bytes, bits, &mut acc).unwrap();
            for ((a, b), v) in acc.iter().zip(&before).zip(&values) {
                prop_assert_eq!(*a, b.wrapping_add(*v));
            }
            let mut acc = before.clone();
            prop_assert!(unpack_add(&longer, bits, &mut acc).is_err());
            prop_assert_eq!(&acc, &before);
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let p = params(1.0, 4, 1, 1);
        let mut rng = StdRng::seed_from_u64(3);
        // 0.3 maps to (1.3 / 2) * 15 = 9.75: q is 9 or 10, E[q] = 9.75.
        let x = [0.3f32; 1];
        let runs = 10_000;
        let mut sum = 0f64;
        for _ in 0..runs {
            sum += f64::from(encode(&p, &x, 1, &mut rng).unwrap()[0]);
        }
        let mean = sum / runs as f64;
        let exact = (1.3 / 2.0) * 15.0;
        let std_err = (0.75f64 * 0.25 / runs as f64).sqrt();
        assert!((mean - exact).abs() < 5.0 * std_err, "{mean} vs {exact}");
    }

    #[test]
    fn pack_known_layout() {
        // Little-endian bit order: value 0 occupies the lowest bits of byte 0.
        assert_eq!(pack(&[1, 2, 3], 2), vec![0b00_11_10_01]);
        assert_eq!(pack(&[0x1ff, 0], 9), vec![0xff, 0x01, 0x00]);
        assert_eq!(pack(&[0x12345], 20), vec![0x45, 0x23, 0x01]);
        assert_eq!(pack(&[0xabcdef, 1], 24), vec![0xef, 0xcd, 0xab, 1, 0, 0]);
        assert_eq!(pack(&[], 13), Vec::<u8>::new());
        assert_eq!(unpack(&[0x45, 0x23, 0x01], 20, 1).unwrap(), vec![0x12345]);
    }

    #[test]
    fn unpack_rejects_bad_input() {
        assert!(unpack_add(&[0b0000_0111], 2, &mut [5]).is_err());
        assert!(unpack_add(&[1, 0], 8, &mut [5]).is_err());
        assert!(unpack(&[], 0, 0).is_err());
        assert!(unpack(&[], 33, 0).is_err());
        assert!(unpack(&[0; 4], 32, 2).is_err());
        assert!(unpack(&[0; 4], 16, usize::MAX).is_err());
        // Padding bits of the last byte must be zero.
        assert!(unpack(&[0b0000_0111], 2, 1).is_err());
        assert_eq!(unpack(&[0b0000_0011], 2, 1).unwrap(), vec![3]);
    }

    /// Exercises the fast paths on a large vector (dev profile: keep modest).
    #[test]
    fn pack_large() {
        let mut rng = StdRng::seed_from_u64(4);
        for bits in [7, 8, 16, 20, 24, 31, 32] {
            let mask = levels(bits) as u32;
            let values: Vec<u32> = (0..100_001).map(|_| rng.next_u32() & mask).collect();
            let bytes = pack(&values, bits);
            assert_eq!(unpack(&bytes, bits, values.len()).unwrap(), values);
            let mut acc = vec![u32::MAX; values.len()];
            unpack_add(&bytes, bits, &mut acc).unwrap();
            assert!(
                acc.iter()
                    .zip(&values)
                    .all(|(a, v)| *a == v.wrapping_sub(1))
            );
        }
    }
}
