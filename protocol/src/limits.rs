//! Size limits for what a participant uploads, by message kind, sans-IO.
//!
//! A frame's header announces its payload length and the payload's first
//! byte names the message kind (the bincode variant index of [`Message`],
//! one byte for every variant), so a receiver can refuse a frame that is
//! larger than its kind can legitimately need after reading nine bytes,
//! before it buffers or decodes the rest:
//!
//! | kind | limit |
//! |---|---|
//! | `Hello` | [`HELLO_MAX_BYTES`] |
//! | `Error` | [`CONTROL_MAX_BYTES`] |
//! | `Contribution` | [`vector_upload_bytes`] of the model's parameters |
//! | `Evaluation` | [`vector_upload_bytes`] of the evaluation sum's values |
//! | anything else | refused: only the coordinator sends it |
//!
//! Until a connection is admitted to the session ([`UploadLimits::before_admission`])
//! every kind is held to the Hello's limit: a peer that has not been
//! admitted cannot make the receiver buffer a model-sized frame.
//!
//! The vector limits bound the largest honest upload of each secure
//! aggregation stage: the masked input (at most 4 bytes per ring element,
//! model parameters plus the weight element), the sealed shares and
//! unmasking shares (a few hundred bytes per neighbour, at most one entry
//! per other participant), and the stage-1 keys with their signature and
//! certificate (within [`STAGE_ENVELOPE_BYTES`]). The exact packed length of
//! a masked input is checked later, by the secure-aggregation coordinator;
//! these limits only keep an oversized frame from being read at all.

use crate::message::{EvalMetrics, Message};

/// Largest `Hello` payload: 256 class names of 128 bytes and the cipher
/// description fit with room to spare.
pub const HELLO_MAX_BYTES: usize = 64 * 1024;
/// Largest `Error` payload a participant may send.
pub const CONTROL_MAX_BYTES: usize = 64 * 1024;
/// Room for the fixed part of an aggregation upload: round numbers, enum
/// tags and length prefixes, and the stage-1 keys with their signature and
/// the signer's certificate.
pub const STAGE_ENVELOPE_BYTES: usize = 64 * 1024;
/// Room per other participant in a stage upload (a sealed share pair, or an
/// unmasking share, with its participant id and length prefix).
pub const PER_PEER_BYTES: usize = 512;
/// Encoded bytes per vector element: an `f32` of a plain update, or a ring
/// element of a masked input packed in at most 32 bits.
pub const BYTES_PER_ELEMENT: usize = 4;

/// Errors of [`UploadLimits::check`] and [`UploadKind::from_first_byte`].
/// Their text names the message kind and both sizes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// A frame is larger than its kind can legitimately need.
    #[error(
        "{kind} frame of {size} bytes exceeds the limit of {limit} bytes for {kind} messages{}",
        if *admitted { "" } else { " before the participant is admitted" }
    )]
    TooLarge {
        /// The message kind the frame announced.
        kind: &'static str,
        /// Announced payload size in bytes.
        size: usize,
        /// The limit for that kind, in bytes.
        limit: usize,
        /// Whether the sender had been admitted (the limits were the
        /// session's, not the small ones before admission).
        admitted: bool,
    },
    /// A kind only the coordinator sends.
    #[error("participants never send a {0} message")]
    NotFromParticipant(&'static str),
    /// A payload whose first byte names no message kind.
    #[error("malformed message: unknown message type {0}")]
    UnknownKind(u8),
    /// An empty payload (no message is zero bytes long).
    #[error("malformed message: empty payload")]
    Empty,
}

/// The kind of a [`Message`] as far as upload limits go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UploadKind {
    /// [`Message::Hello`].
    Hello,
    /// [`Message::Contribution`]: a model update or a secure-aggregation
    /// stage upload of the update sum.
    Contribution,
    /// [`Message::Evaluation`]: an upload to the evaluation sum.
    Evaluation,
    /// [`Message::Error`].
    Error,
    /// [`Message::Withdraw`].
    Withdraw,
    /// [`Message::TrainingTime`].
    TrainingTime,
    /// A message only the coordinator sends (named by its kind).
    FromCoordinator(&'static str),
}

impl UploadKind {
    /// The kind of `msg`.
    pub fn of(msg: &Message) -> Self {
        match msg {
            Message::Hello(_) => UploadKind::Hello,
            Message::Contribution { .. } => UploadKind::Contribution,
            Message::Evaluation { .. } => UploadKind::Evaluation,
            Message::Error { .. } => UploadKind::Error,
            Message::Withdraw { .. } => UploadKind::Withdraw,
            Message::TrainingTime { .. } => UploadKind::TrainingTime,
            Message::Welcome { .. } => UploadKind::FromCoordinator("Welcome"),
            Message::Reject { .. } => UploadKind::FromCoordinator("Reject"),
            Message::TrainRequest { .. } => UploadKind::FromCoordinator("TrainRequest"),
            Message::EvaluateRequest { .. } => UploadKind::FromCoordinator("EvaluateRequest"),
            Message::Finished { .. } => UploadKind::FromCoordinator("Finished"),
            Message::SecAgg { .. } => UploadKind::FromCoordinator("SecAgg"),
        }
    }

    /// The kind named by the first byte of an encoded [`Message`] payload
    /// (its variant index; [`crate::frame`] encodes indices below 251 in
    /// one byte, and `Message` has far fewer variants).
    ///
    /// # Errors
    /// [`LimitError::UnknownKind`] for a byte that names no variant.
    pub fn from_first_byte(byte: u8) -> Result<Self, LimitError> {
        Ok(match byte {
            0 => UploadKind::Hello,
            1 => UploadKind::FromCoordinator("Welcome"),
            2 => UploadKind::FromCoordinator("Reject"),
            3 => UploadKind::FromCoordinator("TrainRequest"),
            4 => UploadKind::Contribution,
            5 => UploadKind::FromCoordinator("EvaluateRequest"),
            6 => UploadKind::Evaluation,
            7 => UploadKind::FromCoordinator("Finished"),
            8 => UploadKind::FromCoordinator("SecAgg"),
            9 => UploadKind::Error,
            10 => UploadKind::Withdraw,
            11 => UploadKind::TrainingTime,
            other => return Err(LimitError::UnknownKind(other)),
        })
    }

    /// The kind's name, as [`Message::kind`] has it.
    pub fn name(self) -> &'static str {
        match self {
            UploadKind::Hello => "Hello",
            UploadKind::Contribution => "Contribution",
            UploadKind::Evaluation => "Evaluation",
            UploadKind::Error => "Error",
            UploadKind::Withdraw => "Withdraw",
            UploadKind::TrainingTime => "TrainingTime",
            UploadKind::FromCoordinator(name) => name,
        }
    }
}

/// What the session's upload limits depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionShape {
    /// Parameters of the session's model.
    pub parameters: usize,
    /// Classes the model predicts (the evaluation sum holds `2 + K²`
    /// values, see [`EvalMetrics::sum_len`]).
    pub classes: usize,
    /// Most participants a round may hold (bounds the per-neighbour entries
    /// of a stage upload).
    pub peers: usize,
}

/// The largest encoded upload of a vector of `elements` values (a plain
/// update, or a masked input of `elements + 1` ring elements) or of any
/// other stage upload of its sum, from a round of at most `peers`
/// participants. Saturates instead of overflowing.
pub fn vector_upload_bytes(elements: usize, peers: usize) -> usize {
    elements
        .saturating_add(1)
        .saturating_mul(BYTES_PER_ELEMENT)
        .saturating_add(PER_PEER_BYTES.saturating_mul(peers))
        .saturating_add(STAGE_ENVELOPE_BYTES)
}

/// An upper bound on the encoded size of a frame carrying a model of
/// `parameters` parameters (a `TrainRequest` or `EvaluateRequest`): 4 bytes
/// per parameter plus room for tensor names and shapes. Saturates.
pub fn model_frame_bytes(parameters: usize) -> usize {
    parameters
        .saturating_mul(BYTES_PER_ELEMENT)
        .saturating_add(STAGE_ENVELOPE_BYTES)
}

/// Per-kind limits on the payload of a participant's frames, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest `Hello`.
    pub hello: usize,
    /// Largest `Error`.
    pub control: usize,
    /// Largest `Contribution`.
    pub contribution: usize,
    /// Largest `Evaluation`.
    pub evaluation: usize,
    /// Whether these are an admitted participant's limits (for the text of
    /// [`LimitError::TooLarge`]).
    pub admitted: bool,
}

impl UploadLimits {
    /// Limits for a connection the session has not admitted yet: every kind
    /// at most [`HELLO_MAX_BYTES`] (and at most `max_frame`).
    pub fn before_admission(max_frame: usize) -> Self {
        let cap = HELLO_MAX_BYTES.min(max_frame);
        Self {
            hello: cap,
            control: cap,
            contribution: cap,
            evaluation: cap,
            admitted: false,
        }
    }

    /// Limits for an admitted participant of a session of `shape`, none
    /// above `max_frame`.
    pub fn for_session(shape: SessionShape, max_frame: usize) -> Self {
        let peers = shape.peers.max(1);
        let eval_len = EvalMetrics::sum_len(shape.classes.min(crate::message::MAX_CLASSES));
        Self {
            hello: HELLO_MAX_BYTES.min(max_frame),
            control: CONTROL_MAX_BYTES.min(max_frame),
            // An update sum may carry the evaluation of its model too (its
            // elements after the update's, see `PairedSetup`).
            contribution: vector_upload_bytes(
                shape.parameters.saturating_add(eval_len).saturating_add(1),
                peers,
            )
            .min(max_frame),
            evaluation: vector_upload_bytes(eval_len, peers).min(max_frame),
            admitted: true,
        }
    }

    /// The limit for `kind`; `None` for kinds participants never send.
    pub fn for_kind(&self, kind: UploadKind) -> Option<usize> {
        match kind {
            UploadKind::Hello => Some(self.hello),
            UploadKind::Error | UploadKind::Withdraw | UploadKind::TrainingTime => {
                Some(self.control)
            }
            UploadKind::Contribution => Some(self.contribution),
            UploadKind::Evaluation => Some(self.evaluation),
            UploadKind::FromCoordinator(_) => None,
        }
    }

    /// The largest limit of any kind: a frame header announcing more can be
    /// refused before its kind is known.
    pub fn largest(&self) -> usize {
        self.hello
            .max(self.control)
            .max(self.contribution)
            .max(self.evaluation)
    }

    /// Checks a frame of `kind` whose payload is `size` bytes.
    ///
    /// # Errors
    /// [`LimitError::TooLarge`] naming the kind and both sizes, or
    /// [`LimitError::NotFromParticipant`].
    pub fn check(&self, kind: UploadKind, size: usize) -> Result<(), LimitError> {
        let limit = self
            .for_kind(kind)
            .ok_or(LimitError::NotFromParticipant(kind.name()))?;
        if size > limit {
            return Err(LimitError::TooLarge {
                kind: kind.name(),
                size,
                limit,
                admitted: self.admitted,
            });
        }
        Ok(())
    }

    /// Checks an encoded payload: its kind (from its first byte) and its
    /// size. Returns the kind.
    ///
    /// # Errors
    /// As [`check`](Self::check), plus [`LimitError::Empty`] and
    /// [`LimitError::UnknownKind`].
    pub fn check_payload(&self, payload: &[u8]) -> Result<UploadKind, LimitError> {
        let &first = payload.first().ok_or(LimitError::Empty)?;
        let kind = UploadKind::from_first_byte(first)?;
        self.check(kind, payload.len())?;
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        PROTOCOL_VERSION,
        cipher::CipherSpec,
        frame::{DEFAULT_MAX_FRAME, HEADER_LEN, encode_frame},
        message::{
            AggregationKind, AggregationPayload, GlobalModel, Hello, MAX_CLASS_NAME, MAX_CLASSES,
            ModelSpec, SessionInfo, SumKind, TrainingConfig,
        },
        secagg::message::{SecAggDownload, SecAggUpload},
        weights::{ModelWeights, NamedTensor},
    };

    fn payload(msg: &Message) -> Vec<u8> {
        encode_frame(msg, DEFAULT_MAX_FRAME).unwrap()[HEADER_LEN..].to_vec()
    }

    fn weights(n: usize) -> ModelWeights {
        ModelWeights::new(vec![
            NamedTensor::new("layer.weight", vec![n], vec![0.5; n]).unwrap(),
        ])
        .unwrap()
    }

    /// One message of every variant (the match in `UploadKind::of` is
    /// exhaustive, so a new variant fails to compile there first).
    fn one_of_each() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                train_samples: 1,
                test_samples: 1,
                image_size: (28, 28),
                classes: vec!["a".into(), "b".into()],
                cipher: None,
            }),
            Message::Welcome {
                participant_id: 3,
                session: SessionInfo {
                    session_id: 1,
                    model: ModelSpec::blocknet_28x28(4),
                    training: TrainingConfig::default(),
                    rounds: 2,
                    aggregation: AggregationKind::Plain,
                },
                model: None,
            },
            Message::Reject { reason: "x".into() },
            Message::TrainRequest {
                evaluates: None,
                sealed: None,
                round: 1,
                global: GlobalModel::Held { digest: [7; 32] },
                seed: 2,
            },
            Message::Contribution {
                round: 1,
                train_loss: 0.5,
                payload: AggregationPayload::Plain {
                    update: vec![1.0],
                    weight: 1.0,
                },
            },
            Message::EvaluateRequest {
                sealed: None,
                round: 1,
                global: Arc::new(weights(2)).into(),
            },
            Message::Evaluation {
                round: 1,
                payload: AggregationPayload::Plain {
                    update: vec![1.0, 0.0],
                    weight: 1.0,
                },
            },
            Message::Finished {
                rounds_completed: 1,
            },
            Message::SecAgg {
                round: 1,
                sum: SumKind::Update,
                msg: SecAggDownload::Abort { reason: "x".into() },
            },
            Message::Error {
                message: "x".into(),
            },
            Message::Withdraw { round: 1 },
            Message::TrainingTime {
                round: 1,
                cpu_secs: 0.5,
            },
        ]
    }

    #[test]
    fn the_first_payload_byte_names_the_kind_of_every_variant() {
        let msgs = one_of_each();
        assert_eq!(msgs.len(), 12, "one message per variant");
        for msg in &msgs {
            let bytes = payload(msg);
            let kind = UploadKind::from_first_byte(bytes[0]).unwrap();
            assert_eq!(kind, UploadKind::of(msg), "{}", msg.kind());
            // `Message::kind` names a SecAgg message by its stage message.
            assert!(msg.kind().starts_with(kind.name()), "{}", msg.kind());
        }
        assert_eq!(
            UploadKind::from_first_byte(12),
            Err(LimitError::UnknownKind(12))
        );
        assert_eq!(
            UploadKind::from_first_byte(251),
            Err(LimitError::UnknownKind(251))
        );
    }

    #[test]
    fn the_largest_valid_hello_fits_before_admission() {
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            train_samples: u64::MAX,
            test_samples: u64::MAX,
            image_size: (u32::MAX, u32::MAX),
            classes: (0..MAX_CLASSES)
                .map(|i| format!("{i:0>width$}", width = MAX_CLASS_NAME))
                .collect(),
            cipher: Some(CipherSpec {
                steps: "le".parse().unwrap(),
                block_size: u32::MAX,
                key_id: "f".repeat(64),
            }),
        });
        let bytes = payload(&hello);
        let limits = UploadLimits::before_admission(DEFAULT_MAX_FRAME);
        assert_eq!(limits.check_payload(&bytes), Ok(UploadKind::Hello));
        assert!(bytes.len() < HELLO_MAX_BYTES / 2 + 1024, "{}", bytes.len());
    }

    #[test]
    fn before_admission_every_kind_is_held_to_the_hello_limit() {
        let limits = UploadLimits::before_admission(DEFAULT_MAX_FRAME);
        assert_eq!(limits.largest(), HELLO_MAX_BYTES);
        for kind in [
            UploadKind::Hello,
            UploadKind::Contribution,
            UploadKind::Evaluation,
            UploadKind::Error,
        ] {
            assert_eq!(limits.check(kind, HELLO_MAX_BYTES), Ok(()));
            let err = limits.check(kind, HELLO_MAX_BYTES + 1).unwrap_err();
            assert!(
                matches!(
                    err,
                    LimitError::TooLarge {
                        admitted: false,
                        ..
                    }
                ),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(kind.name()) && text.contains("before the participant is admitted"),
                "{text}"
            );
        }
        // A smaller configured maximum wins.
        assert_eq!(UploadLimits::before_admission(1000).largest(), 1000);
    }

    #[test]
    fn coordinator_kinds_and_junk_are_refused_whatever_their_size() {
        let limits = UploadLimits::for_session(
            SessionShape {
                parameters: 1000,
                classes: 10,
                peers: 10,
            },
            DEFAULT_MAX_FRAME,
        );
        for msg in one_of_each() {
            let bytes = payload(&msg);
            match UploadKind::of(&msg) {
                UploadKind::FromCoordinator(name) => assert_eq!(
                    limits.check_payload(&bytes),
                    Err(LimitError::NotFromParticipant(name))
                ),
                kind => assert_eq!(limits.check_payload(&bytes), Ok(kind)),
            }
        }
        assert_eq!(limits.check_payload(&[]), Err(LimitError::Empty));
        assert_eq!(
            limits.check_payload(&[0xff, 0, 0]),
            Err(LimitError::UnknownKind(0xff))
        );
        assert!(
            LimitError::NotFromParticipant("TrainRequest")
                .to_string()
                .contains("never send a TrainRequest")
        );
    }

    #[test]
    fn honest_model_sized_uploads_fit_and_twice_that_does_not() {
        let params = 100_000;
        let peers = 50;
        let limits = UploadLimits::for_session(
            SessionShape {
                parameters: params,
                classes: 10,
                peers,
            },
            DEFAULT_MAX_FRAME,
        );
        assert!(limits.admitted);
        let plain = |n: usize| Message::Contribution {
            round: u32::MAX,
            train_loss: 1.0,
            payload: AggregationPayload::Plain {
                update: vec![1.0; n],
                weight: f64::MAX,
            },
        };
        let masked = |n: usize| Message::Contribution {
            round: u32::MAX,
            train_loss: 1.0,
            payload: AggregationPayload::SecAgg {
                round: u32::MAX,
                msg: SecAggUpload::MaskedInput {
                    packed: vec![0xff; n],
                },
            },
        };
        // A plain update, and a masked input of params + 1 ring elements
        // at the widest ring (32 bits).
        for honest in [plain(params), masked(4 * (params + 1))] {
            let bytes = payload(&honest);
            assert_eq!(
                limits.check_payload(&bytes),
                Ok(UploadKind::Contribution),
                "{} bytes",
                bytes.len()
            );
        }
        // Sealed shares for every other participant.
        let shares = Message::Contribution {
            round: u32::MAX,
            train_loss: 1.0,
            payload: AggregationPayload::SecAgg {
                round: u32::MAX,
                msg: SecAggUpload::EncryptedShares {
                    shares: (0..peers as u32)
                        .map(|id| (u32::MAX - id, vec![7; 120]))
                        .collect(),
                },
            },
        };
        assert_eq!(
            limits.check_payload(&payload(&shares)),
            Ok(UploadKind::Contribution)
        );
        let oversized = payload(&plain(2 * params));
        let err = limits.check_payload(&oversized).unwrap_err();
        assert!(
            matches!(
                err,
                LimitError::TooLarge {
                    kind: "Contribution",
                    admitted: true,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("{} bytes exceeds", oversized.len())),
            "{err}"
        );
    }

    #[test]
    fn evaluations_are_small_unless_the_classes_are_many() {
        let shape = SessionShape {
            parameters: 10_000_000,
            classes: 10,
            peers: 10,
        };
        let limits = UploadLimits::for_session(shape, DEFAULT_MAX_FRAME);
        assert!(limits.evaluation < 100 * 1024, "{}", limits.evaluation);
        let sum_len = EvalMetrics::sum_len(10);
        let evaluation = |n: usize| Message::Evaluation {
            round: u32::MAX,
            payload: AggregationPayload::Plain {
                update: vec![0.25; n],
                weight: f64::MAX,
            },
        };
        assert_eq!(
            limits.check_payload(&payload(&evaluation(sum_len))),
            Ok(UploadKind::Evaluation)
        );
        // A model-sized "evaluation" is refused.
        assert!(matches!(
            limits.check_payload(&payload(&evaluation(100_000))),
            Err(LimitError::TooLarge {
                kind: "Evaluation",
                ..
            })
        ));
        // 256 classes: a 65 538-value sum still fits.
        let wide = UploadLimits::for_session(
            SessionShape {
                classes: MAX_CLASSES,
                ..shape
            },
            DEFAULT_MAX_FRAME,
        );
        assert_eq!(
            wide.check_payload(&payload(&evaluation(EvalMetrics::sum_len(MAX_CLASSES)))),
            Ok(UploadKind::Evaluation)
        );
    }

    #[test]
    fn limits_never_exceed_the_configured_maximum_nor_overflow() {
        let huge = SessionShape {
            parameters: usize::MAX,
            classes: usize::MAX,
            peers: usize::MAX,
        };
        let limits = UploadLimits::for_session(huge, 1 << 20);
        assert_eq!(limits.largest(), 1 << 20);
        assert_eq!(vector_upload_bytes(usize::MAX, usize::MAX), usize::MAX);
        assert_eq!(model_frame_bytes(usize::MAX), usize::MAX);
        let small = UploadLimits::for_session(
            SessionShape {
                parameters: 0,
                classes: 0,
                peers: 0,
            },
            DEFAULT_MAX_FRAME,
        );
        assert!(small.contribution >= STAGE_ENVELOPE_BYTES);
    }

    #[test]
    fn a_model_frame_fits_its_estimate() {
        let model = Arc::new(weights(50_000));
        let frame = encode_frame(
            &Message::EvaluateRequest {
                sealed: None,
                round: u32::MAX,
                global: model.into(),
            },
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        assert!(frame.len() <= model_frame_bytes(50_000));
        assert!(frame.len() > model_frame_bytes(50_000) - STAGE_ENVELOPE_BYTES);
    }
}
