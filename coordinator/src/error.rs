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
    /// Shut down on request before the session finished.
    #[error("shut down after {rounds_completed} completed rounds")]
    Interrupted {
        /// Rounds completed before the shutdown.
        rounds_completed: u32,
    },
}

/// Result alias for this crate.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
