//! greyfed participant: everything that touches a party's private images.
//!
//! - [`data`]: dataset readers (image folders, CSV manifests, `.npz`, IDX),
//!   the built-in synthetic digit set, partitioning.
//! - [`pipeline`]: the one data pipeline (load, shard, augment, encrypt, tensors).
//! - [`cipher`]: block-scrambling image encryption keyed by the shared image key.
//! - [`model`] and [`train`]: candle models, local training and evaluation.
//! - [`client`] and [`driver`]: the QUIC client and the loop that drives the
//!   protocol's participant state machine; [`dropout`]: the test hooks
//!   ([`TestHooks`]: scheduled crashes, update dumps) for simulations and
//!   tests, kept out of the other types.
//!
//! Images and the image key never leave this crate; only model updates and
//! evaluation sums do.

pub mod background;
pub mod cipher;
pub mod client;
pub mod cpu_time;
pub mod data;
pub mod dp_sgd;
pub mod driver;
pub mod dropout;
pub mod error;
pub mod layer_mask;
pub mod model;
pub mod pipeline;
pub mod train;

pub use client::ClientIdentity;
pub use driver::{LocalData, ParticipantConfig, ParticipantProgress, ParticipantReport, run};
pub use dropout::TestHooks;
pub use error::{ParticipantError, Result};
pub use pipeline::{BuiltinDigits, DataPath, DataPipeline, DataSource, Encryption};
