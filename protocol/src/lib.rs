//! greyfed wire protocol, sans-IO: message types, framing, model weights,
//! aggregation and the session state machines of both sides.
//!
//! Nothing in this crate opens a socket, reads a clock or spawns a task: the
//! coordinator and participant crates drive these state machines over QUIC,
//! and the tests drive them in memory with a virtual clock.
//!
//! - [`cipher`]: the public image-cipher configuration ([`CipherSpec`](cipher::CipherSpec)).
//! - [`message`]: every message and the configuration types they carry.
//! - [`frame`]: length-prefixed, versioned bincode framing with a size limit.
//! - [`weights`]: [`ModelWeights`], with a safetensors round trip.
//! - [`model_file`]: [`ModelFile`](model_file::ModelFile), a trained model that says what it expects.
//! - [`aggregate`]: the pluggable [`Aggregator`](aggregate::Aggregator) and plain summing.
//! - [`session`]: the coordinator's session state machine.
//! - [`participant`]: the participant's session state machine.
//! - [`secagg`]: secure aggregation (SecAgg/SecAgg+), sans-IO.
//! - [`privacy`]: differential-privacy accounting (RDP of the subsampled Gaussian).
//! - [`transport`]: ALPN and timing constants both QUIC endpoints share.

pub mod aggregate;
pub mod cipher;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod model_delta;
pub mod model_file;
pub mod participant;
pub mod privacy;
pub mod secagg;
pub mod session;
pub mod transport;
pub mod weights;

#[cfg(test)]
mod tests;

pub use error::ProtocolError;
pub use message::*;
pub use weights::{ModelWeights, NamedTensor};

/// Version of the wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 12;
