//! The participant crate's single error type.

use std::path::PathBuf;

use thiserror::Error;

/// Errors from data loading, image encryption, training and the client.
///
/// Messages never contain key material: key errors name the file, not its
/// contents.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ParticipantError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An IDX file is malformed (bad magic, truncated, inconsistent sizes).
    #[error("{}: invalid IDX file: {reason}", path.display())]
    Idx {
        /// The file involved (or a description of the in-memory source).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A dataset is inconsistent or unusable (label out of range, sizes differ, missing files).
    #[error("dataset: {0}")]
    Dataset(String),
    /// A partitioning request cannot be satisfied.
    #[error("partition: {0}")]
    Partition(String),
    /// An image key file is missing, malformed or too widely readable.
    #[error("image key {}: {reason}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong (never the key itself).
        reason: String,
    },
    /// A cipher configuration does not fit the images (e.g. block size does not divide the size).
    #[error("cipher: {0}")]
    Cipher(String),
    /// The model specification or weights do not fit together.
    #[error("model: {0}")]
    Model(String),
    /// An error inside candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A protocol-level error (framing, version, unexpected message).
    #[error(transparent)]
    Protocol(#[from] greyfed_protocol::ProtocolError),
    /// TLS configuration failed (bad CA file, no usable certificate).
    #[error("tls: {0}")]
    Tls(String),
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(String),
    /// The coordinator refused this participant.
    #[error("rejected by the coordinator: {0}")]
    Rejected(String),
}

/// Result alias for this crate.
pub type Result<T, E = ParticipantError> = std::result::Result<T, E>;
