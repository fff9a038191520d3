//! The coordinator crate's single error type.

use std::path::PathBuf;

use thiserror::Error;

/// Errors of the coordinator: configuration, TLS, I/O and protocol.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Certificates or keys are unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// An allow-list file or entry is malformed (see [`crate::auth`]).
    #[error("allow list {source_name}: {}", at_line(*line, reason))]
    AllowList {
        /// The file (or what the text came from).
        source_name: String,
        /// The offending line, from 1; 0 when no single line is at fault.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A participant certificate is valid but not admitted by the allow list.
    #[error("not admitted: {0}")]
    NotAdmitted(String),
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A protocol error from the session state machine.
    #[error(transparent)]
    Protocol(#[from] greyfed_protocol::ProtocolError),
    /// A checkpoint is corrupt, inconsistent or does not fit this run.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The session ended before all rounds ran.
    #[error("session aborted: {0}")]
    Aborted(String),
    /// Every participant id of this session has been handed out (ids are
    /// never reused or wrapped); no further connection can be admitted.
    #[error(
        "participant ids exhausted: {} connections were given an id; restart the coordinator",
        u64::from(u32::MAX)
    )]
    ParticipantIdsExhausted,
    /// Shut down on request before the session finished.
    #[error("shut down after {rounds_completed} completed rounds")]
    Interrupted {
        /// Rounds completed before the shutdown.
        rounds_completed: u32,
    },
}

fn at_line(line: usize, reason: &str) -> String {
    if line == 0 {
        reason.to_string()
    } else {
        format!("line {line}: {reason}")
    }
}

/// Result alias for this crate.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
