//! Transport parameters both sides must agree on. Pure constants: the QUIC
//! endpoints themselves live in the coordinator and participant crates.

use std::time::Duration;

/// TLS ALPN protocol id; carries the protocol version so that mismatched
/// releases fail at the handshake with a clear error.
pub const ALPN: &[u8] = b"greyfed/1";

/// QUIC keep-alive interval: keeps idle connections open during long local
/// training and lets each side notice a vanished peer.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// A connection with no traffic (keep-alives included) for this long is
/// considered dead. A participant killed abruptly is noticed after this time
/// at the latest.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
