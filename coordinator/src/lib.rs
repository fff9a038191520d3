//! greyfed coordinator: accepts participants over QUIC (quinn + rustls,
//! TLS 1.3), drives the sans-IO session from `greyfed-protocol`, applies the
//! server strategy, and records metrics and the final model.
//!
//! The coordinator never sees an image or the image key (unless an operator
//! hands it the key for [`central`] evaluation), and with secure aggregation
//! never an individual update or evaluation either.
//!
//! - [`auth`]: participant authentication: the allow list of client
//!   certificates, its verifier and SIGHUP reloads.
//! - [`central`]: optional central evaluation (needs the image key, off by default).
//! - [`checkpoint`]: per-round checkpoints and `--resume`.
//! - [`config`]: the run configuration, [`CoordinatorConfig`].
//! - [`events`]: progress events for displays ([`CoordinatorEvent`]).
//! - [`server`]: the QUIC endpoint and the driver loop ([`Coordinator`]);
//!   its connections (authenticated peers, reader and writer tasks) are in
//!   the private `connection` module.
//! - [`run_record`]: the run's settings as one typed record,
//!   [`RunRecord`], written to `OUT/run.json` and kept in checkpoints.
//! - [`strategy`]: FedAvg and friends.
//! - [`metrics`]: `metrics.jsonl` records.
//! - [`privacy`]: participant-level DP through the secure sum: settings,
//!   the `run.json` record and the per-round ε ledger.
//! - [`pki`]: the deployment CA, certificate issuance, fingerprints and the
//!   identity a participant certificate carries.
//! - [`tls`]: the QUIC server configuration (mutual TLS).

pub mod auth;
pub mod central;
pub mod checkpoint;
pub mod config;
mod connection;
pub mod error;
pub mod events;
pub mod metrics;
pub mod pki;
pub mod privacy;
pub mod run_record;
pub mod server;
pub mod strategy;
pub mod tls;

pub use checkpoint::Checkpoint;
pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};
pub use events::CoordinatorEvent;
pub use run_record::RunRecord;
pub use server::{Coordinator, RunReport};
