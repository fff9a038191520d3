//! Mask expansion: a 32-byte seed becomes a stream of `u32` mask words from a
//! standard stream cipher's raw keystream (never through RNG traits, so both
//! sides regenerate masks bit for bit).
//!
//! - [`PrgKind::Aes128Ctr`]: AES-128 in CTR mode (big-endian 128-bit counter),
//!   key = seed[0..16], initial counter block = seed[16..32]. Used where the
//!   CPU has AES instructions.
//! - [`PrgKind::ChaCha12`]: ChaCha12 with key = seed, nonce = 12 zero bytes,
//!   counter from 0. Used otherwise.
//!
//! Mask word `k` is the little-endian `u32` at keystream bytes `4k..4k+4`.
//! Seeds are fresh per round and per pair, so a fixed nonce is safe.

use aes::Aes128;
use chacha20::ChaCha12;
use ctr::{
    Ctr128BE,
    cipher::{KeyIvInit, StreamCipher},
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Which stream cipher expands mask seeds. Chosen by the coordinator at run
/// time ([`PrgKind::fastest`]) and recorded in the round so both sides agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrgKind {
    /// AES-128-CTR.
    Aes128Ctr,
    /// ChaCha12.
    ChaCha12,
}

impl PrgKind {
    /// AES-128-CTR when this CPU has AES instructions, ChaCha12 otherwise.
    pub fn fastest() -> PrgKind {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            if std::arch::is_x86_feature_detected!("aes") {
                return PrgKind::Aes128Ctr;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes") {
                return PrgKind::Aes128Ctr;
            }
        }
        PrgKind::ChaCha12
    }
}

/// Mask words generated per keystream chunk: 8 KiB of keystream, small
/// enough to stay in L1 between generation and use.
const CHUNK_WORDS: usize = 2048;

/// How a chunk of mask words is combined into the output.
#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Set,
}

/// `out[k] = op(out[k], word k of the keystream)`: the keystream is written
/// chunk by chunk into a stack buffer and combined as little-endian words.
#[inline(always)]
fn expand<C: StreamCipher>(mut cipher: C, out: &mut [u32], op: Op) {
    let mut buf = [0u8; 4 * CHUNK_WORDS];
    for chunk in out.chunks_mut(CHUNK_WORDS) {
        let bytes = &mut buf[..4 * chunk.len()];
        cipher.write_keystream(bytes);
        combine(chunk, bytes, op);
    }
}

/// `chunk[k] = op(chunk[k], little-endian word k of bytes)`.
#[inline(always)]
fn combine(chunk: &mut [u32], bytes: &[u8], op: Op) {
    let (words, _) = bytes.as_chunks::<4>();
    match op {
        Op::Add => {
            for (o, w) in chunk.iter_mut().zip(words) {
                *o = o.wrapping_add(u32::from_le_bytes(*w));
            }
        }
        Op::Sub => {
            for (o, w) in chunk.iter_mut().zip(words) {
                *o = o.wrapping_sub(u32::from_le_bytes(*w));
            }
        }
        Op::Set => {
            for (o, w) in chunk.iter_mut().zip(words) {
                *o = u32::from_le_bytes(*w);
            }
        }
    }
}

/// The stream cipher of `kind` keyed from `seed` as the module doc says:
/// the one place the keystream layout is defined. Short-lived or held by
/// one generator, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Keystream {
    Aes(Ctr128BE<Aes128>),
    ChaCha(ChaCha12),
}

impl Keystream {
    fn new(kind: PrgKind, seed: &[u8; 32]) -> Self {
        match kind {
            PrgKind::Aes128Ctr => {
                let (halves, _) = seed.as_chunks::<16>();
                Keystream::Aes(Ctr128BE::<Aes128>::new(
                    &halves[0].into(),
                    &halves[1].into(),
                ))
            }
            PrgKind::ChaCha12 => Keystream::ChaCha(ChaCha12::new(seed.into(), &[0u8; 12].into())),
        }
    }

    fn write(&mut self, bytes: &mut [u8]) {
        match self {
            Keystream::Aes(c) => c.write_keystream(bytes),
            Keystream::ChaCha(c) => c.write_keystream(bytes),
        }
    }
}

fn apply(kind: PrgKind, seed: &[u8; 32], out: &mut [u32], op: Op) {
    if out.is_empty() {
        return;
    }
    // Monomorphised per cipher, so the chunk loop has no dispatch inside.
    match Keystream::new(kind, seed) {
        Keystream::Aes(cipher) => expand(cipher, out, op),
        Keystream::ChaCha(cipher) => expand(cipher, out, op),
    }
}

/// `out[k] = out[k].wrapping_add(mask[k])` for the mask stream of `seed`.
pub fn add_mask(kind: PrgKind, seed: &[u8; 32], out: &mut [u32]) {
    apply(kind, seed, out, Op::Add);
}

/// `out[k] = out[k].wrapping_sub(mask[k])` for the mask stream of `seed`.
pub fn sub_mask(kind: PrgKind, seed: &[u8; 32], out: &mut [u32]) {
    apply(kind, seed, out, Op::Sub);
}

/// One mask stream of a sum of masks: its seed and whether it is added.
pub struct MaskTerm<'a> {
    /// The stream's seed.
    pub seed: &'a [u8; 32],
    /// `true`: `+PRG(seed)`, `false`: `-PRG(seed)`.
    pub add: bool,
}

/// `out[k] = out[k] ± word k of each term's stream`: the same words as
/// [`add_mask`] and [`sub_mask`] term after term, but chunk by chunk over
/// all terms, so each chunk of `out` stays in L1 while every stream passes
/// over it (one pass over `out` instead of one per term).
pub fn add_masks(kind: PrgKind, terms: &[MaskTerm<'_>], out: &mut [u32]) {
    if out.is_empty() || terms.is_empty() {
        return;
    }
    let mut streams: Vec<(Keystream, Op)> = terms
        .iter()
        .map(|t| {
            let op = if t.add { Op::Add } else { Op::Sub };
            (Keystream::new(kind, t.seed), op)
        })
        .collect();
    let mut buf = Zeroizing::new([0u8; 4 * CHUNK_WORDS]);
    for chunk in out.chunks_mut(CHUNK_WORDS) {
        let bytes = &mut buf[..4 * chunk.len()];
        for (stream, op) in &mut streams {
            stream.write(bytes);
            combine(chunk, bytes, *op);
        }
    }
}

/// Writes the raw mask stream of `seed` into `out` (for benchmarks: the
/// keystream lower bound, and for tests).
pub fn fill_mask(kind: PrgKind, seed: &[u8; 32], out: &mut [u32]) {
    apply(kind, seed, out, Op::Set);
}

/// Keystream bytes buffered by [`KeystreamRng`]: 4 KiB, refilled in one
/// call so AES-NI or ChaCha's SIMD backend work on many blocks at once.
const RNG_BUFFER: usize = 4096;

/// The keystream of [`PrgKind`] from a 32-byte seed, as a cryptographically
/// secure RNG (same key and counter layout as the mask stream: its bytes are
/// [`fill_mask`]'s, in order). For bulk secret randomness such as DP-SGD's
/// Gaussian noise: with AES instructions it gives random bits about twice
/// as fast as `StdRng` (ChaCha12 in software). The buffer of unused
/// keystream is zeroised on drop.
pub struct KeystreamRng {
    cipher: Keystream,
    buf: Box<[u8; RNG_BUFFER]>,
    pos: usize,
}

impl KeystreamRng {
    /// The keystream of `kind` keyed with `seed` (fresh secret randomness
    /// for every generator: the stream is a function of the seed alone).
    pub fn new(kind: PrgKind, seed: &[u8; 32]) -> Self {
        Self {
            cipher: Keystream::new(kind, seed),
            buf: Box::new([0u8; RNG_BUFFER]),
            pos: RNG_BUFFER,
        }
    }

    fn refill(&mut self) {
        self.cipher.write(&mut self.buf[..]);
        self.pos = 0;
    }

    /// The next `N` keystream bytes (the unused tail of the buffer is
    /// skipped when shorter than `N`).
    #[inline]
    fn take<const N: usize>(&mut self) -> [u8; N] {
        if self.pos + N > RNG_BUFFER {
            self.refill();
        }
        let bytes = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("N bytes were just checked to be left");
        self.pos += N;
        bytes
    }
}

impl Drop for KeystreamRng {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf[..]);
    }
}

impl rand::TryRng for KeystreamRng {
    type Error = core::convert::Infallible;

    #[inline]
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(u32::from_le_bytes(self.take::<4>()))
    }

    #[inline]
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(u64::from_le_bytes(self.take::<8>()))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        let mut filled = 0;
        while filled < dst.len() {
            if self.pos == RNG_BUFFER {
                // Nothing buffered: a long request takes the keystream
                // straight from the cipher (the same bytes, without a copy).
                if dst.len() - filled >= RNG_BUFFER {
                    self.cipher.write(&mut dst[filled..]);
                    return Ok(());
                }
                self.refill();
            }
            let n = (dst.len() - filled).min(RNG_BUFFER - self.pos);
            dst[filled..filled + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            filled += n;
        }
        Ok(())
    }
}

impl rand::TryCryptoRng for KeystreamRng {}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockCipherEncrypt, KeyInit};
    use rand::{Rng, SeedableRng};

    const KINDS: [PrgKind; 2] = [PrgKind::Aes128Ctr, PrgKind::ChaCha12];
    const LENGTHS: [usize; 7] = [0, 1, 1023, 1024, 1025, 2049, 100_003];

    fn seed(tag: u8) -> [u8; 32] {
        core::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(tag))
    }

    /// AES-128-CTR computed block by block: key = seed[..16], counter block
    /// = seed[16..] incremented as a big-endian 128-bit integer.
    fn aes_reference(seed: &[u8; 32], words: usize) -> Vec<u32> {
        let cipher = Aes128::new(&seed[..16].try_into().unwrap());
        let mut ctr = u128::from_be_bytes(seed[16..].try_into().unwrap());
        let mut bytes = Vec::new();
        while bytes.len() < 4 * words {
            let mut block = ctr.to_be_bytes().into();
            cipher.encrypt_block(&mut block);
            bytes.extend_from_slice(&block);
            ctr = ctr.wrapping_add(1);
        }
        words_le(&bytes[..4 * words])
    }

    /// ChaCha12 through the RNG with the same key (64-bit counter, stream
    /// 0: the same keystream as nonce 0 for the first 2^32 blocks).
    fn chacha_reference(seed: &[u8; 32], words: usize) -> Vec<u32> {
        let mut rng = chacha20::ChaCha12Rng::from_seed(*seed);
        let mut bytes = vec![0u8; 4 * words];
        rng.fill_bytes(&mut bytes);
        words_le(&bytes)
    }

    fn words_le(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn mask(kind: PrgKind, seed: &[u8; 32], len: usize) -> Vec<u32> {
        let mut out = vec![0u32; len];
        fill_mask(kind, seed, &mut out);
        out
    }

    /// Summing the terms chunk by chunk gives what adding and subtracting
    /// them one after another gives, at every length (chunk edges too).
    #[test]
    fn fused_masks_are_the_terms_one_by_one() {
        for kind in KINDS {
            for len in LENGTHS {
                let seeds: Vec<[u8; 32]> = (0..5).map(|t| seed(40 + t)).collect();
                let start: Vec<u32> = (0..len as u32)
                    .map(|k| k.wrapping_mul(2_654_435_761))
                    .collect();
                let mut expected = start.clone();
                for (t, s) in seeds.iter().enumerate() {
                    if t % 2 == 0 {
                        add_mask(kind, s, &mut expected);
                    } else {
                        sub_mask(kind, s, &mut expected);
                    }
                }
                let terms: Vec<MaskTerm<'_>> = seeds
                    .iter()
                    .enumerate()
                    .map(|(t, seed)| MaskTerm {
                        seed,
                        add: t % 2 == 0,
                    })
                    .collect();
                let mut got = start.clone();
                add_masks(kind, &terms, &mut got);
                assert_eq!(got, expected, "{kind:?}, {len} words");
                let mut untouched = start.clone();
                add_masks(kind, &[], &mut untouched);
                assert_eq!(untouched, start);
            }
        }
    }

    /// The RNG hands out the mask stream's bytes in order, whatever mix of
    /// word sizes it is asked for (a 4-byte read that leaves fewer than 8
    /// bytes in the buffer makes the next 8-byte read skip them).
    #[test]
    fn keystream_rng_is_the_mask_stream() {
        for kind in KINDS {
            let s = seed(9);
            let words = mask(kind, &s, 3 * RNG_BUFFER / 4);
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut rng = KeystreamRng::new(kind, &s);
            let mut got = vec![0u8; 13];
            rng.fill_bytes(&mut got);
            assert_eq!(got, bytes[..13]);
            // u32s up to the last whole one in the buffer (3 bytes are left).
            let mut pos = 13;
            while pos + 4 <= RNG_BUFFER {
                assert_eq!(
                    rng.next_u32().to_le_bytes(),
                    bytes[pos..pos + 4],
                    "{kind:?} at byte {pos}"
                );
                pos += 4;
            }
            assert_eq!(
                rng.next_u64().to_le_bytes(),
                bytes[RNG_BUFFER..RNG_BUFFER + 8]
            );
            let mut more = vec![0u8; RNG_BUFFER + 5];
            rng.fill_bytes(&mut more);
            assert_eq!(more, bytes[RNG_BUFFER + 8..2 * RNG_BUFFER + 13]);
            // Long requests on an empty buffer come straight from the
            // cipher: still the same stream, and the buffer resumes after.
            let mut fresh = KeystreamRng::new(kind, &s);
            let mut long = vec![0u8; 2 * RNG_BUFFER + 3];
            fresh.fill_bytes(&mut long);
            assert_eq!(long, bytes[..2 * RNG_BUFFER + 3]);
            assert_eq!(
                fresh.next_u32().to_le_bytes(),
                bytes[2 * RNG_BUFFER + 3..2 * RNG_BUFFER + 7]
            );
        }
    }

    #[test]
    fn aes_known_answer() {
        // FIPS-197 appendix C.1: AES-128(000102..0f, 00112233..ff).
        let mut s = [0u8; 32];
        for i in 0..16 {
            s[i] = i as u8;
            s[16 + i] = (i as u8) * 0x11;
        }
        let expected = [0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30];
        let m = mask(PrgKind::Aes128Ctr, &s, 2);
        assert_eq!(m, words_le(&expected));
    }

    #[test]
    fn fill_matches_independent_keystream() {
        for len in LENGTHS {
            let s = seed(len as u8);
            assert_eq!(mask(PrgKind::Aes128Ctr, &s, len), aes_reference(&s, len));
            assert_eq!(mask(PrgKind::ChaCha12, &s, len), chacha_reference(&s, len));
        }
    }

    #[test]
    fn aes_counter_wraps_around() {
        let mut s = seed(1);
        s[16..].fill(0xff);
        assert_eq!(
            mask(PrgKind::Aes128Ctr, &s, 100),
            aes_reference(&s, 100),
            "the counter wraps modulo 2^128"
        );
    }

    #[test]
    fn prefix_consistent_across_lengths() {
        for kind in KINDS {
            let long = mask(kind, &seed(3), 100_003);
            for len in LENGTHS {
                assert_eq!(mask(kind, &seed(3), len), long[..len]);
            }
        }
    }

    #[test]
    fn add_then_sub_restores() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for kind in KINDS {
            for len in LENGTHS {
                let original: Vec<u32> = (0..len).map(|_| rng.next_u32()).collect();
                let mut v = original.clone();
                add_mask(kind, &seed(9), &mut v);
                if len > 0 {
                    assert_ne!(v, original);
                }
                let m = mask(kind, &seed(9), len);
                for ((a, o), w) in v.iter().zip(&original).zip(&m) {
                    assert_eq!(*a, o.wrapping_add(*w));
                }
                sub_mask(kind, &seed(9), &mut v);
                assert_eq!(v, original);
            }
        }
    }

    #[test]
    fn seeds_and_kinds_differ() {
        for kind in KINDS {
            assert_ne!(mask(kind, &seed(1), 64), mask(kind, &seed(2), 64));
        }
        let mut s = seed(1);
        s[31] ^= 1;
        for kind in KINDS {
            assert_ne!(mask(kind, &seed(1), 64), mask(kind, &s, 64));
        }
        assert_ne!(
            mask(PrgKind::Aes128Ctr, &seed(1), 64),
            mask(PrgKind::ChaCha12, &seed(1), 64)
        );
    }

    #[test]
    fn fastest_is_consistent() {
        let kind = PrgKind::fastest();
        assert_eq!(kind, PrgKind::fastest());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            kind == PrgKind::Aes128Ctr,
            std::arch::is_x86_feature_detected!("aes")
        );
    }
}
