//! Authenticated secure aggregation: what each participant signs, how its
//! peers check it, and the floors a participant enforces on the round
//! parameters a coordinator hands out.
//!
//! The coordinator relays every stage-1 key, so without authentication it
//! could swap in keys of its own, open the shares sent to them and unmask
//! one participant's input. Here each participant signs its stage-1
//! statement with the private key of its TLS client certificate and sends
//! the certificate along; every neighbour checks the certificate (chain,
//! usage, allow list: [`PeerVerifier`]), that the identities are distinct,
//! and the signature. The signed statement binds the session, round, sum,
//! sender id, both public keys, a commitment to the self-mask seed and the
//! digest of the whole [`RoundSetup`], which itself names the digest of the
//! model the round trains or evaluates. A coordinator that gives two
//! participants different setups or different models therefore breaks
//! every signature between them, and the round aborts before any share is
//! sealed.
//!
//! Before revealing shares (stage 4), participants sign the set of
//! survivors `U3` the coordinator announced, and each participant unmasks
//! only after at least `t` members of its neighbourhood (itself included)
//! signed the same set: the consistency check of Bonawitz et al. (CCS
//! 2017, round 4).
//!
//! Statements (all integers big-endian):
//! - keys: `"greyfed/secagg/keys/v1" || setup digest || sum || id || c_pk || s_pk || commitment(b)`;
//! - survivors: `"greyfed/secagg/survivors/v1" || setup digest || sum || id || count || ids…`.
//!
//! The setup digest is SHA-256 over `"greyfed/secagg/setup/v1"` and the
//! setup's fields in a fixed order ([`setup_digest`]); the self-mask
//! commitment is SHA-256 over `"greyfed/secagg/self-mask/v1" || b`
//! ([`self_mask_commitment`]), which lets the coordinator check a
//! reconstructed seed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    error::ProtocolError,
    message::{ParticipantId, SumKind},
    privacy::DistributedNoise,
    secagg::{
        encode::EncodingParams,
        graph::{graph_params, threshold_for},
        message::RoundSetup,
        prg::PrgKind,
    },
};

/// Largest credential (DER certificate) a participant may send.
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;
/// Largest signature a participant may send (RSA-4096 needs 512 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 1024;

/// A signature and the TLS 1.3 signature scheme that made it (its IANA
/// code point, e.g. `0x0403` for ECDSA P-256 with SHA-256).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// TLS `SignatureScheme` code point.
    pub scheme: u16,
    /// The signature bytes.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Signature {{ scheme: {:#06x}, {} bytes }}",
            self.scheme,
            self.bytes.len()
        )
    }
}

impl Signature {
    /// Checks the sizes a peer may send.
    pub fn check_size(&self) -> Result<(), ProtocolError> {
        if self.bytes.is_empty() || self.bytes.len() > MAX_SIGNATURE_BYTES {
            return Err(ProtocolError::Malformed(format!(
                "a signature of {} bytes (at most {MAX_SIGNATURE_BYTES})",
                self.bytes.len()
            )));
        }
        Ok(())
    }
}

/// Signs this participant's secure-aggregation statements with the private
/// key of its credential (in deployments: its TLS client certificate, see
/// [`CertificateSigner`](crate::secagg::x509::CertificateSigner)).
pub trait StatementSigner: Send + Sync {
    /// The credential peers check the signatures with (a DER certificate).
    fn credential(&self) -> &[u8];
    /// Signs `statement`.
    ///
    /// # Errors
    /// The key cannot sign (a [`ProtocolError::Crypto`]).
    fn sign(&self, statement: &[u8]) -> Result<Signature, ProtocolError>;
}

/// Checks peers' credentials and signatures (in deployments: the chain to
/// the deployment CA, client usage, validity and an optional allow list;
/// see [`CertificateVerifier`](crate::secagg::x509::CertificateVerifier)).
pub trait PeerVerifier: Send + Sync {
    /// The identity `credential` proves, once it is checked.
    ///
    /// # Errors
    /// The credential is not acceptable (a [`ProtocolError::Crypto`] that
    /// says why).
    fn identity(&self, credential: &[u8]) -> Result<String, ProtocolError>;

    /// Checks that `signature` over `statement` was made by the key of
    /// `credential` (whose identity was checked before).
    ///
    /// # Errors
    /// A bad or unsupported signature (a [`ProtocolError::Crypto`]).
    fn verify(
        &self,
        credential: &[u8],
        statement: &[u8],
        signature: &Signature,
    ) -> Result<(), ProtocolError>;
}

/// The floors a participant enforces on every round's parameters, whatever
/// the coordinator says: a smaller cohort is refused, and the graph degree
/// `k` and threshold `t` must be at least what this participant computes
/// itself from the cohort size and its own bounds ([`graph_params`]):
/// `k` at least the degree needed against its corruption bound `γ` with no
/// dropouts at all, `t` at least the threshold for that `k` when the
/// coordinator plans for the largest dropout fraction this participant
/// tolerates (planning for more dropouts lowers `t`, which helps a
/// coordinator colluding with corrupt participants).
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggPolicy {
    /// Fewest participants a round's cohort, and its announced survivors,
    /// may have.
    pub min_cohort: usize,
    /// The largest dropout fraction `δ` the coordinator may plan for.
    pub max_dropout_fraction: f64,
    /// Bound on the fraction of corrupt participants (`γ`).
    pub corrupt_fraction: f64,
    /// Participant-level DP floor: refuse an update sum whose noise, from
    /// the honest survivors this participant counts on (`n · (1 − δ − γ)`),
    /// gives a noise multiplier below this, or that weighs updates other
    /// than 1 (`None`: no floor; a coordinator may then run without noise).
    pub min_noise_multiplier: Option<f64>,
}

impl Default for SecAggPolicy {
    /// At least 3 participants (with two, each reads the other's update
    /// from the next global model), `γ = 0.1` and `δ` up to 0.3 (the
    /// coordinator's default is 0.1).
    fn default() -> Self {
        Self {
            min_cohort: 3,
            max_dropout_fraction: 0.3,
            corrupt_fraction: 0.1,
            min_noise_multiplier: None,
        }
    }
}

impl SecAggPolicy {
    /// Checks a round's cohort size `n`, degree `k` and threshold `t`.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] naming the floor the setup is under.
    pub fn check(&self, n: usize, degree: usize, threshold: usize) -> Result<(), ProtocolError> {
        if n < self.min_cohort.max(2) {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round's cohort has {n} participants, this participant requires at least {}",
                self.min_cohort.max(2)
            )));
        }
        let (delta, gamma) = (self.max_dropout_fraction, self.corrupt_fraction);
        let local = graph_params(n, 0.0, gamma, false)?;
        graph_params(n, delta, gamma, false)?;
        if degree < local.degree.min(n - 1) {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round's graph degree k = {degree} is below the k = {} this participant \
                 computes for {n} participants (corrupt fraction {gamma})",
                local.degree
            )));
        }
        let needed = threshold_for(n, degree, delta, gamma);
        if threshold < needed {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round's threshold t = {threshold} is below the t = {needed} this \
                 participant computes for k = {degree} of {n} participants (dropout up to \
                 {delta}, corrupt fraction {gamma})"
            )));
        }
        Ok(())
    }

    /// Checks the DP noise of an update sum over `n` participants of `d`
    /// values against [`min_noise_multiplier`](Self::min_noise_multiplier).
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] saying what falls short.
    pub fn check_noise(
        &self,
        encoding: &EncodingParams,
        n: usize,
        d: usize,
    ) -> Result<(), ProtocolError> {
        let Some(floor) = self.min_noise_multiplier else {
            return Ok(());
        };
        if encoding.noise_variance == 0 {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round adds no DP noise; this participant requires a noise multiplier \
                 of at least {floor}"
            )));
        }
        if encoding.max_weight != 1 {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round weighs updates up to {} (DP needs weight 1: a larger weight \
                 multiplies the sensitivity)",
                encoding.max_weight
            )));
        }
        let honest = (n as f64 * (1.0 - self.max_dropout_fraction - self.corrupt_fraction))
            .floor()
            .max(1.0) as usize;
        let z = DistributedNoise::effective_multiplier(encoding, d, honest)?;
        if z < floor {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round's DP noise gives a noise multiplier of {z:.3} from the {honest} \
                 honest survivors this participant counts on, below its floor of {floor}"
            )));
        }
        Ok(())
    }
}

/// What a participant authenticates with and what it demands of a round.
#[derive(Clone)]
pub struct SecAggAuth {
    /// Signs our statements.
    pub signer: Arc<dyn StatementSigner>,
    /// Checks our neighbours'.
    pub verifier: Arc<dyn PeerVerifier>,
    /// Floors on the round parameters.
    pub policy: SecAggPolicy,
}

impl std::fmt::Debug for SecAggAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggAuth")
            .field("credential_bytes", &self.signer.credential().len())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn sum_byte(sum: SumKind) -> u8 {
    match sum {
        SumKind::Update => 0,
        SumKind::Evaluation => 1,
    }
}

/// SHA-256 of a round setup: every field, in a fixed order, under a domain label.
pub fn setup_digest(setup: &RoundSetup) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"greyfed/secagg/setup/v1");
    h.update(setup.session_id.to_be_bytes());
    h.update(setup.round.to_be_bytes());
    h.update([match setup.prg {
        PrgKind::Aes128Ctr => 0u8,
        PrgKind::ChaCha12 => 1,
    }]);
    let e = &setup.encoding;
    h.update(e.clip.to_bits().to_be_bytes());
    h.update(e.bits.to_be_bytes());
    h.update(e.max_weight.to_be_bytes());
    h.update(e.ring_bits.to_be_bytes());
    h.update((setup.graph_order.len() as u64).to_be_bytes());
    for id in &setup.graph_order {
        h.update(id.to_be_bytes());
    }
    h.update(setup.degree.to_be_bytes());
    h.update(setup.threshold.to_be_bytes());
    h.update(setup.num_elements.to_be_bytes());
    h.update(setup.model_digest);
    // A setup without a second input hashes as before the field existed.
    if let Some(p) = &setup.paired {
        h.update(b"paired");
        let e = &p.encoding;
        h.update(e.clip.to_bits().to_be_bytes());
        h.update(e.bits.to_be_bytes());
        h.update(e.max_weight.to_be_bytes());
        h.update(e.ring_bits.to_be_bytes());
        h.update(p.num_elements.to_be_bytes());
    }
    h.finalize().into()
}

/// SHA-256 commitment to a self-mask seed.
pub fn self_mask_commitment(b: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"greyfed/secagg/self-mask/v1");
    h.update(b);
    h.finalize().into()
}

/// The stage-1 statement participant `id` signs.
pub fn keys_statement(
    setup_digest: &[u8; 32],
    sum: SumKind,
    id: ParticipantId,
    c_pk: &[u8; 32],
    s_pk: &[u8; 32],
    commitment: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(22 + 32 + 1 + 4 + 96);
    m.extend_from_slice(b"greyfed/secagg/keys/v1");
    m.extend_from_slice(setup_digest);
    m.push(sum_byte(sum));
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(c_pk);
    m.extend_from_slice(s_pk);
    m.extend_from_slice(commitment);
    m
}

/// The consistency-check statement participant `id` signs over the
/// announced survivors (ascending).
pub fn survivors_statement(
    setup_digest: &[u8; 32],
    sum: SumKind,
    id: ParticipantId,
    survivors: &[ParticipantId],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(27 + 32 + 1 + 4 + 8 + 4 * survivors.len());
    m.extend_from_slice(b"greyfed/secagg/survivors/v1");
    m.extend_from_slice(setup_digest);
    m.push(sum_byte(sum));
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&(survivors.len() as u64).to_be_bytes());
    for s in survivors {
        m.extend_from_slice(&s.to_be_bytes());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_floors() {
        let p = SecAggPolicy::default();
        assert!(p.check(2, 1, 1).is_err(), "two participants");
        // The coordinator's defaults (δ = γ = 0.1) pass, SecAgg+ and full.
        for n in [3, 5, 10, 57, 100, 500, 1000] {
            for full in [false, true] {
                let gp = graph_params(n, 0.1, 0.1, full).unwrap();
                p.check(n, gp.degree, gp.threshold)
                    .unwrap_or_else(|e| panic!("n = {n}, full = {full}: {e}"));
            }
        }
        let gp = graph_params(10, 0.1, 0.1, false).unwrap();
        let err = p.check(10, gp.degree, gp.degree / 2).unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");
        let big = graph_params(500, 0.1, 0.1, false).unwrap();
        let floor = graph_params(500, 0.0, 0.1, false).unwrap().degree;
        assert!(floor <= big.degree);
        let err = p.check(500, floor - 2, floor - 2).unwrap_err();
        assert!(err.to_string().contains("degree"), "{err}");
    }

    #[test]
    fn statements_separate_everything() {
        let d = [1u8; 32];
        let k = |sum, id, c: u8| keys_statement(&d, sum, id, &[c; 32], &[2; 32], &[3; 32]);
        assert_ne!(k(SumKind::Update, 1, 0), k(SumKind::Evaluation, 1, 0));
        assert_ne!(k(SumKind::Update, 1, 0), k(SumKind::Update, 2, 0));
        assert_ne!(k(SumKind::Update, 1, 0), k(SumKind::Update, 1, 9));
        let s = |ids: &[u32]| survivors_statement(&d, SumKind::Update, 1, ids);
        assert_ne!(s(&[1, 2]), s(&[1, 2, 3]));
        assert_ne!(s(&[1, 2]), k(SumKind::Update, 1, 0));
    }
}
