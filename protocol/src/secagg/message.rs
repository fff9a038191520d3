//! Wire types of the four secure-aggregation stages.
//!
//! Coordinator → participant messages ([`SecAggDownload`]) travel as
//! [`Message::SecAgg`](crate::message::Message::SecAgg); participant →
//! coordinator uploads ([`SecAggUpload`]) travel as
//! [`AggregationPayload::SecAgg`](crate::message::AggregationPayload::SecAgg)
//! inside a `Contribution`. Both carry the round number next to them, so a
//! message for another round is refused before it is looked at.
//!
//! ```text
//! participant i                              coordinator
//!                      ◀───────   Setup (parameters, graph order)
//!  AdvertiseKeys       ───────▶   (signed, with certificate)  stage 1
//!                      ◀───────   NeighbourKeys (N1(i), signed)
//!  EncryptedShares     ───────▶                               stage 2
//!                      ◀───────   SharesForYou (from N2(i))
//!  MaskedInput         ───────▶                               stage 3
//!                      ◀───────   SurvivorSet (U3)
//!  SurvivorSignature   ───────▶                               stage 4
//!                      ◀───────   UnmaskRequest (neighbours' signatures)
//!  UnmaskShares        ───────▶                               stage 5
//! ```
//!
//! What is signed and checked: [`auth`](crate::secagg::auth).
//!
//! At any point the coordinator may send [`SecAggDownload::Abort`]: the
//! round is over for that participant (excluded, or the round failed).

use serde::{Deserialize, Serialize};

use crate::{
    error::ProtocolError,
    message::ParticipantId,
    secagg::{
        auth::Signature, encode::EncodingParams, layout::RingLayout, prg::PrgKind, shamir::Share,
    },
};

/// The round parameters every cohort member receives first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSetup {
    /// Coordinator session id (binds every derivation to the session).
    pub session_id: u64,
    /// Round number (binds every derivation to the round).
    pub round: u32,
    /// Stream cipher that expands mask seeds.
    pub prg: PrgKind,
    /// Clipping, quantisation and ring parameters.
    pub encoding: EncodingParams,
    /// The cohort in graph order; with `degree` it defines the neighbour graph.
    pub graph_order: Vec<ParticipantId>,
    /// Degree `k` of the neighbour graph (`n - 1` for full SecAgg).
    pub degree: u32,
    /// Shares needed to reconstruct a secret, `t`.
    pub threshold: u32,
    /// Ring elements per input: model parameters plus one weight element.
    pub num_elements: u64,
    /// [`ModelWeights::digest`](crate::weights::ModelWeights::digest) of the
    /// model this round trains (update sum) or evaluates (evaluation sum);
    /// a participant refuses a setup that names another model than the one
    /// it received.
    pub model_digest: [u8; 32],
    /// A second input summed under the same masks, after the first
    /// (`None`: none): an update sum that also carries the evaluation of the
    /// model it started from.
    pub paired: Option<PairedSetup>,
}

/// The second input of a round that sums two: its own encoding (weights,
/// quantisation, ring) and length. It shares the first input's key
/// agreement, masks and survivors, so the coordinator learns its sum over
/// exactly the participants whose first input it learns.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedSetup {
    /// Clipping, quantisation and ring parameters of the second input.
    pub encoding: EncodingParams,
    /// Its ring elements: values plus one weight element.
    pub num_elements: u64,
}

impl RoundSetup {
    /// Where each input lies in the masked vector, and its ring.
    ///
    /// # Errors
    /// Lengths that do not fit in memory addresses.
    pub fn ring_layout(&self) -> Result<RingLayout, ProtocolError> {
        let len = |n: u64| {
            usize::try_from(n)
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| ProtocolError::InvalidConfig(format!("{n} ring elements")))
        };
        Ok(RingLayout {
            first: (len(self.num_elements)?, self.encoding.ring_bits),
            second: self
                .paired
                .map(|p| len(p.num_elements).map(|n| (n, p.encoding.ring_bits)))
                .transpose()?,
        })
    }

    /// Whether a survivor's own share of its self-mask seed is revealed and
    /// counted in stage 4: only when `2t > k + 1`. A coordinator that tells
    /// some holders of `u`'s shares "`u` survived" and others "`u` dropped"
    /// gets both secrets of `u` only if it collects `t` shares of each from
    /// distinct holders; `u`'s `k` neighbours plus `u` itself (which only
    /// ever reveals its self-mask share) are `k + 1` holders, so with
    /// `2t = k + 1` the own share would be the one that tips it.
    pub fn own_share_counts(&self) -> bool {
        2 * u64::from(self.threshold) > u64::from(self.degree) + 1
    }
}

/// A participant's signed stage-1 keys, as it advertises them and as the
/// coordinator forwards them to its neighbours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeys {
    /// Share-channel public key.
    pub c_pk: [u8; 32],
    /// Mask-agreement public key.
    pub s_pk: [u8; 32],
    /// [`self_mask_commitment`](crate::secagg::auth::self_mask_commitment)
    /// of the self-mask seed `b`.
    pub commitment: [u8; 32],
    /// The signer's credential (its DER client certificate).
    pub credential: Vec<u8>,
    /// Signature over [`keys_statement`](crate::secagg::auth::keys_statement).
    pub signature: Signature,
}

/// A neighbour's signed keys, as forwarded in stage 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKey {
    /// The neighbour.
    pub id: ParticipantId,
    /// Its keys.
    pub keys: SignedKeys,
}

/// Coordinator → participant stage messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SecAggDownload {
    /// Start of the round: the parameters; answer with `AdvertiseKeys`.
    Setup(RoundSetup),
    /// End of stage 1: the keys of the graph neighbours that advertised
    /// theirs and stay in the round (`N1(i)`); answer with `EncryptedShares`.
    NeighbourKeys {
        /// One entry per neighbour in `N1(i)`, ascending by id.
        keys: Vec<NeighbourKey>,
    },
    /// End of stage 2: the sealed share pairs addressed to this participant
    /// by the neighbours that completed stage 2 (`N2(i)`, the senders);
    /// answer with `MaskedInput` once the input is set.
    SharesForYou {
        /// `(sender, ciphertext)`, ascending by sender.
        shares: Vec<(ParticipantId, Vec<u8>)>,
    },
    /// End of stage 3: everyone who sent a masked input (`U3`, ascending);
    /// answer with `SurvivorSignature`.
    SurvivorSet {
        /// `U3`, ascending.
        survivors: Vec<ParticipantId>,
    },
    /// End of the consistency check: the signatures over `U3` of the
    /// recipient's neighbours in `N2(i) ∩ U3` that signed; answer with
    /// `UnmaskShares` once at least `t` (the recipient included) signed.
    UnmaskRequest {
        /// `(signer, signature)`, ascending by signer.
        signatures: Vec<(ParticipantId, Signature)>,
    },
    /// The round is over for the recipient: it was excluded (too few live
    /// neighbours) or the round failed. Nothing more is expected from it.
    Abort {
        /// Human-readable reason (never contains secrets).
        reason: String,
    },
}

impl SecAggDownload {
    /// Short variant name for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SecAggDownload::Setup(_) => "SecAgg::Setup",
            SecAggDownload::NeighbourKeys { .. } => "SecAgg::NeighbourKeys",
            SecAggDownload::SharesForYou { .. } => "SecAgg::SharesForYou",
            SecAggDownload::SurvivorSet { .. } => "SecAgg::SurvivorSet",
            SecAggDownload::UnmaskRequest { .. } => "SecAgg::UnmaskRequest",
            SecAggDownload::Abort { .. } => "SecAgg::Abort",
        }
    }
}

/// Participant → coordinator stage uploads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SecAggUpload {
    /// Stage 1: two fresh X25519 public keys, signed.
    AdvertiseKeys(SignedKeys),
    /// Stage 2: one sealed [`SharePair`](crate::secagg::keys::SharePair) per
    /// neighbour in `N1(i)`.
    EncryptedShares {
        /// `(recipient, ciphertext)`, ascending by recipient.
        shares: Vec<(ParticipantId, Vec<u8>)>,
    },
    /// Stage 3: the masked input, `num_elements` ring elements packed in
    /// `ring_bits` bits each.
    MaskedInput {
        /// Packed masked elements (as bytes on the wire: the same encoding
        /// as a sequence of `u8`, decoded in one copy instead of byte by
        /// byte).
        #[serde(with = "serde_bytes")]
        packed: Vec<u8>,
    },
    /// Stage 4 (consistency check): a signature over
    /// [`survivors_statement`](crate::secagg::auth::survivors_statement) of
    /// the announced `U3`.
    SurvivorSignature {
        /// The signature.
        signature: Signature,
    },
    /// Stage 5: shares of the survivors' self-mask seeds (the sender's own
    /// included) and of the dropped neighbours' mask keys; never both kinds
    /// for one owner.
    UnmaskShares {
        /// `(owner, share of owner's self-mask seed)`, for the survivors and
        /// the sender itself, ascending by owner.
        self_mask_shares: Vec<(ParticipantId, Share)>,
        /// `(owner, share of owner's mask secret key)`, for the dropped,
        /// ascending by owner.
        key_shares: Vec<(ParticipantId, Share)>,
    },
}

impl SecAggUpload {
    /// Short variant name for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SecAggUpload::AdvertiseKeys { .. } => "SecAgg::AdvertiseKeys",
            SecAggUpload::EncryptedShares { .. } => "SecAgg::EncryptedShares",
            SecAggUpload::MaskedInput { .. } => "SecAgg::MaskedInput",
            SecAggUpload::SurvivorSignature { .. } => "SecAgg::SurvivorSignature",
            SecAggUpload::UnmaskShares { .. } => "SecAgg::UnmaskShares",
        }
    }

    /// The stage (1..=5) this upload completes.
    pub fn stage(&self) -> u8 {
        match self {
            SecAggUpload::AdvertiseKeys { .. } => 1,
            SecAggUpload::EncryptedShares { .. } => 2,
            SecAggUpload::MaskedInput { .. } => 3,
            SecAggUpload::SurvivorSignature { .. } => 4,
            SecAggUpload::UnmaskShares { .. } => 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MaskedInput` in the form it had before `serde_bytes`: a sequence of
    /// `u8` (the variant index is the same, 2).
    #[derive(Serialize, Deserialize)]
    enum SeqOfBytes {
        A(()),
        B(()),
        MaskedInput { packed: Vec<u8> },
    }

    #[test]
    fn masked_input_bytes_keep_the_wire_form_of_a_byte_sequence() {
        let config = bincode::config::standard();
        let packed: Vec<u8> = (0..=255u8).cycle().take(70_001).collect();
        let now = bincode::serde::encode_to_vec(
            SecAggUpload::MaskedInput {
                packed: packed.clone(),
            },
            config,
        )
        .unwrap();
        let before = bincode::serde::encode_to_vec(
            SeqOfBytes::MaskedInput {
                packed: packed.clone(),
            },
            config,
        )
        .unwrap();
        assert_eq!(now, before);
        let (back, used): (SecAggUpload, usize) =
            bincode::serde::decode_from_slice(&before, config).unwrap();
        assert_eq!(used, before.len());
        assert_eq!(back, SecAggUpload::MaskedInput { packed });
        // A cut-off input is an error, not a shorter vector.
        assert!(
            bincode::serde::decode_from_slice::<SecAggUpload, _>(
                &before[..before.len() - 1],
                config
            )
            .is_err()
        );
    }
}
