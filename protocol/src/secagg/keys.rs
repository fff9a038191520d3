//! Key agreement and derivations: fresh X25519 key pairs every round,
//! HKDF-SHA256 bound to the session and round, and ChaCha20-Poly1305 for the
//! shares routed through the coordinator.
//!
//! Derivations (all HKDF-SHA256, salt = `"greyfed/secagg/v1" || session_id
//! (8 bytes BE) || round (4 bytes BE) || sum (1 byte: 0 for the update sum, 1
//! for the evaluation sum)`, ikm = the X25519 shared secret, info = label ||
//! setup digest (32 bytes, [`setup_digest`](crate::secagg::auth::setup_digest))
//! || lo || hi (4 bytes BE each, `lo < hi` the two ids) || pk(lo) || pk(hi)
//! (the two public keys that made the shared secret)), 32 bytes each:
//! - pairwise mask seed of `a` and `b`: label `"pairwise-mask"`, the `s` keys;
//! - share-channel key of `a` and `b`: label `"share-key"`, the `c` keys.
//!
//! Binding the setup means two participants given different setups derive
//! unrelated keys (their masks do not cancel and their shares do not open);
//! binding the public keys ties each key to the exact agreement behind it.
//!
//! Shares are sealed with ChaCha20-Poly1305 under the share-channel key,
//! nonce = `from (4 bytes BE) || to (4 bytes BE) || 0u32`, associated data =
//! salt || from || to, so a ciphertext cannot be replayed to another round,
//! sum, pair or direction.

use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit,
    aead::{Aead, Payload},
};
use hkdf::Hkdf;
use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use crate::{
    error::ProtocolError,
    message::{ParticipantId, SumKind},
    secagg::shamir::{CHUNKS, MODULUS, Share},
};

/// Domain-separation prefix of every salt.
const DOMAIN: &[u8] = b"greyfed/secagg/v1";

/// Session, round and sum a derivation is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundContext {
    /// Coordinator session id.
    pub session_id: u64,
    /// Round number.
    pub round: u32,
    /// Which of the round's sums (updates or evaluation metrics).
    pub sum: SumKind,
}

impl RoundContext {
    /// The context of the update sum of `round`.
    pub fn update(session_id: u64, round: u32) -> Self {
        Self {
            session_id,
            round,
            sum: SumKind::Update,
        }
    }

    /// `"greyfed/secagg/v1" || session_id (8 bytes BE) || round (4 bytes BE)
    /// || sum (1 byte: 0 updates, 1 evaluation)`.
    fn salt(&self) -> Vec<u8> {
        let mut salt = Vec::with_capacity(DOMAIN.len() + 13);
        salt.extend_from_slice(DOMAIN);
        salt.extend_from_slice(&self.session_id.to_be_bytes());
        salt.extend_from_slice(&self.round.to_be_bytes());
        salt.push(match self.sum {
            SumKind::Update => 0,
            SumKind::Evaluation => 1,
        });
        salt
    }
}

/// An X25519 key pair, zeroised on drop.
pub struct KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let public: String = self.public.as_bytes()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(f, "KeyPair {{ public: {public}…, secret: <redacted> }}")
    }
}

impl KeyPair {
    /// A fresh key pair.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self::from_secret_bytes(bytes)
    }

    /// Rebuilds a key pair from its 32 secret bytes (after Shamir reconstruction).
    pub fn from_secret_bytes(mut bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        bytes.zeroize();
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The secret bytes, for Shamir sharing only.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// X25519 with `peer`; errors on a low-order peer key (all-zero shared secret).
    pub fn agree(&self, peer: &[u8; 32]) -> Result<[u8; 32], ProtocolError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(ProtocolError::Crypto(
                "peer public key has low order (all-zero shared secret)".into(),
            ));
        }
        Ok(shared.to_bytes())
    }
}

/// One side of a key agreement: a participant and the public key it used.
pub type PairEnd = (ParticipantId, [u8; 32]);

/// HKDF-SHA256(salt = ctx, ikm = shared, info = label || setup || lo || hi
/// || pk(lo) || pk(hi)) → 32 bytes.
fn derive(
    shared: &[u8; 32],
    ctx: &RoundContext,
    setup_digest: &[u8; 32],
    label: &[u8],
    a: PairEnd,
    b: PairEnd,
) -> [u8; 32] {
    let (lo, hi) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut info = Vec::with_capacity(label.len() + 32 + 8 + 64);
    info.extend_from_slice(label);
    info.extend_from_slice(setup_digest);
    info.extend_from_slice(&lo.0.to_be_bytes());
    info.extend_from_slice(&hi.0.to_be_bytes());
    info.extend_from_slice(&lo.1);
    info.extend_from_slice(&hi.1);
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&ctx.salt()), shared)
        .expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Seed of the pairwise mask between `a` and `b` (symmetric in `a`, `b`),
/// with their mask-agreement public keys.
pub fn pairwise_mask_seed(
    shared: &[u8; 32],
    ctx: &RoundContext,
    setup_digest: &[u8; 32],
    a: PairEnd,
    b: PairEnd,
) -> [u8; 32] {
    derive(shared, ctx, setup_digest, b"pairwise-mask", a, b)
}

/// Key of the share channel between `a` and `b` (symmetric), with their
/// share-channel public keys.
pub fn share_channel_key(
    shared: &[u8; 32],
    ctx: &RoundContext,
    setup_digest: &[u8; 32],
    a: PairEnd,
    b: PairEnd,
) -> [u8; 32] {
    derive(shared, ctx, setup_digest, b"share-key", a, b)
}

/// What `from` sends `to` in stage 2: its shares of its `s` secret key and of
/// its self-mask seed `b` (secret: not `Copy`; the shares zeroise
/// themselves when dropped and show only their `x` in `Debug`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharePair {
    /// Sender.
    pub from: ParticipantId,
    /// Recipient.
    pub to: ParticipantId,
    /// Share of the sender's mask-agreement secret key.
    pub key_share: Share,
    /// Share of the sender's self-mask seed.
    pub self_mask_share: Share,
}

/// Bytes of one share in the sealed plaintext: x then the 5 values, u64 BE.
const SHARE_BYTES: usize = 8 * (1 + CHUNKS);
/// Plaintext: from (u32 BE) || to (u32 BE) || key_share || self_mask_share.
const PLAINTEXT_BYTES: usize = 8 + 2 * SHARE_BYTES;
/// Poly1305 tag length.
const TAG_BYTES: usize = 16;
/// Length of a sealed share pair: 104 bytes of plaintext plus the tag.
pub const SEALED_SHARE_PAIR_BYTES: usize = PLAINTEXT_BYTES + TAG_BYTES;

fn write_share(out: &mut Vec<u8>, share: &Share) {
    out.extend_from_slice(&share.x.to_be_bytes());
    for y in &share.y {
        out.extend_from_slice(&y.to_be_bytes());
    }
}

/// Reads a share from exactly [`SHARE_BYTES`] bytes; every value must be a
/// field element and x non-zero.
fn read_share(bytes: &[u8]) -> Option<Share> {
    let (words, rest) = bytes.as_chunks::<8>();
    if words.len() != 1 + CHUNKS || !rest.is_empty() {
        return None;
    }
    let x = u64::from_be_bytes(words[0]);
    let mut y = [0u64; CHUNKS];
    for (v, w) in y.iter_mut().zip(&words[1..]) {
        *v = u64::from_be_bytes(*w);
    }
    (x != 0 && x < MODULUS && y.iter().all(|&v| v < MODULUS)).then_some(Share { x, y })
}

/// Nonce `from || to || 0u32` and associated data `salt || from || to`.
fn nonce_and_aad(
    ctx: &RoundContext,
    from: ParticipantId,
    to: ParticipantId,
) -> ([u8; 12], Vec<u8>) {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&from.to_be_bytes());
    nonce[4..8].copy_from_slice(&to.to_be_bytes());
    let mut aad = ctx.salt();
    aad.extend_from_slice(&from.to_be_bytes());
    aad.extend_from_slice(&to.to_be_bytes());
    (nonce, aad)
}

/// Encrypts `pair` from `pair.from` to `pair.to` under `key`.
///
/// Plaintext layout (104 bytes, all integers big-endian): `from` (u32),
/// `to` (u32), then each share as `x` (u64) and its 5 values (u64):
/// `key_share` first, `self_mask_share` second. The output is the
/// ChaCha20-Poly1305 ciphertext with its 16-byte tag appended
/// ([`SEALED_SHARE_PAIR_BYTES`] bytes). The nonce depends only on the
/// direction, so each key must seal at most one pair per direction.
pub fn seal_share_pair(key: &[u8; 32], ctx: &RoundContext, pair: &SharePair) -> Vec<u8> {
    let mut plaintext = Vec::with_capacity(PLAINTEXT_BYTES);
    plaintext.extend_from_slice(&pair.from.to_be_bytes());
    plaintext.extend_from_slice(&pair.to.to_be_bytes());
    write_share(&mut plaintext, &pair.key_share);
    write_share(&mut plaintext, &pair.self_mask_share);
    let (nonce, aad) = nonce_and_aad(ctx, pair.from, pair.to);
    let cipher = ChaCha20Poly1305::new(key.into());
    let sealed = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .expect("ChaCha20-Poly1305 accepts a 104-byte message");
    plaintext.zeroize();
    sealed
}

/// Decrypts and checks a sealed share pair claimed to be from `from` to `to`.
///
/// # Errors
/// Authentication failure, malformed plaintext, or ids that differ from the claim.
/// All are [`ProtocolError::Crypto`].
pub fn open_share_pair(
    key: &[u8; 32],
    ctx: &RoundContext,
    from: ParticipantId,
    to: ParticipantId,
    ciphertext: &[u8],
) -> Result<SharePair, ProtocolError> {
    if ciphertext.len() != SEALED_SHARE_PAIR_BYTES {
        return Err(ProtocolError::Crypto(format!(
            "sealed share pair from {from} to {to} has {} bytes, expected {SEALED_SHARE_PAIR_BYTES}",
            ciphertext.len()
        )));
    }
    let (nonce, aad) = nonce_and_aad(ctx, from, to);
    let cipher = ChaCha20Poly1305::new(key.into());
    let mut plaintext = cipher
        .decrypt(
            &nonce.into(),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| {
            ProtocolError::Crypto(format!(
                "share pair from {from} to {to} failed authentication \
                 (wrong key, round or sender, or tampered)"
            ))
        })?;
    let parsed = parse_share_pair(&plaintext);
    plaintext.zeroize();
    let pair = parsed.ok_or_else(|| {
        ProtocolError::Crypto(format!("share pair from {from} to {to} is malformed"))
    })?;
    if pair.from != from || pair.to != to {
        return Err(ProtocolError::Crypto(format!(
            "share pair claimed from {from} to {to} names {} to {}",
            pair.from, pair.to
        )));
    }
    Ok(pair)
}

fn parse_share_pair(plaintext: &[u8]) -> Option<SharePair> {
    if plaintext.len() != PLAINTEXT_BYTES {
        return None;
    }
    let (ids, shares) = plaintext.split_at(8);
    let (from, to) = ids.split_at(4);
    let (key_share, self_mask_share) = shares.split_at(SHARE_BYTES);
    Some(SharePair {
        from: u32::from_be_bytes(from.try_into().ok()?),
        to: u32::from_be_bytes(to.try_into().ok()?),
        key_share: read_share(key_share)?,
        self_mask_share: read_share(self_mask_share)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    const CTX: RoundContext = RoundContext {
        session_id: 0x0102_0304_0506_0708,
        round: 7,
        sum: SumKind::Update,
    };

    fn pair(from: ParticipantId, to: ParticipantId) -> SharePair {
        let share = |x: u64, base: u64| Share {
            x,
            y: core::array::from_fn(|i| (base + i as u64 * 0x1_0000_0001) % MODULUS),
        };
        SharePair {
            from,
            to,
            key_share: share(u64::from(to) + 1, 11),
            self_mask_share: share(u64::from(to) + 1, MODULUS - 10),
        }
    }

    #[test]
    fn agreement_is_symmetric() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = KeyPair::generate(&mut rng);
        let b = KeyPair::generate(&mut rng);
        let ab = a.agree(&b.public()).unwrap();
        assert_eq!(ab, b.agree(&a.public()).unwrap());
        let c = KeyPair::generate(&mut rng);
        assert_ne!(ab, a.agree(&c.public()).unwrap());
        // Rebuilding from the secret bytes gives the same key pair.
        let a2 = KeyPair::from_secret_bytes(a.secret_bytes());
        assert_eq!(a2.public(), a.public());
        assert_eq!(a2.agree(&b.public()).unwrap(), ab);
    }

    #[test]
    fn rfc7748_vector() {
        // RFC 7748 section 6.1.
        let hex = |s: &str| -> [u8; 32] {
            core::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        };
        let alice = KeyPair::from_secret_bytes(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            alice.public(),
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let shared = alice
            .agree(&hex(
                "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
            ))
            .unwrap();
        assert_eq!(
            shared,
            hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }

    #[test]
    fn low_order_keys_are_rejected() {
        let mut rng = StdRng::seed_from_u64(2);
        let a = KeyPair::generate(&mut rng);
        let mut one = [0u8; 32];
        one[0] = 1;
        for low in [[0u8; 32], one] {
            assert!(matches!(a.agree(&low), Err(ProtocolError::Crypto(_))));
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let a = KeyPair::from_secret_bytes([0xab; 32]);
        let text = format!("{a:?}");
        assert!(!text.contains("abab"), "{text}");
        assert!(text.contains("redacted"));
    }

    const SETUP: [u8; 32] = [0x5e; 32];

    #[test]
    fn derivations_are_symmetric_and_separated() {
        let shared = [9u8; 32];
        let (a, b) = ((3, [0xaa; 32]), (8, [0xbb; 32]));
        let seed = pairwise_mask_seed(&shared, &CTX, &SETUP, a, b);
        assert_eq!(seed, pairwise_mask_seed(&shared, &CTX, &SETUP, b, a));
        let key = share_channel_key(&shared, &CTX, &SETUP, a, b);
        assert_eq!(key, share_channel_key(&shared, &CTX, &SETUP, b, a));
        assert_ne!(seed, key);
        assert_ne!(seed, pairwise_mask_seed(&shared, &CTX, &SETUP, a, (9, b.1)));
        assert_ne!(seed, pairwise_mask_seed(&[8u8; 32], &CTX, &SETUP, a, b));
        // The setup and both public keys are bound.
        assert_ne!(seed, pairwise_mask_seed(&shared, &CTX, &[0; 32], a, b));
        assert_ne!(
            seed,
            pairwise_mask_seed(&shared, &CTX, &SETUP, (3, [0; 32]), b)
        );
        assert_ne!(
            seed,
            pairwise_mask_seed(&shared, &CTX, &SETUP, a, (8, [0; 32]))
        );
        let other_round = RoundContext { round: 8, ..CTX };
        assert_ne!(
            seed,
            pairwise_mask_seed(&shared, &other_round, &SETUP, a, b)
        );
        let other_session = RoundContext {
            session_id: 1,
            ..CTX
        };
        assert_ne!(
            seed,
            pairwise_mask_seed(&shared, &other_session, &SETUP, a, b)
        );
        let evaluation = RoundContext {
            sum: SumKind::Evaluation,
            ..CTX
        };
        assert_ne!(seed, pairwise_mask_seed(&shared, &evaluation, &SETUP, a, b));
    }

    /// The documented derivation, computed with HMAC directly (RFC 5869).
    #[test]
    fn derivation_matches_rfc5869_by_hand() {
        use hkdf::hmac::{Hmac, Mac};
        let shared = [5u8; 32];
        let mut salt = b"greyfed/secagg/v1".to_vec();
        salt.extend_from_slice(&CTX.session_id.to_be_bytes());
        salt.extend_from_slice(&CTX.round.to_be_bytes());
        salt.push(0); // SumKind::Update
        let mut mac = <Hmac<Sha256> as hkdf::hmac::KeyInit>::new_from_slice(&salt).unwrap();
        mac.update(&shared);
        let prk = mac.finalize().into_bytes();
        let mut mac = <Hmac<Sha256> as hkdf::hmac::KeyInit>::new_from_slice(&prk).unwrap();
        mac.update(b"pairwise-mask");
        mac.update(&SETUP);
        mac.update(&2u32.to_be_bytes());
        mac.update(&5u32.to_be_bytes());
        mac.update(&[0x22; 32]);
        mac.update(&[0x55; 32]);
        mac.update(&[1]);
        let okm: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(
            pairwise_mask_seed(&shared, &CTX, &SETUP, (5, [0x55; 32]), (2, [0x22; 32])),
            okm
        );
    }

    #[test]
    fn seal_open_round_trip() {
        let key = [3u8; 32];
        let p = pair(4, 9);
        let sealed = seal_share_pair(&key, &CTX, &p);
        assert_eq!(sealed.len(), SEALED_SHARE_PAIR_BYTES);
        assert_eq!(open_share_pair(&key, &CTX, 4, 9, &sealed).unwrap(), p);
    }

    #[test]
    fn open_rejects_everything_wrong() {
        let key = [3u8; 32];
        let sealed = seal_share_pair(&key, &CTX, &pair(4, 9));
        let crypto =
            |r: Result<SharePair, ProtocolError>| matches!(r, Err(ProtocolError::Crypto(_)));
        // Wrong key.
        assert!(crypto(open_share_pair(&[4u8; 32], &CTX, 4, 9, &sealed)));
        // Tampered ciphertext or tag, anywhere.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x20;
            assert!(crypto(open_share_pair(&key, &CTX, 4, 9, &t)), "byte {i}");
        }
        // Wrong claimed sender, recipient, or swapped direction.
        assert!(crypto(open_share_pair(&key, &CTX, 5, 9, &sealed)));
        assert!(crypto(open_share_pair(&key, &CTX, 4, 8, &sealed)));
        assert!(crypto(open_share_pair(&key, &CTX, 9, 4, &sealed)));
        // Another round or session.
        let r = RoundContext { round: 8, ..CTX };
        assert!(crypto(open_share_pair(&key, &r, 4, 9, &sealed)));
        let s = RoundContext {
            session_id: 2,
            ..CTX
        };
        assert!(crypto(open_share_pair(&key, &s, 4, 9, &sealed)));
        // Truncated, extended, empty.
        for len in [0, 1, 16, sealed.len() - 1] {
            assert!(crypto(open_share_pair(&key, &CTX, 4, 9, &sealed[..len])));
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(crypto(open_share_pair(&key, &CTX, 4, 9, &longer)));
    }

    /// A sender that seals inconsistent ids or out-of-field values under the
    /// right nonce and AAD is still refused after decryption.
    #[test]
    fn open_rejects_authentic_but_malformed_plaintext() {
        let key = [3u8; 32];
        let seal_raw = |from: u32, to: u32, plaintext: &[u8]| {
            let (nonce, aad) = nonce_and_aad(&CTX, from, to);
            ChaCha20Poly1305::new(&key.into())
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: plaintext,
                        aad: &aad,
                    },
                )
                .unwrap()
        };
        let mut good = Vec::new();
        let p = pair(4, 9);
        good.extend_from_slice(&4u32.to_be_bytes());
        good.extend_from_slice(&9u32.to_be_bytes());
        write_share(&mut good, &p.key_share);
        write_share(&mut good, &p.self_mask_share);
        assert_eq!(
            open_share_pair(&key, &CTX, 4, 9, &seal_raw(4, 9, &good)).unwrap(),
            p
        );

        let mut wrong_ids = good.clone();
        wrong_ids[3] = 5;
        let mut bad_value = good.clone();
        bad_value[8 + 8..8 + 16].copy_from_slice(&MODULUS.to_be_bytes());
        let mut zero_x = good.clone();
        zero_x[8..16].fill(0);
        for plaintext in [wrong_ids, bad_value, zero_x] {
            assert!(matches!(
                open_share_pair(&key, &CTX, 4, 9, &seal_raw(4, 9, &plaintext)),
                Err(ProtocolError::Crypto(_))
            ));
        }
    }
}
